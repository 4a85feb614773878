"""`esp32sim fleet start --firmware`: a provisioned board runs its firmware while nobody holds its
serial port; esptool opening the port resets it into the ROM bootloader (the firmware stops, the
broker publishes its Will), closing the port boots it again from flash."""

import json
import os
import ssl
import subprocess
import threading
import time

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from .conftest import ESP32SIM, run_esptool
from .nvs_images import build_nvs, mqtt_namespaces

DEVICE = "esp32-sim-02"  # test_boot uses -01 against the same session broker
TOPIC = f"devices/{DEVICE}"


def _sim(*args):
    return subprocess.run([ESP32SIM, *args], capture_output=True, text=True, timeout=60)


class Monitor:
    def __init__(self, broker):
        d = broker["dir"]
        self.messages = []
        self.cond = threading.Condition()
        ready = threading.Event()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"monitor-{os.getpid()}", protocol=mqtt.MQTTv5
        )
        ctx = ssl.create_default_context(cafile=str(d / "ca.crt"))
        ctx.load_cert_chain(str(d / "monitor.crt"), str(d / "monitor.key"))
        self.client.tls_set_context(ctx)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(f"{TOPIC}/#", qos=1)
        self.client.on_subscribe = lambda c, u, mid, rcs, p: ready.set()
        self.client.on_message = self._on_message
        self.client.connect(broker["host"], broker["port"])
        self.client.loop_start()
        assert ready.wait(10)

    def _on_message(self, c, u, m):
        with self.cond:
            self.messages.append((time.monotonic(), m.topic, json.loads(m.payload) if m.payload else None))
            self.cond.notify_all()

    def mark(self):
        with self.cond:
            return len(self.messages)

    def wait(self, leaf, pred, since=0, timeout=10):
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for t, topic, body in self.messages[since:]:
                    if topic == f"{TOPIC}/{leaf}" and body is not None and pred(body):
                        return t, body
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"nothing on {leaf}: {self.messages[since:][-5:]}")
                self.cond.wait(left)

    def between(self, leaf, start, end):
        with self.cond:
            return [b for t, topic, b in self.messages if topic == f"{TOPIC}/{leaf}" and start <= t <= end]

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def lab(tmp_path, broker):
    d = tmp_path / "lab"
    d.mkdir(mode=0o700)
    key, cert = broker["pki"]["clients"][DEVICE]
    image = bytearray(b"\xff" * (4 << 20))
    nvs = mqtt_namespaces(DEVICE, f"mqtts://localhost:{broker['port']}", broker["pki"]["ca"], cert, key)
    image[0x9000:0xF000] = build_nvs(nvs)
    fd = os.open(d / "ttyUSB0.flash", os.O_WRONLY | os.O_CREAT, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(image)
    monitor = Monitor(broker)
    yield d, monitor
    _sim("fleet", "stop", "--dir", str(d))
    monitor.close()


def test_fleet_firmware_runs_while_the_port_is_closed(lab):
    d, monitor = lab
    args = ["fleet", "start", "--count", "2", "--dir", str(d), "--firmware", "--firmware-interval", "0.3"]
    started = _sim(*args)
    assert started.returncode == 0, started.stderr
    _, status = monitor.wait("status", lambda m: m.get("online"))
    assert status["renewal"] == "idle" and status["v"] == 1
    monitor.wait("telemetry", lambda m: m["seq"] == 3)
    again = _sim(*args)
    assert again.returncode == 0 and "already running" in again.stdout
    other = _sim("fleet", "start", "--count", "2", "--dir", str(d))  # the same boards without firmware
    assert other.returncode == 1 and "different fleet" in other.stderr
    assert json.loads((d / "fleet.json").read_text())["firmware"] == {"interval": 0.3}
    assert json.loads(_sim("fleet", "status", "--dir", str(d)).stdout)["firmware"] == {"interval": 0.3}
    log = (d / "fleet.log").read_text()
    assert "board 0: firmware: " in log and " connected broker=localhost:" in log
    assert "board 1: firmware: " in log and "not-provisioned" in log  # an unprovisioned board idles

    # esptool opens the port: the board resets into the bootloader, the firmware stops at once
    # (the broker publishes the Will), esptool talks to the ROM; its close lets the board boot.
    mark = monitor.mark()
    out = run_esptool(str(d / "ttyUSB0"), "read-mac").output
    assert "MAC:                24:0a:c4:00:00:01" in out
    _, will = monitor.wait("status", lambda m: not m["online"], since=mark)
    assert will == {"v": 1, "online": False}
    monitor.wait("telemetry", lambda m: m["seq"] == 1, since=mark)  # a fresh boot counts anew
    monitor.wait("status", lambda m: m.get("online"), since=mark)
    log = (d / "fleet.log").read_text()
    assert "Z reset into the ROM bootloader (port opened)" in log
    assert log.count("board 0: firmware: ") > log.count("board 1: firmware: ")

    # While something holds the port, the board stays in the bootloader: no readings at all.
    monitor.wait("telemetry", lambda m: m["seq"] == 2, since=mark)
    fd = os.open(d / "ttyUSB0", os.O_RDWR | os.O_NOCTTY)
    try:
        opened = time.monotonic()
        monitor.wait("status", lambda m: not m["online"], since=monitor.mark())
        time.sleep(1.2)  # four intervals
        closed = time.monotonic()
    finally:
        os.close(fd)
    assert monitor.between("telemetry", opened + 0.3, closed) == []
    t, _ = monitor.wait("telemetry", lambda m: m["seq"] == 1, since=monitor.mark())
    assert t - closed < 3

    stop = _sim("fleet", "stop", "--dir", str(d))
    assert stop.returncode == 0 and "stopped pid" in stop.stdout
    assert not (d / "fleet.pid").exists()
    assert "Traceback" not in (d / "fleet.log").read_text()
