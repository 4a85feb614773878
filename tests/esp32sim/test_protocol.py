"""Raw protocol: malformed input gets ROM/stub error responses, NOR semantics, resets."""

import hashlib
import struct
import time

import pytest
import serial

from esp32sim import slip
from esp32sim.commands import SYNC_PAYLOAD


class Raw:
    """A hand-driven host: send frames, read response frames."""

    def __init__(self, port):
        self.ser = serial.serial_for_url(port, timeout=0.5)
        self.dec = slip.Decoder()
        self.frames = []

    def close(self):
        self.ser.close()

    def send_raw(self, data):
        self.ser.write(data)

    def cmd(self, op, data=b"", chk=0):
        self.send_raw(slip.encode(struct.pack("<BBHI", 0, op, len(data), chk) + data))

    def frame(self, timeout=2.0):
        deadline = time.monotonic() + timeout
        while not self.frames and time.monotonic() < deadline:
            chunk = self.ser.read(self.ser.in_waiting or 1)
            for kind, value in self.dec.feed(chunk):
                assert kind == "frame", value
                self.frames.append(value)
        return self.frames.pop(0) if self.frames else None

    def response(self, timeout=2.0):
        f = self.frame(timeout)
        assert f is not None, "no response"
        direction, op, length, value = struct.unpack("<BBHI", f[:8])
        assert direction == 1 and length == len(f) - 8
        return op, value, f[8:]

    def sync(self):
        self.cmd(0x08, SYNC_PAYLOAD)
        replies = [self.response() for _ in range(8)]
        return replies


def _checksum(data):
    c = 0xEF
    for b in data:
        c ^= b
    return c


@pytest.fixture
def raw(sim_factory, transport):
    sim = sim_factory(transport)
    r = Raw(sim.port)
    r.sim = sim
    yield r
    r.close()


def test_sync_answers_eight_times(raw):
    replies = raw.sync()
    assert all(op == 0x08 and value == 0x20120707 and data == b"\0\0\0\0" for op, value, data in replies)
    assert raw.frame(timeout=0.3) is None


def test_malformed_input_gets_rom_errors(raw):
    raw.sync()
    # Unknown opcode (and a stub-only one, ERASE_FLASH) in the ROM: "invalid message".
    for op in (0x55, 0xD0, 0x14):
        raw.cmd(op)
        assert raw.response() == (op, 0, b"\x01\x05\x00\x00")
    # A bad SLIP escape inside a frame.
    raw.send_raw(b"\xc0\x00\x0a\x04\x00\x00\x00\x00\x00\xdb\x01\x10\x00\x40\xc0")
    op, _, data = raw.response()
    assert data[:2] == b"\x01\x05"
    # A truncated frame (shorter than a header) and a length field that lies.
    raw.send_raw(slip.encode(b"\x00\x0a\x04"))
    assert raw.response()[2][:2] == b"\x01\x05"
    raw.send_raw(slip.encode(struct.pack("<BBHI", 0, 0x0A, 8, 0) + b"\x00\x10\x00\x40"))
    assert raw.response() == (0x0A, 0, b"\x01\x05\x00\x00")
    # A wrong checksum on a data block: "checksum error".
    raw.cmd(0x05, struct.pack("<IIII", 16, 1, 16, 0x3FFB0000))
    assert raw.response()[2] == b"\0\0\0\0"
    block = bytes(range(16))
    raw.cmd(0x07, struct.pack("<IIII", 16, 0, 0, 0) + block, chk=_checksum(block) ^ 0xFF)
    assert raw.response() == (0x07, 0, b"\x01\x07\x00\x00")
    # Garbage between frames is line noise, then the board still works.
    raw.send_raw(b"\x00\x55garbage\xff")
    raw.cmd(0x0A, struct.pack("<I", 0x40001000))
    assert raw.response() == (0x0A, 0x00F01D83, b"\0\0\0\0")
    assert raw.sim.proc.poll() is None


def test_nor_flash_write_only_clears_bits(raw):
    raw.sync()
    # ROM FLASH_BEGIN erases (size) bytes up front; size 0 erases nothing.
    raw.cmd(0x02, struct.pack("<IIII", 4096, 1, 0x400, 0x1000))
    assert raw.response()[2] == b"\0\0\0\0"
    block = b"\xf0" * 0x400
    raw.cmd(0x03, struct.pack("<IIII", len(block), 0, 0, 0) + block, chk=_checksum(block))
    assert raw.response()[2] == b"\0\0\0\0"
    raw.cmd(0x02, struct.pack("<IIII", 0, 1, 0x400, 0x1000))  # no erase this time
    assert raw.response()[2] == b"\0\0\0\0"
    block2 = b"\x3c" * 0x400
    raw.cmd(0x03, struct.pack("<IIII", len(block2), 0, 0, 0) + block2, chk=_checksum(block2))
    assert raw.response()[2] == b"\0\0\0\0"
    with open(raw.sim.flash, "rb") as f:
        f.seek(0x1000)
        assert f.read(0x400) == b"\x30" * 0x400  # 0xF0 & 0x3C: programming ANDs
    # The ROM's MD5 is 32 hex digits.
    raw.cmd(0x13, struct.pack("<IIII", 0x1000, 0x400, 0, 0))
    _, _, data = raw.response()
    assert data[:32] == hashlib.md5(b"\x30" * 0x400).hexdigest().encode()
    # Wrong sequence number: "failed to act".
    raw.cmd(0x03, struct.pack("<IIII", len(block2), 5, 0, 0) + block2, chk=_checksum(block2))
    assert raw.response()[2][:2] == b"\x01\x06"


def _upload_fake_stub(raw):
    code = b"\x36\x41\x00" * 100
    raw.cmd(0x05, struct.pack("<IIII", len(code), 1, 0x1800, 0x40080000))
    assert raw.response()[2] == b"\0\0\0\0"
    raw.cmd(0x07, struct.pack("<IIII", len(code), 0, 0, 0) + code, chk=_checksum(code))
    assert raw.response()[2] == b"\0\0\0\0"
    raw.cmd(0x06, struct.pack("<II", 0, 0x40080004))
    assert raw.response()[2] == b"\0\0\0\0"
    assert raw.frame() == b"OHAI"


def test_stub_errors_and_reset_back_to_rom(raw):
    raw.sync()
    _upload_fake_stub(raw)
    replies = raw.sync()
    assert all(value == 0 and data == b"\0\0" for _, value, data in replies)  # stub: 2-byte status
    raw.cmd(0x77)
    assert raw.response() == (0x77, 0, b"\xff\x00")
    raw.cmd(0xD1, struct.pack("<II", 0x1001, 0x1000))  # unaligned erase
    assert raw.response()[2] == b"\xc0\x00"
    raw.cmd(0x11, struct.pack("<IIII", 4, 0, 0, 0) + b"abcd", chk=_checksum(b"abcd"))  # no begin
    assert raw.response()[2] == b"\xc6\x00"
    raw.cmd(0x10, struct.pack("<IIIII", 100, 1, 0x4000, 0x2000, 0))
    assert raw.response()[2] == b"\0\0"
    raw.cmd(0x11, struct.pack("<IIII", 4, 0, 0, 0) + b"abcd", chk=_checksum(b"abcd"))  # not zlib
    assert raw.response()[2] == b"\xc7\x00"
    # Opening the port anew is a power-on: the ROM answers again.
    raw.close()
    time.sleep(0.1)
    again = Raw(raw.sim.port)
    try:
        assert all(value == 0x20120707 for _, value, _ in again.sync())
    finally:
        again.close()


def test_stub_read_flash_flow_control(raw):
    raw.sync()
    _upload_fake_stub(raw)
    raw.cmd(0xD2, struct.pack("<IIII", 0, 0x3000, 0x1000, 2))
    assert raw.response()[2] == b"\0\0"
    got = b""
    # With two packets in flight the board sends two, then waits for an ack.
    got += raw.frame()
    got += raw.frame()
    assert raw.frame(timeout=0.3) is None
    raw.send_raw(slip.encode(struct.pack("<I", len(got))))
    got += raw.frame()
    raw.send_raw(slip.encode(struct.pack("<I", len(got))))
    digest = raw.frame()
    assert got == b"\xff" * 0x3000
    assert digest == hashlib.md5(got).digest()


def test_rom_flash_end_leaves_the_bootloader(raw):
    raw.sync()
    raw.cmd(0x02, struct.pack("<IIII", 0, 0, 0x400, 0))
    assert raw.response()[2] == b"\0\0\0\0"
    raw.cmd(0x04, struct.pack("<I", 1))
    assert raw.response() == (0x04, 0, b"\0\0\0\0")
    # The firmware runs now: the bootloader protocol is gone until the next power-on.
    raw.cmd(0x08, SYNC_PAYLOAD)
    assert raw.frame(timeout=0.5) is None
    raw.close()
    time.sleep(0.1)
    again = Raw(raw.sim.port)
    try:
        assert len(again.sync()) == 8
    finally:
        again.close()


def test_serve_removes_its_pty_link_on_exit(sim_factory):
    import os

    sim = sim_factory("pty")
    target = os.readlink(sim.link)
    assert target.startswith("/dev/pts/")
    sim.stop()
    assert sim.proc.returncode == 0
    assert not os.path.lexists(sim.link)
