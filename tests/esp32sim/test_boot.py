"""`esp32sim boot`: NVS credentials flashed through esptool, then MQTT over mTLS to Mosquitto."""

import json
import ssl
import subprocess
import threading
import time

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from .conftest import ESP32SIM, run_esptool
from .nvs_images import build_nvs, mqtt_namespaces


class Monitor:
    """A subscriber on devices/# (CN=monitor may read everything)."""

    def __init__(self, broker):
        d = broker["dir"]
        self.messages = []
        self.ready = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="monitor", protocol=mqtt.MQTTv5)
        ctx = ssl.create_default_context(cafile=str(d / "ca.crt"))
        ctx.load_cert_chain(str(d / "monitor.crt"), str(d / "monitor.key"))
        self.client.tls_set_context(ctx)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe("devices/#", qos=1)
        self.client.on_subscribe = lambda c, u, mid, rcs, p: self.ready.set()
        self.client.on_message = lambda c, u, m: self.messages.append((m.topic, m.payload))
        self.client.connect(broker["host"], broker["port"])
        self.client.loop_start()
        assert self.ready.wait(10), "monitor did not subscribe"

    def wait_for(self, n, timeout=10):
        deadline = time.monotonic() + timeout
        while len(self.messages) < n and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.messages

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def monitor(broker):
    m = Monitor(broker)
    yield m
    m.close()


def _provision(sim_factory, tmp_path, namespaces, transport="pty"):
    """Flash an NVS image at 0x9000 through the real esptool; return the board's flash file."""
    sim = sim_factory(transport)
    nvs = tmp_path / "nvs.bin"
    nvs.write_bytes(build_nvs(namespaces))
    run_esptool(sim.port, "write-flash", "0x9000", str(nvs))
    return sim.flash


def _boot(flash, *args, timeout=60):
    return subprocess.run(
        [ESP32SIM, "boot", "--flash", flash, "--timeout", "5", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _creds(broker, device="esp32-sim-01", port=None, rogue=False, ca=None):
    pki = broker["pki"]
    key, cert = pki["rogue"] if rogue else pki["clients"][device]
    uri = f"mqtts://localhost:{port or broker['port']}"
    return mqtt_namespaces(device, uri, ca or pki["ca"], cert, key)


def test_boot_publishes_readings(sim_factory, tmp_path, broker, monitor, transport):
    flash = _provision(sim_factory, tmp_path, _creds(broker), transport)
    proc = _boot(flash, "--count", "2", "--interval", "0.2")
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("published")]
    assert len(lines) == 2
    got = [(t, json.loads(p)) for t, p in monitor.wait_for(2) if t.startswith("devices/esp32-sim-01/")]
    assert [t for t, _ in got] == ["devices/esp32-sim-01/telemetry"] * 2
    assert [m["seq"] for _, m in got] == [1, 2]
    for _, m in got:
        assert m["device_id"] == "esp32-sim-01"
        assert 5 <= m["temperature_c"] <= 40 and 10 <= m["humidity_pct"] <= 95
        assert set(m) == {"device_id", "temperature_c", "humidity_pct", "seq"}
    assert "Traceback" not in proc.stderr


def test_boot_refused_on_another_boards_topic(sim_factory, tmp_path, broker, monitor):
    flash = _provision(sim_factory, tmp_path, _creds(broker))
    proc = _boot(flash, "--once", "--topic-override", "devices/esp32-sim-02/telemetry")
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "not authorized" in proc.stderr.lower() and "0x87" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    time.sleep(0.3)
    assert not [t for t, _ in monitor.messages if t.startswith("devices/esp32-sim-02/")]


def test_boot_without_credentials(sim_factory, tmp_path):
    sim = sim_factory("tcp")
    proc = _boot(sim.flash, "--once")
    assert proc.returncode == 2
    assert "no 'mqtt' namespace" in proc.stderr and "Traceback" not in proc.stderr
    partial = {"mqtt": {"broker_uri": ("string", "mqtts://localhost:1"), "device_id": ("string", "x")}}
    flash = _provision(sim_factory, tmp_path, partial)
    proc = _boot(flash, "--once")
    assert proc.returncode == 2
    assert "lacks topic_root, ca_cert, client_cert, client_key" in proc.stderr


def test_boot_tls_failures(sim_factory, tmp_path, broker):
    # A client certificate from another CA: the broker ends the handshake.
    flash = _provision(sim_factory, tmp_path, _creds(broker, rogue=True))
    proc = _boot(flash, "--once")
    assert proc.returncode == 4, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    # A CA that did not sign the broker's certificate: the board refuses the broker.
    (tmp_path / "b").mkdir()
    flash = _provision(sim_factory, tmp_path / "b", _creds(broker, ca=broker["pki"]["rogue_ca"]))
    proc = _boot(flash, "--once")
    assert proc.returncode == 4 and "certificate" in proc.stderr


def test_boot_connect_refused(sim_factory, tmp_path, broker):
    flash = _provision(sim_factory, tmp_path, _creds(broker, port=broker["open_port"]))
    proc = _boot(flash, "--once")
    assert proc.returncode == 5, proc.stderr
    assert "refused CONNECT" in proc.stderr


def test_boot_times_out_on_a_silent_broker(sim_factory, tmp_path, broker):
    """A TLS peer that never answers CONNECT: exit 6 after --timeout, not a hang."""
    import socket

    d = broker["dir"]
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(d / "server.crt"), str(d / "server.key"))
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    held = []

    def accept():
        conn, _ = listener.accept()
        tls = ctx.wrap_socket(conn, server_side=True)
        held.append(tls)  # read nothing, answer nothing

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        flash = _provision(sim_factory, tmp_path, _creds(broker, port=port))
        started = time.monotonic()
        proc = subprocess.run(
            [ESP32SIM, "boot", "--flash", flash, "--once", "--timeout", "1"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert proc.returncode == 6, proc.stderr
        assert "no CONNACK" in proc.stderr
        assert time.monotonic() - started < 15
    finally:
        for s in held:
            s.close()
        listener.close()
