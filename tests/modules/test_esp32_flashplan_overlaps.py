"""plugins/module_utils/esp32_flashplan.py: overlaps by whole 4 KiB sectors (what esptool erases),
between every pair of regions, named with their ranges; esp32_flash refuses them through it."""

from __future__ import annotations

from ansible_collections.esp32_fleet.mqtt_fleet.plugins.module_utils.esp32_flashplan import (
    describe_overlap,
    flash_overlaps,
    sector_span,
)

NVS = {"name": "the NVS partition", "offset": 0x9000, "size": 0x6000}


def test_sector_span_rounds_the_start_down_and_the_end_up():
    assert sector_span(0x1000, 0x8000) == (0x1000, 0x9000)
    assert sector_span(0x1000, 0x8001) == (0x1000, 0xA000)
    assert sector_span(0x1800, 0x10) == (0x1000, 0x2000)


def test_an_image_ending_where_the_nvs_partition_starts_does_not_overlap():
    assert flash_overlaps([{"name": "boot.bin", "offset": 0x1000, "size": 0x8000}, NVS]) == []


def test_an_image_starting_before_the_nvs_partition_but_ending_in_it_overlaps():
    merged = {"name": "0x1000_merged.bin", "offset": 0x1000, "size": 0xA000}
    overlaps = flash_overlaps([NVS, merged])
    assert len(overlaps) == 1
    assert describe_overlap(overlaps[0]) == (
        "0x1000_merged.bin (0xa000 bytes at 0x1000, sectors 0x1000-0xafff) overlaps the NVS partition "
        "(0x6000 bytes at 0x9000, sectors 0x9000-0xefff): both cover 0x9000-0xafff"
    )


def test_one_byte_into_the_next_sector_overlaps_the_image_there():
    overlaps = flash_overlaps(
        [
            {"name": "app.bin", "offset": 0x10000, "size": 0x10001},
            {"name": "data.bin", "offset": 0x20000, "size": 4},
        ]
    )
    assert [(o["first"]["name"], o["second"]["name"]) for o in overlaps] == [("app.bin", "data.bin")]
    assert "both cover 0x20000-0x20fff" in describe_overlap(overlaps[0])


def test_every_pair_is_checked_not_only_neighbours():
    big = {"name": "big.bin", "offset": 0x1000, "size": 0x20000}
    overlaps = flash_overlaps([big, NVS, {"name": "app.bin", "offset": 0x10000, "size": 0x100}])
    assert sorted((o["first"]["name"], o["second"]["name"]) for o in overlaps) == [
        ("big.bin", "app.bin"),
        ("big.bin", "the NVS partition"),
    ]


def test_an_image_inside_another_overlaps():
    outer = {"name": "outer.bin", "offset": 0x10000, "size": 0x100000}
    inner = {"name": "inner.bin", "offset": 0x20000, "size": 0x1000}
    assert len(flash_overlaps([inner, outer])) == 1


def test_esp32_flash_names_both_images_and_ranges(board, run_module, tmp_path):
    merged = tmp_path / "merged.bin"
    merged.write_bytes(b"\x5a" * 0xA000)
    nvs = tmp_path / "nvs.bin"
    nvs.write_bytes(b"\x00" * 0x6000)
    result = run_module(
        "esp32_flash",
        {
            "port": "/dev/fake",
            "images": [{"offset": 0x9000, "path": str(nvs)}, {"offset": 0x1000, "path": str(merged)}],
        },
    )
    assert result["failed"] is True and result["kind"] == "overlap"
    assert "merged.bin (0xa000 bytes at 0x1000, sectors 0x1000-0xafff) overlaps nvs.bin" in result["msg"]
    assert board.opened == 0
