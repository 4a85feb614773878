"""Test side of the device protocol: a restartable Mosquitto with mTLS, ACLs and an optional CRL,
a PKI whose CA keys the tests hold (so they can sign CSRs), and a controller client (`fleet-pki`)."""

import contextlib
import datetime
import ipaddress
import json
import os
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from paho.mqtt.enums import CallbackAPIVersion

from .conftest import MOSQUITTO, _free_port
from .nvs_images import build_nvs, mqtt_namespaces

UTC = datetime.UTC
FLASH_SIZE = 4 * 1024 * 1024


def _now():
    return datetime.datetime.now(UTC)


def _name(cn):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def pem(cert) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def pem_key(key) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


class Ca:
    def __init__(self, cn):
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(_name(cn))
            .issuer_name(_name(cn))
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_now() - datetime.timedelta(days=1))
            .not_valid_after(_now() + datetime.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
            )
            .sign(self.key, hashes.SHA256())
        )
        self.pem = pem(self.cert)

    def issue(self, cn, public_key, *, days=365, not_before=None, server=False, not_after=None):
        nb = not_before or _now() - datetime.timedelta(minutes=5)
        na = not_after or _now() + datetime.timedelta(days=days)
        b = (
            x509.CertificateBuilder()
            .subject_name(_name(cn))
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(nb)
            .not_valid_after(na)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        )
        if server:
            b = b.add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        else:
            b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        return b.sign(self.key, hashes.SHA256())

    def client(self, cn, **kw):
        """(key PEM, certificate PEM, certificate) of a new client identity."""
        key = ec.generate_private_key(ec.SECP256R1())
        cert = self.issue(cn, key.public_key(), **kw)
        return pem_key(key), pem(cert), cert

    def sign_csr(self, csr_pem, *, cn=None, public_key=None, **kw):
        """What the controller does (device profile: CN kept, clientAuth); cn/public_key: a bad answer."""
        csr = x509.load_pem_x509_csr(csr_pem.encode())
        assert csr.is_signature_valid
        subject_cn = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        return self.issue(cn or subject_cn, public_key or csr.public_key(), **kw)

    def crl(self, serials):
        b = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.cert.subject)
            .last_update(_now() - datetime.timedelta(minutes=5))
            .next_update(_now() + datetime.timedelta(days=1))
        )
        for s in serials:
            b = b.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(s).revocation_date(_now()).build()
            )
        return b.sign(self.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()


class Pki:
    """fleet CA (signs the broker and the devices), a previous fleet CA the broker still trusts
    (for CA rotation), a new CA nobody trusts yet, and a rogue CA."""

    def __init__(self):
        self.ca = Ca("esp32sim fleet CA")
        self.old = Ca("esp32sim fleet CA (previous)")
        self.new = Ca("esp32sim fleet CA (next)")
        self.rogue = Ca("rogue CA")
        self.server_key = ec.generate_private_key(ec.SECP256R1())
        self.server = self.ca.issue("localhost", self.server_key.public_key(), server=True)
        self.controller = self.ca.client("fleet-pki")
        self.monitor = self.ca.client("monitor")


class Broker:
    """Mosquitto 2 with mTLS on a fixed port (so a restart keeps the address): CN = username,
    ACL devices/%u/#, `fleet-pki` reads and writes devices/#, `monitor` reads it."""

    def __init__(self, directory: Path, pki: Pki):
        if not os.path.exists(MOSQUITTO):
            raise RuntimeError(f"mosquitto is required ({MOSQUITTO} not found)")
        self.dir = directory
        self.pki = pki
        self.host = "127.0.0.1"
        self.port = _free_port()
        self.proc = None
        self.starts = 0
        d = directory
        (d / "cafile.pem").write_text(pki.ca.pem + pki.old.pem)
        (d / "server.crt").write_text(pem(pki.server))
        (d / "server.key").write_text(pem_key(pki.server_key))
        os.chmod(d / "server.key", 0o600)
        (d / "acl").write_text(
            "user fleet-pki\ntopic readwrite devices/#\n\nuser monitor\ntopic read devices/#\n\n"
            "pattern readwrite devices/%u/#\n"
        )
        self.start()

    def _conf(self, crl):
        lines = [
            "user root",
            "per_listener_settings false",
            "persistence false",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
            "allow_anonymous false",
            f"acl_file {self.dir / 'acl'}",
            f"listener {self.port} 127.0.0.1",
            f"cafile {self.dir / 'cafile.pem'}",
            f"certfile {self.dir / 'server.crt'}",
            f"keyfile {self.dir / 'server.key'}",
            "tls_version tlsv1.2",
            "require_certificate true",
            "use_identity_as_username true",
        ]
        if crl is not None:
            (self.dir / "crl.pem").write_text(self.pki.ca.crl(crl) + self.pki.old.crl([]))
            lines.append(f"crlfile {self.dir / 'crl.pem'}")
        (self.dir / "mosquitto.conf").write_text("\n".join(lines) + "\n")

    def start(self, crl=None):
        """crl: serials (of the fleet CA) to revoke, or None for no CRL check."""
        self._conf(crl)
        self.starts += 1
        self.log_path = self.dir / f"mosquitto{self.starts}.log"
        log = open(self.log_path, "wb")  # noqa: SIM115 - the process keeps it
        for _ in range(50):  # the old process may still hold the port for a moment
            self.proc = subprocess.Popen(
                [MOSQUITTO, "-c", str(self.dir / "mosquitto.conf")], stdout=log, stderr=log
            )
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and self.proc.poll() is None:
                with contextlib.suppress(OSError), socket.create_connection((self.host, self.port), 0.2):
                    log.close()
                    return
                time.sleep(0.02)
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            time.sleep(0.1)
        log.close()
        raise RuntimeError(f"mosquitto did not start: {self.log_path.read_text()}")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def restart(self, down=0.0, crl=None):
        self.stop()
        time.sleep(down)
        self.start(crl)

    def log_text(self):
        return self.log_path.read_text(errors="replace")


class Client:
    """An MQTT 5 client of the test broker (the controller `fleet-pki`, or any identity), recording
    every message with its arrival time; reconnects by itself when the broker restarts."""

    def __init__(self, broker, identity, subscribe="devices/#", cn=None):
        key_pem, cert_pem, _ = identity
        self.messages = []
        self.cond = threading.Condition()
        self.ready = threading.Event()
        ctx = ssl.create_default_context(cadata=broker.pki.ca.pem)
        d = broker.dir
        name = cn or f"client{id(self)}"
        (d / f"{name}.crt").write_text(cert_pem)
        (d / f"{name}.key").write_text(key_pem)
        os.chmod(d / f"{name}.key", 0o600)
        ctx.load_cert_chain(str(d / f"{name}.crt"), str(d / f"{name}.key"))
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=name, protocol=mqtt.MQTTv5)
        self.client.tls_set_context(ctx)
        self.client.reconnect_delay_set(0.05, 0.5)

        def on_connect(c, u, flags, rc, props):
            if subscribe:
                c.subscribe(subscribe, qos=1)
            else:
                self.ready.set()

        self.client.on_connect = on_connect
        self.client.on_subscribe = lambda c, u, mid, rcs, p: self.ready.set()
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port, keepalive=30)
        self.client.loop_start()
        assert self.ready.wait(10), "test client did not connect"

    def _on_message(self, c, u, m):
        with self.cond:
            self.messages.append(
                {"topic": m.topic, "payload": m.payload, "retain": m.retain, "t": time.time()}
            )
            self.cond.notify_all()

    def wait(self, topic, pred=lambda m: True, timeout=10.0, since=0):
        """The first JSON message on topic (from index since) that pred accepts, as a dict with
        "_t" (arrival time), "_i" (index) and "_retain" added."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for i, m in enumerate(self.messages[since:], since):
                    if m["topic"] == topic and m["payload"]:
                        body = json.loads(m["payload"])
                        if pred(body):
                            return {**body, "_t": m["t"], "_i": i, "_retain": m["retain"]}
                left = deadline - time.monotonic()
                if left <= 0:
                    seen = [(m["topic"], m["payload"][:80]) for m in self.messages[since:]][-8:]
                    raise TimeoutError(f"nothing on {topic} within {timeout:g}s; last seen: {seen}")
                self.cond.wait(left)

    def all(self, topic, since=0):
        with self.cond:
            return [
                json.loads(m["payload"])
                for m in self.messages[since:]
                if m["topic"] == topic and m["payload"]
            ]

    def mark(self):
        with self.cond:
            return len(self.messages)

    def publish(self, topic, payload, retain=True):
        text = payload if isinstance(payload, str) else json.dumps(payload)
        info = self.client.publish(topic, text, qos=1, retain=retain)
        info.wait_for_publish(5)

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


def tls_probe(broker, key_pem, cert_pem) -> str:
    """A bare TLS handshake with a client credential: "" if the broker accepts it, else the error."""
    d = broker.dir
    (d / "probe.crt").write_text(cert_pem)
    (d / "probe.key").write_text(key_pem)
    os.chmod(d / "probe.key", 0o600)
    ctx = ssl.create_default_context(cadata=broker.pki.ca.pem)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(d / "probe.crt"), str(d / "probe.key"))
    try:
        with (
            socket.create_connection((broker.host, broker.port), 5) as raw,
            ctx.wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            tls.settimeout(2)
            tls.sendall(b"\xe0\x00")  # DISCONNECT: a TLS 1.3 rejection would only show on read
            tls.recv(1)
        return ""
    except (ssl.SSLError, OSError) as e:
        return f"{type(e).__name__}: {e}"
    finally:
        (d / "probe.key").unlink()


def retained(broker, identity, topic, wait=0.4):
    """The retained message on topic as a fresh subscriber sees it (None if there is none)."""
    c = Client(broker, identity, subscribe=topic, cn=f"peek{time.monotonic_ns()}")
    time.sleep(wait)
    c.close()
    got = [m for m in c.messages if m["topic"] == topic and m["retain"]]
    return json.loads(got[-1]["payload"]) if got and got[-1]["payload"] else None


def make_flash(path: Path, device, broker, cert_pem, key_pem, *, ca=None, renew_days=None, extra=None):
    """A board's 4 MiB flash as a station leaves it: the nvs partition (Espressif's generator) at
    0x9000, everything else erased."""
    ns = mqtt_namespaces(
        device, f"mqtts://localhost:{broker.port}", ca or broker.pki.ca.pem, cert_pem, key_pem
    )
    if renew_days is not None:
        ns["mqtt"]["renew_days"] = ("u16", str(renew_days))
    image = bytearray(b"\xff" * FLASH_SIZE)
    image[0x9000:0xF000] = build_nvs(ns)
    for offset, data in (extra or {}).items():
        image[offset : offset + len(data)] = data
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(image)
    return path
