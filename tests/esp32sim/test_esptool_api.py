"""esptool's library API (esptool.cmds) against the simulator, plus resets and faults."""

import hashlib
import random

import pytest
from esptool.cmds import (
    attach_flash,
    connect_esp,
    detect_chip,
    detect_flash_size,
    erase_region,
    flash_id,
    read_flash,
    read_flash_sfdp,
    reset_chip,
    run_stub,
    verify_flash,
    write_flash,
)
from esptool.targets import ESP32ROM
from esptool.util import FatalError

from .conftest import run_esptool

SHORT = {"timeout": 1}  # esptool gives up on a silent board after 1 s instead of 3


@pytest.mark.parametrize("use_stub", [True, False], ids=["stub", "no-stub"])
def test_api_roundtrip(sim_factory, transport, use_stub):
    sim = sim_factory(transport, mac="24:0a:c4:aa:bb:cc")
    data = random.Random(7).randbytes(20000)
    with detect_chip(sim.port) as esp:
        assert esp.CHIP_NAME == "ESP32"
        assert esp.get_chip_description() == "ESP32-D0WD-V3 (revision v3.0)"
        assert esp.read_mac() == (0x24, 0x0A, 0xC4, 0xAA, 0xBB, 0xCC)
        assert esp.get_crystal_freq() == 40
        if use_stub:
            esp = run_stub(esp)
            assert esp.IS_STUB
        attach_flash(esp)
        assert esp.flash_id() & 0xFFFFFF == 0x1640EF
        write_flash(esp, [(0x9000, data)])
        verify_flash(esp, [(0x9000, data)])
        assert esp.flash_md5sum(0x9000, len(data)) == hashlib.md5(data).hexdigest()
        n = len(data) if use_stub else 2048
        assert read_flash(esp, 0x9000, n) == data[:n]
        if use_stub:
            erase_region(esp, 0x9000, 0x1000)
            assert esp.flash_md5sum(0x9000, 0x1000) == hashlib.md5(b"\xff" * 0x1000).hexdigest()
        reset_chip(esp, "no-reset")
    with open(sim.flash, "rb") as f:
        f.seek(0x9000)
        image = f.read(len(data))
    assert image[0x1000:] == data[0x1000:]
    assert image[:0x1000] == (b"\xff" * 0x1000 if use_stub else data[:0x1000])


def test_stub_left_running_until_port_reopens(sim_factory, transport):
    """--after no-reset-stub keeps the stub only while the port stays open; a reopen is a reset."""
    sim = sim_factory(transport)
    esp = detect_chip(sim.port)
    esp = run_stub(esp)
    # Same open port: a new sync is answered by the stub (value 0).
    esp.sync()
    assert esp.sync_stub_detected
    esp._port.close()
    with detect_chip(sim.port) as again:
        assert not again.sync_stub_detected
        assert not again.IS_STUB


def test_fault_hang_after_write_blocks(sim_factory, transport, tmp_path):
    sim = sim_factory(transport, faults=["hang-after-write-blocks=2"])
    (tmp_path / "x.bin").write_bytes(random.Random(1).randbytes(64 * 1024))
    proc = run_esptool(
        sim.port, "--no-stub", "write-flash", "0x10000", str(tmp_path / "x.bin"), check=False, config=SHORT
    )
    assert proc.returncode != 0
    assert any(
        msg in proc.output for msg in ("Failed to write", "No serial data received", "No more data to read")
    ), proc.output
    assert "hanging after 2 write blocks" in sim.log_text()
    # A new power-on answers again (and hangs again after two blocks).
    assert "MAC:" in run_esptool(sim.port, "--no-stub", "read-mac").output


def test_fault_corrupt_block(sim_factory, transport, tmp_path):
    sim = sim_factory(transport, faults=["corrupt-block=3"])
    data = random.Random(2).randbytes(40 * 1024)
    (tmp_path / "x.bin").write_bytes(data)
    proc = run_esptool(sim.port, "write-flash", "0x10000", str(tmp_path / "x.bin"), check=False)
    assert proc.returncode != 0
    assert "MD5 of file does not match data in flash!" in proc.output
    with open(sim.flash, "rb") as f:
        f.seek(0x10000)
        image = f.read(len(data))
    diff = [i for i in range(len(data)) if image[i] != data[i]]
    assert len(diff) == 1


def test_fault_other_chip(sim_factory, transport):
    sim = sim_factory(transport, faults=["chip=esp32s3"])
    proc = run_esptool(sim.port, "--chip", "esp32", "read-mac", check=False)
    assert proc.returncode != 0
    assert "This chip is ESP32-S3, not ESP32" in proc.output
    with detect_chip(sim.port) as esp:
        assert esp.CHIP_NAME == "ESP32-S3"
    with pytest.raises(FatalError, match="This chip is ESP32-S3, not ESP32"):
        connect_esp(sim.port, chip="esp32")
    sim2 = sim_factory(transport, faults=["chip=esp32s2"], name="s2")
    esp = detect_chip(sim2.port)
    try:
        assert esp.CHIP_NAME == "ESP32-S2"
    finally:
        esp._port.close()


def test_baud_pacing_is_not_faster_than_the_line(sim_factory, transport):
    """With pacing, the stub upload at 115200 8N1 cannot beat physics (10 bits per byte)."""
    import time

    from esptool.loader import StubFlasher
    from esptool.targets import ESP32ROM

    stub = StubFlasher(ESP32ROM)
    stub_bytes = len(stub.text) + len(stub.data)

    sim = sim_factory(transport, pacing=True)
    t = time.monotonic()
    with detect_chip(sim.port) as esp:
        esp = run_stub(esp)
    elapsed = time.monotonic() - t
    assert elapsed >= stub_bytes * 10 / 115200


def test_attach_flash_as_a_real_chip(sim_factory, capsys):
    """Issue item 11, esptool's own test_attach_flash: before SPI_ATTACH the ROM reaches no flash."""
    sim = sim_factory("pty")
    with ESP32ROM(sim.port) as esp:
        esp.connect()
        assert detect_flash_size(esp) is None
        flash_id(esp)
        read_flash_sfdp(esp, 0, 4)
        pre = capsys.readouterr().out
        attach_flash(esp)
        assert detect_flash_size(esp) == "4MB"
        flash_id(esp)
        read_flash_sfdp(esp, 0, 4)
        post = capsys.readouterr().out
    assert "Detected flash size: Unknown" in pre and "Device: ffff" in pre
    assert "SFDP[0..3]: 0xff 0xff 0xff 0xff" in pre
    assert "Manufacturer: ef" in post and "Device: 4016" in post and "Detected flash size: 4MB" in post
    assert "SFDP[0..3]: 0x53 0x46 0x44 0x50" in post


def test_stub_attaches_the_flash_itself(sim_factory):
    """The flasher stub attaches the flash when it starts; a new power-on detaches it again."""
    sim = sim_factory("pty")
    with ESP32ROM(sim.port) as esp:
        esp.connect()
        esp = run_stub(esp)
        assert detect_flash_size(esp) == "4MB"
        assert esp.read_spiflash_sfdp(0, 32) == int.from_bytes(b"SFDP", "little")
    with ESP32ROM(sim.port) as esp:  # reopening the port is a reset
        esp.connect()
        assert esp.flash_id(cache=False) == 0xFFFFFF
