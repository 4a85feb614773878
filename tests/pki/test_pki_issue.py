"""What playbooks/pki.yml produces: four-run pattern, CA, broker and device certificates, CRL, modes."""

from __future__ import annotations

import datetime as dt
import re
import stat

DAY = 86400


def _mode(path):
    return stat.S_IMODE(path.stat().st_mode)


def _lifetime_days(tools, cert):
    out = tools.openssl("x509", "-in", str(cert), "-noout", "-startdate", "-enddate").stdout
    start, end = (
        dt.datetime.strptime(line.split("=", 1)[1].strip(), "%b %d %H:%M:%S %Y %Z")
        for line in out.splitlines()
    )
    return (end - start).total_seconds() / DAY


def _extension(text, name):
    """The header line (with ', critical' or not) and the value lines of one X509v3 extension."""
    match = re.search(rf"^\s*X509v3 {name}:( critical)?[ ]*\n((?:\s{{16,}}.*\n)+)", text, re.M)
    assert match, f"no {name} in:\n{text}"
    return bool(match.group(1)), " ".join(match.group(2).split())


def test_four_run_pattern_check_real_then_nothing_changes(issued, tools):
    _, (check1, real1, check2, real2) = issued
    assert check1.changed > 0 and check1.recap["failed"] == 0  # and wrote nothing (see the fixture)
    assert real1.changed > 0 and real1.recap["failed"] == 0
    assert check2.changed == 0, check2.output[-3000:]
    assert real2.changed == 0, real2.output[-3000:]
    for run in (check1, real1, check2, real2):  # --diff included: the passphrase never shows
        assert tools.PASSPHRASE not in run.output
        assert "PRIVATE KEY-----" not in run.output


def test_layout_and_modes(issued, tools):
    pki = issued[0].pki
    for d in ("ca", "brokers", "devices"):
        assert _mode(pki / d) == 0o700, d
    assert _mode(pki / "ca" / "ca.key") == 0o600
    for name in ("ca/ca.crt", "ca/crl.pem"):
        assert _mode(pki / name) == 0o644, name
    for host in ("localhost", "broker2"):
        assert _mode(pki / "brokers" / f"{host}.key") == 0o600
        assert (pki / "brokers" / f"{host}.crt").is_file()
    for device in tools.DEVICE_IDS:
        assert _mode(pki / "devices" / f"{device}.key") == 0o600
        assert (pki / "devices" / f"{device}.crt").is_file()
    assert not (pki / "devices" / "dev-b.crt").exists()  # the device id, not the host name


def test_ca_key_is_encrypted_with_the_passphrase(issued, tmp_path, tools):
    key = issued[0].pki / "ca" / "ca.key"
    assert key.read_text().startswith("-----BEGIN ENCRYPTED PRIVATE KEY-----")
    good, bad = tmp_path / "good", tmp_path / "bad"
    good.write_text(tools.PASSPHRASE)
    bad.write_text("not-the-passphrase")
    wrong = tools.openssl("pkey", "-in", str(key), "-passin", f"file:{bad}", "-noout", check=False)
    assert wrong.returncode != 0
    out = tools.openssl("pkey", "-in", str(key), "-passin", f"file:{good}", "-noout", "-text").stdout
    assert "ASN1 OID: prime256v1" in out


def test_ca_certificate_is_a_strict_ca(issued, tools):
    text = tools.x509_text(issued[0].pki / "ca" / "ca.crt")
    assert _extension(text, "Basic Constraints") == (True, "CA:TRUE, pathlen:0")
    assert _extension(text, "Key Usage") == (True, "Certificate Sign, CRL Sign")
    assert _extension(text, "Subject Key Identifier")[1]
    assert "Subject Alternative Name" not in text
    assert "ASN1 OID: prime256v1" in text and "ecdsa-with-SHA256" in text
    assert "CN = esp32-mqtt-fleet CA" in text
    assert abs(_lifetime_days(tools, issued[0].pki / "ca" / "ca.crt") - 3650) < 1


def _ca_ski(tools, pki):
    return _extension(tools.x509_text(pki / "ca" / "ca.crt"), "Subject Key Identifier")[1]


def test_broker_certificates_verify_as_servers_with_their_sans(issued, tools):
    pki = issued[0].pki
    ca = pki / "ca" / "ca.crt"
    want_sans = {
        "localhost": "DNS:localhost, IP Address:127.0.0.1",
        "broker2": "DNS:broker2.example.net, IP Address:192.0.2.10, IP Address:2001:DB8:0:0:0:0:0:10",
    }
    for host, sans in want_sans.items():
        cert = pki / "brokers" / f"{host}.crt"
        assert tools.verifies(ca, cert, "sslserver")
        assert not tools.verifies(ca, cert, "sslclient")
        text = tools.x509_text(cert)
        assert _extension(text, "Subject Alternative Name")[1] == sans
        assert _extension(text, "Extended Key Usage")[1] == "TLS Web Server Authentication"
        assert _extension(text, "Key Usage") == (True, "Digital Signature")
        assert _extension(text, "Basic Constraints") == (True, "CA:FALSE")
        assert _extension(text, "Authority Key Identifier")[1] == _ca_ski(tools, pki)
        assert f"CN = {host}" in text and "ASN1 OID: prime256v1" in text
        assert abs(_lifetime_days(tools, cert) - 365) < 1
        key = (pki / "brokers" / f"{host}.key").read_text()
        assert key.startswith("-----BEGIN PRIVATE KEY-----")  # unencrypted: the broker reads it
        chain = (pki / "brokers" / f"{host}.chain.pem").read_text()
        assert chain.split() == (cert.read_text() + (pki / "ca" / "ca.crt").read_text()).split()


def test_device_certificates_verify_as_clients_with_cn_device_id(issued, tools):
    pki = issued[0].pki
    ca = pki / "ca" / "ca.crt"
    for device in tools.DEVICE_IDS:
        cert = pki / "devices" / f"{device}.crt"
        assert tools.verifies(ca, cert, "sslclient")
        assert not tools.verifies(ca, cert, "sslserver")
        text = tools.x509_text(cert)
        assert re.search(rf"Subject: O = esp32-mqtt-fleet, CN = {re.escape(device)}$", text, re.M)
        assert _extension(text, "Extended Key Usage")[1] == "TLS Web Client Authentication"
        assert _extension(text, "Key Usage") == (True, "Digital Signature")
        assert _extension(text, "Authority Key Identifier")[1] == _ca_ski(tools, pki)
        assert abs(_lifetime_days(tools, cert) - 365) < 1
        pub_cert = tools.openssl("x509", "-in", str(cert), "-noout", "-pubkey").stdout
        pub_key = tools.openssl("pkey", "-in", str(pki / "devices" / f"{device}.key"), "-pubout").stdout
        assert pub_cert == pub_key


def test_crl_is_signed_by_the_ca_and_renewed_well_before_it_expires(issued, tools):
    pki = issued[0].pki
    crl = pki / "ca" / "crl.pem"
    tools.openssl("crl", "-in", str(crl), "-CAfile", str(pki / "ca" / "ca.crt"), "-noout")  # signature check
    text = tools.openssl("crl", "-in", str(crl), "-noout", "-text").stdout
    assert "Issuer: O = esp32-mqtt-fleet, CN = esp32-mqtt-fleet CA" in text
    assert "No Revoked Certificates." in text
    nxt = tools.openssl("crl", "-in", str(crl), "-noout", "-nextupdate").stdout.split("=", 1)[1].strip()
    left = dt.datetime.strptime(nxt, "%b %d %H:%M:%S %Y %Z") - dt.datetime.now(dt.UTC).replace(tzinfo=None)
    assert 29 < left.total_seconds() / DAY <= 30
    for device in tools.DEVICE_IDS:
        cert = pki / "devices" / f"{device}.crt"
        assert tools.verifies(pki / "ca" / "ca.crt", cert, "sslclient", "-crl_check", "-CRLfile", str(crl))
    revoked = (pki / "ca" / "revoked.yml").read_text()
    assert "pki_revoked_certificates: []" in revoked
