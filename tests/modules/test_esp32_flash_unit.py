"""esp32_flash against a fake board behind the one choke point (open_session)."""

from __future__ import annotations

import base64
import hashlib

import pytest
import serial
from esptool.util import FatalError as fatal

NVS = bytes(range(256)) * 96  # 24 KiB
APP = b"\xe9" + bytes(4095) + b"code" * 4096  # 20 KiB


@pytest.fixture
def images(tmp_path):
    app = tmp_path / "app.bin"
    app.write_bytes(APP)
    return [
        dict(offset=0x10000, path=str(app)),
        dict(offset="0x9000", content_b64=base64.b64encode(NVS).decode()),
    ]


def args(images, **extra):
    return dict(port="/dev/ttyUSB0", images=images, **extra)


def test_four_runs_check_real_check_real(board, run_module, images):
    first = run_module("esp32_flash", args(images), check_mode=True, diff=True)
    assert first["changed"] is True
    assert [i["status"] for i in first["images"]] == ["would_write", "would_write"]
    assert board.flash[0x9000 : 0x9000 + len(NVS)] == b"\xff" * len(NVS)  # check mode wrote nothing
    assert "0x009000+0x6000" in first["diff"]["after"] and "0x010000" in first["diff"]["after"]

    second = run_module("esp32_flash", args(images))
    assert second["changed"] is True
    assert [i["status"] for i in second["images"]] == ["written", "written"]
    assert board.flash[0x9000 : 0x9000 + len(NVS)] == NVS
    assert board.flash[0x10000 : 0x10000 + len(APP)] == APP
    nvs = second["images"][1]
    assert nvs["offset"] == 0x9000 and nvs["size"] == len(NVS)
    assert nvs["sha256"] == hashlib.sha256(NVS).hexdigest()
    assert nvs["md5"] == hashlib.md5(NVS).hexdigest()
    assert nvs["wire_bytes"] > 0
    assert second["mac"] == "24:0a:c4:00:00:01" and second["chip"] == "ESP32"

    third = run_module("esp32_flash", args(images), check_mode=True, diff=True)
    assert third["changed"] is False
    assert [i["status"] for i in third["images"]] == ["skipped", "skipped"]
    assert third["diff"]["after"] == ""

    writes_before = board.calls.get("write", 0)
    fourth = run_module("esp32_flash", args(images))
    assert fourth["changed"] is False
    assert board.calls.get("write", 0) == writes_before
    assert board.opened == board.closed == 4


def test_only_the_differing_image_is_written(board, run_module, images):
    run_module("esp32_flash", args(images))
    board.flash[0x9000] ^= 0xFF  # someone changed one byte of the NVS partition
    result = run_module("esp32_flash", args(images))
    assert result["changed"] is True
    assert [i["status"] for i in result["images"]] == ["skipped", "written"]
    assert board.flash[0x9000 : 0x9000 + len(NVS)] == NVS


def test_mac_mismatch_refuses_before_writing(board, run_module, images):
    result = run_module("esp32_flash", args(images, expected_mac="24-0A-C4-00-00-02"))
    assert result["failed"] is True and result["changed"] is False
    assert result["kind"] == "mac_mismatch"
    assert "24:0a:c4:00:00:01" in result["msg"] and "24:0a:c4:00:00:02" in result["msg"]
    assert "write" not in board.calls and "md5" not in board.calls
    assert board.closed == board.opened == 1


def test_matching_mac_in_any_spelling_is_accepted(board, run_module, images):
    result = run_module("esp32_flash", args(images, expected_mac="240AC4000001"))
    assert result["changed"] is True and "failed" not in result


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (
            fatal(
                "Could not open /dev/ttyUSB0, the port is busy or doesn't exist.\n"
                "(could not open port /dev/ttyUSB0: [Errno 2] No such file or directory: '/dev/ttyUSB0')\n"
            ),
            "port_missing",
        ),
        (
            serial.SerialException(
                "Could not exclusively lock port /dev/ttyUSB0: [Errno 11] Resource temporarily unavailable"
            ),
            "port_busy",
        ),
        (
            fatal(
                "Could not open /dev/ttyUSB0, the port is busy or doesn't exist.\n"
                "(could not open port /dev/ttyUSB0: [Errno 13] Permission denied: '/dev/ttyUSB0')"
            ),
            "port_permission",
        ),
        (fatal("Failed to connect to ESP32: No serial data received."), "no_answer"),
        (fatal("This chip is ESP32-S3, not ESP32. Wrong chip argument?"), "wrong_chip"),
        (OSError(2, "No such file or directory"), "port_missing"),
    ],
)
def test_connection_errors_end_the_task_cleanly(board, run_module, images, error, kind):
    board.fail["connect"] = error
    result = run_module("esp32_flash", args(images))
    assert result["failed"] is True and result["changed"] is False
    assert result["kind"] == kind
    assert "Traceback" not in result["msg"] and "\n" not in result["msg"]
    assert result["images"] == []


def test_lost_connection_mid_write_is_failed_not_changed(board, run_module, images):
    board.fail["write"] = fatal("Timed out waiting for packet header")
    result = run_module("esp32_flash", args(images))
    assert result["failed"] is True
    assert result["changed"] is False
    assert result["kind"] == "connection_lost"
    assert [i["status"] for i in result["images"]] == ["failed", "would_write"]
    assert board.closed == 1  # the port is closed even when the write blew up


def test_failure_after_one_image_reports_which_was_written(board, run_module, images):
    board.fail["write"] = serial.SerialException("device reports readiness to read but returned no data")
    board.fail_on["write"] = 2
    result = run_module("esp32_flash", args(images))
    assert result["failed"] is True
    assert result["changed"] is True  # the first image did land on the board
    assert [i["status"] for i in result["images"]] == ["written", "failed"]
    assert result["kind"] == "connection_lost"


def test_esptool_md5_check_failure_is_verify_failed(board, run_module, images):
    board.fail["write"] = fatal("MD5 of file does not match data in flash!")
    result = run_module("esp32_flash", args(images))
    assert result["failed"] is True and result["changed"] is False
    assert result["kind"] == "verify_failed"


def test_verify_pass_catches_a_board_that_stores_wrong_bytes(board, run_module, images):
    board.corrupt_writes = True
    result = run_module("esp32_flash", args(images))
    assert result["failed"] is True
    assert result["kind"] == "verify_failed"
    assert "verify_failed" in [i["status"] for i in result["images"]]


def test_verify_false_skips_the_second_md5_pass(board, run_module, images):
    run_module("esp32_flash", args(images, verify=False))
    assert board.calls["md5"] == 2  # only the comparison before writing
    board.flash[0x9000] ^= 0xFF
    run_module("esp32_flash", args(images, verify=True))
    assert board.calls["md5"] == 2 + 2 + 2  # compare 2, then verify 2


def test_image_larger_than_flash_fails_before_writing(board, run_module, tmp_path):
    big = tmp_path / "big.bin"
    big.write_bytes(b"\x00" * 0x2000)
    result = run_module("esp32_flash", args([dict(offset=0x3FF000, path=str(big))]))
    assert result["failed"] is True and result["kind"] == "image_too_large"
    assert "write" not in board.calls


def test_unaligned_offset_fails_without_touching_the_port(board, run_module, images):
    images[0]["offset"] = 0x10010
    result = run_module("esp32_flash", args(images))
    assert result["failed"] is True and result["kind"] == "offset_unaligned"
    assert "0x10010" in result["msg"]
    assert board.opened == 0


def test_overlapping_images_are_refused(board, run_module, images):
    images[1]["offset"] = 0xE000  # the 24 KiB NVS image would run into the app at 0x10000
    result = run_module("esp32_flash", args(images))
    assert result["failed"] is True and result["kind"] == "overlap"
    assert board.opened == 0


def test_missing_image_file_is_named(board, run_module, tmp_path):
    result = run_module("esp32_flash", args([dict(offset=0x10000, path=str(tmp_path / "nope.bin"))]))
    assert result["failed"] is True and result["kind"] == "image_source"
    assert "nope.bin" in result["msg"]


def test_path_and_content_are_mutually_exclusive(board, run_module, images):
    images[0]["content_b64"] = "AAAA"
    result = run_module("esp32_flash", args(images))
    assert result["failed"] is True
    assert "mutually exclusive" in result["msg"]


def test_erase_regions_clears_stale_data_after_the_image_and_stays_idempotent(board, run_module):
    board.flash[0x9000:0xF000] = b"\x11" * 0x6000  # an old, longer NVS image
    image = [dict(offset="0x9000", size="0x6000", content_b64=base64.b64encode(b"new!" * 1024).decode())]
    plain = run_module("esp32_flash", args(image))  # erase=none: only the image's own bytes count
    assert plain["changed"] is True
    assert board.flash[0xB000:0xF000] == b"\x11" * 0x4000  # stale pages survive erase=none
    result = run_module("esp32_flash", args(image, erase="regions"))
    assert result["changed"] is True
    assert result["images"][0]["region_size"] == 0x6000
    assert board.flash[0x9000:0xA000] == b"new!" * 1024
    assert board.flash[0xA000:0xF000] == b"\xff" * 0x5000
    again = run_module("esp32_flash", args(image, erase="regions"))
    assert again["changed"] is False


def test_erase_all_is_never_idempotent(board, run_module, images):
    run_module("esp32_flash", args(images))
    result = run_module("esp32_flash", args(images, erase="all"))
    assert result["changed"] is True
    assert board.calls["erase_all"] == 1
    assert [i["status"] for i in result["images"]] == ["written", "written"]


def test_timeout_ends_a_stuck_run(board, run_module, images):
    board.write_delay = 3
    result = run_module("esp32_flash", args(images, timeout=0.5))
    assert result["failed"] is True and result["kind"] == "timeout"
    assert board.closed == 1


def test_missing_esptool_gives_the_install_hint(board, run_module, images, monkeypatch):
    from ansible_collections.esp32_fleet.mqtt_fleet.plugins.module_utils import esp32_esptool

    monkeypatch.setattr(esp32_esptool, "HAS_ESPTOOL", False)
    monkeypatch.setattr(esp32_esptool, "ESPTOOL_IMPORT_ERROR", "ImportError: No module named 'esptool'")
    result = run_module("esp32_flash", args(images))
    assert result["failed"] is True
    assert "esptool>=5.2 on the station" in result["msg"]


def test_unknown_chip_name_is_refused(board, run_module, images):
    result = run_module("esp32_flash", args(images, chip="esp99"))
    assert result["failed"] is True and "esp99" in result["msg"]
    assert board.opened == 0


def test_session_options_reach_the_choke_point(board, run_module, images):
    run_module(
        "esp32_flash",
        args(
            images,
            baud=115200,
            before="no-reset",
            after="no-reset",
            chip="esp32",
            stub=False,
            connect_attempts=2,
        ),
    )
    assert board.session_args == dict(
        port="/dev/ttyUSB0",
        baud=115200,
        before="no-reset",
        after="no-reset",
        chip="esp32",
        connect_attempts=2,
        stub=False,
    )


def test_image_larger_than_its_region_fails_before_connecting(board, run_module):
    image = [dict(offset=0x9000, size="0x1000", content_b64=base64.b64encode(NVS).decode())]
    result = run_module("esp32_flash", args(image))
    assert result["failed"] is True and result["kind"] == "image_too_large"
    assert "0x1000" in result["msg"]
    assert board.opened == 0


def test_malformed_expected_mac_fails_before_connecting(board, run_module, images):
    result = run_module("esp32_flash", args(images, expected_mac="24:0a:c4:00:00"))
    assert result["failed"] is True and result["kind"] == "invalid"
    assert board.opened == 0


def test_unchanged_board_costs_no_stub_upload(board, run_module, images):
    run_module("esp32_flash", args(images))
    assert board.calls["prepare_transfer"] == 1
    run_module("esp32_flash", args(images))
    assert board.calls["prepare_transfer"] == 1  # the rerun compared MD5s through the ROM only


def test_erase_all_without_stub_is_refused(board, run_module, images):
    result = run_module("esp32_flash", args(images, erase="all", stub=False))
    assert result["failed"] is True and "stub" in result["msg"]
    assert board.opened == 0
