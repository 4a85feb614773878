"""The firmware twin against docs/device-protocol.md: a real Mosquitto (mTLS, ACLs, restarts, a CRL)
and the test playing the controller (`fleet-pki`, signing CSRs with the test's CA)."""

import datetime
import hashlib
import re
import signal
import subprocess
import time
import zlib

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from esp32sim.firmware import FW_VERSION, Firmware, cert_fingerprint
from esp32sim.nvs import NvsWriter, parse_nvs

from .conftest import ESP32SIM
from .fw_harness import Broker, Client, Pki, make_flash, pem, retained, tls_probe

ID = re.compile(r"^[A-Za-z0-9_-]{16,64}$")
INTERVAL = 0.25
FIELD = slice(0x312000, 0x318000)
NVS = slice(0x9000, 0xF000)


@pytest.fixture(scope="module")
def pki():
    return Pki()


@pytest.fixture(scope="module")
def broker(tmp_path_factory, pki):
    b = Broker(tmp_path_factory.mktemp("fw-broker"), pki)
    yield b
    b.stop()


@pytest.fixture
def controller(broker, pki):
    c = Client(broker, pki.controller, cn="fleet-pki")
    yield c
    c.close()


class Boards:
    """Boards (flash files) and the firmware instances booted from them; all stopped at the end."""

    def __init__(self, tmp_path, broker, pki, request):
        self.tmp, self.broker, self.pki = tmp_path, broker, pki
        self.running = []
        self.n = 0
        self.tag = hashlib.sha256(request.node.name.encode()).hexdigest()[:6]

    def provision(self, *, days=365, ca=None, cert=None, renew_days=None, issuer=None, extra=None):
        """A station-provisioned board: (device id, flash path, station certificate)."""
        self.n += 1
        device = f"esp32-fw-{self.tag}-{self.n}"
        key_pem, cert_pem, cert = (issuer or self.pki.ca).client(device, days=days)
        path = make_flash(
            self.tmp / f"{device}.flash",
            device,
            self.broker,
            cert_pem,
            key_pem,
            ca=ca,
            renew_days=renew_days,
            extra=extra,
        )
        return device, path, cert

    def boot(self, path, **kw):
        kw.setdefault("interval", INTERVAL)
        kw.setdefault("backoff_cap", 0.5)
        kw.setdefault("settle", 0.2)
        kw.setdefault("connect_timeout", 5.0)
        lines = []
        fw = Firmware(str(path), log=lines.append, **kw)
        fw.lines = lines
        self.running.append(fw)
        return fw.start()

    def stop_all(self):
        for fw in self.running:
            fw.stop()
        for fw in self.running:
            assert not [e for e in fw.events if e["event"] == "panic"], fw.events


@pytest.fixture
def boards(tmp_path, broker, pki, request):
    b = Boards(tmp_path, broker, pki, request)
    yield b
    b.stop_all()


def field(path):
    return parse_nvs(path.read_bytes()[FIELD]).get("fleet", {})


def serial(cert):
    return format(cert.serial_number, "x")


def iso(dt):
    return dt.strftime("%Y-%m-%dT%H:%M:%SZ")


def csr_of(msg):
    return x509.load_pem_x509_csr(msg["csr"].encode())


def spki(key):
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def answer(controller, root, req, cert, ca):
    """What the controller publishes for a signed request: the cert, and the request cleared."""
    controller.publish(f"{root}/pki/csr", "")
    controller.publish(f"{root}/pki/cert", {"v": 1, "req": req, "cert": pem(cert), "ca": ca})


def command(controller, root, nonce):
    controller.publish(f"{root}/pki/cmd", {"v": 1, "op": "renew", "nonce": nonce})


def test_publishes_every_interval_status_retained_and_last_will(boards, controller, broker, pki):
    device, path, cert = boards.provision(days=10, renew_days=5)  # outside its renewal window
    root = f"devices/{device}"
    fw = boards.boot(path)
    status = controller.wait(f"{root}/status", lambda m: m.get("online"))
    assert {k: v for k, v in status.items() if not k.startswith("_")} == {
        "v": 1,
        "online": True,
        "fw": FW_VERSION,
        "cert_serial": serial(cert),
        "cert_not_after": iso(cert.not_valid_after_utc),
        "renewal": "idle",
    }
    first = controller.wait(f"{root}/telemetry", lambda m: m["seq"] == 1)
    fourth = controller.wait(f"{root}/telemetry", lambda m: m["seq"] == 4)
    readings = controller.all(f"{root}/telemetry")[:4]
    assert [m["seq"] for m in readings] == [1, 2, 3, 4]
    assert all(set(m) == {"device_id", "temperature_c", "humidity_pct", "seq"} for m in readings)
    assert all(m["device_id"] == device and 5 <= m["temperature_c"] <= 40 for m in readings)
    assert 3 * INTERVAL * 0.8 <= fourth["_t"] - first["_t"] <= 3 * INTERVAL + 1.0
    # Retained, so a subscriber that comes later still learns the board's state.
    assert retained(broker, pki.monitor, f"{root}/status")["cert_serial"] == serial(cert)
    # MQTT 5, clean start, keepalive 30, client id and username = device id (mosquitto's log).
    assert f"as {device} (p5, c1, k30, u'{device}')" in broker.log_text()
    # The log callback: one line per event, with a UTC timestamp.
    stamp = r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z "
    assert any(
        re.match(stamp + r"connected broker=localhost:\d+ slot=0 serial=[0-9a-f]+$", x) for x in fw.lines
    )
    assert any(re.search(r"Z published seq=3$", line) for line in fw.lines)
    # A reset drops the connection without DISCONNECT: the broker publishes the retained Will.
    mark = controller.mark()
    fw.halt()
    will = controller.wait(f"{root}/status", since=mark)
    assert {k: v for k, v in will.items() if not k.startswith("_")} == {"v": 1, "online": False}
    assert retained(broker, pki.monitor, f"{root}/status") == {"v": 1, "online": False}
    assert not [e for e in fw.events if e["event"] == "csr"]  # mqtt/renew_days (u16) was honoured


def test_reconnects_after_a_broker_restart_within_the_backoff_bound(boards, controller, broker):
    device, path, _ = boards.provision()
    cap = 0.5
    fw = boards.boot(path, backoff_cap=cap)
    fw.wait_for("published", seq=2)
    since = len(fw.events)
    broker.stop()
    time.sleep(1.5)
    broker.start()
    up = time.monotonic()
    back = fw.wait_for("connected", since=since, timeout=10)
    gone = fw.wait_for("disconnected", since=since)
    waits = [e for e in fw.events[since:] if e["event"] == "reconnect" and e["mono"] < back["mono"]]
    assert len(waits) >= 2, "the board retried while the broker was down"
    assert all(0 <= e["delay"] <= cap for e in waits)
    assert [e["attempt"] for e in waits] == list(range(1, len(waits) + 1))
    # Back within one capped wait (plus a TLS handshake) of the broker's return.
    assert back["mono"] - up <= cap + 1.0
    assert back["mono"] - gone["mono"] >= 1.5  # the outage, as a test computes it from the log
    fw.wait_for("published", since=since)
    controller.wait(f"devices/{device}/status", lambda m: m.get("online"), timeout=5)


def test_backoff_grows_exponentially_with_full_jitter(pki, tmp_path, broker):
    """Section 6 with the protocol's numbers: delays in [0, min(60, 2^attempt)], random."""
    path = make_flash(
        tmp_path / "b.flash", "esp32-fw-backoff", broker, *pki.ca.client("esp32-fw-backoff")[:2]
    )
    fw = Firmware(str(path))
    samples = {a: [fw._backoff(a) for _ in range(300)] for a in (0, 3, 6, 10)}
    for attempt, delays in samples.items():
        bound = min(60.0, 2.0**attempt)
        assert all(0 <= d <= bound for d in delays)
        assert max(delays) > 0.8 * bound and min(delays) < 0.2 * bound  # full jitter, not equal
    fw.stop()


def test_renewal_on_the_window_installs_and_the_new_certificate_is_used(boards, controller, broker, pki):
    device, path, station = boards.provision(days=10)  # renew_days absent: 30
    root = f"devices/{device}"
    nvs_before = path.read_bytes()[NVS]
    fw = boards.boot(path)
    request = controller.wait(f"{root}/pki/csr")
    assert request["v"] == 1 and request["reason"] == "window" and ID.match(request["req"])
    assert retained(broker, pki.monitor, f"{root}/pki/csr")["req"] == request["req"]
    csr = csr_of(request)
    assert csr.is_signature_valid and csr.signature_hash_algorithm.name == "sha256"
    assert csr.subject.rfc4514_string() == f"CN={device}" and len(csr.extensions) == 0
    assert (
        isinstance(csr.public_key(), ec.EllipticCurvePublicKey) and csr.public_key().curve.name == "secp256r1"
    )
    state = field(path)
    assert state["pend_req"] == request["req"]
    pend_key = serialization.load_pem_private_key(state["pend_key"].encode(), None)
    assert spki(pend_key.public_key()) == spki(csr.public_key())
    assert state["base_fp"] == hashlib.sha256(station.public_bytes(serialization.Encoding.DER)).hexdigest()
    status = controller.wait(f"{root}/status", lambda m: m.get("renewal") == "pending")
    assert status["cert_serial"] == serial(station)

    issued = pki.ca.sign_csr(request["csr"], days=90)
    answer(controller, root, request["req"], issued, pki.ca.pem)
    ack = controller.wait(f"{root}/pki/ack")
    assert {k: v for k, v in ack.items() if not k.startswith("_")} == {
        "v": 1,
        "req": request["req"],
        "state": "installed",
        "serial": serial(issued),
    }
    status = controller.wait(f"{root}/status", lambda m: m.get("cert_serial") == serial(issued))
    assert status["renewal"] == "idle" and status["cert_not_after"] == iso(issued.not_valid_after_utc)
    state = field(path)
    assert state["cred_slot"] == 1 and state["a_cert"] == pem(issued)
    a_key = serialization.load_pem_private_key(state["a_key"].encode(), None)
    assert spki(a_key.public_key()) == spki(issued.public_key())
    assert "pend_key" not in state and "pend_req" not in state and "b_cert" not in state
    assert path.read_bytes()[NVS] == nvs_before, "the firmware wrote the station's nvs partition"
    # The ack is retained for the controller (it clears it after revoking the old serial).
    assert retained(broker, pki.monitor, f"{root}/pki/ack")["state"] == "installed"

    # Proof that the new credential is what the board uses: the controller revokes the old serial
    # and the brokers reload. The old certificate can no longer connect at all ...
    since = len(fw.events)
    try:
        broker.restart(crl=[station.serial_number])
        refused = tls_probe(broker, _station_key(path), pem(station))
        assert "CERTIFICATE_REVOKED" in refused
        assert _log_count(broker, "certificate verify failed", 1) == 1  # the probe's
        # ... yet the board is back, and the broker refused nothing else: it never tried the old one.
        back = fw.wait_for("connected", since=since, timeout=10)
        assert back["serial"] == serial(issued) and back["slot"] == 1
        controller.wait(f"{root}/telemetry", lambda m: True, since=controller.mark())
        # After a reboot too: cred_slot selects slot a.
        fw.stop()
        fw2 = boards.boot(path)
        assert fw2.wait_for("connected")["serial"] == serial(issued)
        fw2.wait_for("published", seq=1)
        assert broker.log_text().count("certificate verify failed") == 1
        assert broker.log_text().count(f"as {device} (p5, c1, k30, u'{device}')") == 2
    finally:
        broker.restart()


def _log_count(broker, text, at_least, timeout=3.0):
    """How often text is in the broker's log, once it is there at_least times (mosquitto logs late)."""
    deadline = time.monotonic() + timeout
    while broker.log_text().count(text) < at_least and time.monotonic() < deadline:
        time.sleep(0.02)
    return broker.log_text().count(text)


def _station_key(path):
    """The station key as provisioned (read back from nvs, as esptool read-flash would)."""
    return parse_nvs(path.read_bytes()[NVS])["mqtt"]["client_key"]


def test_renewal_on_a_command_once_per_nonce_and_slots_alternate(boards, controller, pki):
    device, path, _ = boards.provision(days=365)
    root = f"devices/{device}"
    fw = boards.boot(path)
    fw.wait_for("published", seq=2)
    assert not [e for e in fw.events if e["event"] == "csr"]  # far from the window: no request
    serials = []
    for n, nonce in enumerate(("nonce-one-0123456789", "nonce-two-0123456789")):
        mark = controller.mark()
        command(controller, root, nonce)
        request = controller.wait(f"{root}/pki/csr", since=mark)
        assert request["reason"] == "command"
        issued = pki.ca.sign_csr(request["csr"])
        answer(controller, root, request["req"], issued, pki.ca.pem)
        ack = controller.wait(f"{root}/pki/ack", lambda m, r=request["req"]: m["req"] == r, since=mark)
        assert ack["state"] == "installed" and ack["serial"] == serial(issued)
        serials.append(issued)
        assert field(path)["cmd_nonce"] == nonce and field(path)["cred_slot"] == n + 1
        if n == 0:
            # A reboot meets the same retained command: nothing happens (once per nonce).
            fw.stop()
            fw = boards.boot(path)
            assert fw.wait_for("connected")["slot"] == 1
            fw.wait_for("published", seq=3)
            assert not [e for e in fw.events if e["event"] in ("csr", "command")]
    state = field(path)
    assert state["a_cert"] == pem(serials[0]) and state["b_cert"] == pem(serials[1])  # previous slot kept
    status = controller.wait(f"{root}/status", lambda m: m.get("cert_serial") == serial(serials[1]))
    assert status["renewal"] == "idle"


def test_rejected_waits_before_asking_again_and_a_command_resets_the_wait(boards, controller, pki):
    device, path, _ = boards.provision(days=10)
    root = f"devices/{device}"
    fw = boards.boot(path, reject_wait=1.5, window_check=0.1)
    first = controller.wait(f"{root}/pki/csr")
    controller.publish(f"{root}/pki/csr", "")
    controller.publish(
        f"{root}/pki/rejected", {"v": 1, "req": first["req"], "reason": "rate_limited", "detail": "too soon"}
    )
    rejected = fw.wait_for("renewal", state="rejected")
    controller.wait(f"{root}/status", lambda m: m.get("renewal") == "rejected")
    assert "pend_req" not in field(path) and "pend_key" not in field(path)
    again = fw.wait_for("csr", since=fw.events.index(rejected), timeout=5)
    assert 1.5 <= again["mono"] - rejected["mono"] <= 1.5 + 0.1 + 1.0
    assert again["req"] != first["req"] and again["reason"] == "window"
    # Rejected again, with the protocol's hour to wait; a renew command asks at once.
    mark = controller.mark()
    fw.reject_wait = 3600
    controller.publish(
        f"{root}/pki/rejected", {"v": 1, "req": again["req"], "reason": "replayed", "detail": ""}
    )
    second = fw.wait_for("renewal", state="rejected", req=again["req"])
    command(controller, root, "please-renew-now-0001")
    third = controller.wait(
        f"{root}/pki/csr", lambda m: m["req"] not in (first["req"], again["req"]), since=mark
    )
    assert third["reason"] == "command" and third["_t"] - second["t"] < 2


@pytest.mark.parametrize("scenario", ["checks", "broker"])
def test_a_bad_certificate_fails_and_the_old_credential_stays(boards, controller, pki, scenario):
    device, path, station = boards.provision(days=365)
    root = f"devices/{device}"
    fw = boards.boot(path, retry_wait=3600)
    fw.wait_for("published", seq=1)
    other = ec.generate_private_key(ec.SECP256R1())
    past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=2)
    if scenario == "checks":
        cases = [
            (
                "key",
                lambda csr: pki.ca.sign_csr(csr, public_key=other.public_key()),
                pki.ca.pem,
                "public key",
            ),
            ("cn", lambda csr: pki.ca.sign_csr(csr, cn="esp32-someone-else"), pki.ca.pem, "CN"),
            ("chain", lambda csr: pki.rogue.sign_csr(csr), pki.ca.pem, "does not chain"),
            (
                "expired",
                lambda csr: pki.ca.sign_csr(csr, not_before=past, not_after=past),
                pki.ca.pem,
                "not valid",
            ),
            ("bundle", lambda csr: pki.ca.sign_csr(csr), pki.new.pem, "ca: the broker's certificate"),
        ]
    else:
        # Passes every check of the board (its CA is in the bundle it came with), but the broker
        # does not trust that CA: the board connects with it, fails, and goes back.
        cases = [
            ("broker", lambda csr: pki.rogue.sign_csr(csr), pki.ca.pem + pki.rogue.pem, "new certificate")
        ]
    for n, (name, sign, ca, error) in enumerate(cases):
        mark = controller.mark()
        command(controller, root, f"bad-answer-{name}-{n:04d}")
        request = controller.wait(f"{root}/pki/csr", since=mark)
        cert = sign(request["csr"])
        answer(controller, root, request["req"], cert, ca)
        ack = controller.wait(f"{root}/pki/ack", lambda m, r=request["req"]: m["req"] == r, since=mark)
        assert ack["state"] == "failed" and error in ack["error"], (name, ack)
        assert ack["serial"] == serial(cert)
        status = controller.wait(f"{root}/status", lambda m: m.get("renewal") == "failed", since=mark)
        assert status["cert_serial"] == serial(station)
        seq = fw.wait_for("published", since=len(fw.events))["seq"]  # still publishing
        assert seq > 1
        state = field(path)
        assert state.get("cred_slot", 0) == 0 and "pend_key" not in state and "pend_req" not in state
    if scenario == "broker":
        assert fw.wait_for("connect-failed", slot=1)
        assert [e["slot"] for e in fw.events if e["event"] == "connected"][-1] == 0
    assert fw.cred.serial == serial(station)


def test_a_power_cut_while_pending_republishes_the_same_request(boards, controller, pki):
    device, path, _ = boards.provision(days=10)
    root = f"devices/{device}"
    fw = boards.boot(path)
    first = controller.wait(f"{root}/pki/csr")
    assert field(path)["pend_req"] == first["req"]  # pend_req, then pend_key, then the publish
    fw.halt()  # the power goes
    controller.publish(f"{root}/pki/csr", "")  # and the broker lost the retained request
    mark = controller.mark()
    boards.boot(path)
    again = controller.wait(f"{root}/pki/csr", since=mark)
    assert again["req"] == first["req"]
    assert spki(csr_of(again).public_key()) == spki(csr_of(first).public_key())
    issued = pki.ca.sign_csr(again["csr"])
    answer(controller, root, again["req"], issued, pki.ca.pem)
    ack = controller.wait(f"{root}/pki/ack", since=mark)
    assert ack["state"] == "installed" and ack["serial"] == serial(issued)


def test_a_request_cut_short_before_its_key_was_stored_is_dropped(boards, controller, pki, broker):
    """pend_req written, pend_key not (power cut in between): nothing was published, so the
    next boot erases the stray id and asks afresh."""
    device, path, station = boards.provision(days=10)
    flash = bytearray(path.read_bytes())
    w = NvsWriter(memoryview(flash)[FIELD])
    w.set_str("fleet", "base_fp", cert_fingerprint(pem(station)))
    w.set_str("fleet", "pend_req", "stray-request-id-000001")
    path.write_bytes(flash)
    fw = boards.boot(path)
    request = controller.wait(f"devices/{device}/pki/csr")
    assert request["req"] != "stray-request-id-000001"
    assert field(path)["pend_req"] == request["req"]
    fw.stop()


def test_a_reprovisioned_board_voids_its_field_state(boards, controller, pki, broker):
    device, path, station = boards.provision(days=365)
    root = f"devices/{device}"
    key_pem, cert_pem, field_cert = pki.ca.client(device)
    # Field state as a renewal left it: slot a in use, a command acted on, a stored bundle.
    flash = bytearray(path.read_bytes())
    w = NvsWriter(memoryview(flash)[FIELD])
    w.set_str("fleet", "base_fp", cert_fingerprint(pem(station)))
    w.set_str("fleet", "a_cert", cert_pem)
    w.set_str("fleet", "a_key", key_pem)
    w.set_u8("fleet", "cred_slot", 1)
    w.set_str("fleet", "cmd_nonce", "done-before-000000001")
    w.set_str("fleet", "ca_cert", pki.ca.pem + pki.new.pem)
    path.write_bytes(flash)
    fw = boards.boot(path)
    assert fw.wait_for("connected")["serial"] == serial(field_cert)  # the field slot is honoured
    fw.stop()
    # A station provisions the board again (a new certificate in nvs): the field state is void.
    new_key, new_cert_pem, new_station = pki.ca.client(device)
    make_flash(path.with_suffix(".new"), device, broker, new_cert_pem, new_key)
    flash = bytearray(path.read_bytes())
    flash[NVS] = path.with_suffix(".new").read_bytes()[NVS]
    path.write_bytes(flash)
    fw = boards.boot(path)
    reset = fw.wait_for("field-reset")
    assert reset["reason"] == "re-provisioned"
    assert fw.wait_for("connected")["slot"] == 0
    assert fw.cred.serial == serial(new_station)
    assert field(path) == {"base_fp": cert_fingerprint(new_cert_pem)}
    controller.wait(f"{root}/status", lambda m: m.get("cert_serial") == serial(new_station))


def test_trust_bundle_updates(boards, controller, pki, broker):
    """Section 5: a bundle is checked (CAs only, the broker chains to it) and stored; a board whose
    issuer left the bundle renews."""
    # A board from the previous CA, which the broker still trusts during the rotation.
    device, path, _ = boards.provision(days=365, issuer=pki.old, ca=pki.ca.pem)
    root = f"devices/{device}"
    fw = boards.boot(path)
    fw.wait_for("published", seq=1)
    leaf = pki.ca.client("not-a-ca")[1]
    for bundle, error in ((leaf, "not every block"), (pki.rogue.pem, "does not chain"), ("garbage", "PEM")):
        since = len(fw.events)
        controller.publish(f"{root}/pki/ca", {"v": 1, "ca": bundle})
        assert error in fw.wait_for("ca-refused", since=since)["error"]
        assert "ca_cert" not in field(path)
    # The rotation's bundle: the current CA and the next one; the board's issuer is not in it.
    mark = controller.mark()
    bundle = pki.ca.pem + pki.new.pem
    controller.publish(f"{root}/pki/ca", {"v": 1, "ca": bundle})
    fw.wait_for("ca-stored", cas=2)
    assert field(path)["ca_cert"] == bundle
    request = controller.wait(f"{root}/pki/csr", since=mark)
    assert request["reason"] == "window"
    issued = pki.ca.sign_csr(request["csr"])
    answer(controller, root, request["req"], issued, bundle)
    assert controller.wait(f"{root}/pki/ack", since=mark)["state"] == "installed"
    # Same bundle again (retained, on every connect): nothing happens; a reboot verifies the
    # broker with the stored bundle.
    fw.stop()
    fw = boards.boot(path)
    assert fw.wait_for("connected")["serial"] == serial(issued)
    fw.wait_for("published", seq=2)
    assert fw.bundle == bundle
    assert not [e for e in fw.events if e["event"] in ("ca-stored", "ca-refused", "csr")]


def test_partition_table_decides_where_field_state_lives(boards, controller, pki):
    table = bytearray()
    for label, ptype, sub, off, size in (
        ("nvs", 1, 2, 0x9000, 0x6000),
        ("otadata", 1, 0, 0xF000, 0x2000),
        ("ota_0", 0, 0x10, 0x10000, 0x180000),
        ("nvs_field", 1, 2, 0x3F0000, 0x6000),
    ):
        table += b"\xaa\x50" + bytes([ptype, sub]) + off.to_bytes(4, "little") + size.to_bytes(4, "little")
        table += label.encode().ljust(16, b"\0") + bytes(4)
    table += b"\xeb\xeb" + b"\xff" * 14 + hashlib.md5(bytes(table)).digest()
    _, path, station = boards.provision(extra={0x8000: bytes(table)})
    fw = boards.boot(path)
    assert fw.wait_for("boot")["partition_table"] == "yes"
    fw.wait_for("published", seq=1)
    image = path.read_bytes()
    assert parse_nvs(image[0x3F0000:0x3F6000])["fleet"]["base_fp"] == cert_fingerprint(pem(station))
    assert image[FIELD] == b"\xff" * 0x6000
    # A damaged table (MD5 mismatch) is not used: the documented offsets apply.
    fw.stop()
    broken = bytearray(image)
    broken[0x8000 + 4 * 32 + 20] ^= 1
    path.write_bytes(broken)
    fw = boards.boot(path)
    assert fw.wait_for("boot")["partition_table"] == "no"
    fw.wait_for("published", seq=1)
    assert "base_fp" in field(path)


def test_an_unprovisioned_board_idles(tmp_path):
    path = tmp_path / "blank.flash"
    path.write_bytes(b"\xff" * (4 << 20))
    fw = Firmware(str(path)).start()
    assert "no 'mqtt' namespace" in fw.wait_for("not-provisioned")["error"]
    assert fw.alive
    assert fw.stop(2)
    assert path.read_bytes() == b"\xff" * (4 << 20)


def test_esp32sim_run_cli(boards, controller, broker, tmp_path):
    device, path, _ = boards.provision()
    proc = subprocess.Popen(
        [ESP32SIM, "run", "--flash", str(path), "--interval", "0.2", "--backoff-cap", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        controller.wait(f"devices/{device}/telemetry", lambda m: m["seq"] == 2, timeout=15)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert re.search(r"Z connected broker=localhost:\d+ slot=0", out) and "published seq=1" in out
    assert "halted" in out.splitlines()[-1]
    blank = tmp_path / "blank.flash"
    blank.write_bytes(b"\xff" * (4 << 20))
    bad = subprocess.run([ESP32SIM, "run", "--flash", str(blank)], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "no 'mqtt' namespace" in bad.stderr
    missing = subprocess.run(
        [ESP32SIM, "run", "--flash", str(tmp_path / "nope")], capture_output=True, text=True
    )
    assert missing.returncode == 2 and not (tmp_path / "nope").exists()


def test_a_power_cut_between_the_slot_switch_and_the_cleanup_still_acks(boards, controller, pki):
    """cred_slot already points at the new slot, pend_* not yet erased: the next boot sees that
    the pending key is the key of the credential in use, finishes, and acks `installed`."""
    device, path, station = boards.provision(days=365)
    key = ec.generate_private_key(ec.SECP256R1())
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    ).decode()
    issued = pki.ca.issue(device, key.public_key())
    flash = bytearray(path.read_bytes())
    w = NvsWriter(memoryview(flash)[FIELD])
    w.set_str("fleet", "base_fp", cert_fingerprint(pem(station)))
    w.set_str("fleet", "pend_req", "finished-request-000001")
    w.set_str("fleet", "pend_key", key_pem)
    w.set_str("fleet", "a_cert", pem(issued))
    w.set_str("fleet", "a_key", key_pem)
    w.set_u8("fleet", "cred_slot", 1)
    path.write_bytes(flash)
    fw = boards.boot(path)
    ack = controller.wait(f"devices/{device}/pki/ack")
    assert (ack["req"], ack["state"], ack["serial"]) == (
        "finished-request-000001",
        "installed",
        serial(issued),
    )
    assert fw.wait_for("connected")["slot"] == 1
    state = field(path)
    assert "pend_key" not in state and "pend_req" not in state and state["cred_slot"] == 1
    assert not [e for e in fw.events if e["event"] == "csr"]


def test_an_nvs_field_without_a_free_page_is_erased_and_started_afresh(boards):
    """ESP_ERR_NVS_NO_FREE_PAGES from nvs_flash_init: what ESP-IDF applications do is erase the
    partition and init again; the station's nvs is untouched."""
    pages = bytearray()
    for seq in range(6):
        header = (0xFFFFFFFE).to_bytes(4, "little") + seq.to_bytes(4, "little") + b"\xfe" + b"\xff" * 19
        crc = zlib.crc32(header[4:28], 0xFFFFFFFF) & 0xFFFFFFFF
        pages += (header + crc.to_bytes(4, "little")).ljust(4096, b"\xff")
    _, path, station = boards.provision(extra={0x312000: bytes(pages)})
    nvs_before = path.read_bytes()[NVS]
    fw = boards.boot(path)
    assert "NO_FREE_PAGES" in fw.wait_for("field-erased")["error"]
    fw.wait_for("published", seq=1)
    assert field(path) == {"base_fp": cert_fingerprint(pem(station))}
    assert path.read_bytes()[NVS] == nvs_before


def test_a_long_running_board_bounds_its_memory_and_its_log(boards):
    """The living lab runs for months: only the last events are kept, one reading in N is logged."""
    _, path, _ = boards.provision()
    fw = boards.boot(path, interval=0.02, keep_events=30, log_every_reading=10)
    fw.wait_for("published", seq=60, timeout=30)
    assert len(fw.events) <= 30
    assert fw.events[-1]["t"] >= fw.events[0]["t"]
    logged = [int(line.split("seq=")[1].split()[0]) for line in fw.lines if " published " in line]
    assert logged[0] == 1 and all(seq == 1 or seq % 10 == 0 for seq in logged)
    assert {10, 20, 30, 40, 50} <= set(logged)
    assert any(" connected " in line for line in fw.lines)  # everything else is logged
