"""Renewal of the broker's certificate, picked up by a running Mosquitto on SIGHUP.

The pki role issues a 20-day server certificate; a normal run (365 days, 30-day window) finds it due
and re-issues it. The new files replace the broker's and the broker gets SIGHUP (what the mosquitto
role's "Reload mosquitto" does): a client connected before keeps publishing and receiving, and a new
connection is served the new certificate. Uses the Debian mosquitto binary on an ephemeral port.
"""

from __future__ import annotations

import getpass
import shutil
import signal
import socket
import ssl
import subprocess
import time
import uuid

import paho.mqtt.client as mqtt
import pytest
from cryptography import x509

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
TIMEOUT = 30  # seconds, generous for a loaded machine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server_serial(port: int, ca, crt, key) -> int:
    """Serial of the certificate the broker presents to a NEW connection (mTLS handshake)."""
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.load_cert_chain(str(crt), str(key))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        return x509.load_der_x509_certificate(tls.getpeercert(binary_form=True)).serial_number


class Client:
    """A paho client that records what it receives and whether it was ever disconnected."""

    def __init__(self, port: int, ca, crt, key, client_id: str):
        self.messages: list[bytes] = []
        self.disconnects = 0
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id)
        self.c.tls_set(ca_certs=str(ca), certfile=str(crt), keyfile=str(key))
        self.c.on_message = lambda _c, _u, m: self.messages.append(m.payload)
        self.c.on_disconnect = self._on_disconnect
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()
        self._wait(lambda: self.c.is_connected(), "connect")

    def _on_disconnect(self, *_args):
        self.disconnects += 1

    @staticmethod
    def _wait(cond, what: str) -> None:
        end = time.monotonic() + TIMEOUT
        while time.monotonic() < end:
            if cond():
                return
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}")

    def roundtrip(self, topic: str) -> None:
        """Subscribe, publish and wait for our own message to come back."""
        payload = uuid.uuid4().hex.encode()
        self.c.subscribe(topic, qos=1)
        time.sleep(0.2)
        self.c.publish(topic, payload, qos=1).wait_for_publish(TIMEOUT)
        self._wait(lambda: payload in self.messages, f"message on {topic}")

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


@pytest.fixture
def broker_dir(tmp_path):
    d = tmp_path / "broker"
    d.mkdir()
    return d


def _install(pki, broker_dir) -> None:
    """What the mosquitto role deploys: CA bundle, server certificate and key, CRL."""
    shutil.copy(pki.pki / "ca" / "bundle.pem", broker_dir / "ca.crt")
    shutil.copy(pki.pki / "brokers" / "localhost.crt", broker_dir / "server.crt")
    shutil.copy(pki.pki / "brokers" / "localhost.key", broker_dir / "server.key")
    shutil.copy(pki.pki / "ca" / "crl.pem", broker_dir / "crl.pem")


def _start(broker_dir, port: int) -> subprocess.Popen:
    conf = broker_dir / "mosquitto.conf"
    conf.write_text(
        f"user {getpass.getuser()}\n"
        "per_listener_settings true\n"
        f"listener {port} 127.0.0.1\n"
        f"cafile {broker_dir / 'ca.crt'}\n"
        f"certfile {broker_dir / 'server.crt'}\n"
        f"keyfile {broker_dir / 'server.key'}\n"
        f"crlfile {broker_dir / 'crl.pem'}\n"
        "require_certificate true\nuse_identity_as_username true\ntls_version tlsv1.2\n"
        "allow_anonymous false\n"
    )
    proc = subprocess.Popen(
        [MOSQUITTO, "-c", str(conf)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    end = time.monotonic() + TIMEOUT
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            if proc.poll() is not None:
                raise AssertionError(proc.stdout.read()) from None
            time.sleep(0.1)
    proc.kill()
    raise AssertionError("mosquitto did not listen")


def test_renewed_broker_certificate_is_served_after_sighup_without_dropping_clients(
    new_pki, broker_dir, tools
):
    pki = new_pki
    short = {"pki_server_validity_days": 20, "pki_client_validity_days": 20, "pki_renew_before_days": 10}
    run = pki.run(extra=short)
    assert run.rc == 0, run.output[-3000:]
    _install(pki, broker_dir)
    port = _free_port()
    proc = _start(broker_dir, port)
    ca = pki.pki / "ca" / "ca.crt"
    dev = pki.pki / "devices"
    try:
        old_serial = _server_serial(port, ca, dev / "dev-a.crt", dev / "dev-a.key")
        client = Client(port, ca, dev / "dev-a.crt", dev / "dev-a.key", "dev-a")
        client.roundtrip("devices/dev-a/before")

        # A normal run: 365-day leaves, 30-day window: the 20-day certificates are due.
        run = pki.run()
        assert run.rc == 0, run.output[-3000:]
        assert "Sign with the CA the certificate of localhost" in run.output
        new_serial = x509.load_pem_x509_certificate(
            (pki.pki / "brokers" / "localhost.crt").read_bytes()
        ).serial_number
        assert new_serial != old_serial
        _install(pki, broker_dir)
        proc.send_signal(signal.SIGHUP)
        time.sleep(1)

        assert _server_serial(port, ca, dev / "dev-a.crt", dev / "dev-a.key") == new_serial
        client.roundtrip("devices/dev-a/after")
        assert client.disconnects == 0 and client.c.is_connected()
        client.close()
        assert proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(TIMEOUT)
