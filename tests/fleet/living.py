"""A living test fleet for over-the-air renewal: a throwaway project (tests/fleet/conftest.py) whose
lab runs each board's firmware twin, and a real Mosquitto configured as the mosquitto role configures
one (global security settings, a certificate listener where CN = user = client id with the CRL, a
password listener for the monitor) whose ACL is the role's own template (tests/fleet/render_acl.yml),
so the service identity's rights under test are the ones a real broker gets."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import ssl
import subprocess
import threading
import time

import paho.mqtt.client as mqtt
import pytest
import yaml
from paho.mqtt.enums import CallbackAPIVersion

from esp32sim.nvs import parse_nvs

from .conftest import FleetProject

MONITOR_PASSWORD = "test-only-renewal-monitor"
# The brokers group of a living fleet: the test's broker (Broker below) and its monitor user.
TEST_BROKER = {
    "testbroker": {
        "mosquitto_server_names": ["localhost", "127.0.0.1"],
        "mosquitto_users": [
            {
                "name": "fleet-monitor",
                "password": MONITOR_PASSWORD,
                "acl": [{"access": "read", "topic": "devices/#"}],
            }
        ],
    }
}
FIELD_OFFSET, FIELD_SIZE = 0x312000, 0x6000
STATION_OFFSET, STATION_SIZE = 0x9000, 0x6000


def crl_paths(pki) -> list:
    """Every CA's CRL on the controller: the CA's, and the new CA's during a rotation."""
    return [crl for crl in (pki / "ca" / "crl.pem", pki / "ca-next" / "crl.pem") if crl.is_file()]


def current_credential(state_field: dict, station: dict) -> tuple[str, str]:
    """The certificate and key a board connects with: the station's (slot 0) or a field slot."""
    slot = int(state_field.get("cred_slot", 0) or 0)
    if slot == 0:
        return station["client_cert"], station["client_key"]
    name = "ab"[slot - 1]
    return state_field[f"{name}_cert"], state_field[f"{name}_key"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Broker:
    def __init__(self, project: FleetProject, device_port: int, monitor_port: int, env=None):
        self.project = project
        self.device_port = device_port
        self.monitor_port = monitor_port
        self.dir = project.base / "broker"
        self.env = env  # e.g. a moving clock (tests/fleet/test_fleet_two_years.py)
        self.proc = None
        self.deployed = None

    def configure(self):
        if not (self.dir / "acl").is_file():
            self.dir.mkdir(exist_ok=True)
            rc, out, _ = self.project.run_playbook(
                "tests/fleet/render_acl.yml", "-e", f"render_acl_dest={self.dir / 'acl'}"
            )
            assert rc == 0, out[-3000:]
            subprocess.run(
                ["mosquitto_passwd", "-c", "-b", str(self.dir / "passwd"), "fleet-monitor", MONITOR_PASSWORD],
                check=True,
                capture_output=True,
            )
        pki = self.project.pki
        # As the mosquitto role deploys it: during a CA rotation the crlfile holds both CAs' CRLs.
        (self.dir / "crl.pem").write_bytes(b"".join(c.read_bytes() for c in crl_paths(pki)))
        tls = (
            f"cafile {pki}/ca/bundle.pem\ncertfile {pki}/brokers/testbroker.chain.pem\n"
            f"keyfile {pki}/brokers/testbroker.key\ntls_version tlsv1.2\n"
        )
        (self.dir / "mosquitto.conf").write_text(
            "user root\nper_listener_settings false\npersistence false\nallow_anonymous false\n"
            f"password_file {self.dir}/passwd\nacl_file {self.dir}/acl\n"
            "log_dest stderr\nlog_type all\n"
            f"listener {self.device_port} 127.0.0.1\n{tls}"
            f"require_certificate true\ncrlfile {self.dir}/crl.pem\n"
            "use_identity_as_username true\nuse_username_as_clientid true\n"
            f"listener {self.monitor_port} 127.0.0.1\n{tls}"
        )

    def start(self):
        self.configure()
        self.log = open(self.dir / "log", "ab")  # noqa: SIM115
        self.deployed = self.pki_files()
        cmd = ["mosquitto", "-c", str(self.dir / "mosquitto.conf")]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=self.log, env=self.env)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", self.monitor_port), 0.2).close()
                return self
            time.sleep(0.1)
        raise AssertionError("mosquitto did not start: " + (self.dir / "log").read_text())

    def reload(self):
        """What the broker play's handler does after a CRL or certificate change: SIGHUP. (The ACL is
        rendered once: tests/fleet/render_acl.yml revokes no board, so it never changes.)"""
        self.configure()
        self.deployed = self.pki_files()
        self.proc.send_signal(signal.SIGHUP)
        time.sleep(0.5)

    def pki_files(self) -> dict:
        """What the mosquitto role deploys from the controller's PKI, by the handler it notifies."""
        pki = self.project.pki
        brokers = pki / "brokers"
        return {
            "restart": (pki / "ca" / "bundle.pem").read_bytes(),
            "reload": b"".join(
                p.read_bytes()
                for p in [*crl_paths(pki), brokers / "testbroker.chain.pem", brokers / "testbroker.key"]
            ),
        }

    def sync(self) -> str:
        """The broker play's part for this broker, after the PKI changed: restart when the trust
        bundle changed (roles/mosquitto/tasks/tls.yml), SIGHUP when only the CRL, certificate or key
        did. Returns what it did: "restarted", "reloaded" or ""."""
        files = self.pki_files()
        if files["restart"] != self.deployed["restart"]:
            self.stop()
            self.start()
            return "restarted"
        if files["reload"] != self.deployed["reload"]:
            self.reload()
            return "reloaded"
        return ""

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


class Monitor:
    """The application user, subscribed to every board's topics (retained status included)."""

    def __init__(self, broker: Broker, ca: str):
        self.messages = []
        self.lock = threading.Lock()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.username_pw_set("fleet-monitor", MONITOR_PASSWORD)
        ctx = ssl.create_default_context(cafile=ca)
        self.client.tls_set_context(ctx)
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, u, f, r, p: c.subscribe("devices/#", qos=1)
        self.client.connect("localhost", broker.monitor_port)
        self.client.loop_start()

    def _on_message(self, client, userdata, msg):
        with self.lock:
            self.messages.append((time.monotonic(), msg.topic, msg.payload))

    def wait_for(self, topic, since=0.0, timeout=30.0, pred=None):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                for at, t, payload in self.messages:
                    if t == topic and at >= since and (pred is None or pred(payload)):
                        return json.loads(payload) if payload else None
            time.sleep(0.1)
        raise AssertionError(
            f"nothing on {topic} within {timeout} s; seen: {sorted({t for _, t, _ in self.messages})}"
        )

    def close(self):
        self.client.loop_stop()
        self.client.disconnect()


def field_state(project: FleetProject, index: int) -> dict:
    with open(project.sim_dir / f"ttyUSB{index}.flash", "rb") as f:
        f.seek(FIELD_OFFSET)
        return parse_nvs(f.read(FIELD_SIZE)).get("fleet", {})


def station_state(project: FleetProject, index: int) -> dict:
    with open(project.sim_dir / f"ttyUSB{index}.flash", "rb") as f:
        f.seek(STATION_OFFSET)
        return parse_nvs(f.read(STATION_SIZE))["mqtt"]


@pytest.fixture
def living_fleet(fleet_project):
    """Two provisioned boards running their firmware against a real broker, a monitor watching."""
    device_port, monitor_port = free_port(), free_port()
    sim = {"esp32_sim_flash": "{{ esp32_port }}.flash", "esp32_sim_firmware": True}
    project = fleet_project(
        {"b1": {"esp32_mac": "24:0a:c4:00:00:01", **sim}, "b2": {"esp32_mac": "24:0a:c4:00:00:02", **sim}},
        brokers=TEST_BROKER,
    )
    extra = {
        "lab_esp32sim_firmware": True,
        "esp32_provision_broker_uri": f"mqtts://localhost:{device_port}",
        "renewal_broker_host": "localhost",
        "renewal_broker_port": device_port,
        "renewal_request_wait": 30,
        "renewal_ack_wait": 30,
    }
    vars_file = project.inventory / "group_vars" / "all.yml"

    data = yaml.safe_load(vars_file.read_text())
    data.update(extra)
    vars_file.write_text(yaml.safe_dump(data))
    # The PKI first (CA, CRL, broker and service identity), so the broker is up before the boards boot.
    rc, out, _ = project.run_playbook("playbooks/pki.yml", "-e", "pki_issue_device_certs=false")
    assert rc == 0, out[-3000:]
    broker = Broker(project, device_port, monitor_port).start()
    monitor = Monitor(broker, str(project.pki / "ca" / "bundle.pem"))
    try:
        rc, out, _ = project.run()
        assert rc == 0, out[-4000:]
        project.broker = broker
        project.monitor = monitor
        yield project
    finally:
        monitor.close()
        project.stop_lab()
        broker.stop()
