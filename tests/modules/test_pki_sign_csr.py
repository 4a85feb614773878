"""pki_sign_csr: a board's request (CN only, key made on the board) becomes a certificate in the pki
role's device profile, from the given CA; the same request again keeps the certificate; a wrong CN,
a broken self-signature, a wrong CA passphrase fail cleanly; check mode writes nothing."""

from __future__ import annotations

import datetime
import os
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

PASSPHRASE = "test-only-ca-passphrase"


@pytest.fixture
def ca(tmp_path):
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    (tmp_path / "ca.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "ca.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(PASSPHRASE.encode()),
        )
    )
    return cert


def csr(cn="esp32-01", key=None, san=False):
    key = key or ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    )
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName("evil.example")]), False)
    return key, builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()


def args(tmp_path, pem, **over):
    return {
        "path": str(tmp_path / "renewals-esp32-01.crt"),
        "csr_content": pem,
        "common_name": "esp32-01",
        "organization": "esp32-mqtt-fleet",
        "ca_cert": str(tmp_path / "ca.crt"),
        "ca_key": str(tmp_path / "ca.key"),
        "ca_passphrase": PASSPHRASE,
        "validity_days": 365,
        **over,
    }


def test_the_certificate_is_the_device_profile_for_the_boards_key(tmp_path, ca, run_module):
    key, pem = csr(san=True)  # what the request asks beyond its key and CN is ignored
    result = run_module("pki_sign_csr", args(tmp_path, pem))
    assert result["changed"] is True
    cert = x509.load_pem_x509_certificate((tmp_path / "renewals-esp32-01.crt").read_bytes())
    assert cert.public_key().public_numbers() == key.public_key().public_numbers()
    assert cert.subject.rfc4514_string() == "O=esp32-mqtt-fleet,CN=esp32-01"
    cert.verify_directly_issued_by(ca)
    ext = {e.oid: e for e in cert.extensions}
    assert x509.oid.ExtensionOID.SUBJECT_ALTERNATIVE_NAME not in ext
    bc = ext[x509.oid.ExtensionOID.BASIC_CONSTRAINTS]
    assert bc.critical and not bc.value.ca
    ku = ext[x509.oid.ExtensionOID.KEY_USAGE]
    assert ku.critical and ku.value.digital_signature and not ku.value.key_cert_sign
    assert list(ext[x509.oid.ExtensionOID.EXTENDED_KEY_USAGE].value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    aki = ext[x509.oid.ExtensionOID.AUTHORITY_KEY_IDENTIFIER].value.key_identifier
    assert aki == ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert lifetime == datetime.timedelta(days=365)
    assert result["serial_number"] == cert.serial_number
    assert result["serial_hex"] == f"{cert.serial_number:x}"
    assert stat.S_IMODE(os.stat(tmp_path / "renewals-esp32-01.crt").st_mode) == 0o644


def test_the_same_request_again_keeps_the_certificate_a_new_key_gets_a_new_one(tmp_path, ca, run_module):
    _, pem = csr()
    first = run_module("pki_sign_csr", args(tmp_path, pem))
    again = run_module("pki_sign_csr", args(tmp_path, pem))
    assert again["changed"] is False and again["serial_number"] == first["serial_number"]
    checked = run_module("pki_sign_csr", args(tmp_path, pem), check_mode=True)
    assert checked["changed"] is False
    _, other = csr()
    before = (tmp_path / "renewals-esp32-01.crt").read_bytes()
    preview = run_module("pki_sign_csr", args(tmp_path, other), check_mode=True)
    assert preview["changed"] is True and preview["serial_number"] is None
    assert (tmp_path / "renewals-esp32-01.crt").read_bytes() == before
    new = run_module("pki_sign_csr", args(tmp_path, other))
    assert new["changed"] is True and new["serial_number"] != first["serial_number"]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: csr(cn="esp32-02")[1], "not CN=esp32-01"),
        (
            lambda: "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
            "not a PEM",
        ),
    ],
)
def test_a_request_for_another_device_or_garbage_fails_and_writes_nothing(
    tmp_path, ca, run_module, make, message
):
    result = run_module("pki_sign_csr", args(tmp_path, make()))
    assert result["failed"] is True and message in result["msg"]
    assert not (tmp_path / "renewals-esp32-01.crt").exists()


def test_a_broken_self_signature_fails(tmp_path, ca, run_module):
    _, pem = csr()
    der = bytearray(x509.load_pem_x509_csr(pem.encode()).public_bytes(serialization.Encoding.DER))
    der[-3] ^= 0x01  # inside the signature
    import base64

    body = base64.encodebytes(bytes(der)).decode()
    tampered = f"-----BEGIN CERTIFICATE REQUEST-----\n{body}-----END CERTIFICATE REQUEST-----\n"
    result = run_module("pki_sign_csr", args(tmp_path, tampered))
    assert result["failed"] is True
    assert "self-signature" in result["msg"] or "not a PEM" in result["msg"]


def test_a_wrong_ca_passphrase_fails_without_echoing_it(tmp_path, ca, run_module):
    _, pem = csr()
    result = run_module("pki_sign_csr", args(tmp_path, pem, ca_passphrase="wrong-passphrase-123"))
    assert result["failed"] is True and "with the given passphrase" in result["msg"]
    assert "wrong-passphrase-123" not in str(result)
    assert not (tmp_path / "renewals-esp32-01.crt").exists()
