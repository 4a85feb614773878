"""Command handling: the ESP32 ROM serial bootloader and, after a stub upload, the flasher stub.

One `Session` is one power-on of the board. The transport feeds it raw bytes and sends what it
queues in `out`; a new session (reset) starts when the port is opened anew.
"""

import hashlib
import struct
import zlib

from . import slip
from .device import BLOCK, CHIP_IDS, SECTOR, Faults, Flash, Registers

# Opcodes (esptool loader.py ESP_CMDS).
FLASH_BEGIN = 0x02
FLASH_DATA = 0x03
FLASH_END = 0x04
MEM_BEGIN = 0x05
MEM_END = 0x06
MEM_DATA = 0x07
SYNC = 0x08
WRITE_REG = 0x09
READ_REG = 0x0A
SPI_SET_PARAMS = 0x0B
SPI_ATTACH = 0x0D
READ_FLASH_SLOW = 0x0E
CHANGE_BAUDRATE = 0x0F
FLASH_DEFL_BEGIN = 0x10
FLASH_DEFL_DATA = 0x11
FLASH_DEFL_END = 0x12
SPI_FLASH_MD5 = 0x13
GET_SECURITY_INFO = 0x14
ERASE_FLASH = 0xD0
ERASE_REGION = 0xD1
READ_FLASH = 0xD2
RUN_USER_CODE = 0xD3

SYNC_PAYLOAD = b"\x07\x07\x12\x20" + b"\x55" * 32
ROM_SYNC_VALUE = 0x20120707

# ROM error reasons (second status byte; first is 1).
ROM_INVALID_MSG = 0x05
ROM_FAILED = 0x06
ROM_BAD_CRC = 0x07
ROM_FLASH_WRITE_ERR = 0x08
ROM_FLASH_READ_ERR = 0x09
ROM_READ_LEN_ERR = 0x0A
ROM_DEFLATE_ERR = 0x0B
# Flasher stub error codes (first status byte).
STUB_BAD_DATA_LEN = 0xC0
STUB_BAD_DATA_CHECKSUM = 0xC1
STUB_BAD_BLOCKSIZE = 0xC2
STUB_INVALID_COMMAND = 0xC3
STUB_NOT_IN_FLASH_MODE = 0xC6
STUB_INFLATE_ERROR = 0xC7
STUB_TOO_MUCH_DATA = 0xC9
STUB_CMD_NOT_IMPLEMENTED = 0xFF

ROM_COMMANDS = {
    FLASH_BEGIN, FLASH_DATA, FLASH_END, MEM_BEGIN, MEM_END, MEM_DATA, SYNC, WRITE_REG, READ_REG,
    SPI_SET_PARAMS, SPI_ATTACH, READ_FLASH_SLOW, CHANGE_BAUDRATE, FLASH_DEFL_BEGIN,
    FLASH_DEFL_DATA, FLASH_DEFL_END, SPI_FLASH_MD5,
}  # fmt: skip
STUB_COMMANDS = (ROM_COMMANDS - {READ_FLASH_SLOW}) | {ERASE_FLASH, ERASE_REGION, READ_FLASH, RUN_USER_CODE}


class CommandError(Exception):
    """A command that fails with a status the host sees; `rom` and `stub` are the reasons."""

    def __init__(self, rom: int, stub: int, message: str = ""):
        super().__init__(message)
        self.rom = rom
        self.stub = stub


def _checksum(data: bytes) -> int:
    state = 0xEF
    for b in data:
        state ^= b
    return state


# Bytes of the interrupted block that reach the flash before an unplug (four 256-byte flash pages):
# little enough to cut any real image short, e.g. the certificates at the start of an NVS partition.
UNPLUG_WRITTEN = 1024


class Session:
    """One power-on of a simulated ESP32 (ROM bootloader, then optionally the flasher stub)."""

    def __init__(self, flash: Flash, regs: Registers, faults: Faults | None = None, log=None):
        self.flash = flash
        self.regs = regs
        self.faults = faults or Faults()
        self.log = log or (lambda msg: None)
        self.decoder = slip.Decoder()
        self.out = bytearray()
        self.stub = False
        self.running_app = False  # left the bootloader: deaf until the next reset
        self.hung = False  # fault injection: stopped answering
        self.unplugged = False  # fault injection: the transport must make the port vanish
        self.unplug_armed = self.faults.unplug_after_write_blocks is not None
        self.baud = 115200
        self.pending_baud = None
        self.write_blocks = 0
        self._mem = None
        self._mem_segments = []
        self._flash = None  # state of a FLASH_BEGIN / FLASH_DEFL_BEGIN in progress
        self._read = None  # state of a stub READ_FLASH stream
        self.regs.power_on()
        self.regs.baud = self.baud
        self.regs.chip = self.faults.chip

    # -- bytes in, bytes out -------------------------------------------------------------
    def feed(self, data: bytes):
        if self.running_app or self.hung or self.unplugged:
            return
        for kind, value in self.decoder.feed(data):
            if self.hung or self.running_app or self.unplugged:
                return
            if kind == "error":
                self.log(f"framing error: {value}")
                # The ROM cannot know which command a mangled frame was: it answers op 0 with
                # "invalid message", which esptool reports instead of hanging.
                self._respond(0, 0, b"", ROM_INVALID_MSG, STUB_BAD_DATA_LEN)
            else:
                self._frame(value)

    def _send(self, payload: bytes):
        self.out += slip.encode(payload)

    def _respond(self, op: int, value: int = 0, data: bytes = b"", rom_err: int = 0, stub_err: int = 0):
        if self.stub:
            status = bytes([stub_err, 0]) if stub_err else b"\x00\x00"
        else:
            status = bytes([1, rom_err, 0, 0]) if rom_err else b"\x00\x00\x00\x00"
        body = data + status
        self._send(struct.pack("<BBHI", 1, op, len(body), value) + body)

    # -- dispatch ------------------------------------------------------------------------
    def _frame(self, frame: bytes):
        if self._read is not None:
            self._read_ack(frame)
            return
        if len(frame) < 8:
            self.log(f"truncated frame ({len(frame)} bytes)")
            self._respond(frame[1] if len(frame) > 1 else 0, 0, b"", ROM_INVALID_MSG, STUB_BAD_DATA_LEN)
            return
        direction, op, length, chk = struct.unpack("<BBHI", frame[:8])
        data = frame[8:]
        if direction != 0:
            self.log(f"not a request (direction {direction:#x}), ignored")
            return
        if length != len(data):
            self.log(f"op {op:#04x}: length field {length} but {len(data)} data bytes")
            self._respond(op, 0, b"", ROM_INVALID_MSG, STUB_BAD_DATA_LEN)
            return
        known = STUB_COMMANDS if self.stub else ROM_COMMANDS
        if op == GET_SECURITY_INFO and self.faults.chip in CHIP_IDS:
            known = known | {GET_SECURITY_INFO}
        if op not in known:
            self.log(f"unsupported command {op:#04x}")
            self._respond(op, 0, b"", ROM_INVALID_MSG, STUB_CMD_NOT_IMPLEMENTED)
            return
        handler = getattr(self, f"_op_{op:02x}")
        try:
            result = handler(data, chk)
        except CommandError as e:
            self.log(f"op {op:#04x} failed: {e}")
            self._respond(op, 0, b"", e.rom, e.stub)
            return
        except struct.error as e:
            self.log(f"op {op:#04x}: malformed parameters ({e})")
            self._respond(op, 0, b"", ROM_INVALID_MSG, STUB_BAD_DATA_LEN)
            return
        except Exception as e:  # a simulator bug must look like a failed command, not a dead board
            self.log(f"op {op:#04x}: internal error {e!r}")
            self._respond(op, 0, b"", ROM_FAILED, STUB_INVALID_COMMAND)
            return
        if result is None:  # the handler answered itself (or must stay silent)
            return
        value, payload = result
        self._respond(op, value, payload)
        self._after_response(op)

    def _after_response(self, op):
        if self.pending_baud is not None:
            self.baud = self.pending_baud
            self.regs.baud = self.baud
            self.pending_baud = None

    @staticmethod
    def _params(data: bytes, fmt: str, exact: bool = False):
        size = struct.calcsize(fmt)
        if len(data) < size or (exact and len(data) != size):
            raise CommandError(ROM_INVALID_MSG, STUB_BAD_DATA_LEN, f"{len(data)} parameter bytes")
        return struct.unpack(fmt, data[:size])

    # -- ROM and stub commands -----------------------------------------------------------
    def _op_08(self, data, chk):  # SYNC
        if data != SYNC_PAYLOAD:
            raise CommandError(ROM_INVALID_MSG, STUB_BAD_DATA_LEN, "bad SYNC pattern")
        # The ROM answers a SYNC eight times; the stub's answers carry 0 instead of the
        # ROM's value, which is how esptool notices a stub is still running.
        value = 0 if self.stub else ROM_SYNC_VALUE
        for _ in range(8):
            self._respond(SYNC, value)
        return None

    def _op_0a(self, data, chk):  # READ_REG
        (addr,) = self._params(data, "<I", exact=True)
        return self.regs.read(addr), b""

    def _op_09(self, data, chk):  # WRITE_REG: one or more (addr, value, mask, delay_us)
        if not data or len(data) % 16:
            raise CommandError(ROM_INVALID_MSG, STUB_BAD_DATA_LEN, "WRITE_REG length")
        for i in range(0, len(data), 16):
            addr, value, mask, _delay = struct.unpack("<IIII", data[i : i + 16])
            self.regs.write(addr, value, mask)
        return 0, b""

    def _op_0b(self, data, chk):  # SPI_SET_PARAMS
        self._params(data, "<IIIIII", exact=True)
        return 0, b""

    def _op_0d(self, data, chk):  # SPI_ATTACH (ROM takes 8 bytes, the stub 4)
        self._params(data, "<I" if self.stub else "<II", exact=True)
        self.regs.flash_attached = True
        return 0, b""

    def _op_0f(self, data, chk):  # CHANGE_BAUDRATE (new, old): answered at the old rate
        new, _old = self._params(data, "<II", exact=True)
        if not 300 <= new <= 5_000_000:
            raise CommandError(ROM_INVALID_MSG, STUB_BAD_DATA_LEN, f"baud {new}")
        self.pending_baud = new
        self.log(f"baud rate -> {new}")
        return 0, b""

    def _op_13(self, data, chk):  # SPI_FLASH_MD5
        addr, size, _a, _b = self._params(data, "<IIII", exact=True)
        if not self.flash.check(addr, size):
            raise CommandError(ROM_FLASH_READ_ERR, STUB_BAD_DATA_LEN, "MD5 outside flash")
        # MD5 is what the ROM and the stub compute: a transfer check, not security.
        digest = hashlib.md5(self.flash.read(addr, size))  # noqa: S324
        return 0, (digest.digest() if self.stub else digest.hexdigest().encode())

    def _op_14(self, data, chk):  # GET_SECURITY_INFO: only when posing as a newer chip
        if data:
            raise CommandError(ROM_INVALID_MSG, STUB_BAD_DATA_LEN, "GET_SECURITY_INFO takes no data")
        info = struct.pack("<IBBBBBBBBII", 0, 0, 0, 0, 0, 0, 0, 0, 0, CHIP_IDS[self.faults.chip], 0)
        return 0, info

    def _op_0e(self, data, chk):  # READ_FLASH_SLOW (ROM): 64 bytes per command
        addr, length = self._params(data, "<II", exact=True)
        if length > 64 or not self.flash.check(addr, length):
            raise CommandError(ROM_READ_LEN_ERR, STUB_BAD_DATA_LEN, "bad read length")
        # The ROM always answers 64 bytes; esptool keeps the first `length`.
        chunk = self.flash.read(addr, min(64, self.flash.size - addr))
        return 0, chunk + b"\xff" * (64 - len(chunk))

    # -- RAM download (stub upload) ------------------------------------------------------
    def _op_05(self, data, chk):  # MEM_BEGIN
        size, blocks, blocksize, offset = self._params(data, "<IIII", exact=True)
        if blocksize == 0 or blocks * blocksize < size:
            raise CommandError(ROM_INVALID_MSG, STUB_BAD_BLOCKSIZE, "MEM_BEGIN geometry")
        self._mem = {"size": size, "blocksize": blocksize, "offset": offset, "data": bytearray(), "seq": 0}
        return 0, b""

    def _op_07(self, data, chk):  # MEM_DATA
        if self._mem is None:
            raise CommandError(ROM_FAILED, STUB_NOT_IN_FLASH_MODE, "MEM_DATA without MEM_BEGIN")
        length, seq, _a, _b = self._params(data, "<IIII")
        block = data[16:]
        if length != len(block):
            raise CommandError(ROM_INVALID_MSG, STUB_BAD_DATA_LEN, "MEM_DATA length")
        if _checksum(block) != chk & 0xFF:
            raise CommandError(ROM_BAD_CRC, STUB_BAD_DATA_CHECKSUM, "MEM_DATA checksum")
        if seq != self._mem["seq"]:
            raise CommandError(ROM_FAILED, STUB_BAD_DATA_LEN, f"MEM_DATA seq {seq}")
        self._mem["data"] += block
        self._mem["seq"] += 1
        if len(self._mem["data"]) == self._mem["size"]:
            self._mem_segments.append((self._mem["offset"], bytes(self._mem["data"])))
        return 0, b""

    def _op_06(self, data, chk):  # MEM_END (stay, entry)
        stay, entry = self._params(data, "<II", exact=True)
        self._respond(MEM_END, 0)
        if stay == 0:
            loaded = any(start <= entry < start + len(seg) for start, seg in self._mem_segments)
            if not loaded:
                # Jumping to an address nothing was loaded at: the chip crashes into reset.
                self.log(f"MEM_END entry {entry:#x} outside loaded RAM: board crashes")
                self.running_app = True
                return None
            # We cannot execute Xtensa code: anything started from uploaded RAM is taken to
            # be the flasher stub, which greets the host with a bare "OHAI" frame.
            self.stub = True
            self.regs.flash_attached = True  # the stub attaches the flash before it says hello
            self._mem = None
            self._send(b"OHAI")
            self.log("flasher stub running")
        return None

    # -- flash writes --------------------------------------------------------------------
    def _begin(self, data, compressed):
        fmt = "<IIIII" if self.stub else "<IIII"
        size, blocks, blocksize, offset = self._params(data, fmt, exact=True)[:4]
        if (self.stub and blocksize > 0x4000) or blocksize == 0:
            raise CommandError(ROM_INVALID_MSG, STUB_BAD_BLOCKSIZE, f"block size {blocksize}")
        if not self.flash.check(offset, 0) or (offset >= self.flash.size and size):
            raise CommandError(ROM_FAILED, STUB_BAD_DATA_LEN, f"offset {offset:#x} outside flash")
        # Both loaders erase whole sectors from the one holding `offset` to the one holding the
        # last byte of `size`: the ROM all at once here, the stub as the data gets there. `size` is
        # the erase size for the ROM (esptool sends the image size, rounded up to a 1 KiB block when
        # compressed; only the ESP8266 ROM needs esptool's get_erase_size() workaround) and the exact
        # byte count for the stub, which writes no more than that: the 0xFF padding esptool adds
        # to the last block is dropped, so sectors after the image are never touched.
        start = offset - offset % SECTOR
        end = min(self.flash.size, -(-(offset + size) // SECTOR) * SECTOR) if size else start
        state = {
            "offset": offset,
            "size": size,
            "blocks": blocks,
            "blocksize": blocksize,
            "seq": 0,
            "written": 0,
            "next_erase": start,
            "erase_end": end,
            "inflate": zlib.decompressobj() if compressed else None,
            "compressed": compressed,
        }
        self._flash = state
        if self.stub:
            # esp-flasher-stub (esptool's default stub) starts the first erase at FLASH_BEGIN.
            self._stub_erase_step(state)
        else:
            self.flash.erase(start, end - start)
            state["next_erase"] = end
        return 0, b""

    def _stub_erase_step(self, state):
        """One erase of the stub: a 64 KiB block where aligned and wholly wanted, else a sector."""
        addr, end = state["next_erase"], state["erase_end"]
        if addr >= end:
            return
        n = BLOCK if addr % BLOCK == 0 and end - addr >= BLOCK else SECTOR
        self.flash.erase(addr, n)
        state["next_erase"] = addr + n

    def _op_02(self, data, chk):  # FLASH_BEGIN
        return self._begin(data, compressed=False)

    def _op_10(self, data, chk):  # FLASH_DEFL_BEGIN
        return self._begin(data, compressed=True)

    def _data(self, data, chk, compressed):
        state = self._flash
        if state is None or state["compressed"] != compressed:
            raise CommandError(ROM_FAILED, STUB_NOT_IN_FLASH_MODE, "no flash write in progress")
        length, seq, _a, _b = self._params(data, "<IIII")
        block = data[16:]
        if length != len(block):
            raise CommandError(ROM_INVALID_MSG, STUB_BAD_DATA_LEN, "data length field")
        if _checksum(block) != chk & 0xFF:
            raise CommandError(ROM_BAD_CRC, STUB_BAD_DATA_CHECKSUM, "block checksum")
        if seq != state["seq"]:
            raise CommandError(ROM_FAILED, STUB_BAD_DATA_LEN, f"sequence {seq}, expected {state['seq']}")
        faults = self.faults
        if faults.hang_after_write_blocks is not None and self.write_blocks >= faults.hang_after_write_blocks:
            self.log(f"fault: hanging after {self.write_blocks} write blocks")
            self.hung = True
            return None
        self.write_blocks += 1
        if compressed:
            if self.stub:
                # The stub erases opportunistically while it inflates (one erase per pass).
                self._stub_erase_step(state)
            try:
                plain = state["inflate"].decompress(block)
            except zlib.error as e:
                raise CommandError(ROM_DEFLATE_ERR, STUB_INFLATE_ERROR, f"inflate: {e}") from None
        else:
            plain = block
        if self.unplug_armed and self.write_blocks > faults.unplug_after_write_blocks:
            # The first KiB of this block reaches the flash, then the power and the port are gone.
            self.log(f"fault: unplugged while writing block {self.write_blocks}")
            self._program(state, plain[:UNPLUG_WRITTEN])
            self.unplugged = True
            return None
        if faults.corrupt_block is not None and self.write_blocks == faults.corrupt_block and plain:
            self.log(f"fault: flipping a bit in write block {self.write_blocks}")
            plain = bytes([plain[0] ^ 0x01]) + plain[1:]
        self._program(state, plain)
        state["seq"] += 1
        return 0, b""

    def _program(self, state, plain):
        addr = state["offset"] + state["written"]
        if self.stub:
            remaining = state["size"] - state["written"]
            if state["compressed"] and len(plain) > remaining:
                raise CommandError(ROM_FLASH_WRITE_ERR, STUB_TOO_MUCH_DATA, "more data than FLASH_BEGIN said")
            plain = plain[:remaining]  # the padding of the last block is not written
        if not self.flash.check(addr, len(plain)):
            raise CommandError(ROM_FLASH_WRITE_ERR, STUB_TOO_MUCH_DATA, "write past end of flash")
        if self.stub:
            # Erase just ahead of the write, never past the last sector FLASH_BEGIN asked for.
            while state["next_erase"] < min(addr + len(plain), state["erase_end"]):
                self._stub_erase_step(state)
        # The ROM writes whole blocks, padding included: 0xFF programs nothing on NOR flash.
        self.flash.program(addr, plain)
        state["written"] += len(plain)

    def _op_03(self, data, chk):  # FLASH_DATA
        return self._data(data, chk, compressed=False)

    def _op_11(self, data, chk):  # FLASH_DEFL_DATA
        return self._data(data, chk, compressed=True)

    def _end(self, op, data):
        (stay,) = self._params(data, "<I", exact=True)
        self._flash = None
        self._respond(op, 0)
        if not self.stub:
            # The ROM leaves download mode on FLASH_END whatever the flag (esptool avoids
            # sending it for that reason): the board runs its firmware until the next reset.
            self.log("leaving the bootloader to run the application")
            self.running_app = True
        elif stay == 0:
            # The stub's "reboot" is esptool's soft reset into the ROM bootloader.
            self.log("stub: soft reset back into the ROM bootloader")
            self.stub = False
            self.regs.power_on()
        return None

    def _op_04(self, data, chk):  # FLASH_END
        return self._end(FLASH_END, data)

    def _op_12(self, data, chk):  # FLASH_DEFL_END
        return self._end(FLASH_DEFL_END, data)

    # -- stub-only commands --------------------------------------------------------------
    def _op_d0(self, data, chk):  # ERASE_FLASH
        if data:
            raise CommandError(ROM_INVALID_MSG, STUB_BAD_DATA_LEN, "ERASE_FLASH takes no data")
        self.flash.erase(0, self.flash.size)
        return 0, b""

    def _op_d1(self, data, chk):  # ERASE_REGION
        offset, size = self._params(data, "<II", exact=True)
        if offset % SECTOR or size % SECTOR or not self.flash.check(offset, size):
            raise CommandError(ROM_INVALID_MSG, STUB_BAD_DATA_LEN, "unaligned erase region")
        self.flash.erase(offset, size)
        return 0, b""

    def _op_d3(self, data, chk):  # RUN_USER_CODE: no answer, the app starts
        self.running_app = True
        return None

    def _op_d2(self, data, chk):  # READ_FLASH: answer, then stream packets with host acks
        offset, length, packet, inflight = self._params(data, "<IIII", exact=True)
        if packet == 0 or inflight == 0 or not self.flash.check(offset, length):
            raise CommandError(ROM_INVALID_MSG, STUB_BAD_DATA_LEN, "READ_FLASH parameters")
        self._respond(READ_FLASH, 0)
        self._read = {
            "offset": offset,
            "length": length,
            "packet": packet,
            "inflight": inflight,
            "sent": 0,
            "acked": 0,
            "md5": hashlib.md5(),  # noqa: S324 - the stub's transfer digest
        }
        self._read_pump()
        return None

    def _read_pump(self):
        r = self._read
        while r["sent"] < r["length"] and r["sent"] - r["acked"] < r["packet"] * r["inflight"]:
            n = min(r["packet"], r["length"] - r["sent"])
            chunk = self.flash.read(r["offset"] + r["sent"], n)
            r["md5"].update(chunk)
            self._send(chunk)
            r["sent"] += n

    def _read_ack(self, frame):
        r = self._read
        if len(frame) != 4:
            self.log(f"READ_FLASH: expected a 4-byte ack, got {len(frame)} bytes; read aborted")
            self._read = None
            return
        (acked,) = struct.unpack("<I", frame)
        if acked > r["sent"] or acked < r["acked"]:
            self.log(f"READ_FLASH: bad ack {acked} (sent {r['sent']}); read aborted")
            self._read = None
            return
        r["acked"] = acked
        if acked == r["length"]:
            self._send(r["md5"].digest())
            self._read = None
            return
        self._read_pump()
