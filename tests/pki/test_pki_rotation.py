"""CA rotation through pki_ca_rotation: introduce → switch → retire, on the controller's PKI tree.

One test walks the whole rotation on a copy of the session PKI, because each phase starts from the
state the previous one left; out-of-order phases are tried at every step and must change nothing.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

LEAVES = ["brokers/localhost", "brokers/broker2", "devices/dev-a", "devices/esp32-0042", "devices/dev-c"]
DEVICES = [leaf for leaf in LEAVES if leaf.startswith("devices/")]
BROKERS = [leaf for leaf in LEAVES if leaf.startswith("brokers/")]
PEM = re.compile(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----\n", re.S)


def _refused(pki, tools, phase: str) -> None:
    """A phase out of order fails naming the variable and leaves the tree byte-for-byte as it was."""
    before = tools.tree_hash(pki.pki)
    run = pki.run(extra={"pki_ca_rotation": phase})
    assert run.rc != 0, run.output[-2000:]
    assert f"pki_ca_rotation={phase} is out of order" in run.output, run.output[-2000:]
    assert tools.tree_hash(pki.pki) == before


def _steady(pki, phase: str) -> None:
    """A second run of the same phase, and a run with none, change nothing."""
    for extra in ({"pki_ca_rotation": phase}, {}):
        run = pki.run(extra=extra)
        assert run.rc == 0 and run.changed == 0, run.output[-3000:]


def _issued_by(tools, ca, pki, leaves) -> bool:
    purposes = {"brokers": "sslserver", "devices": "sslclient"}
    return all(tools.verifies(ca, pki.pki / f"{leaf}.crt", purposes[leaf.split("/")[0]]) for leaf in leaves)


def test_rotation_phases_in_order_and_out_of_order(copy_of_issued, tools, tmp_path):
    pki = copy_of_issued
    ca_dir, nxt = pki.pki / "ca", pki.pki / "ca-next"
    old_ca, old_key = (ca_dir / "ca.crt").read_bytes(), (ca_dir / "ca.key").read_bytes()
    old_serial = tools.openssl("x509", "-in", str(ca_dir / "ca.crt"), "-noout", "-serial").stdout
    old_serial = int(old_serial.strip().split("=", 1)[1], 16)

    # Nothing to switch to or retire yet.
    _refused(pki, tools, "switch")
    _refused(pki, tools, "retire")

    # Check mode of introduce writes nothing.
    before = tools.tree_hash(pki.pki)
    check = pki.run("--check", "--diff", extra={"pki_ca_rotation": "introduce"})
    assert check.rc == 0 and check.changed > 0, check.output[-3000:]
    assert tools.tree_hash(pki.pki) == before

    # introduce: a second CA, trusted alongside; devices move to it, brokers stay.
    run = pki.run(extra={"pki_ca_rotation": "introduce"})
    assert run.rc == 0, run.output[-3000:]
    assert (nxt / "phase").read_text() == "introduce\n"
    assert (ca_dir / "ca.crt").read_bytes() == old_ca
    new_cn = tools.openssl("x509", "-in", str(nxt / "ca.crt"), "-noout", "-subject").stdout
    assert re.search(r"CN ?= ?esp32-mqtt-fleet CA \d{8}T\d{6}Z$", new_cn.strip()), new_cn
    assert _issued_by(tools, nxt / "ca.crt", pki, DEVICES)
    assert _issued_by(tools, ca_dir / "ca.crt", pki, BROKERS)
    bundle = (ca_dir / "bundle.pem").read_text()
    assert PEM.findall(bundle) == PEM.findall(old_ca.decode() + (nxt / "ca.crt").read_text())
    # The new CA has its own CRL (the broker needs one per trusted issuer).
    assert (
        tools.openssl("crl", "-in", str(nxt / "crl.pem"), "-CAfile", str(nxt / "ca.crt"), "-noout").returncode
        == 0
    )
    _steady(pki, "introduce")
    _refused(pki, tools, "retire")

    # switch: the brokers' certificates come from the new CA too.
    run = pki.run(extra={"pki_ca_rotation": "switch"})
    assert run.rc == 0, run.output[-3000:]
    assert (nxt / "phase").read_text() == "switch\n"
    assert _issued_by(tools, nxt / "ca.crt", pki, LEAVES)
    chain = (pki.pki / "brokers" / "localhost.chain.pem").read_text()
    assert PEM.findall(chain)[1] == (nxt / "ca.crt").read_text()
    _steady(pki, "switch")
    _refused(pki, tools, "introduce")

    # retire: the new CA becomes the CA, the old certificate is archived, the old key is gone.
    new_ca, new_key = (nxt / "ca.crt").read_bytes(), (nxt / "ca.key").read_bytes()
    leaves_before = {leaf: (pki.pki / f"{leaf}.crt").read_bytes() for leaf in LEAVES}
    # Check mode of retire writes nothing (ca-retired/ does not exist yet).
    before = tools.tree_hash(pki.pki)
    check = pki.run("--check", "--diff", extra={"pki_ca_rotation": "retire"})
    assert check.rc == 0 and check.changed > 0, check.output[-3000:]
    assert tools.tree_hash(pki.pki) == before
    run = pki.run(extra={"pki_ca_rotation": "retire"})
    assert run.rc == 0, run.output[-3000:]
    assert not nxt.exists()
    assert (ca_dir / "ca.crt").read_bytes() == new_ca
    assert (ca_dir / "ca.key").read_bytes() == new_key
    assert (pki.pki / "ca-retired" / f"{old_serial}.crt").read_bytes() == old_ca
    assert not any(p.is_file() and p.read_bytes() == old_key for p in pki.pki.rglob("*"))
    assert PEM.findall((ca_dir / "bundle.pem").read_text()) == [new_ca.decode()]
    assert {leaf: (pki.pki / f"{leaf}.crt").read_bytes() for leaf in LEAVES} == leaves_before
    assert (
        tools.openssl(
            "crl", "-in", str(ca_dir / "crl.pem"), "-CAfile", str(ca_dir / "ca.crt"), "-noout"
        ).returncode
        == 0
    )
    _steady(pki, "retire")

    # A later rotation starts again from introduce.
    _refused(pki, tools, "switch")


def test_switch_waits_for_every_device(copy_of_issued, tools):
    """A device still holding a certificate from the old CA blocks the broker's switch."""
    pki = copy_of_issued
    run = pki.run(extra={"pki_ca_rotation": "introduce"})
    assert run.rc == 0, run.output[-3000:]
    # Put one device back on an old-CA certificate (as a board that was not re-provisioned would be).
    (pki.pki / "devices" / "dev-c.crt").write_bytes(_old_device_cert(pki, tools, "dev-c"))
    before = tools.tree_hash(pki.pki)
    run = pki.run(extra={"pki_ca_rotation": "switch", "pki_issue_device_certs": False})
    assert run.rc != 0
    assert "not yet issued by the new CA: dev-c" in run.output, run.output[-2000:]
    assert tools.tree_hash(pki.pki) == before


def _old_device_cert(pki, tools, device: str) -> bytes:
    """A client certificate for device signed by the OLD CA, made with openssl."""
    base = pki.base
    csr = base / f"{device}.csr"
    tools.openssl(
        "req",
        "-new",
        "-key",
        str(pki.pki / "devices" / f"{device}.key"),
        "-subj",
        f"/CN={device}",
        "-out",
        str(csr),
    )
    out = base / f"{device}.old.crt"
    tools.openssl(
        "x509",
        "-req",
        "-in",
        str(csr),
        "-CA",
        str(pki.pki / "ca" / "ca.crt"),
        "-CAkey",
        str(pki.pki / "ca" / "ca.key"),
        "-passin",
        f"pass:{tools.PASSPHRASE}",
        "-days",
        "30",
        "-out",
        str(out),
    )
    return out.read_bytes()


def test_revocations_before_and_during_a_rotation_hold_for_either_ca(copy_of_issued, tools):
    """While both CAs are trusted a device may hold a certificate of either; the broker checks each
    against its issuer's CRL, so playbooks/revoke.yml must put the serial on both CAs' CRLs. A device
    revoked BEFORE the rotation keeps its old certificate: it must not hold the rotation up, and it must
    stay revoked after retire (its entry stays on ca/revoked.yml, the list the roles read)."""
    pki = copy_of_issued
    pki.brokers = {}  # revoke.yml's broker play has no host here
    pki.write_inventory()
    nxt, ca_dir, devices = pki.pki / "ca-next", pki.pki / "ca", pki.pki / "devices"
    revoke = tools.ROOT / "playbooks" / "revoke.yml"
    manifests = {"esp32_provision_manifest_dir": str(pki.base / "manifests")}

    def refused(ca: Path, crl: Path, device: str) -> bool:
        args = ["-crl_check", "-purpose", "sslclient", "-CAfile", str(ca), "-CRLfile", str(crl)]
        proc = tools.openssl("verify", *args, str(devices / f"{device}.crt"), check=False)
        return proc.returncode != 0 and "certificate revoked" in proc.stdout + proc.stderr

    run = pki.run(extra={"device": "dev-c", **manifests}, playbook=revoke)
    assert run.rc == 0, run.output[-3000:]
    old_dev_c = (devices / "dev-c.crt").read_bytes()

    run = pki.run(extra={"pki_ca_rotation": "introduce"})
    assert run.rc == 0, run.output[-3000:]
    assert _issued_by(tools, nxt / "ca.crt", pki, ["devices/dev-a"])  # the new CA issued it
    assert (devices / "dev-c.crt").read_bytes() == old_dev_c  # revoked: not re-issued

    run = pki.run(extra={"device": "dev-a", **manifests}, playbook=revoke)
    assert run.rc == 0, run.output[-3000:]
    assert refused(nxt / "ca.crt", nxt / "crl.pem", "dev-a")
    assert not refused(nxt / "ca.crt", nxt / "crl.pem", "esp32-0042")
    crl_check = ("-crl_check", "-CRLfile", str(nxt / "crl.pem"))
    assert tools.verifies(nxt / "ca.crt", devices / "esp32-0042.crt", "sslclient", *crl_check)
    again = pki.run(extra={"device": "dev-a", **manifests}, playbook=revoke)
    assert again.rc == 0 and again.changed == 0, again.output[-3000:]

    for phase in ("switch", "retire"):  # dev-c, revoked with an old-CA certificate, holds nothing up
        run = pki.run(extra={"pki_ca_rotation": phase})
        assert run.rc == 0, run.output[-3000:]
    assert refused(ca_dir / "ca.crt", ca_dir / "crl.pem", "dev-a")
    listed = {
        r["device_id"]
        for r in yaml.safe_load((ca_dir / "revoked.yml").read_text())["pki_revoked_certificates"]
    }
    assert listed == {"dev-a", "dev-c"}
    _steady(pki, "retire")
    assert (devices / "dev-c.crt").read_bytes() == old_dev_c  # still revoked: still not re-issued
