"""fleet_renewal against a real throwaway Mosquitto (mTLS, CN = user name, an ACL of the shape the
mosquitto role writes): the test plays the boards with paho-mqtt and the pki role with `cryptography`.

A request is collected, a bad one refused on R/pki/rejected with R/pki/csr cleared; an answer is
published and recorded, the board's confirmation matched, the exchange finished; commands and trust
bundles are idempotent; check mode publishes nothing; the read-only application identity is refused
by the broker (the ACL the playbooks rely on). Each test uses its own boards (retained messages stay).
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import ipaddress
import itertools
import json
import os
import shutil
import socket
import subprocess
import threading
import time
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from ansible_collections.esp32_fleet.mqtt_fleet.plugins.module_utils import fleet_csr
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from paho.mqtt.subscribeoptions import SubscribeOptions

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
SERVICE, MONITOR = "fleet-pki", "fleet-monitor"
_ids = itertools.count(1)


# -- a throwaway PKI and broker -------------------------------------------------------------------


def _name(cn):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _pem_key(key):
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


class Pki:
    def __init__(self, directory: Path, cn="renewal test CA"):
        self.dir = directory
        self.now = datetime.datetime.now(datetime.UTC)
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(_name(cn))
            .issuer_name(_name(cn))
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(self.now - datetime.timedelta(minutes=5))
            .not_valid_after(self.now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
            )
            .sign(self.key, hashes.SHA256())
        )
        self.ca = directory / f"{cn.replace(' ', '-')}.crt"
        self.ca.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def sign(self, public_key, cn, path: Path, server=False):
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(cn))
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(self.now - datetime.timedelta(minutes=5))
            .not_valid_after(self.now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        )
        if server:
            san = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
            usage = ExtendedKeyUsageOID.SERVER_AUTH
        else:
            usage = ExtendedKeyUsageOID.CLIENT_AUTH
        cert = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False).sign(
            self.key, hashes.SHA256()
        )
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return cert

    def identity(self, cn, server=False):
        """(cert path, key path) of a new identity with CN cn."""
        key = ec.generate_private_key(ec.SECP256R1())
        key_path = self.dir / f"{cn}.key"
        key_path.write_bytes(_pem_key(key))
        os.chmod(key_path, 0o600)
        cert_path = self.dir / f"{cn}.crt"
        self.sign(key.public_key(), cn, cert_path, server=server)
        return cert_path, key_path

    def sign_csr(self, csr_pem, path: Path):
        """What the pki role's sign_csr does, in short: the board's key and CN, the device profile."""
        csr = x509.load_pem_x509_csr(csr_pem.encode())
        cn = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        return self.sign(csr.public_key(), cn, path)


def _free_port():
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


ACL = f"""user {SERVICE}
topic readwrite devices/+/pki/#
topic read devices/+/status
topic read devices/+/telemetry

user {MONITOR}
topic read devices/#

pattern readwrite devices/%u/#
"""


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    if not os.path.exists(MOSQUITTO):
        pytest.fail(f"mosquitto is required ({MOSQUITTO} not found)")
    d = tmp_path_factory.mktemp("renewal-broker")
    pki = Pki(d)
    server_cert, server_key = pki.identity("localhost", server=True)
    pki.identity(SERVICE)
    pki.identity(MONITOR)
    (d / "acl").write_text(ACL)
    proc = log = None
    for attempt in range(5):
        port = _free_port()
        (d / "mosquitto.conf").write_text(
            "\n".join(
                [
                    "user root",
                    "per_listener_settings false",
                    "persistence false",
                    "log_dest stderr",
                    "log_type all",
                    "allow_anonymous false",
                    f"acl_file {d / 'acl'}",
                    f"listener {port} 127.0.0.1",
                    f"cafile {pki.ca}",
                    f"certfile {server_cert}",
                    f"keyfile {server_key}",
                    "tls_version tlsv1.2",
                    "require_certificate true",
                    "use_identity_as_username true",
                    "",
                ]
            )
        )
        log = open(d / f"mosquitto{attempt}.log", "wb")  # noqa: SIM115 - closed below
        proc = subprocess.Popen([MOSQUITTO, "-c", str(d / "mosquitto.conf")], stdout=log, stderr=log)
        deadline = time.monotonic() + 5
        up = False
        while time.monotonic() < deadline and proc.poll() is None:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                up = True
                break
            time.sleep(0.05)
        if up:
            break
        proc.kill()
        proc.wait()
        log.close()
    else:
        pytest.fail(f"mosquitto did not start: {(d / 'mosquitto0.log').read_text()}")
    yield {"port": port, "dir": d, "pki": pki}
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    log.close()


# -- the boards (paho-mqtt) -----------------------------------------------------------------------


class Client:
    """An MQTT v5 client with an identity of the test PKI; records what arrives on its subscriptions."""

    def __init__(self, broker, cn, subscribe=(), on_message=None):
        self.cn = cn
        pki = broker["pki"]
        cert, key = pki.dir / f"{cn}.crt", pki.dir / f"{cn}.key"
        if not cert.exists():
            pki.identity(cn)
        self.cert = cert
        self.messages = []
        self.cond = threading.Condition()
        self.pubacks = {}
        self.hook = on_message
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=f"{cn}-{uuid.uuid4().hex[:6]}", protocol=mqtt.MQTTv5
        )
        self.client.tls_set(ca_certs=str(pki.ca), certfile=str(cert), keyfile=str(key))
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish
        self.client.on_subscribe = lambda *_a: self._note("subscribed")
        self.client.on_connect = lambda *_a: self._note("connected")
        self.flags = set()
        self.client.connect("127.0.0.1", broker["port"])
        self.client.loop_start()
        self._wait(lambda: "connected" in self.flags)
        if subscribe:
            self.client.subscribe([(t, SubscribeOptions(qos=1, noLocal=True)) for t in subscribe])
            self._wait(lambda: "subscribed" in self.flags)
            time.sleep(0.1)  # the retained ones

    def _note(self, flag):
        with self.cond:
            self.flags.add(flag)
            self.cond.notify_all()

    def _wait(self, pred, timeout=5.0):
        deadline = time.monotonic() + timeout
        with self.cond:
            while not pred():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"{self.cn}: timed out; seen {[(t, p[:60]) for t, p, _ in self.messages]}"
                    )
                self.cond.wait(left)

    def _on_message(self, _c, _u, msg):
        with self.cond:
            self.messages.append((msg.topic, bytes(msg.payload), bool(msg.retain)))
            self.cond.notify_all()
        if self.hook:
            self.hook(self, msg.topic, bytes(msg.payload))

    def _on_publish(self, _c, _u, mid, reason_code, _p):
        with self.cond:
            self.pubacks[mid] = reason_code
            self.cond.notify_all()

    def publish(self, topic, body, retain=True):
        payload = body if isinstance(body, bytes) else json.dumps(body).encode()
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        self._wait(lambda: info.mid in self.pubacks)
        return self.pubacks[info.mid]

    def wait_for(self, topic, pred=lambda payload: bool(payload), timeout=5.0):
        def found():
            return next((p for t, p, _ in self.messages if t == topic and pred(p)), None)

        self._wait(lambda: found() is not None, timeout)
        return json.loads(found())

    def on(self, topic):
        with self.cond:
            return [p for t, p, _ in self.messages if t == topic]

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def clients():
    made = []

    def make(broker, cn, **kw):
        c = Client(broker, cn, **kw)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


def retained(broker, topic):
    """The retained payload of topic (b"" when none), as a fresh subscriber sees it."""
    c = Client(broker, MONITOR, subscribe=[topic])
    try:
        time.sleep(0.1)
        got = c.on(topic)
        return got[-1] if got else b""
    finally:
        c.close()


def new_board(broker):
    device_id = f"esp32-t{next(_ids)}-{uuid.uuid4().hex[:6]}"
    cert, _ = broker["pki"].identity(device_id)
    return {"id": device_id, "root": f"devices/{device_id}", "cert": str(cert), "revoked": False}


def make_csr(device_id, key=None, san=False):
    key = key or ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(_name(device_id))
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName("evil.example")]), False)
    return key, builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()


def request(device_id, req=None, **kw):
    key, pem = make_csr(device_id, **kw)
    req = req or uuid.uuid4().hex
    return key, {"v": 1, "req": req, "csr": pem, "reason": "window"}


def serial_of(path):
    return x509.load_pem_x509_certificate(Path(path).read_bytes()).serial_number


# -- running the module ---------------------------------------------------------------------------


@pytest.fixture
def renewal(broker, tmp_path, run_module):
    state = tmp_path / "renewals" / "state.json"
    pki = broker["pki"]

    def run(action, devices, check_mode=False, identity=SERVICE, connection=None, **kw):
        args = dict(
            action=action,
            host="127.0.0.1",
            port=broker["port"],
            ca_cert=str(pki.ca),
            client_cert=str(pki.dir / f"{identity}.crt"),
            client_key=str(pki.dir / f"{identity}.key"),
            state_file=str(state),
            devices=devices,
            settle=0.2,
            timeout=5,
            **kw,
        )
        args.update(connection or {})
        return run_module("fleet_renewal", args, check_mode=check_mode)

    run.state = state
    return run


def entry(run, device_id):
    return fleet_csr.device_entry(fleet_csr.load_state(str(run.state)), device_id)


# -- the tests ------------------------------------------------------------------------------------


def test_collect_returns_requests_and_answers_refusals(broker, renewal, clients):
    good, rsa_board, san_board, gone = (new_board(broker) for _ in range(4))
    gone["revoked"] = True
    boards = {
        b["id"]: clients(broker, b["id"], subscribe=[f"{b['root']}/pki/rejected"])
        for b in (good, rsa_board, san_board, gone)
    }
    _, ok = request(good["id"])
    _, weak = request(rsa_board["id"], key=rsa.generate_private_key(public_exponent=65537, key_size=1024))
    _, san = request(san_board["id"], san=True)
    _, revoked = request(gone["id"])
    for board, body in ((good, ok), (rsa_board, weak), (san_board, san), (gone, revoked)):
        assert not boards[board["id"]].publish(f"{board['root']}/pki/csr", body).is_failure
    # Not JSON, straight from a board: malformed, still answered.
    junk = new_board(broker)
    junk_client = clients(broker, junk["id"], subscribe=[f"{junk['root']}/pki/rejected"])
    junk_client.publish(f"{junk['root']}/pki/csr", b"\x00not json")

    devices = [good, rsa_board, san_board, gone, junk]
    result = renewal("collect", devices, policy={"key_type": "EC", "key_curve": "secp256r1"})
    assert result["changed"] is True, result
    assert [(r["device_id"], r["req"], r["repeat"]) for r in result["requests"]] == [
        (good["id"], ok["req"], False)
    ]
    assert result["requests"][0]["csr"].strip() == ok["csr"].strip()
    reasons = {r["device_id"]: (r["reason"], r["req"]) for r in result["refused"]}
    assert reasons == {
        rsa_board["id"]: ("wrong_key", weak["req"]),
        san_board["id"]: ("wrong_cn", san["req"]),
        gone["id"]: ("revoked", revoked["req"]),
        junk["id"]: ("malformed", None),
    }
    rejected = boards[rsa_board["id"]].wait_for(f"{rsa_board['root']}/pki/rejected")
    assert rejected["v"] == 1 and rejected["req"] == weak["req"] and rejected["reason"] == "wrong_key"
    assert "RSA 1024" in rejected["detail"]
    assert junk_client.wait_for(f"{junk['root']}/pki/rejected")["reason"] == "malformed"
    # Refused requests are cleared; the accepted one stays until it is answered; nothing is recorded.
    assert retained(broker, f"{rsa_board['root']}/pki/csr") == b""
    assert retained(broker, f"{junk['root']}/pki/csr") == b""
    assert json.loads(retained(broker, f"{good['root']}/pki/csr"))["req"] == ok["req"]
    assert entry(renewal, good["id"]) == fleet_csr.empty_entry()
    assert entry(renewal, rsa_board["id"]) == fleet_csr.empty_entry()
    again = renewal("collect", devices)
    assert again["changed"] is False and again["refused"] == [] and len(again["requests"]) == 1


def test_answer_ack_finish(broker, renewal, clients, tmp_path):
    board = new_board(broker)
    old_serial = serial_of(board["cert"])
    device = clients(broker, board["id"], subscribe=[f"{board['root']}/pki/cert"])
    _, body = request(board["id"])
    device.publish(f"{board['root']}/pki/csr", body)

    collected = renewal("collect", [board])
    (req,) = collected["requests"]
    new_cert = tmp_path / f"{board['id']}.renewal.crt"
    issued = broker["pki"].sign_csr(req["csr"], new_cert)
    answer = [{"id": board["id"], "req": req["req"], "cert": str(new_cert)}]
    bundle = str(broker["pki"].ca)

    answered = renewal("answer", [board], answers=answer, ca_bundle=bundle)
    assert answered["changed"] is True, answered
    (item,) = answered["answered"]
    assert (
        item["serial"] == format(issued.serial_number, "x") and item["serial_number"] == issued.serial_number
    )
    assert item["replaces_serial"] == old_serial and item["published"] is True
    got = device.wait_for(f"{board['root']}/pki/cert")
    assert got == {"v": 1, "req": body["req"], "cert": new_cert.read_text(), "ca": Path(bundle).read_text()}
    assert retained(broker, f"{board['root']}/pki/csr") == b""
    state = entry(renewal, board["id"])
    assert state["pending"]["req"] == body["req"] and state["pending"]["serial"] == item["serial"]
    assert state["pending"]["replaces_serial"] == format(old_serial, "x")
    assert body["req"] in state["answered_reqs"]
    assert oct(os.stat(renewal.state).st_mode & 0o777) == "0o600"

    # The same answer again: nothing to do.
    assert renewal("answer", [board], answers=answer, ca_bundle=bundle)["changed"] is False
    # The same request again (a board that rebooted while pending) is a repeat, to be answered again.
    device.publish(f"{board['root']}/pki/csr", body)
    repeat = renewal("collect", [board])
    assert repeat["refused"] == [] and repeat["requests"][0]["repeat"] is True
    again = renewal("answer", [board], answers=answer, ca_bundle=bundle)
    assert again["changed"] is True and again["answered"][0]["published"] is False  # the cert was retained
    assert retained(broker, f"{board['root']}/pki/csr") == b""

    # The board confirms; collect matches it.
    device.publish(
        f"{board['root']}/pki/ack",
        {"v": 1, "req": body["req"], "state": "installed", "serial": item["serial"]},
    )
    confirmed = renewal("collect", [board])
    assert confirmed["changed"] is False
    assert confirmed["acks"] == [
        {
            "device_id": board["id"],
            "req": body["req"],
            "serial": item["serial"],
            "serial_number": issued.serial_number,
            "replaces_serial": old_serial,
        }
    ]

    finished = renewal("finish", [board], finished=[board["id"]])
    assert finished["changed"] is True
    assert finished["completed"][0]["replaces_serial"] == old_serial
    assert retained(broker, f"{board['root']}/pki/cert") == b""
    assert retained(broker, f"{board['root']}/pki/ack") == b""
    state = entry(renewal, board["id"])
    assert state["pending"] is None and state["command"] is None and state["last_issued"]
    assert renewal("finish", [board], finished=[board["id"]])["changed"] is False

    # The old request again is a replay; a new one within the interval is rate limited.
    device.publish(f"{board['root']}/pki/csr", body)
    _, newer = request(board["id"])
    replay = renewal("collect", [board])
    assert [r["reason"] for r in replay["refused"]] == ["replayed"]
    device.publish(f"{board['root']}/pki/csr", newer)
    limited = renewal("collect", [board])
    assert [r["reason"] for r in limited["refused"]] == ["rate_limited"]


def test_answer_waits_for_the_confirmation(broker, renewal, clients, tmp_path):
    board = new_board(broker)

    def firmware(client, topic, payload):
        if topic.endswith("/pki/cert") and payload:
            msg = json.loads(payload)
            serial = format(x509.load_pem_x509_certificate(msg["cert"].encode()).serial_number, "x")
            ack = {"v": 1, "req": msg["req"], "state": "installed", "serial": serial}
            client.client.publish(f"{board['root']}/pki/ack", json.dumps(ack), qos=1, retain=True)

    device = clients(broker, board["id"], subscribe=[f"{board['root']}/pki/cert"], on_message=firmware)
    _, body = request(board["id"])
    device.publish(f"{board['root']}/pki/csr", body)
    (req,) = renewal("collect", [board])["requests"]
    cert = tmp_path / "new.crt"
    issued = broker["pki"].sign_csr(req["csr"], cert)
    started = time.monotonic()
    answered = renewal(
        "answer",
        [board],
        answers=[{"id": board["id"], "req": req["req"], "cert": str(cert)}],
        ca_bundle=str(broker["pki"].ca),
        wait=10,
    )
    assert time.monotonic() - started < 5  # returned on the confirmation, not after the wait
    assert [(a["device_id"], a["serial_number"]) for a in answered["acks"]] == [
        (board["id"], issued.serial_number)
    ]
    assert answered["failed_acks"] == []


def test_a_failed_install_is_reported(broker, renewal, clients, tmp_path):
    board = new_board(broker)
    device = clients(broker, board["id"])
    _, body = request(board["id"])
    device.publish(f"{board['root']}/pki/csr", body)
    (req,) = renewal("collect", [board])["requests"]
    cert = tmp_path / "new.crt"
    broker["pki"].sign_csr(req["csr"], cert)
    renewal(
        "answer",
        [board],
        answers=[{"id": board["id"], "req": req["req"], "cert": str(cert)}],
        ca_bundle=str(broker["pki"].ca),
    )
    device.publish(
        f"{board['root']}/pki/ack",
        {
            "v": 1,
            "req": body["req"],
            "state": "failed",
            "serial": "1",
            "error": "connection with the new certificate failed",
        },
    )
    result = renewal("collect", [board])
    assert result["acks"] == [] and result["failed_acks"][0]["error"].startswith("connection with")
    # Finishing a board whose confirmation does not match does nothing.
    finish = renewal("finish", [board], finished=[board["id"]])
    assert finish["changed"] is False and finish["skipped"][0]["device_id"] == board["id"]


def test_command_is_idempotent_opens_the_rate_limit_and_finish_closes_it(broker, renewal, clients, tmp_path):
    board = new_board(broker)

    def firmware(client, topic, payload):
        if topic.endswith("/pki/cmd") and payload:
            client.client.publish(
                f"{board['root']}/pki/csr", json.dumps(request(board["id"])[1]), qos=1, retain=True
            )

    device = clients(broker, board["id"], subscribe=[f"{board['root']}/pki/cmd"], on_message=firmware)
    # A certificate was issued over the air an hour ago.
    renewal.state.parent.mkdir()
    state = fleet_csr.new_state()
    issued = fleet_csr.empty_entry()
    issued["last_issued"] = fleet_csr.iso(datetime.datetime.now(datetime.UTC) - datetime.timedelta(hours=1))
    fleet_csr.set_entry(state, board["id"], issued)
    fleet_csr.save_state(str(renewal.state), state)
    device.publish(f"{board['root']}/pki/csr", request(board["id"])[1])
    assert [r["reason"] for r in renewal("collect", [board])["refused"]] == ["rate_limited"]

    first = renewal("command", [board])
    assert first["changed"] is True and first["commanded"] == [board["id"]]
    cmd = device.wait_for(f"{board['root']}/pki/cmd")
    assert cmd["v"] == 1 and cmd["op"] == "renew" and len(cmd["nonce"]) == 32 and int(cmd["nonce"], 16) >= 0
    assert entry(renewal, board["id"])["command"]["nonce"] == cmd["nonce"]
    second = renewal("command", [board])
    assert second["changed"] is False and second["already_open"] == [board["id"]]

    # The board answers the command with a request: waited for, and accepted despite the rate limit.
    collected = renewal("collect", [board], wait_for=[board["id"]], wait=5)
    assert collected["refused"] == [] and len(collected["requests"]) == 1
    req = collected["requests"][0]
    cert = tmp_path / "new.crt"
    issued_cert = broker["pki"].sign_csr(req["csr"], cert)
    renewal(
        "answer",
        [board],
        answers=[{"id": board["id"], "req": req["req"], "cert": str(cert)}],
        ca_bundle=str(broker["pki"].ca),
    )
    device.publish(
        f"{board['root']}/pki/ack",
        {"v": 1, "req": req["req"], "state": "installed", "serial": format(issued_cert.serial_number, "x")},
    )
    assert renewal("finish", [board], finished=[board["id"]])["changed"] is True
    assert retained(broker, f"{board['root']}/pki/cmd") == b""
    assert entry(renewal, board["id"])["command"] is None


def test_publish_ca_is_idempotent(broker, renewal, clients, tmp_path):
    boards = [new_board(broker), new_board(broker)]
    revoked = dict(new_board(broker), revoked=True)
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(broker["pki"].ca.read_bytes())
    first = renewal("publish_ca", [*boards, revoked], ca_bundle=str(bundle))
    assert first["changed"] is True and first["published"] == [b["id"] for b in boards]
    assert first["skipped"] == [{"device_id": revoked["id"], "reason": "revoked"}]
    assert json.loads(retained(broker, f"{boards[0]['root']}/pki/ca")) == {"v": 1, "ca": bundle.read_text()}
    second = renewal("publish_ca", [*boards, revoked], ca_bundle=str(bundle))
    assert second["changed"] is False and second["unchanged"] == [b["id"] for b in boards]
    # A rotation's two-CA bundle: published again; one board's retained bundle differs, only it changes.
    other = Pki(tmp_path, "next CA")
    bundle.write_text(broker["pki"].ca.read_text() + other.ca.read_text())
    assert renewal("publish_ca", boards[:1], ca_bundle=str(bundle))["published"] == [boards[0]["id"]]
    third = renewal("publish_ca", boards, ca_bundle=str(bundle))
    assert third["published"] == [boards[1]["id"]] and third["unchanged"] == [boards[0]["id"]]


def test_publish_ca_leaves_a_board_whose_station_wrote_the_bundle(broker, renewal, clients, tmp_path):
    """Regression: after a fresh provisioning no board had a retained bundle, so the first upkeep
    (and upkeep --check) published the very bundle every board had just been flashed with."""
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(broker["pki"].ca.read_bytes())
    fresh = dict(new_board(broker), ca_sha256=hashlib.sha256(bundle.read_bytes()).hexdigest())
    older = dict(new_board(broker), ca_sha256=hashlib.sha256(b"an earlier bundle").hexdigest())
    unknown = new_board(broker)  # provisioned before the manifest recorded the bundle
    check = renewal("publish_ca", [fresh, older, unknown], ca_bundle=str(bundle), check_mode=True)
    assert check["published"] == [older["id"], unknown["id"]], check
    result = renewal("publish_ca", [fresh, older, unknown], ca_bundle=str(bundle))
    assert result["unchanged"] == [fresh["id"]] and result["published"] == [older["id"], unknown["id"]]
    assert retained(broker, f"{fresh['root']}/pki/ca") == b""
    # A rotation's two-CA bundle is not the station's: every board gets it.
    bundle.write_text(broker["pki"].ca.read_text() + Pki(tmp_path, "next CA").ca.read_text())
    rotation = renewal("publish_ca", [fresh, older, unknown], ca_bundle=str(bundle))
    assert rotation["published"] == [fresh["id"], older["id"], unknown["id"]], rotation


def test_observe_reads_status_and_readings_and_changes_nothing(broker, renewal, clients):
    live, gone, silent = new_board(broker), new_board(broker), new_board(broker)
    revoked = dict(new_board(broker), revoked=True)
    board = clients(broker, live["id"])
    status = {"v": 1, "online": True, "fw": "esp32sim-0.1.0", "cert_serial": "ab12", "renewal": "pending"}
    assert not board.publish(f"{live['root']}/status", status).is_failure
    # A board whose Last Will is what is retained: offline.
    clients(broker, gone["id"]).publish(f"{gone['root']}/status", {"v": 1, "online": False})
    stop = threading.Event()

    def readings():
        while not stop.is_set():
            board.client.publish(f"{live['root']}/telemetry", b'{"seq": 1}', qos=1)
            stop.wait(0.3)

    sender = threading.Thread(target=readings)
    sender.start()
    try:
        result = renewal("observe", [live, gone, silent, revoked], wait=1.5, check_mode=True)
    finally:
        stop.set()
        sender.join()
    assert result["changed"] is False and set(result["reports"]) == {live["id"], gone["id"], silent["id"]}
    seen = result["reports"][live["id"]]
    assert seen["online"] and seen["firmware_version"] == "esp32sim-0.1.0" and seen["cert_serial"] == "ab12"
    assert seen["renewal_state"] == "pending" and seen["readings"] >= 2
    assert datetime.datetime.strptime(seen["last_reading"], "%Y-%m-%dT%H:%M:%SZ")
    quiet = {
        "online": False,
        "firmware_version": None,
        "cert_serial": None,
        "last_reading": None,
        "readings": 0,
    }
    assert result["reports"][gone["id"]] == dict(quiet, renewal_state="offline")
    assert result["reports"][silent["id"]] == dict(quiet, renewal_state="no report")
    assert not renewal.state.exists()  # read only: no state written


def test_check_mode_publishes_and_writes_nothing(broker, renewal, clients, tmp_path):
    board = new_board(broker)
    device = clients(broker, board["id"])
    _, body = request(board["id"], san=True)
    device.publish(f"{board['root']}/pki/csr", body)
    watcher = clients(broker, MONITOR, subscribe=[f"{board['root']}/pki/#"])
    seen = len(watcher.messages)  # the retained request
    bundle = str(broker["pki"].ca)

    collected = renewal("collect", [board], check_mode=True)
    assert collected["changed"] is True and collected["refused"][0]["reason"] == "wrong_cn"
    assert renewal("command", [board], check_mode=True)["commanded"] == [board["id"]]
    assert renewal("publish_ca", [board], ca_bundle=bundle, check_mode=True)["published"] == [board["id"]]
    # The pki role's check mode signs nothing: an answer whose certificate file is missing is previewed.
    preview = renewal(
        "answer",
        [board],
        answers=[{"id": board["id"], "req": body["req"], "cert": str(tmp_path / "missing.crt")}],
        ca_bundle=bundle,
        check_mode=True,
        wait=5,
    )
    assert preview["changed"] is True and preview["answered"][0]["published"] is True
    assert preview["answered"][0]["serial"] is None
    time.sleep(0.3)
    assert watcher.messages[seen:] == []
    assert json.loads(retained(broker, f"{board['root']}/pki/csr"))["v"] == 1  # still there
    assert not renewal.state.parent.exists()  # neither the state file nor its lock


def test_the_read_only_identity_is_refused_by_the_broker(broker, renewal, clients, tmp_path):
    board = new_board(broker)
    device = clients(broker, board["id"])
    _, body = request(board["id"])
    device.publish(f"{board['root']}/pki/csr", body)
    (req,) = renewal("collect", [board])["requests"]
    cert = tmp_path / "new.crt"
    broker["pki"].sign_csr(req["csr"], cert)
    answer = [{"id": board["id"], "req": req["req"], "cert": str(cert)}]
    bundle = str(broker["pki"].ca)

    refused = renewal("answer", [board], answers=answer, ca_bundle=bundle, identity=MONITOR)
    assert refused["failed"] is True
    assert f"{board['root']}/pki/cert" in refused["msg"] and "0x87" in refused["msg"], refused["msg"]
    assert "\n" not in refused["msg"]
    assert retained(broker, f"{board['root']}/pki/cert") == b""
    # The refused answer left no trace: the service identity answers it afterwards.
    assert entry(renewal, board["id"]) == fleet_csr.empty_entry()
    ok = renewal("answer", [board], answers=answer, ca_bundle=bundle)
    assert ok["changed"] is True and ok["answered"][0]["published"] is True
    # A board cannot publish under another board's root either (the pattern ACL).
    intruder = clients(broker, new_board(broker)["id"])
    assert intruder.publish(f"{board['root']}/pki/ack", {"v": 1}).value == 0x87


@pytest.mark.parametrize("problem", ["closed port", "unknown CA", "rogue identity", "missing file"])
def test_connection_failures_are_one_line(broker, renewal, tmp_path, problem):
    board = new_board(broker)
    kw = {}
    if problem == "closed port":
        kw["port"] = _free_port()
    elif problem == "unknown CA":
        kw["ca_cert"] = str(Pki(tmp_path, "rogue CA").ca)
    elif problem == "rogue identity":  # a client certificate the broker's CA did not issue
        cert, key = Pki(tmp_path, "rogue CA").identity(SERVICE)
        kw.update(client_cert=str(cert), client_key=str(key))
    else:
        kw["client_key"] = str(tmp_path / "nope.key")
    result = renewal("publish_ca", [board], ca_bundle=str(broker["pki"].ca), connection=kw)
    assert result["failed"] is True
    assert "\n" not in result["msg"] and "Traceback" not in result["msg"]
    expected = {
        "closed port": "cannot connect",
        "unknown CA": "TLS with",
        "rogue identity": "closed the connection before its CONNACK",
        "missing file": "client_key",
    }
    assert expected[problem] in result["msg"], result["msg"]


def test_through_ansible_playbook(broker, playbook, tmp_path):
    board = new_board(broker)
    pki = broker["pki"]
    task = {
        "esp32_fleet.mqtt_fleet.fleet_renewal": {
            "action": "publish_ca",
            "host": "127.0.0.1",
            "port": broker["port"],
            "ca_cert": str(pki.ca),
            "client_cert": str(pki.dir / f"{SERVICE}.crt"),
            "client_key": str(pki.dir / f"{SERVICE}.key"),
            "devices": [board],
            "ca_bundle": str(pki.ca),
            "settle": 0.2,
        },
        "register": "published",
    }
    rc, results, stats = playbook([task, task])
    assert rc == 0, results
    assert results[0]["changed"] is True and results[0]["published"] == [board["id"]]
    assert results[1]["changed"] is False and results[1]["unchanged"] == [board["id"]]
    assert stats["changed"] == 1
