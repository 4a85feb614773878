"""The controller's renewal decisions (plugins/module_utils/fleet_csr.py) without a broker: every
refusal of docs/device-protocol.md's table and the accepted request, the confirmation decision, the
state file's transitions, its bounded lists and its atomic 0600 write under the lock."""

from __future__ import annotations

import datetime as dt
import json
import os
import stat

import pytest
from ansible_collections.esp32_fleet.mqtt_fleet.plugins.module_utils import fleet_csr as fc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

DEVICE = "esp32-01"
NOW = dt.datetime(2026, 6, 1, 12, 0, tzinfo=dt.UTC)
REQ = "Qm9hcmQtcmVxdWVzdC0wMDAx"
POLICY = {"key_type": "EC", "key_curve": "secp256r1", "key_size": 2048, "min_interval_hours": 24}


def p256():
    return ec.generate_private_key(ec.SECP256R1())


def make_csr(key=None, cn=DEVICE, names=None, san=False, attribute=False):
    key = key or p256()
    subject = x509.Name(names if names is not None else [x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    builder = x509.CertificateSigningRequestBuilder().subject_name(subject)
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName("evil.example")]), False)
    if attribute:
        builder = builder.add_attribute(x509.oid.AttributeOID.CHALLENGE_PASSWORD, b"secret")
    return key, builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()


def payload(csr_pem, req=REQ, **over):
    body = {"v": 1, "req": req, "csr": csr_pem, "reason": "window", **over}
    return json.dumps(body).encode()


def cert_for(key, cn=DEVICE, serial=0x5F3A9C):
    ca_key = p256()
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")]))
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(NOW - dt.timedelta(days=1))
        .not_valid_after(NOW + dt.timedelta(days=30))
        .sign(ca_key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
        .decode()
    )


def check(data, state=None, current=None, revoked=False, policy=POLICY, now=NOW, device=DEVICE):
    return fc.check_request(device, data, policy, state or fc.empty_entry(), current, revoked, now)


def refused(result, reason):
    assert result["accepted"] is False, result
    assert result["reason"] == reason, result
    assert result["reason"] in fc.REFUSALS
    assert result["detail"]
    return result


# -- accepted --------------------------------------------------------------------------------------


def test_a_request_like_the_firmware_s_is_accepted():
    key, pem = make_csr()
    result = check(payload(pem), current=cert_for(p256()))
    assert result["accepted"] is True and result["repeat"] is False
    assert result["req"] == REQ and result["reason"] == "window"
    assert result["public_key_sha256"] == fc.public_key_sha256(key.public_key())
    assert x509.load_pem_x509_csr(result["csr_pem"].encode()).subject.rfc4514_string() == f"CN={DEVICE}"


def test_an_rsa_policy_takes_keys_of_at_least_its_size():
    policy = {"key_type": "RSA", "key_size": 2048}
    _, pem = make_csr(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    assert check(payload(pem), policy=policy)["accepted"] is True
    _, pem = make_csr(rsa.generate_private_key(public_exponent=65537, key_size=3072))
    assert check(payload(pem), policy=policy)["accepted"] is True
    refused(check(payload(make_csr()[1]), policy=policy), "wrong_key")


def test_a_p384_policy_takes_p384_only():
    policy = {"key_type": "EC", "key_curve": "secp384r1"}
    _, pem = make_csr(ec.generate_private_key(ec.SECP384R1()))
    assert check(payload(pem), policy=policy)["accepted"] is True
    refused(check(payload(make_csr()[1]), policy=policy), "wrong_key")


# -- each refusal ----------------------------------------------------------------------------------


def test_too_large_is_decided_before_parsing():
    result = refused(check(b"{" * (fc.MAX_PAYLOAD + 1)), "too_large")
    assert result["req"] is None
    _, pem = make_csr()
    big = payload(pem, padding="x" * fc.MAX_PAYLOAD)
    refused(check(big), "too_large")
    exact = payload(pem, padding="")
    exact = exact[:-1] + b" " * (fc.MAX_PAYLOAD - len(exact)) + b"}"
    assert len(exact) == fc.MAX_PAYLOAD and check(exact)["accepted"] is True


@pytest.mark.parametrize(
    ("data", "req"),
    [
        (b"not json", None),
        (b"\xff\xfe", None),
        (b"[1, 2]", None),
        (json.dumps({"req": REQ, "csr": "x"}).encode(), REQ),  # no v
        (json.dumps({"v": 1, "csr": "x"}).encode(), None),  # no req
        (json.dumps({"v": 1, "req": REQ}).encode(), REQ),  # no csr
        (json.dumps({"v": True, "req": REQ, "csr": "x"}).encode(), REQ),  # a bool is not 1
        (json.dumps({"v": 1, "req": REQ, "csr": 42}).encode(), REQ),
    ],
)
def test_malformed_payloads(data, req):
    assert refused(check(data), "malformed")["req"] == req


def test_version_2_is_malformed():
    _, pem = make_csr()
    result = refused(check(payload(pem, v=2)), "malformed")
    assert "version" in result["detail"] and result["req"] == REQ


@pytest.mark.parametrize(
    "req",
    [
        "short",
        "x" * 65,
        "has space in it 123",
        "semi;colon;0123456789",
        "ünïcode-0123456789",
        12345678901234567,
    ],
)
def test_a_bad_request_id_is_malformed(req):
    _, pem = make_csr()
    result = refused(check(payload(pem, req=req)), "malformed")
    # The board's own id is echoed (it matches the rejection on it) when it is a string.
    assert result["req"] == (req if isinstance(req, str) else None)


def test_request_id_bounds():
    _, pem = make_csr()
    assert check(payload(pem, req="a" * 16))["accepted"] is True
    assert check(payload(pem, req="A-_9" * 16))["accepted"] is True
    refused(check(payload(pem, req="a" * 15)), "malformed")


def test_a_tampered_signature_is_malformed():
    _, pem = make_csr()
    der = bytearray(x509.load_pem_x509_csr(pem.encode()).public_bytes(serialization.Encoding.DER))
    der[-3] ^= 0x01  # inside the signature's last bytes
    tampered = x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM).decode()
    result = refused(check(payload(tampered)), "malformed")
    assert "signature" in result["detail"]


@pytest.mark.parametrize(
    "text",
    [
        "",
        "-----BEGIN CERTIFICATE REQUEST-----\nnot base64\n-----END CERTIFICATE REQUEST-----\n",
        "garbage",
    ],
)
def test_a_csr_that_is_not_a_pem_csr_is_malformed(text):
    refused(check(payload(text)), "malformed")


def test_two_pem_blocks_or_another_block_type_are_malformed():
    _, one = make_csr()
    _, two = make_csr()
    refused(check(payload(one + two)), "malformed")
    cert = cert_for(p256())
    assert "CERTIFICATE REQUEST" in refused(check(payload(cert)), "malformed")["detail"]
    refused(check(payload(one + cert)), "malformed")
    refused(check(payload("hello\n" + one)), "malformed")
    assert check(payload("\n" + one + "\n\n"))["accepted"] is True


@pytest.mark.parametrize(
    "names",
    [
        [x509.NameAttribute(NameOID.COMMON_NAME, "esp32-02")],  # another board's CN
        [x509.NameAttribute(NameOID.COMMON_NAME, DEVICE.upper())],
        [x509.NameAttribute(NameOID.COMMON_NAME, DEVICE), x509.NameAttribute(NameOID.ORGANIZATION_NAME, "x")],
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, DEVICE)],
        [x509.NameAttribute(NameOID.COMMON_NAME, DEVICE), x509.NameAttribute(NameOID.COMMON_NAME, DEVICE)],
        [],
    ],
)
def test_a_subject_other_than_exactly_cn_device_is_wrong_cn(names):
    _, pem = make_csr(names=names)
    refused(check(payload(pem)), "wrong_cn")


def test_a_multi_valued_rdn_is_wrong_cn():
    key = p256()
    rdn = x509.RelativeDistinguishedName(
        [x509.NameAttribute(NameOID.COMMON_NAME, DEVICE), x509.NameAttribute(NameOID.ORGANIZATION_NAME, "x")]
    )
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([rdn])).sign(key, hashes.SHA256())
    refused(check(payload(csr.public_bytes(serialization.Encoding.PEM).decode())), "wrong_cn")


def test_a_san_or_any_extension_or_attribute_is_wrong_cn():
    _, pem = make_csr(san=True)
    assert "subjectAltName" in refused(check(payload(pem)), "wrong_cn")["detail"]
    key = p256()
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, DEVICE)]))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    refused(check(payload(csr.public_bytes(serialization.Encoding.PEM).decode())), "wrong_cn")
    _, pem = make_csr(attribute=True)
    refused(check(payload(pem)), "wrong_cn")


def test_a_cn_for_the_wrong_topic_device_is_wrong_cn():
    _, pem = make_csr(cn="esp32-01")
    refused(check(payload(pem), device="esp32-02"), "wrong_cn")


@pytest.mark.parametrize(
    "key",
    [
        pytest.param(lambda: rsa.generate_private_key(public_exponent=65537, key_size=1024), id="rsa-1024"),
        pytest.param(lambda: ec.generate_private_key(ec.SECP384R1()), id="p-384"),
        pytest.param(lambda: ec.generate_private_key(ec.SECP521R1()), id="p-521"),
    ],
)
def test_keys_outside_the_default_policy_are_wrong_key(key):
    _, pem = make_csr(key())
    refused(check(payload(pem)), "wrong_key")


def test_rsa_1024_is_wrong_key_under_an_rsa_2048_policy():
    _, pem = make_csr(rsa.generate_private_key(public_exponent=65537, key_size=1024))
    assert "RSA 1024" in refused(check(payload(pem), policy={"key_type": "RSA"}), "wrong_key")["detail"]


def test_ed25519_is_wrong_key():
    from cryptography.hazmat.primitives.asymmetric import ed25519

    key = ed25519.Ed25519PrivateKey.generate()
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, DEVICE)]))
        .sign(key, None)
    )
    refused(check(payload(csr.public_bytes(serialization.Encoding.PEM).decode())), "wrong_key")


def test_a_revoked_board_is_refused():
    _, pem = make_csr()
    refused(check(payload(pem), revoked=True), "revoked")


def test_the_current_certificate_s_key_is_replayed():
    key, pem = make_csr()
    assert "current certificate" in refused(check(payload(pem), current=cert_for(key)), "replayed")["detail"]


def test_an_answered_key_or_request_is_replayed():
    key, pem = make_csr()
    entry = fc.empty_entry()
    entry["answered_keys"] = [fc.public_key_sha256(key.public_key())]
    refused(check(payload(pem), state=entry), "replayed")
    entry = fc.empty_entry()
    entry["answered_reqs"] = [REQ]
    refused(check(payload(make_csr()[1]), state=entry), "replayed")


def _issued(hours_ago, command=False, pending=False):
    entry = fc.empty_entry()
    at = fc.iso(NOW - dt.timedelta(hours=hours_ago))
    if pending:
        entry["pending"] = {
            "req": "T2xkZXItcmVxdWVzdC0wMDAw",
            "serial": "1",
            "cert_sha256": "00",
            "public_key_sha256": "00",
            "issued_at": at,
            "replaces_serial": None,
        }
    else:
        entry["last_issued"] = at
    if command:
        entry["command"] = {"nonce": "a" * 32, "at": fc.iso(NOW)}
    return entry


def test_rate_limited_within_the_interval_unless_a_command_is_open():
    _, pem = make_csr()
    result = refused(check(payload(pem), state=_issued(3)), "rate_limited")
    assert "3.0 h ago" in result["detail"]
    assert check(payload(pem), state=_issued(3, command=True))["accepted"] is True
    assert check(payload(pem), state=_issued(25))["accepted"] is True
    assert (
        check(payload(pem), state=_issued(3), policy=dict(POLICY, min_interval_hours=2))["accepted"] is True
    )
    assert (
        check(payload(pem), state=_issued(3), policy=dict(POLICY, min_interval_hours=0))["accepted"] is True
    )


def test_a_pending_unconfirmed_certificate_counts_for_the_rate_limit():
    _, pem = make_csr()
    refused(check(payload(pem), state=_issued(1, pending=True)), "rate_limited")
    assert check(payload(pem), state=_issued(1, pending=True, command=True))["accepted"] is True


def test_the_pending_request_sent_again_is_a_repeat_not_a_replay():
    key, pem = make_csr()
    entry = fc.record_answer(
        fc.empty_entry(), REQ, fc.public_key_sha256(key.public_key()), "5f3a9c", "ab", None, NOW
    )
    result = check(payload(pem), state=entry, now=NOW + dt.timedelta(minutes=5))
    assert result["accepted"] is True and result["repeat"] is True
    # The same request id with another key is a replay.
    refused(check(payload(make_csr()[1]), state=entry), "replayed")
    # After the renewal is finished the request is answered history: a replay.
    refused(check(payload(pem), state=fc.record_finish(entry)), "replayed")


def test_the_checks_run_in_the_table_s_order():
    # A revoked board's oversize, malformed or wrong-CN request is refused for that first.
    refused(check(b"x" * 9000, revoked=True), "too_large")
    refused(check(b"x", revoked=True), "malformed")
    _, pem = make_csr(cn="other")
    refused(check(payload(pem), revoked=True), "wrong_cn")
    key, pem = make_csr()
    refused(check(payload(pem), revoked=True, current=cert_for(key)), "revoked")
    refused(check(payload(pem), current=cert_for(key), state=_issued(1)), "replayed")


def test_rejection_payload_is_the_protocol_s():
    result = check(b"nope")
    assert json.loads(fc.rejection_payload(result)) == {
        "v": 1,
        "req": None,
        "reason": "malformed",
        "detail": "the request is not JSON",
    }


def test_the_policy_takes_the_pki_role_s_names_and_refuses_nonsense():
    assert fc.normalize_policy(None) == {
        "type": "EC",
        "curve": "secp256r1",
        "size": 2048,
        "min_interval_hours": 24,
    }
    assert fc.normalize_policy({"key_type": "rsa", "key_size": "4096"})["size"] == 4096
    for bad in (
        {"key_type": "DSA"},
        {"key_curve": "secp256k1"},
        {"key_size": "big"},
        {"min_interval_hours": -1},
    ):
        with pytest.raises(ValueError):
            fc.normalize_policy(bad)


# -- confirmations ---------------------------------------------------------------------------------


def _pending_entry(serial="5f3a9c"):
    return fc.record_answer(fc.empty_entry(), REQ, "ab" * 32, serial, "cd" * 32, 0x1234, NOW)


def ack(**over):
    return json.dumps({"v": 1, "req": REQ, "state": "installed", "serial": "5f3a9c", **over}).encode()


def test_check_ack_matched():
    result = fc.check_ack(DEVICE, ack(), _pending_entry())
    assert result["result"] == "matched" and result["req"] == REQ and result["serial"] == "5f3a9c"
    # Serial spelling differences (upper case, leading zeros) are the same number.
    assert fc.check_ack(DEVICE, ack(serial="005F3A9C"), _pending_entry())["result"] == "matched"


def test_check_ack_failed():
    result = fc.check_ack(DEVICE, ack(state="failed", error="connection refused"), _pending_entry())
    assert result["result"] == "failed" and result["detail"] == "connection refused"
    # Installed, but not the certificate issued for the request.
    assert fc.check_ack(DEVICE, ack(serial="abc"), _pending_entry())["result"] == "failed"


@pytest.mark.parametrize(
    ("data", "entry"),
    [
        (ack(), fc.empty_entry()),  # nothing pending
        (ack(req="T3RoZXItcmVxdWVzdC0wMDAx"), None),  # another request
        (ack(v=2), None),
        (b"not json", None),
        (ack(state="weird"), None),
    ],
)
def test_check_ack_stale(data, entry):
    assert fc.check_ack(DEVICE, data, entry if entry is not None else _pending_entry())["result"] == "stale"


# -- state transitions and the file ---------------------------------------------------------------


def test_transitions_answer_finish_command():
    entry = fc.record_command(fc.empty_entry(), "n" * 32, NOW)
    assert entry["command"] == {"nonce": "n" * 32, "at": "2026-06-01T12:00:00Z"}
    entry = fc.record_answer(entry, REQ, "ab" * 32, "5F3A9C", "cd" * 32, 0x1234, NOW)
    assert entry["pending"] == {
        "req": REQ,
        "serial": "5f3a9c",
        "cert_sha256": "cd" * 32,
        "public_key_sha256": "ab" * 32,
        "issued_at": "2026-06-01T12:00:00Z",
        "replaces_serial": "1234",
    }
    assert entry["answered_reqs"] == [REQ] and entry["answered_keys"] == ["ab" * 32]
    assert entry["last_issued"] is None and entry["command"]
    done = fc.record_finish(entry)
    assert done["pending"] is None and done["command"] is None
    assert done["last_issued"] == "2026-06-01T12:00:00Z"
    assert done["answered_reqs"] == [REQ]
    assert entry["pending"] is not None  # transitions return new entries


def test_answered_lists_keep_the_last_twenty():
    entry = fc.empty_entry()
    for i in range(30):
        entry = fc.record_answer(entry, f"request-{i:012d}", f"key{i}", "1", "c", None, NOW)
    assert len(entry["answered_reqs"]) == fc.MAX_ANSWERED == 20
    assert entry["answered_reqs"][0] == "request-000000000010"
    assert entry["answered_reqs"][-1] == "request-000000000029"
    assert entry["answered_keys"] == [f"key{i}" for i in range(10, 30)]
    # Answering a remembered request again does not duplicate it.
    again = fc.record_answer(entry, "request-000000000015", "key15", "1", "c", None, NOW)
    assert len(again["answered_reqs"]) == 20 and again["answered_reqs"][-1] == "request-000000000015"


def test_state_file_round_trip_is_atomic_and_0600(tmp_path):
    path = tmp_path / "state.json"
    assert fc.load_state(str(path)) == {"v": 1, "devices": {}}
    state = fc.new_state()
    fc.set_entry(state, DEVICE, _pending_entry())
    old_umask = os.umask(0o022)
    try:
        with fc.locked(str(path)):
            fc.save_state(str(path), state)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / ".state.json.lock").stat().st_mode) == 0o600
    assert fc.load_state(str(path)) == state
    assert fc.device_entry(fc.load_state(str(path)), "unknown") == fc.empty_entry()
    # Nothing but the state and its lock is left in the directory (the temp file was renamed).
    assert sorted(p.name for p in tmp_path.iterdir()) == [".state.json.lock", "state.json"]
    # A second save replaces the file (new inode), the old content never half-written.
    inode = path.stat().st_ino
    fc.save_state(str(path), fc.new_state())
    assert path.stat().st_ino != inode and fc.load_state(str(path)) == fc.new_state()


def test_a_write_that_fails_leaves_the_old_state(tmp_path, monkeypatch):
    path = tmp_path / "state.json"
    state = fc.new_state()
    fc.set_entry(state, DEVICE, _pending_entry())
    fc.save_state(str(path), state)

    def boom(*_args):
        raise OSError("disk full")

    monkeypatch.setattr(fc.os, "replace", boom)
    with pytest.raises(OSError):
        fc.save_state(str(path), fc.new_state())
    assert fc.load_state(str(path)) == state
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


@pytest.mark.parametrize("content", ["not json", "[]", '{"v": 2, "devices": {}}', '{"v": 1, "devices": []}'])
def test_an_unusable_state_file_fails_instead_of_starting_over(tmp_path, content):
    path = tmp_path / "state.json"
    path.write_text(content)
    with pytest.raises(fc.StateError, match="state file"):
        fc.load_state(str(path))


def test_loading_normalizes_and_bounds_entries(tmp_path):
    path = tmp_path / "state.json"
    raw = {
        "v": 1,
        "devices": {
            DEVICE: {"answered_reqs": [f"r{i}" for i in range(25)] + [7], "pending": "junk", "extra": 1},
        },
    }
    path.write_text(json.dumps(raw))
    entry = fc.device_entry(fc.load_state(str(path)), DEVICE)
    assert entry["answered_reqs"] == [f"r{i}" for i in range(5, 25)]
    assert entry["pending"] is None and set(entry) == set(fc.empty_entry())


def test_certificate_facts_and_serials():
    key = p256()
    facts = fc.certificate_facts(cert_for(key, serial=0x00ABCDEF))
    assert facts["serial"] == "abcdef" and facts["serial_number"] == 0xABCDEF
    assert facts["public_key_sha256"] == fc.public_key_sha256(key.public_key())
    assert facts["common_names"] == [DEVICE] and len(facts["cert_sha256"]) == 64
    assert fc.serial_int("AB:CD") == 0xABCD and fc.serial_int("xyz") is None and fc.serial_int(True) is None
