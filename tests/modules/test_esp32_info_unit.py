"""esp32_info against a fake board behind the one choke point (open_session)."""

from __future__ import annotations

import hashlib

import pytest
from esptool.util import FatalError


def test_returns_board_facts_and_never_changes(board, run_module):
    result = run_module("esp32_info", dict(port="socket://127.0.0.1:1"))
    assert result["changed"] is False
    assert result["chip"] == "ESP32"
    assert result["mac"] == "24:0a:c4:00:00:01"
    assert result["flash_size"] == 4 * 1024 * 1024
    assert result["stub"] is True
    assert result["esptool_version"].startswith("5.")
    assert result["regions"] == []
    assert "write" not in board.calls and "erase_all" not in board.calls


def test_md5_regions_are_computed_by_the_board(board, run_module):
    board.flash[0x9000:0xF000] = b"\x42" * 0x6000
    result = run_module(
        "esp32_info",
        dict(
            port="/dev/ttyUSB0", md5_regions=[dict(offset="0x9000", size=0x6000), dict(offset=0, size="4096")]
        ),
        check_mode=True,
    )
    assert result["regions"] == [
        dict(offset=0x9000, size=0x6000, md5=hashlib.md5(b"\x42" * 0x6000).hexdigest()),
        dict(offset=0, size=4096, md5=hashlib.md5(b"\xff" * 4096).hexdigest()),
    ]


def test_bad_region_offset_is_named(board, run_module):
    result = run_module("esp32_info", dict(port="/dev/ttyUSB0", md5_regions=[dict(offset="nine", size=1)]))
    assert result["failed"] is True
    assert "md5_regions[0].offset" in result["msg"]
    assert board.opened == 0


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (FatalError("Failed to connect to ESP32: No serial data received."), "no_answer"),
        (FatalError("Timed out waiting for packet header"), "connection_lost"),
    ],
)
def test_errors_are_clean(board, run_module, error, kind):
    board.fail["info"] = error
    result = run_module("esp32_info", dict(port="/dev/ttyUSB0"))
    assert result["failed"] is True and result["kind"] == kind
    assert board.closed == 1
