"""plugins/filter/esp32_fleet_revoked.py: the one answer to "is this device revoked?" (its current
certificate's serial is on ca/revoked.yml), with clear errors on a malformed list, and ansible-playbook
finding the filter through the project's ansible.cfg."""

from __future__ import annotations

import datetime
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from ansible.errors import AnsibleFilterError
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

_spec = importlib.util.spec_from_file_location(
    "esp32_fleet_revoked", ROOT / "plugins" / "filter" / "esp32_fleet_revoked.py"
)
flt = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(flt)


def _cert(path: Path, serial: int) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, path.stem)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


@pytest.fixture
def pki(tmp_path):
    """devices/a.crt (serial 1001, revoked), b.crt (2002, not revoked, its old 1999 is), no c.crt."""
    devices = tmp_path / "devices"
    devices.mkdir()
    _cert(devices / "a.crt", 1001)
    _cert(devices / "b.crt", 2002)
    revoked = tmp_path / "revoked.yml"
    revoked.write_text(
        yaml.safe_dump(
            {
                "pki_revoked_certificates": [
                    {
                        "serial_number": 1001,
                        "device_id": "a",
                        "reason": "key_compromise",
                        "revocation_date": "20260101000000Z",
                    },
                    {
                        "serial_number": "1999",
                        "device_id": "b",
                        "reason": "superseded",
                        "revocation_date": "20260102000000Z",
                    },
                ]
            }
        )
    )
    return devices, revoked


def test_revoked_ids_are_the_devices_whose_current_certificate_is_listed(pki):
    devices, revoked = pki
    # b's superseded certificate is listed, not its current one; c has no certificate at all.
    assert flt.esp32_fleet_revoked_ids(["c", "b", "a"], str(devices), str(revoked)) == ["a"]


def test_revocation_returns_the_entry_or_nothing(pki):
    devices, revoked = pki
    entry = flt.esp32_fleet_revocation("a", str(devices), str(revoked))
    assert entry == {
        "serial_number": 1001,
        "device_id": "a",
        "reason": "key_compromise",
        "revocation_date": "20260101000000Z",
    }
    assert flt.esp32_fleet_revocation("b", str(devices), str(revoked)) == {}
    assert flt.esp32_fleet_revocation("c", str(devices), str(revoked)) == {}


def test_a_missing_or_empty_list_revokes_nothing(pki, tmp_path):
    devices, revoked = pki
    assert flt.esp32_fleet_revoked_ids(["a", "b"], str(devices), str(tmp_path / "absent.yml")) == []
    revoked.write_text("---\n# Revoked certificates\npki_revoked_certificates: []\n")
    assert flt.esp32_fleet_revoked_ids(["a", "b"], str(devices), str(revoked)) == []
    revoked.write_text("")
    assert flt.esp32_fleet_revocation("a", str(devices), str(revoked)) == {}


def test_entries_parse_text_and_documents_with_int_serials():
    text = "pki_revoked_certificates:\n  - {serial_number: '42', device_id: x}\n"
    assert flt.esp32_fleet_revoked_entries(text) == [{"serial_number": 42, "device_id": "x"}]
    assert flt.esp32_fleet_revoked_entries({"pki_revoked_certificates": None}) == []
    assert flt.esp32_fleet_revoked_entries(None) == []


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ("[1, 2]", "expected a mapping"),
        ("pki_revoked_certificates: {serial_number: 1}", "must be a list"),
        ("pki_revoked_certificates: [5]", "[0] is not a mapping with serial_number"),
        ("pki_revoked_certificates: [{device_id: a}]", "[0] is not a mapping with serial_number"),
        (
            "pki_revoked_certificates: [{serial_number: 1}, {serial_number: abc}]",
            "[1].serial_number is not an integer",
        ),
        ("pki_revoked_certificates: [{serial_number: true}]", "[0].serial_number is not an integer"),
        ("pki_revoked_certificates: [", "not YAML"),
    ],
)
def test_a_malformed_list_fails_clearly(document, message):
    with pytest.raises(AnsibleFilterError) as info:
        flt.esp32_fleet_revoked_entries(document, source="ca/revoked.yml")
    assert message in str(info.value)
    assert "ca/revoked.yml" in str(info.value)


def test_a_malformed_file_or_certificate_fails_naming_it(pki):
    devices, revoked = pki
    revoked.write_text("pki_revoked_certificates: [{serial_number: x}]\n")
    with pytest.raises(AnsibleFilterError, match=re.escape(str(revoked))):
        flt.esp32_fleet_revoked_ids(["a"], str(devices), str(revoked))
    revoked.write_text("pki_revoked_certificates: [{serial_number: 1}]\n")
    (devices / "a.crt").write_text("not a certificate\n")
    with pytest.raises(AnsibleFilterError, match=r"a\.crt: not a PEM certificate"):
        flt.esp32_fleet_revocation("a", str(devices), str(revoked))
    with pytest.raises(AnsibleFilterError, match="must be a list"):
        flt.esp32_fleet_revoked_ids("a", str(devices), str(revoked))
    with pytest.raises(AnsibleFilterError, match="not a device id"):
        flt.esp32_fleet_revocation("../a", str(devices), str(revoked))


def test_ansible_finds_the_filter_through_the_project_config(pki, tmp_path):
    """The roles and playbooks call the filter by FQCN, resolved through ansible.cfg's collections_path."""
    devices, revoked = pki
    flt = "esp32_fleet.mqtt_fleet.esp32_fleet_revoked_ids"
    expr = f"{{{{ ['a', 'b'] | {flt}('{devices}', '{revoked}') | to_json }}}}"
    env = dict(
        os.environ,
        ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"),
        ANSIBLE_LOCAL_TEMP=str(tmp_path / "tmp"),
        ANSIBLE_NOCOLOR="1",
    )
    proc = subprocess.run(
        [
            str(BIN / "ansible"),
            "localhost",
            "-i",
            "localhost,",
            "-c",
            "local",
            "-m",
            "ansible.builtin.debug",
            "-a",
            f"msg={expr}",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # "localhost | SUCCESS => <YAML>" (ansible.cfg's callback_result_format).
    result = yaml.safe_load(proc.stdout.split("=>", 1)[1])
    assert json.loads(result["msg"]) == ["a"]


def test_merge_keeps_the_order_and_lists_a_serial_once():
    old = [{"serial_number": 1, "device_id": "a"}, {"serial_number": 2, "device_id": "b"}]
    more = [{"serial_number": 2, "device_id": "b2"}, {"serial_number": 3, "device_id": "c"}]
    merged = flt.esp32_fleet_revoked_merge(old, more)
    assert merged == [*old, {"serial_number": 3, "device_id": "c"}]
    assert flt.esp32_fleet_revoked_merge(old, []) == old
    assert old == [{"serial_number": 1, "device_id": "a"}, {"serial_number": 2, "device_id": "b"}]
