"""plugins/filter/esp32_fleet_topic.py (the one topic-root rule) and plugins/filter/esp32_fleet_flash.py
(a board's firmware list and its overlaps with the NVS partition), called as Ansible calls them."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import yaml
from ansible.errors import AnsibleFilterError

ROOT = Path(__file__).resolve().parents[2]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "plugins" / "filter" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


topic = _load("esp32_fleet_topic")
flash = _load("esp32_fleet_flash")


def test_topic_root_is_prefix_and_device_id_by_default():
    assert topic.esp32_fleet_topic_root({"inventory_hostname": "b1"}) == "devices/b1"
    assert topic.esp32_fleet_topic_root({"inventory_hostname": "b1", "esp32_device_id": "cellar-01"}) == (
        "devices/cellar-01"
    )


def test_the_boards_own_prefix_wins_over_the_callers_default():
    board = {"inventory_hostname": "b1", "esp32_provision_topic_prefix": "fleet/"}
    assert topic.esp32_fleet_topic_root(board) == "fleet/b1"
    assert topic.esp32_fleet_topic_root(board, "other") == "fleet/b1"
    assert topic.esp32_fleet_topic_root({"inventory_hostname": "b1"}, "plant") == "plant/b1"


def test_an_explicit_topic_root_wins():
    board = {
        "inventory_hostname": "b1",
        "esp32_provision_topic_prefix": "fleet",
        "esp32_topic_root": "sites/a/b1",
    }
    assert topic.esp32_fleet_topic_root(board) == "sites/a/b1"


@pytest.mark.parametrize("root", ["sites/+/b1", "sites/#", "sites//b1", "/b1"])
def test_a_root_that_would_grant_other_topics_is_refused(root):
    with pytest.raises(AnsibleFilterError, match="without \\+ or #"):
        topic.esp32_fleet_topic_root({"inventory_hostname": "b1", "esp32_topic_root": root})


def test_the_filter_default_is_the_roles_default():
    defaults = yaml.safe_load((ROOT / "roles" / "esp32_provision" / "defaults" / "main.yml").read_text())
    assert defaults["esp32_provision_topic_prefix"] == topic.DEFAULT_PREFIX


def test_explicit_images_win_over_the_directory():
    explicit = [{"offset": "0x10000", "path": "/fw/app.bin"}]
    assert flash.esp32_fleet_firmware_images(explicit, [{"path": "/d/0x1000_boot.bin"}]) == explicit


def test_directory_images_take_their_offset_from_the_name_in_path_order():
    found = [{"path": "/d/0x10000_app.bin", "size": 1}, {"path": "/d/0x1000_boot.bin", "size": 1}]
    assert flash.esp32_fleet_firmware_images([], found) == [
        {"offset": "0x10000", "path": "/d/0x10000_app.bin"},
        {"offset": "0x1000", "path": "/d/0x1000_boot.bin"},
    ]
    with pytest.raises(AnsibleFilterError, match=r"<offset>_<name>\.bin"):
        flash.esp32_fleet_firmware_images([], ["/d/0xZZ_app.bin"])


def test_overlaps_use_each_files_size_and_name_it(tmp_path):
    merged = tmp_path / "0x1000_merged.bin"
    merged.write_bytes(b"\x5a" * 0xA000)
    app = tmp_path / "0x10000_app.bin"
    app.write_bytes(b"\x01" * 0x100)
    images = flash.esp32_fleet_firmware_images([], [str(merged), str(app)])
    assert flash.esp32_fleet_flash_overlaps(images, 0x9000, "0x6000") == [
        f"{merged} (0xa000 bytes at 0x1000, sectors 0x1000-0xafff) overlaps the NVS partition "
        "(0x6000 bytes at 0x9000, sectors 0x9000-0xefff): both cover 0x9000-0xafff"
    ]
    merged.write_bytes(b"\x5a" * 0x8000)  # ends exactly where the NVS partition starts
    assert flash.esp32_fleet_flash_overlaps(images, 36864, 24576) == []


def test_an_unreadable_image_or_bad_offset_fails_naming_it(tmp_path):
    with pytest.raises(AnsibleFilterError, match=r"nope\.bin"):
        flash.esp32_fleet_flash_overlaps(
            [{"offset": "0x10000", "path": str(tmp_path / "nope.bin")}], 0x9000, 0x6000
        )
    app = tmp_path / "app.bin"
    app.write_bytes(b"\x01")
    with pytest.raises(AnsibleFilterError, match="offset must be an integer"):
        flash.esp32_fleet_flash_overlaps([{"offset": "ten", "path": str(app)}], 0x9000, 0x6000)
