"""CRL upkeep: a normal pki run re-signs a CRL that an older run signed and that now expires within
pki_crl_renew_before_days, so devices are not locked out when the old CRL's nextUpdate passes; the
window must be shorter than the CRL's lifetime."""

from __future__ import annotations

import datetime as dt

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

DAY = dt.timedelta(days=1)


def _sign_old_crl(pki, tools, last_update, next_update, ca_dir=None):
    """A CRL as an older run would have left it: signed by the CA (in ca_dir, default ca/), same
    (empty) revocation list."""
    ca_dir = ca_dir or pki.pki / "ca"
    ca = x509.load_pem_x509_certificate((ca_dir / "ca.crt").read_bytes())
    key = serialization.load_pem_private_key((ca_dir / "ca.key").read_bytes(), tools.PASSPHRASE.encode())
    crl = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.subject)
        .last_update(last_update)
        .next_update(next_update)
        .sign(key, hashes.SHA256())
    )
    (ca_dir / "crl.pem").write_bytes(crl.public_bytes(serialization.Encoding.PEM))


def _next_update(tools, crl):
    text = tools.openssl("crl", "-in", str(crl), "-noout", "-nextupdate").stdout.split("=", 1)[1].strip()
    return dt.datetime.strptime(text, "%b %d %H:%M:%S %Y %Z").replace(tzinfo=dt.UTC)


def _verify_at(tools, pki, crl, when):
    ca = pki.pki / "ca" / "ca.crt"
    cert = pki.pki / "devices" / "dev-a.crt"
    return tools.openssl(
        "verify", "-crl_check", "-attime", str(int(when.timestamp())), "-purpose", "sslclient",
        "-CAfile", str(ca), "-CRLfile", str(crl), str(cert), check=False,
    )  # fmt: skip


def test_a_crl_from_an_older_run_expiring_in_the_window_is_resigned(copy_of_issued, tools, tmp_path):
    pki = copy_of_issued
    now = dt.datetime.now(dt.UTC)
    crl = pki.pki / "ca" / "crl.pem"
    # Signed 27 days ago with the default 30-day lifetime: 3 days left, inside the 10-day window.
    _sign_old_crl(pki, tools, now - 27 * DAY, now + 3 * DAY)
    old = tmp_path / "old-crl.pem"
    old.write_bytes(crl.read_bytes())
    old_next = _next_update(tools, old)

    run = pki.run()
    assert run.rc == 0, run.output[-3000:]
    assert run.changed == 1, run.output[-3000:]  # the CRL, nothing else
    new_next = _next_update(tools, crl)
    assert dt.timedelta(days=29) < new_next - now <= dt.timedelta(days=30, minutes=5)

    later = old_next + DAY
    with_old = _verify_at(tools, pki, old, later)
    assert with_old.returncode != 0
    assert "CRL has expired" in with_old.stdout + with_old.stderr
    with_new = _verify_at(tools, pki, crl, later)
    assert with_new.returncode == 0, with_new.stdout + with_new.stderr

    # Re-signed once: the next run keeps the new CRL byte for byte.
    kept = crl.read_bytes()
    again = pki.run()
    assert again.rc == 0 and again.changed == 0, again.output[-3000:]
    assert crl.read_bytes() == kept


# (5, 10) is in test_pki_bad_inputs.py; equal is the edge case.
def test_a_crl_window_as_long_as_the_lifetime_is_refused(copy_of_issued, tools):
    pki = copy_of_issued
    before = tools.tree_hash(pki.pki)
    run = pki.run(extra={"pki_crl_validity_days": 10, "pki_crl_renew_before_days": 10})
    assert run.rc != 0
    assert "pki_crl_validity_days" in run.output and "pki_crl_renew_before_days" in run.output
    assert tools.tree_hash(pki.pki) == before


def test_the_new_cas_crl_follows_its_window_and_its_revocation_list(copy_of_issued, tools):
    """During a rotation the new CA's CRL (ca-next/crl.pem, signed by the same tasks as the CA's) is
    kept outside the renewal window, re-signed inside it, and lists ca-next/revoked.yml; ca/crl.pem is
    left alone."""
    pki = copy_of_issued
    run = pki.run(extra={"pki_ca_rotation": "introduce"})
    assert run.rc == 0, run.output[-3000:]
    nxt, ca_crl = pki.pki / "ca-next", pki.pki / "ca" / "crl.pem"
    ca_crl_before = ca_crl.read_bytes()
    now = dt.datetime.now(dt.UTC)

    # 15 days left: outside the 10-day window, kept byte for byte by a run without a rotation phase.
    _sign_old_crl(pki, tools, now - 15 * DAY, now + 15 * DAY, ca_dir=nxt)
    kept = (nxt / "crl.pem").read_bytes()
    run = pki.run()
    assert run.rc == 0 and run.changed == 0, run.output[-3000:]
    assert (nxt / "crl.pem").read_bytes() == kept

    # 3 days left: re-signed for the full lifetime, by the new CA.
    _sign_old_crl(pki, tools, now - 27 * DAY, now + 3 * DAY, ca_dir=nxt)
    run = pki.run()
    assert run.rc == 0 and run.changed == 1, run.output[-3000:]
    lifetime = _next_update(tools, nxt / "crl.pem") - now
    assert dt.timedelta(days=29) < lifetime <= dt.timedelta(days=30, minutes=5)

    # An entry of the new CA's own revocation list goes into its CRL, not into the CA's.
    (nxt / "revoked.yml").write_text(
        "---\npki_revoked_certificates:\n"
        "  - {serial_number: 4242, revocation_date: '20260101000000Z', device_id: dev-x,"
        " reason: key_compromise}\n"
    )
    run = pki.run()
    assert run.rc == 0 and run.changed == 1, run.output[-3000:]
    crl = str(nxt / "crl.pem")
    text = tools.openssl("crl", "-in", crl, "-CAfile", str(nxt / "ca.crt"), "-noout", "-text")
    assert "Serial Number: 1092" in text.stdout and "Key Compromise" in text.stdout, text.stdout
    assert ca_crl.read_bytes() == ca_crl_before
