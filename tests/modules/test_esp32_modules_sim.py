"""Integration: the esp32_* modules through ansible-playbook against the real simulator (esp32sim).

The simulator speaks the ROM bootloader and flasher-stub protocols to the unmodified esptool 5.6 that
the modules use, over a pty (a path like /dev/ttyUSB0) or TCP (socket://).
"""

from __future__ import annotations

import contextlib
import hashlib
import socket
import threading

import pytest
import serial

from esp32sim.nvs import parse_nvs

MAC = "24:0a:c4:00:00:01"
NVS_OFFSET, NVS_SIZE, APP_OFFSET = 0x9000, 0x6000, 0x10000


def namespaces(tmp_path):
    key = tmp_path / "client.key"
    key.write_text(
        "-----BEGIN EC PRIV" + "ATE KEY-----\nsim-test-key-material\n-----END EC PRIV" + "ATE KEY-----\n"
    )
    return {
        "mqtt": {
            "broker_uri": "mqtts://127.0.0.1:8883",
            "device_id": "esp32-sim-01",
            "topic_root": "fleet/esp32-sim-01",
            "client_key": {"file": str(key)},
        },
        "wifi": {"ssid": "lab", "password": "lab-wifi-password"},
    }


def flash_task(port, images, **extra):
    args = dict(port=port, images=images, expected_mac=MAC, **extra)
    return dict(name="Flash the board", esp32_flash=args, register="flashed")


def read_back(port, offset, size):
    """Read flash through esptool's own API (not through the module under test)."""
    from esptool import cmds

    with cmds.detect_chip(port, connect_mode="no-reset") as esp:
        esp = cmds.run_stub(esp)
        return bytes(esp.read_flash(offset, size))


@pytest.mark.parametrize("transport", ["tcp", "pty"])
def test_four_runs_and_nvs_round_trip(sim, playbook, tmp_path, firmware, transport):
    board = sim(transport=transport, mac=MAC)
    nvs_bin = tmp_path / "nvs.bin"
    values = namespaces(tmp_path)
    rc, results, _ = playbook([dict(esp32_nvs=dict(dest=str(nvs_bin), namespaces=values))])
    assert rc == 0 and results[0]["changed"] is True
    images = [dict(offset=NVS_OFFSET, path=str(nvs_bin)), dict(offset=hex(APP_OFFSET), path=str(firmware))]
    tasks = [flash_task(board.port, images, before="no-reset")]

    rc, results, stats = playbook(tasks, check=True, diff=True)
    assert rc == 0, results
    assert stats["changed"] == 1
    assert [i["status"] for i in results[0]["images"]] == ["would_write", "would_write"]
    assert "0x009000+0x6000" in results[0]["diff"]["after"]
    assert read_back(board.port, NVS_OFFSET, 64) == b"\xff" * 64  # check mode wrote nothing

    rc, results, stats = playbook(tasks)
    assert rc == 0, results
    assert stats["changed"] == 1
    written = results[0]["images"]
    assert [i["status"] for i in written] == ["written", "written"]
    assert written[1]["size"] == firmware.stat().st_size
    assert written[1]["sha256"] == hashlib.sha256(firmware.read_bytes()).hexdigest()
    assert 0 < written[1]["wire_bytes"] < firmware.stat().st_size  # compressed on the wire
    assert results[0]["mac"] == MAC and results[0]["chip"] == "ESP32"

    rc, results, stats = playbook(tasks, check=True)
    assert rc == 0 and stats["changed"] == 0
    assert [i["status"] for i in results[0]["images"]] == ["skipped", "skipped"]

    rc, results, stats = playbook(tasks)
    assert rc == 0 and stats["changed"] == 0
    assert [i["status"] for i in results[0]["images"]] == ["skipped", "skipped"]

    # Round trip: what the board holds parses back to exactly the values given to esp32_nvs.
    parsed = parse_nvs(read_back(board.port, NVS_OFFSET, NVS_SIZE))
    expected = {ns: {k: v for k, v in kv.items() if isinstance(v, str)} for ns, kv in values.items()}
    expected["mqtt"]["client_key"] = (tmp_path / "client.key").read_text()
    assert parsed == expected
    assert read_back(board.port, APP_OFFSET, 4096) == firmware.read_bytes()[:4096]


def test_info_reports_the_board_and_region_md5(sim, playbook, tmp_path):
    board = sim(transport="tcp", mac="24:0a:c4:12:34:56")
    task = dict(
        esp32_info=dict(port=board.port, md5_regions=[dict(offset="0x9000", size="0x6000")]), register="info"
    )
    rc, results, stats = playbook([task], check=True)
    assert rc == 0 and stats["changed"] == 0
    info = results[0]
    assert info["mac"] == "24:0a:c4:12:34:56"
    assert info["chip"] == "ESP32" and info["description"].startswith("ESP32")
    assert info["flash_size"] == 4 * 1024 * 1024
    assert info["stub"] is True
    assert info["regions"] == [
        dict(offset=0x9000, size=0x6000, md5=hashlib.md5(b"\xff" * 0x6000).hexdigest())
    ]


def test_mac_mismatch_is_refused_and_nothing_written(sim, playbook, tmp_path):
    board = sim(transport="tcp", mac="24:0a:c4:00:00:02")
    image = [dict(offset=NVS_OFFSET, content_b64="AAECAw==")]
    rc, results, stats = playbook([flash_task(board.port, image)])
    assert rc != 0 and stats["failures"] == 1 and stats["changed"] == 0
    assert results[0]["kind"] == "mac_mismatch"
    assert "24:0a:c4:00:00:02" in results[0]["msg"]
    assert read_back(board.port, NVS_OFFSET, 4) == b"\xff" * 4


def test_wrong_chip_is_refused(sim, playbook):
    board = sim(transport="tcp", faults=["chip=esp32s3"])
    image = [dict(offset=NVS_OFFSET, content_b64="AAECAw==")]
    rc, results, stats = playbook([flash_task(board.port, image, chip="esp32")])
    assert rc != 0 and stats["changed"] == 0
    assert results[0]["kind"] == "wrong_chip", results[0]["msg"]


def test_board_that_stops_answering_mid_write_fails_cleanly_then_rerun_succeeds(
    sim, playbook, tmp_path, firmware
):
    board = sim(transport="tcp", faults=["hang-after-write-blocks=3"])
    images = [dict(offset=APP_OFFSET, path=str(firmware))]
    rc, results, stats = playbook([flash_task(board.port, images)])
    assert rc != 0 and stats["failures"] == 1
    assert stats["changed"] == 0 and results[0]["changed"] is False
    assert results[0]["kind"] == "connection_lost", results[0]["msg"]
    assert results[0]["images"][0]["status"] == "failed"
    assert "Traceback" not in results[0]["msg"]

    # The board is power-cycled (the simulator restarted on the same flash, without the fault).
    board.stop()
    again = sim(transport="tcp", flash=board.flash)
    rc, results, stats = playbook([flash_task(again.port, images)])
    assert rc == 0 and stats["changed"] == 1, results
    assert results[0]["images"][0]["status"] == "written"
    rc, results, stats = playbook([flash_task(again.port, images)])
    assert rc == 0 and stats["changed"] == 0


def test_missing_port_is_reported_as_such(playbook, tmp_path):
    image = [dict(offset=NVS_OFFSET, content_b64="AAECAw==")]
    rc, results, _ = playbook([flash_task(str(tmp_path / "ttyUSB9"), image, connect_attempts=1)])
    assert rc != 0 and results[0]["kind"] == "port_missing", results[0]["msg"]


def test_busy_port_is_reported_as_such(sim, playbook):
    board = sim(transport="pty")
    holder = serial.Serial(board.port, exclusive=True)  # a serial monitor left open on the port
    try:
        image = [dict(offset=NVS_OFFSET, content_b64="AAECAw==")]
        rc, results, _ = playbook([flash_task(board.port, image, connect_attempts=1)])
    finally:
        holder.close()
    assert rc != 0 and results[0]["kind"] == "port_busy", results[0]["msg"]


@contextlib.contextmanager
def silent_tcp_board():
    """A TCP port that accepts and never answers: a board not in download mode."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    conns = []
    stop = threading.Event()

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            with contextlib.suppress(OSError):
                conns.append(server.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"socket://127.0.0.1:{server.getsockname()[1]}"
    finally:
        stop.set()
        thread.join()
        for c in conns:
            c.close()
        server.close()


def test_board_not_in_download_mode_is_no_answer(playbook):
    with silent_tcp_board() as port:
        image = [dict(offset=NVS_OFFSET, content_b64="AAECAw==")]
        rc, results, _ = playbook([flash_task(port, image, connect_attempts=1)])
    assert rc != 0 and results[0]["kind"] == "no_answer", results[0]["msg"]
    assert results[0]["changed"] is False


def test_erase_regions_through_the_rom_loader_clears_stale_pages(sim, playbook, tmp_path):
    """stub: false drives the ROM bootloader (no flasher stub); erase=regions leaves no old pages."""
    board = sim(transport="pty")
    old = tmp_path / "old.bin"
    old.write_bytes(b"\x11" * NVS_SIZE)
    new = tmp_path / "new.bin"
    new.write_bytes(b"\x22" * 0x1000)
    rom = dict(stub=False, baud=115200)
    rc, _, _ = playbook([flash_task(board.port, [dict(offset=NVS_OFFSET, path=str(old))], **rom)])
    assert rc == 0
    region = [dict(offset=NVS_OFFSET, path=str(new), size=hex(NVS_SIZE))]
    rc, results, stats = playbook([flash_task(board.port, region, erase="regions", **rom)])
    assert rc == 0 and stats["changed"] == 1, results
    assert results[0]["images"][0]["region_size"] == NVS_SIZE
    assert read_back(board.port, NVS_OFFSET, NVS_SIZE) == b"\x22" * 0x1000 + b"\xff" * (NVS_SIZE - 0x1000)
    rc, results, stats = playbook([flash_task(board.port, region, erase="regions", **rom)])
    assert rc == 0 and stats["changed"] == 0
