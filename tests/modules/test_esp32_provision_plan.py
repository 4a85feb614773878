"""The esp32_provision_board action's decisions (module_utils/esp32_provision_plan.py) and its device
issuance (module_utils/pki_device.py): which reasons make a board get new credentials, which firmware
is rewritten, what is revoked; a key is 0600 from its first byte, kept when it is of the wanted type,
and its certificate is kept until the renewal window or a new signing CA."""

from __future__ import annotations

import datetime
import os
import stat
from pathlib import Path

import pytest
from ansible_collections.esp32_fleet.mqtt_fleet.plugins.module_utils import esp32_provision_plan as plan
from ansible_collections.esp32_fleet.mqtt_fleet.plugins.module_utils import pki_device
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID

NOW = datetime.datetime(2026, 12, 3, 12, 0, tzinfo=datetime.UTC)
PREVIOUS = {"mac": "24:0a:c4:00:00:01", "nvs_md5": "a" * 32, "cert_serial": "1234", "config_sha256": "x"}
CURRENT = {"serial_number": 1234, "not_after": NOW + datetime.timedelta(days=200)}
BOARD = {"mac": "24:0A:C4:00:00:01", "nvs_md5": "a" * 32}


def test_a_board_that_matches_its_record_needs_nothing():
    assert plan.credential_reasons(PREVIOUS, True, CURRENT, 30, NOW, board=BOARD) == []
    # Without reading the board the controller cannot tell more: the caller reads it.
    assert plan.credential_reasons(PREVIOUS, True, CURRENT, 30, NOW) == []


def test_no_record_is_the_only_reason_of_a_new_board():
    assert plan.credential_reasons({}, False, None, 30, NOW, board=BOARD) == [plan.NO_RECORD]


@pytest.mark.parametrize(
    ("config", "cert", "board", "reasons"),
    [
        (True, CURRENT, dict(BOARD, mac="24:0a:c4:00:00:09"), ["another board on this port"]),
        (True, CURRENT, dict(BOARD, nvs_md5="b" * 32), ["NVS partition differs from the recorded image"]),
        (False, CURRENT, BOARD, ["settings changed"]),
        (True, None, BOARD, ["recorded certificate not found on the controller"]),
        (True, dict(CURRENT, serial_number=99), BOARD, ["certificate on the controller replaced"]),
        (
            False,
            dict(CURRENT, not_after=NOW + datetime.timedelta(days=10)),
            BOARD,
            ["settings changed", "certificate renewed (expires 20261213120000Z)"],
        ),
    ],
)
def test_each_difference_from_the_record_is_named(config, cert, board, reasons):
    assert plan.credential_reasons(PREVIOUS, config, cert, 30, NOW, board=board) == reasons


def test_only_differing_firmware_is_named():
    firmware = [{"name": "0x1000_boot.bin", "md5": "1" * 32}, {"name": "0x10000_app.bin", "md5": "2" * 32}]
    assert plan.firmware_reasons(firmware, ["1" * 32, "3" * 32]) == ["firmware 0x10000_app.bin differs"]
    assert plan.firmware_reasons(firmware, ["1" * 32, "2" * 32]) == []


def test_the_replaced_certificate_is_revoked_only_when_it_changed():
    assert plan.revocation(PREVIOUS, 5678, "b1", True) == {"serial_number": "1234", "device_id": "b1"}
    assert plan.revocation(PREVIOUS, 1234, "b1", True) is None
    assert plan.revocation(PREVIOUS, 5678, "b1", False) is None
    assert plan.revocation({}, 5678, "b1", True) is None


def test_the_firmware_row_names_offsets_in_hex():
    row = plan.firmware_row([{"offset": 0x10000, "name": "a.bin", "sha256": "s", "md5": "m", "size": 3}])
    assert row == [{"offset": "0x10000", "name": "a.bin", "sha256": "s", "md5": "m", "size": 3}]


# -- issuance ---------------------------------------------------------------------------------------


def _ca(tmp_path, name):
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - datetime.timedelta(days=1))
        .not_valid_after(NOW + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    directory = tmp_path / name
    directory.mkdir()
    (directory / "ca.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "ca.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"test-only-pass"),
        )
    )
    return directory


def ensure(device_id, profile, passphrase, now):
    """Issue and record with the key kept: (changed, facts, key_path, cert_path)."""
    creds = pki_device.issue(device_id, profile, passphrase, now)
    creds.persist(profile, keep_key=True)
    return creds.changed, creds.facts(), creds.key_path, creds.cert_path


@pytest.fixture
def profile(tmp_path):
    ca = _ca(tmp_path, "ca")
    return {
        "devices_dir": str(tmp_path / "devices"),
        "signer_cert": str(ca / "ca.crt"),
        "signer_key": str(ca / "ca.key"),
        "organization": "esp32-mqtt-fleet",
        "validity_days": 365,
        "renew_before_days": 30,
        "key_type": "EC",
        "key_curve": "secp256r1",
        "key_size": 2048,
        "owner": "",
        "group": "",
    }


def test_a_new_device_gets_a_0600_key_and_a_certificate_in_the_device_profile(profile, monkeypatch):
    seen = []
    real_mkstemp = pki_device.tempfile.mkstemp

    def watching_mkstemp(*a, **kw):  # the mode the key file has before a byte is written
        fd, path = real_mkstemp(*a, **kw)
        seen.append(stat.S_IMODE(os.fstat(fd).st_mode))
        return fd, path

    monkeypatch.setattr(pki_device.tempfile, "mkstemp", watching_mkstemp)
    changed, facts, key_path, cert_path = ensure("b1", profile, "test-only-pass", now=NOW)
    assert changed and seen[0] == 0o600  # the key (the certificate follows, 0644 after its rename)
    assert stat.S_IMODE(os.stat(key_path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(profile["devices_dir"]).st_mode) == 0o700
    cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    ca = x509.load_pem_x509_certificate(Path(profile["signer_cert"]).read_bytes())
    cert.verify_directly_issued_by(ca)
    assert cert.subject.rfc4514_string() == "O=esp32-mqtt-fleet,CN=b1"
    ext = {e.oid: e for e in cert.extensions}
    assert ext[ExtensionOID.BASIC_CONSTRAINTS].critical and not ext[ExtensionOID.BASIC_CONSTRAINTS].value.ca
    assert ext[ExtensionOID.KEY_USAGE].critical and ext[ExtensionOID.KEY_USAGE].value.digital_signature
    assert list(ext[ExtensionOID.EXTENDED_KEY_USAGE].value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert ExtensionOID.AUTHORITY_KEY_IDENTIFIER in ext and ExtensionOID.SUBJECT_KEY_IDENTIFIER in ext
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == datetime.timedelta(days=365)
    assert facts["serial_number"] == cert.serial_number and facts["not_after"].endswith("Z")


def test_a_current_certificate_and_its_key_are_kept(profile):
    _, first, key_path, _ = ensure("b1", profile, "test-only-pass", now=NOW)
    key_before = Path(key_path).read_bytes()
    changed, again, _, _ = ensure("b1", profile, "wrong passphrase is never read", now=NOW)
    assert not changed and again == first and Path(key_path).read_bytes() == key_before


def test_a_removed_key_gets_a_new_key_and_certificate(profile):
    _, first, key_path, _ = ensure("b1", profile, "test-only-pass", now=NOW)
    os.unlink(key_path)  # what a verified flash does with esp32_provision_keep_device_keys false
    changed, second, _, _ = ensure("b1", profile, "test-only-pass", now=NOW)
    assert changed and second["serial_number"] != first["serial_number"]


def test_the_renewal_window_and_a_new_signing_ca_reissue_for_the_same_key(profile, tmp_path):
    _, first, key_path, cert_path = ensure("b1", profile, "test-only-pass", now=NOW)
    key_before = Path(key_path).read_bytes()
    later = NOW + datetime.timedelta(days=340)  # 25 days before expiry: inside the 30-day window
    changed, renewed, _, _ = ensure("b1", profile, "test-only-pass", now=later)
    assert changed and renewed["serial_number"] != first["serial_number"]
    assert Path(key_path).read_bytes() == key_before
    new_ca = _ca(tmp_path, "ca-next")
    rotated = dict(profile, signer_cert=str(new_ca / "ca.crt"), signer_key=str(new_ca / "ca.key"))
    changed, moved, _, _ = ensure("b1", rotated, "test-only-pass", now=later)
    assert changed and moved["serial_number"] != renewed["serial_number"]
    issuer = x509.load_pem_x509_certificate(Path(cert_path).read_bytes()).issuer.rfc4514_string()
    assert issuer == "CN=ca-next"


def test_a_wrong_passphrase_fails_cleanly_and_leaves_no_certificate(profile):
    with pytest.raises(pki_device.DeviceCertError, match="with the given passphrase"):
        ensure("b1", profile, "not the passphrase", now=NOW)
    assert not os.path.exists(os.path.join(profile["devices_dir"], "b1.crt"))
