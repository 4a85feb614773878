"""The real esptool CLI against the simulator, over a pty and TCP, with and without the stub."""

import hashlib
import random
import zlib

import pytest

from .conftest import run_esptool

FLASH_SIZE = 4 * 1024 * 1024


@pytest.fixture(params=["stub", "no-stub"])
def stub_args(request):
    return [] if request.param == "stub" else ["--no-stub"]


def _image(size, seed, compressible=True):
    rng = random.Random(seed)
    if compressible:
        return bytes(rng.choice(b"esp32sim-fleet ") for _ in range(size))
    return rng.randbytes(size)


def _flash_file(sim):
    with open(sim.flash, "rb") as f:
        return f.read()


def test_identify(sim_factory, transport, stub_args):
    sim = sim_factory(transport, mac="24:0a:c4:12:34:56")
    out = run_esptool(sim.port, *stub_args, "read-mac").output
    assert "Detecting chip type... ESP32" in out
    assert "ESP32-D0WD-V3 (revision v3.0)" in out
    assert "Crystal frequency:  40MHz" in out
    assert out.count("MAC:                24:0a:c4:12:34:56") >= 2
    assert ("Stub flasher running" in out) == (not stub_args)

    out = run_esptool(sim.port, *stub_args, "flash-id").output
    assert "Manufacturer: ef" in out and "Device: 4016" in out
    assert "Detected flash size: 4MB" in out

    out = run_esptool(sim.port, *stub_args, "chip-id").output
    assert "24:0a:c4:12:34:56" in out


def test_get_security_info_fails_like_esp32(sim_factory, transport, stub_args):
    sim = sim_factory(transport)
    proc = run_esptool(sim.port, *stub_args, "get-security-info", check=False)
    assert proc.returncode != 0
    assert "Failed to get security info" in proc.output
    expected = "Command not implemented" if not stub_args else "format of the received message is invalid"
    assert expected in proc.output


def test_write_verify_read(sim_factory, transport, stub_args):
    sim = sim_factory(transport)
    comp = _image(48 * 1024 + 123, 1)
    raw = _image(20 * 1024 + 7, 2, compressible=False)
    tmp = sim.log_path.parent
    (tmp / "comp.bin").write_bytes(comp)
    (tmp / "raw.bin").write_bytes(raw)
    out = run_esptool(
        sim.port, *stub_args, "-b", "921600", "write-flash", "0x10000", str(tmp / "comp.bin")
    ).output
    assert "Changing baud rate to 921600" in out
    assert "Hash of data verified." in out
    out = run_esptool(
        sim.port, *stub_args, "write-flash", "--no-compress", "0x30000", str(tmp / "raw.bin")
    ).output
    assert "Hash of data verified." in out

    image = _flash_file(sim)
    assert image[0x10000 : 0x10000 + len(comp)] == comp
    assert image[0x30000 : 0x30000 + len(raw)] == raw
    # The rest of the last erased sector stays erased (0xFF), flash beyond is untouched.
    assert image[0x10000 + len(comp) : 0x10000 + len(comp) + 16] == b"\xff" * 16
    assert image[:0x10000] == b"\xff" * 0x10000

    out = run_esptool(sim.port, *stub_args, "verify-flash", "0x10000", str(tmp / "comp.bin")).output
    assert "Verification successful (digest matched)" in out

    # ROM: 64 bytes per command; stub: 8 packets with flow control (pyserial socket:// reads
    # one byte per call, so bigger reads only measure the client).
    n = 8192 if stub_args else 32 * 1024
    run_esptool(sim.port, *stub_args, "read-flash", "0x10000", hex(n), str(tmp / "back.bin"))
    assert (tmp / "back.bin").read_bytes() == comp[:n]


def test_verify_detects_difference(sim_factory, transport):
    sim = sim_factory(transport)
    tmp = sim.log_path.parent
    (tmp / "a.bin").write_bytes(b"\x00" * 4096)
    proc = run_esptool(sim.port, "verify-flash", "0x0", str(tmp / "a.bin"), check=False)
    assert proc.returncode != 0
    assert "Verification failed" in proc.output or "does not match" in proc.output


def test_skip_flashed(sim_factory, transport):
    sim = sim_factory(transport)
    tmp = sim.log_path.parent
    data = _image(64 * 1024, 3)
    (tmp / "app.bin").write_bytes(data)
    run_esptool(sim.port, "write-flash", "0x20000", str(tmp / "app.bin"))
    out = run_esptool(sim.port, "write-flash", "--skip-flashed", "0x20000", str(tmp / "app.bin")).output
    assert "Skipping" in out or "already" in out.lower()
    assert "Wrote" not in out
    assert _flash_file(sim)[0x20000 : 0x20000 + len(data)] == data


def test_erase_region_and_flash(sim_factory, transport):
    sim = sim_factory(transport)
    tmp = sim.log_path.parent
    data = _image(3 * 4096, 4, compressible=False)
    (tmp / "d.bin").write_bytes(data)
    run_esptool(sim.port, "write-flash", "0x40000", str(tmp / "d.bin"))
    run_esptool(sim.port, "erase-region", "0x41000", "0x1000")
    image = _flash_file(sim)
    assert image[0x40000:0x41000] == data[:4096]
    assert image[0x41000:0x42000] == b"\xff" * 4096
    assert image[0x42000:0x43000] == data[8192:]
    # esptool's own check: read back through the stub.
    run_esptool(sim.port, "read-flash", "0x40000", "0x3000", str(tmp / "r.bin"))
    assert (tmp / "r.bin").read_bytes() == data[:4096] + b"\xff" * 4096 + data[8192:]
    run_esptool(sim.port, "erase-flash")
    assert _flash_file(sim) == b"\xff" * FLASH_SIZE


def test_rom_erases_through_flash_begin(sim_factory):
    """ROM: erase-region works through FLASH_BEGIN's up-front erase; erase-flash needs the stub."""
    sim = sim_factory("pty")
    tmp = sim.log_path.parent
    (tmp / "z.bin").write_bytes(b"\x00" * 8192)
    run_esptool(sim.port, "--no-stub", "write-flash", "0x50000", str(tmp / "z.bin"))
    run_esptool(sim.port, "--no-stub", "erase-region", "0x51000", "0x1000")
    image = _flash_file(sim)
    assert image[0x50000:0x51000] == b"\x00" * 4096
    assert image[0x51000:0x52000] == b"\xff" * 4096
    proc = run_esptool(sim.port, "--no-stub", "erase-flash", check=False)
    assert proc.returncode != 0
    assert "ROM does not support function erase_flash" in proc.output
    assert _flash_file(sim)[0x50000:0x51000] == b"\x00" * 4096


def test_flash_survives_restart(sim_factory, tmp_path):
    flash = tmp_path / "persist.flash"
    first = sim_factory("tcp", flash=flash, name="first")
    data = _image(10000, 5)
    (tmp_path / "p.bin").write_bytes(data)
    run_esptool(first.port, "write-flash", "0x8000", str(tmp_path / "p.bin"))
    first.stop()
    second = sim_factory("pty", flash=flash, name="second")
    run_esptool(second.port, "verify-flash", "0x8000", str(tmp_path / "p.bin"))
    assert flash.read_bytes()[0x8000 : 0x8000 + len(data)] == data
    assert flash.stat().st_size == FLASH_SIZE


def test_write_whole_flash_compressed_md5(sim_factory):
    """A 1 MiB compressed write lands byte for byte and MD5s agree with hashlib."""
    sim = sim_factory("pty")
    tmp = sim.log_path.parent
    data = _image(1024 * 1024, 6)
    (tmp / "big.bin").write_bytes(data)
    out = run_esptool(sim.port, "-b", "921600", "write-flash", "0x100000", str(tmp / "big.bin")).output
    assert f"({len(zlib.compress(data, 9))} compressed)" in out
    image = _flash_file(sim)
    assert hashlib.md5(image[0x100000:0x200000]).digest() == hashlib.md5(data).digest()


SECTOR = 0x1000


def _expect_write(flash, addr, data):
    """What a real ESP32 leaves after writing `data` at `addr`: the sectors the image touches are
    erased whole (stub) or from esptool's aligned start (ROM) and then programmed; nothing else."""
    start = addr - addr % SECTOR
    end = -(-(addr + len(data)) // SECTOR) * SECTOR
    flash[start:end] = b"\xff" * (end - start)
    flash[addr : addr + len(data)] = data


@pytest.mark.parametrize("compress", ["--compress", "--no-compress"])
def test_write_erases_only_the_sectors_it_touches(sim_factory, tmp_path, stub_args, compress):
    """Issue item 9: a 1 KiB image at 0xFC00 leaves the sector at 0x10000 alone, and a bootloader
    written at 0x1000 after the partition table at 0x8000 leaves the table alone."""
    flash_path = tmp_path / "used.flash"
    # A used board: every byte programmed (0x5A is neither erased 0xFF nor a state NOR reaches
    # from the images below by programming alone), so any stray erase shows up.
    flash_path.write_bytes(b"\x5a" * FLASH_SIZE)
    sim = sim_factory("pty", flash=flash_path)
    expected = bytearray(flash_path.read_bytes())
    steps = [
        (0xFC00, _image(1024, 11)),  # ends exactly at the sector boundary 0x10000
        (0x8000, _image(0xC00, 12)),  # partition table
        (0x1000, _image(0x6A00 + 123, 13)),  # bootloader: its last 16 KiB stub block reaches 0x9000
    ]
    problems = []  # every step is checked, so one run shows each sequence that goes wrong
    for addr, data in steps:
        image = tmp_path / f"{addr:x}.bin"
        image.write_bytes(data)
        out = run_esptool(sim.port, *stub_args, "write-flash", compress, hex(addr), str(image)).output
        assert "Hash of data verified." in out
        assert ("compressed)" in out) == (compress == "--compress"), out
        _expect_write(expected, addr, data)
        actual = _flash_file(sim)
        changed = [
            hex(a) for a in range(0, FLASH_SIZE, SECTOR) if actual[a : a + SECTOR] != expected[a : a + SECTOR]
        ]
        if changed:
            problems.append(f"after writing {len(data)} bytes at {addr:#x}, sectors differ: {changed}")
    assert not problems, problems
    image = _flash_file(sim)
    assert image[0x10000:0x11000] == b"\x5a" * SECTOR
    assert image[0x8000:0x8C00] == steps[1][1]


def test_read_flash_sfdp(sim_factory, stub_args):
    """Issue item 10: the SFDP register of the W25Q32, as esptool's own test_flash_sfdp reads it."""
    sim = sim_factory("pty")
    out = run_esptool(sim.port, *stub_args, "read-flash-sfdp", "0", "4").output
    assert "SFDP[0..3]: 0x53 0x46 0x44 0x50" in out
    out = run_esptool(sim.port, *stub_args, "read-flash-sfdp", "1", "3").output
    assert "SFDP[1..3]: 0x46 0x44 0x50" in out
    # The basic flash parameter table (pointer at 0x0C) states the density: 2^25 bits - 1 = 4 MiB.
    out = run_esptool(sim.port, *stub_args, "read-flash-sfdp", "0x0c", "3").output
    assert "SFDP[12..14]: 0x80 0x00 0x00" in out
    out = run_esptool(sim.port, *stub_args, "read-flash-sfdp", "0x84", "4").output
    assert "SFDP[132..135]: 0xff 0xff 0xff 0x01" in out
