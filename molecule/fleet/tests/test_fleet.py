"""The provisioned fleet, checked after converge and idempotence: the broker knows every board
(inside the container), each board's credentials READ BACK FROM ITS FLASH publish on its own topic and
are refused on another board's (MQTT through the published ports), and the manifest and the
controller hold what the fleet play promised."""

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

PKI = Path(os.environ["PKI_DIR"])
LAB = Path(os.environ["LAB_DIR"])
MANIFEST = Path(os.environ["MANIFEST_DIR"]) / "fleet.json"
APP_PORT = int(os.environ["MQTT_APP_PORT"])
APP_PASSWORD = os.environ["MQTT_APP_PASSWORD"]
ESP32SIM = str(Path(sys.executable).parent / "esp32sim")
BOARDS = {
    "esp32-mol-01": ("ttyUSB0", "devices/esp32-mol-01"),
    "esp32-mol-02": ("ttyUSB1", "devices/esp32-mol-02"),
    "esp32-mol-03": ("ttyUSB2", "plant/line-3/esp32-mol-03"),
}


def watch(topic, command, wait=10.0):
    """Subscribe as the application user, run the command once subscribed, return (rc, messages)."""
    got, subscribed, done = [], threading.Event(), threading.Event()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.tls_set(ca_certs=str(PKI / "ca" / "ca.crt"))
    client.username_pw_set("fleet-monitor", APP_PASSWORD)
    client.on_connect = lambda c, *_: c.subscribe(topic, qos=1)
    client.on_subscribe = lambda *_: subscribed.set()

    def on_message(_c, _u, msg):
        got.append(msg.payload)
        done.set()

    client.on_message = on_message
    client.connect("localhost", APP_PORT)
    client.loop_start()
    try:
        assert subscribed.wait(10), "no SUBACK for the application user"
        rc = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False).returncode
        done.wait(wait)
    finally:
        client.loop_stop()
        client.disconnect()
    return rc, got


def test_broker_runs_and_grants_each_board_its_own_topic_root(host):
    assert host.service("mosquitto").is_running
    acl = host.file("/etc/mosquitto/acl").content_string
    for _, root in BOARDS.values():
        assert f"{root}/#" in acl


@pytest.mark.parametrize("name", sorted(BOARDS))
def test_board_publishes_with_the_credentials_in_its_flash(name):
    port, root = BOARDS[name]
    rc, got = watch(f"{root}/telemetry", [ESP32SIM, "boot", "--flash", str(LAB / f"{port}.flash"), "--once"])
    assert rc == 0
    assert got, f"no reading from {name}"
    reading = json.loads(got[0])
    assert isinstance(reading, dict) and reading


def test_board_is_refused_on_another_boards_topic():
    other = BOARDS["esp32-mol-02"][1] + "/telemetry"
    rc, got = watch(
        other,
        [ESP32SIM, "boot", "--flash", str(LAB / "ttyUSB0.flash"), "--once", "--topic-override", other],
        wait=3,
    )
    assert rc == 3
    assert got == []


def test_manifest_records_every_board_provisioned_then_unchanged():
    rows = json.loads(MANIFEST.read_text())["rows"]
    by_board = {}
    for row in rows:
        by_board.setdefault(row["device_id"], []).append(row["result"])
    assert set(by_board) == set(BOARDS)
    for results in by_board.values():
        # converge provisioned, idempotence (and check mode writes nothing) found it unchanged
        assert results[0] == "provisioned"
        assert results[-1] == "unchanged"
        assert "failed" not in results


def test_device_keys_are_not_kept_on_the_controller():
    devices = PKI / "devices"
    assert sorted(p.name for p in devices.glob("*.crt")) == sorted(f"{n}.crt" for n in BOARDS)
    assert list(devices.glob("*.key")) == []
