"""Helpers shared by the scenario's test files, handed out as fixtures (with pytest's importlib import
mode, test files cannot import each other or this file).
"""

import contextlib
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

PKI = Path(os.environ["PKI_DIR"])
CA = PKI / "ca" / "ca.crt"
SCENARIO = Path(os.environ["MOLECULE_SCENARIO_DIRECTORY"])
INVENTORY = Path(os.environ["MOLECULE_INVENTORY_FILE"]).parent
# Generous for a loaded 2-core machine.
TIMEOUT = 30


def device(name):
    return PKI / "devices" / f"{name}.crt", PKI / "devices" / f"{name}.key"


class Mqtt:
    """A small synchronous MQTT v5 client: reason codes of CONNACK, SUBACK and PUBACK, messages, and
    whether the broker dropped it. client_id/clean_start/session_expiry make a persistent session."""

    def __init__(
        self, port, cert=None, username=None, password=None, tls=True,
        client_id=None, clean_start=True, session_expiry=0,
    ):  # fmt: skip
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id or f"test-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv5,
        )
        if tls:
            certfile, keyfile = (str(cert[0]), str(cert[1])) if cert else (None, None)
            self.client.tls_set(ca_certs=str(CA), certfile=certfile, keyfile=keyfile)
        if username is not None:
            self.client.username_pw_set(username, password)
        self.port = port
        self.clean_start = clean_start
        self.properties = None
        if session_expiry:
            self.properties = Properties(PacketTypes.CONNECT)
            self.properties.SessionExpiryInterval = session_expiry
        self.connected = threading.Event()
        self.acked = {}
        self.messages = []
        self.retained = []
        self.connack = None
        self.session_present = None
        self.disconnects = []
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_publish = self._on_publish
        self.client.on_message = self._on_message
        self.client.on_disconnect = lambda c, u, flags, rc, props: self.disconnects.append(rc)

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        self.connack = reason_code
        self.session_present = flags.session_present
        self.connected.set()

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties):
        self.acked[mid] = reason_codes

    def _on_publish(self, client, userdata, mid, reason_code, properties):
        self.acked[mid] = reason_code

    def _on_message(self, client, userdata, msg):
        self.messages.append((msg.topic, msg.payload))
        if msg.retain:
            self.retained.append((msg.topic, msg.payload))

    def __enter__(self):
        self.client.connect("localhost", self.port, clean_start=self.clean_start, properties=self.properties)
        self.client.loop_start()
        assert self.connected.wait(TIMEOUT), "no CONNACK"
        return self

    def __exit__(self, *exc):
        self.client.disconnect()
        self.client.loop_stop()

    def _wait(self, mid):
        event = threading.Event()
        for _ in range(TIMEOUT * 20):
            if mid in self.acked:
                return self.acked[mid]
            event.wait(0.05)
        raise AssertionError(f"no acknowledgement for message id {mid}")

    def subscribe(self, topic):
        _, mid = self.client.subscribe(topic, qos=1)
        return self._wait(mid)[0]

    def publish(self, topic, payload, retain=False):
        return self._wait(self.client.publish(topic, payload, qos=1, retain=retain).mid)


def wait_for(predicate, timeout=TIMEOUT):
    event = threading.Event()
    for _ in range(timeout * 10):
        if predicate():
            return True
        event.wait(0.1)
    return False


def converge(limit, *extra):
    """Run the scenario's converge playbook against one container, as Molecule does: (rc, output with
    whitespace folded, raw output)."""
    env = dict(os.environ, ANSIBLE_ROLES_PATH=str(SCENARIO.parents[1] / "roles"), ANSIBLE_FORCE_COLOR="0")
    result = subprocess.run(
        [str(Path(sys.executable).parent / "ansible-playbook"), "-i", str(INVENTORY), "--limit", limit,
         str(SCENARIO / "converge.yml"), *extra],
        capture_output=True, text=True, env=env, timeout=900,
    )  # fmt: skip
    raw = result.stdout + result.stderr  # the failure message goes to stderr
    # Callbacks may wrap long messages: compare with whitespace folded.
    return result.returncode, " ".join(raw.split()), raw


class Availability:
    """Handshakes with a TLS listener every 50 ms in a thread, recording when none succeeded: the
    longest outage is the broker's unavailability during a change (measured, reported, not timed)."""

    def __init__(self, port, cert):
        self.port = port
        self.ctx = ssl.create_default_context(cafile=str(CA))
        self.ctx.load_cert_chain(*cert)
        self.stop = threading.Event()
        self.longest = 0.0
        self.failures = 0
        self.attempts = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _up(self):
        with (
            contextlib.suppress(OSError),
            # A broker that is down refuses at once; a slow handshake on a loaded machine is not
            # an outage, so it gets the full TIMEOUT before it counts as one.
            socket.create_connection(("localhost", self.port), timeout=TIMEOUT) as raw,
            self.ctx.wrap_socket(raw, server_hostname="localhost"),
        ):
            return True
        return False

    def _run(self):
        down_since = None
        while not self.stop.is_set():
            self.attempts += 1
            now = time.monotonic()
            if self._up():
                if down_since is not None:
                    self.longest = max(self.longest, time.monotonic() - down_since)
                    down_since = None
            else:
                self.failures += 1
                down_since = down_since if down_since is not None else now
            self.stop.wait(0.05)
        if down_since is not None:  # still down at the end: counts up to now
            self.longest = max(self.longest, time.monotonic() - down_since)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(TIMEOUT)


@pytest.fixture
def kit():
    """This module: kit.Mqtt, kit.converge, kit.device, kit.wait_for, kit.PKI, kit.CA."""
    return sys.modules[__name__]


@pytest.fixture
def availability(capsys, request):
    """Availability(port, cert) monitors; each one's numbers are printed past pytest's capture."""
    monitors = []

    def make(port, cert):
        monitor = Availability(port, cert)
        monitors.append(monitor)
        return monitor

    yield make
    with capsys.disabled():
        for m in monitors:
            print(
                f"\n[availability] {request.node.name}: longest outage {m.longest:.2f} s "
                f"({m.failures} of {m.attempts} handshakes failed)"
            )
