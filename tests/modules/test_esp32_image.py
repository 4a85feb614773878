"""The controller's image check (module_utils/esp32_image.py, module esp32_image_info) on real ESP32
app images made by the simulator's SDK (esp32sim/appimage.py), each one first read by esptool's own
`image-info`, so the two implementations are held against the one Espressif ships; and the two-OTA
partition table against the firmware twin's reader (esp32sim/firmware.py)."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from ansible_collections.esp32_fleet.mqtt_fleet.plugins.module_utils import esp32_image
from ansible_collections.esp32_fleet.mqtt_fleet.plugins.modules.esp32_image_info import problems

from esp32sim.appimage import build_app_image, build_bootloader_image
from esp32sim.firmware import read_partition_table

BIN = Path(sys.executable).parent


def esptool_info(path):
    done = subprocess.run(
        [str(BIN / "esptool"), "image-info", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return done.returncode, done.stdout + done.stderr


def test_a_good_image_reads_as_esptool_reads_it(tmp_path):
    data = build_app_image(project="fleet-sensor", version="1.1.0", size=40000)
    path = tmp_path / "app.bin"
    path.write_bytes(data)
    rc, out = esptool_info(path)
    assert rc == 0, out
    facts = esp32_image.read_app_image(path)
    assert re.search(r"Project name: (\S+)", out)[1] == facts["project"] == "fleet-sensor"
    assert re.search(r"App version: (\S+)", out)[1] == facts["version"] == "1.1.0"
    assert "Chip ID: 0 (ESP32)" in out and facts["chip"] == "esp32"
    assert re.search(r"Segments: (\d+)", out)[1] == str(len(facts["segments"]))
    assert "(valid)" in re.search(r"Validation hash: .*", out)[0] and facts["sha256_ok"] is True
    assert facts["sha256"] == hashlib.sha256(data).hexdigest() and facts["size"] == len(data)
    assert problems(facts, "esp32", "fleet-sensor", True) == []


def test_a_corrupted_image_is_refused_like_esptool_does(tmp_path):
    data = bytearray(build_app_image(project="fleet-sensor", version="1.1.0", size=8192))
    data[600] ^= 0x01  # one bit in a segment: checksum and hash no longer match
    path = tmp_path / "bad.bin"
    path.write_bytes(bytes(data))
    _rc, out = esptool_info(path)
    assert "invalid" in out.lower()
    with pytest.raises(esp32_image.ImageError, match=r"checksum|SHA-256"):
        esp32_image.read_app_image(path)
    # Only the appended hash broken (the checksum byte still fits): the hash catches it.
    data = bytearray(build_app_image(project="fleet-sensor", version="1.1.0"))
    data[-1] ^= 0xFF
    with pytest.raises(esp32_image.ImageError, match="SHA-256"):
        esp32_image.parse_app_image(bytes(data))


def test_a_wrong_chip_or_project_is_named():
    s3 = esp32_image.parse_app_image(build_app_image(project="fleet-sensor", version="2.0.0", chip_id=9))
    assert s3["chip"] == "esp32s3"
    assert problems(s3, "esp32", "fleet-sensor", True) == [
        "the image is built for esp32s3, the fleet is esp32"
    ]
    other = esp32_image.parse_app_image(build_app_image(project="door-opener", version="2.0.0"))
    assert "door-opener" in problems(other, "esp32", "fleet-sensor", True)[0]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "too short"),
        (b"\x7fELF" + b"\x00" * 60, "not an ESP32 app image"),
        (build_app_image(project="p", version="1")[:100], "past the end|before the checksum"),
        (build_bootloader_image(), "app description"),
    ],
)
def test_what_is_not_an_app_image_says_why(data, message):
    with pytest.raises(esp32_image.ImageError, match=message):
        esp32_image.parse_app_image(data)


def test_an_image_without_appended_hash_is_refused_by_default():
    facts = esp32_image.parse_app_image(build_app_image(project="p", version="1", hash_appended=False))
    assert facts["hash_appended"] is False
    assert problems(facts, "", "", True) == ["the image has no appended SHA-256 (require_hash)"]
    assert problems(facts, "", "", False) == []


class _Flash:
    def __init__(self, data, at):
        self.data = bytearray(b"\xff" * 0x10000)
        self.data[at : at + len(data)] = data

    def read(self, addr, n):
        return bytes(self.data[addr : addr + n])


def test_the_partition_table_is_the_documented_layout():
    table = esp32_image.partition_table()
    assert len(table) == esp32_image.PARTITION_TABLE_SIZE
    parsed = read_partition_table(_Flash(table, esp32_image.PARTITION_TABLE_OFFSET))
    assert parsed == {
        label: (ptype, subtype, offset, size)
        for label, ptype, subtype, offset, size in esp32_image.TWO_OTA_LAYOUT
    }
    # The MD5 entry covers the entries: a changed entry no longer validates.
    broken = bytearray(table)
    broken[10] ^= 0x01
    assert read_partition_table(_Flash(bytes(broken), esp32_image.PARTITION_TABLE_OFFSET)) is None
    offset, blank = esp32_image.ota_data_initial()
    assert (offset, len(blank), set(blank)) == (0x310000, 0x2000, {0xFF})
    assert esp32_image.in_app_slot(0x10000) and esp32_image.in_app_slot(0x190000)
    assert not esp32_image.in_app_slot(0x1000) and not esp32_image.in_app_slot(0x310000)


def test_the_module_refuses_and_reports(tmp_path, run_module):
    path = tmp_path / "app.bin"
    path.write_bytes(build_app_image(project="fleet-sensor", version="1.2.0"))
    ok = run_module("esp32_image_info", {"path": str(path), "chip": "esp32", "project": "fleet-sensor"})
    assert ok["changed"] is False and ok["version"] == "1.2.0" and not ok.get("failed")
    refused = run_module("esp32_image_info", {"path": str(path), "project": "door-opener"})
    assert refused["failed"] and "door-opener" in refused["msg"]
    missing = run_module("esp32_image_info", {"path": str(tmp_path / "none.bin")})
    assert missing["failed"] and "not a valid ESP32 app image" in missing["msg"]
    json.dumps(ok)
