"""Over-the-air firmware rollouts end to end (issue 15): a living fleet of firmware twins provisioned
with the two-OTA layout, a real Mosquitto, the image server role on this host's Debian nginx (client
certificates of the fleet CA, its CRL), and playbooks/ota.yml in stages.

One test function over one fleet (the steps build on each other, and the host has one nginx):
layout, refusals before any board is contacted, a bad image stopped at the canary, a good image with
a power cut in the middle of one download, the idempotent rerun, a station rerun that leaves the OTA
app alone, a revoked board that gets no job and no image."""

from __future__ import annotations

import hashlib
import json
import os
import ssl
import struct
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from ansible_collections.esp32_fleet.mqtt_fleet.plugins.module_utils import esp32_image

from esp32sim.appimage import build_app_image, build_bootloader_image

from . import host_nginx
from .living import TEST_BROKER, Broker, Monitor, free_port, station_state

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        os.geteuid() != 0 or not Path("/usr/sbin/nginx").exists(), reason="needs root and nginx"
    ),
]

PROJECT = "fleet-sensor"
SIZE = 96 * 1024
BOARDS = ("b1", "b2", "b3")
# Board b2 (index 1) loses power 40 KB into its first download, once.
FAULTS = ["1:ota-power-loss=40000"]


def _images(base: Path) -> dict:
    out = base / "images"
    out.mkdir()
    images = {
        "good": build_app_image(PROJECT, "1.1.0", size=SIZE),
        "bad": build_app_image(PROJECT, "1.2.0", size=SIZE, selfcheck_fail=True),
        "s3": build_app_image(PROJECT, "1.1.0", size=SIZE, chip_id=9),
        "other": build_app_image("door-opener", "1.1.0", size=SIZE),
        "next": build_app_image(PROJECT, "1.3.0", size=SIZE),
    }
    corrupt = bytearray(images["good"])
    corrupt[SIZE // 2] ^= 0x40
    images["corrupt"] = bytes(corrupt)
    paths = {}
    for name, data in images.items():
        paths[name] = out / f"{name}.bin"
        paths[name].write_bytes(data)
    return paths


def _running_version(project, index: int) -> tuple[str, str]:
    """The slot the board's otadata selects and the app description's version in it, read from its
    flash (ESP-IDF's rule: the valid entry with the highest sequence; erased: ota_0)."""
    with open(project.sim_dir / f"ttyUSB{index}.flash", "rb") as f:
        flash = f.read()
    best = None
    for sector in (0x310000, 0x311000):
        seq, _label, state, _crc = struct.unpack_from("<I20sII", flash, sector)
        if seq != 0xFFFFFFFF and state not in (3, 4):  # INVALID, ABORTED
            best = max(best or 0, seq)
    slot = "ota_0" if best is None else ("ota_0", "ota_1")[(best - 1) % 2]
    offset, size = esp32_image.partition(slot)
    image = flash[offset : offset + size]
    facts = esp32_image.parse_app_image(image[: _image_length(image)])
    return slot, facts["version"]


def _image_length(image: bytes) -> int:
    """Length of the app image at the start of a slot (header, segments, checksum, hash)."""
    count = image[1]
    pos = 24
    for _ in range(count):
        _addr, length = struct.unpack_from("<II", image, pos)
        pos += 8 + length
    pos += 15 - (pos % 16) + 1
    return pos + (32 if image[23] else 0)


@pytest.fixture
def ota_fleet(fleet_project, tmp_path):
    device_port, monitor_port, ota_port = free_port(), free_port(), free_port()
    sim = {"esp32_sim_flash": "{{ esp32_port }}.flash", "esp32_sim_firmware": True}
    boards = {name: {"esp32_mac": f"24:0a:c4:00:00:0{i + 1}", **sim} for i, name in enumerate(BOARDS)}
    project = fleet_project(boards, brokers=TEST_BROKER)
    hosts_file = project.inventory / "hosts.yml"
    hosts = yaml.safe_load(hosts_file.read_text())
    hosts["all"]["children"]["ota_servers"] = {"hosts": {"testota": None}}
    hosts_file.write_text(yaml.safe_dump(hosts))
    firmware = project.base / "files" / "firmware"
    firmware.mkdir(parents=True)
    (firmware / "0x1000_bootloader.bin").write_bytes(build_bootloader_image())
    (firmware / f"0x10000_{PROJECT}.bin").write_bytes(build_app_image(PROJECT, "1.0.0", size=SIZE))
    nginx_vars = host_nginx.paths()
    extra = {
        "lab_esp32sim_firmware": True,
        "esp32_provision_broker_uri": f"mqtts://localhost:{device_port}",
        "renewal_broker_host": "localhost",
        "renewal_broker_port": device_port,
        "ota_broker_host": "localhost",
        "ota_broker_port": device_port,
        "ota_server_port": ota_port,
        "ota_url_base": f"https://localhost:{ota_port}/ota",
        "ota_wait": 90,
        **nginx_vars,
    }
    vars_file = project.inventory / "group_vars" / "all.yml"
    data = yaml.safe_load(vars_file.read_text())
    data.update(extra)
    vars_file.write_text(yaml.safe_dump(data))
    rc, out, _ = project.run_playbook("playbooks/pki.yml", "-e", "pki_issue_device_certs=false")
    assert rc == 0, out[-3000:]
    broker = Broker(project, device_port, monitor_port).start()
    monitor = Monitor(broker, str(project.pki / "ca" / "bundle.pem"))
    try:
        with host_nginx.taken_over(tmp_path, nginx_vars):
            rc, out, _ = project.run(faults=FAULTS)
            assert rc == 0, out[-4000:]
            rc, out, _ = project.run_playbook("playbooks/ota_server.yml")
            assert rc == 0, out[-4000:]
            project.broker, project.monitor = broker, monitor
            project.images = _images(project.base)
            project.ota_port = ota_port
            project.nginx_root = Path(nginx_vars["ota_server_root"])
            yield project
    finally:
        monitor.close()
        project.stop_lab()
        broker.stop()


def _ota(project, image, *extra):
    return project.run_playbook("playbooks/ota.yml", "-e", f"ota_image={image}", *extra)


def _status(project, board, since, pred, timeout=60):
    return project.monitor.wait_for(
        f"devices/{board}/status", since=since, timeout=timeout, pred=lambda p: p and pred(json.loads(p))
    )


def _jobs_seen(project, since=0.0):
    with project.monitor.lock:
        return sorted(
            {t for at, t, p in project.monitor.messages if t.endswith("/ota/job") and p and at >= since}
        )


def _ota_rows(project):
    return [r for r in project.rows() if r["result"] in ("updated", "rolled-back", "ota-failed")]


def step_provisioning_lays_out_ota(project):
    for i, board in enumerate(BOARDS):
        row = project.last()[board]
        assert (row["layout"], row["firmware_version"], row["firmware_source"]) == ("ota", "1.0.0", "station")
        with open(project.sim_dir / f"ttyUSB{i}.flash", "rb") as f:
            f.seek(0x8000)
            assert f.read(0xC00) == esp32_image.partition_table()
        _status(project, board, 0, lambda s: s.get("fw") == "1.0.0" and s.get("online"))


def step_bad_images_are_refused_before_any_board_is_contacted(project):
    since = time.monotonic()
    for name, why in (
        ("corrupt", "not a valid ESP32 app image"),
        ("s3", "built for esp32s3"),
        ("other", "door-opener"),
    ):
        rc, out, _ = _ota(project, project.images[name])
        assert rc != 0 and why in out, out[-3000:]
    assert not project.nginx_root.exists() or not list(project.nginx_root.iterdir())
    time.sleep(1)
    assert _jobs_seen(project, since) == []


def step_a_bad_image_stops_at_the_canary_which_rolls_back(project):
    since = time.monotonic()
    rows_before = len(project.rows())
    rc, out, recap = _ota(project, project.images["bad"], "-e", '{"ota_stages": [1, "100%"]}')
    assert rc != 0, out[-3000:]
    assert "rolled-back" in out, out[-6000:]
    # The canary (first board) took the job and went back to 1.0.0 by itself; nobody else got one.
    assert _jobs_seen(project, since) == ["devices/b1/ota/job"]
    new = project.rows()[rows_before:]
    assert [(r["device_id"], r["result"], r["firmware_version"]) for r in new] == [
        ("b1", "rolled-back", "1.0.0")
    ]
    assert "self-check failed on 1.2.0" in new[0]["reason"]
    assert _running_version(project, 0)[1] == "1.0.0"
    _status(project, "b1", since, lambda s: s.get("fw") == "1.0.0" and s.get("online"))
    # The fleet keeps publishing on the old version.
    now = time.monotonic()
    for board in BOARDS:
        project.monitor.wait_for(f"devices/{board}/telemetry", since=now, timeout=30)
    # The later stage never started: b2 and b3 were not in any task of the play.
    assert "b2" not in recap and "b3" not in recap, recap


def step_a_good_image_reaches_every_board_even_through_a_power_cut(project):
    since = time.monotonic()
    rc, out, recap = _ota(project, project.images["good"])
    assert rc == 0, out[-4000:]
    assert all(recap[b]["failed"] == 0 for b in BOARDS)
    last = project.last()
    for i, board in enumerate(BOARDS):
        assert (last[board]["result"], last[board]["firmware_version"], last[board]["firmware_source"]) == (
            "updated",
            "1.1.0",
            "ota",
        )
        assert _running_version(project, i) == ("ota_1", "1.1.0")
        _status(project, board, since, lambda s: s.get("fw") == "1.1.0" and s.get("slot") == "ota_1")
    # b2's power went 40 KB into its download: it came back on 1.0.0 and finished the retained job.
    log = (project.sim_dir / "fleet.log").read_text()
    assert "power-loss" in log, log[-2000:]
    # Only this rollout's image is published.
    assert [p.name for p in project.nginx_root.iterdir()] == [
        f"{PROJECT}-1.1.0-{_sha(project.images['good'])[:12]}.bin"
    ]
    # make status (playbooks/status.yml) agrees with the manifest.
    rc, out, _ = project.run_playbook("playbooks/status.yml")
    assert rc == 0, out[-3000:]
    status = json.loads((project.base / "manifests" / "status.json").read_text())
    seen = {r["name"]: r["firmware_version"] for r in status["rows"] if r["kind"] == "device"}
    assert seen == dict.fromkeys(BOARDS, "1.1.0"), seen


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def step_the_same_rollout_again_changes_nothing(project):
    since = time.monotonic()
    rc, out, recap = _ota(project, project.images["good"])
    assert rc == 0, out[-3000:]
    assert all(v["changed"] == 0 for v in recap.values()), out[-3000:]
    assert _jobs_seen(project, since) == []
    # A station run after the rollout keeps the OTA app (no USB downgrade) and changes nothing.
    rc, out, recap = project.run(faults=FAULTS)
    assert rc == 0, out[-3000:]
    assert all(recap[b]["changed"] == 0 for b in BOARDS), out[-3000:]
    assert all(_running_version(project, i) == ("ota_1", "1.1.0") for i in range(len(BOARDS)))


def step_a_revoked_board_gets_no_job_and_no_image(project):
    rc, out, _ = project.run_playbook("playbooks/revoke.yml", "-e", "device=b3", "--limit", "localhost")
    assert rc == 0, out[-3000:]
    since = time.monotonic()
    rc, out, _ = _ota(project, project.images["next"], "-e", '{"ota_stages": ["100%"]}')
    assert rc == 0, out[-4000:]
    assert _jobs_seen(project, since) == ["devices/b1/ota/job", "devices/b2/ota/job"]
    assert _running_version(project, 2)[1] == "1.1.0"
    assert project.last()["b3"]["result"] == "revoked"
    # b3's own credentials, read from its flash: the image server refuses them (CRL refreshed by the rollout).
    nvs = station_state(project, 2)
    (project.base / "b3.crt").write_text(nvs["client_cert"])
    key = project.base / "b3.key"
    key.touch(0o600)
    key.write_text(nvs["client_key"])
    ctx = ssl.create_default_context(cafile=str(project.pki / "ca" / "bundle.pem"))
    ctx.load_cert_chain(str(project.base / "b3.crt"), str(key))
    name = next(project.nginx_root.iterdir()).name
    url = f"https://localhost:{project.ota_port}/ota/{name}"
    with pytest.raises((urllib.error.HTTPError, ssl.SSLError, urllib.error.URLError)) as refused:
        urllib.request.urlopen(url, context=ctx, timeout=10)
    assert getattr(refused.value, "code", 400) == 400


STEPS = [
    step_provisioning_lays_out_ota,
    step_bad_images_are_refused_before_any_board_is_contacted,
    step_a_bad_image_stops_at_the_canary_which_rolls_back,
    step_a_good_image_reaches_every_board_even_through_a_power_cut,
    step_the_same_rollout_again_changes_nothing,
    step_a_revoked_board_gets_no_job_and_no_image,
]


def test_a_staged_rollout_with_rollback_on_a_living_fleet(ota_fleet):
    for step in STEPS:
        step(ota_fleet)
