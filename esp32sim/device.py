"""The device model: NOR flash (file backed), eFuses and the registers esptool reads."""

import mmap
import os
import stat
import struct
from dataclasses import dataclass, field

FLASH_SIZE = 4 * 1024 * 1024
SECTOR = 0x1000  # erase sector
BLOCK = 0x10000  # erase block (64 KiB), which the flasher stub uses where it can

# Chip-detect magic words at 0x40001000 (esptool targets/*.py MAGIC_VALUE).
CHIP_MAGIC = {
    "esp32": 0x00F01D83,
    "esp32s2": 0x000007C6,
    "esp32c3": 0x6921506F,
    "esp8266": 0xFFF0C101,
}
# ESP32-S3 and later are identified by the chip id in GET_SECURITY_INFO (which the original
# ESP32 ROM does not implement). A board told to be one of those answers that command the
# way such a ROM would, so esptool's detection and `--chip esp32` checks see a wrong chip.
CHIP_IDS = {"esp32s3": 9, "esp32c3": 5, "esp32c2": 12, "esp32c6": 13, "esp32h2": 16, "esp32p4": 18}
CHIP_MAGIC_UNKNOWN = {name: 0 for name in CHIP_IDS}

CHIP_DETECT_MAGIC_REG = 0x40001000
EFUSE_BASE = 0x3FF5A000
SPI0_BASE = 0x3FF42000
UART_CLKDIV_REG = 0x3FF40014
APB_CTL_DATE = 0x3FF6607C
RTCCALICFG1 = 0x3FF5F06C
XTAL_HZ = 40_000_000

DEFAULT_MAC = "24:0a:c4:00:00:01"
# Winbond W25Q32JV: RDID answers manufacturer EF, memory type 40, capacity 16 (2^0x16 = 4 MiB).
FLASH_RDID = bytes([0xEF, 0x40, 0x16])
# Its 256-byte SFDP register (JESD216A, what READ SFDP 5Ah returns; only A7-A0 select a byte): the
# header "SFDP" rev 1.5 with one parameter header, the JEDEC basic flash parameter table (16
# dwords at 0x80), 0xFF elsewhere. The table is the one a W25Q128JV (EF 40 18) dumps, published
# with Linux commit 83e824a4 "mtd: spi-nor: Correct flags for Winbond w25q128"; the 32 Mbit part
# of the same series differs in its second dword, the density (bits - 1).
_BFPT_TAIL = bytes.fromhex(
    "44eb086b" "083b42bb" "feffffff" "ffff0000" "ffff40eb" "0c200f52" "10d80000"
    "3602a600" "82ea14c9" "e9637633" "7a757a75" "f7a2d55c" "19f74dff" "e930f880"
)  # fmt: skip
_BFPT = bytes.fromhex("e520f9ff") + (FLASH_SIZE * 8 - 1).to_bytes(4, "little") + _BFPT_TAIL
FLASH_SFDP = (
    b"SFDP" + bytes([0x05, 0x01, 0x00, 0xFF]) + bytes([0x00, 0x05, 0x01, 0x10, 0x80, 0x00, 0x00, 0xFF])
).ljust(0x80, b"\xff") + _BFPT.ljust(0x80, b"\xff")

# SPI0 registers of the USR (user command) unit that esptool's run_spiflash_command programs.
SPI_CMD, SPI_ADDR, SPI_USR, SPI_USR1, SPI_USR2, SPI_MISO_DLEN = 0x00, 0x04, 0x1C, 0x20, 0x24, 0x2C
SPI_W0 = 0x80
SPI_CMD_USR = 1 << 18
SPI_USR_ADDR = 1 << 30
SPI_USR_MISO = 1 << 28


def parse_mac(text: str) -> bytes:
    parts = text.replace("-", ":").split(":")
    if len(parts) != 6:
        raise ValueError(f"MAC {text!r} must have 6 octets")
    try:
        mac = bytes(int(p, 16) for p in parts)
    except ValueError:
        raise ValueError(f"MAC {text!r} is not hexadecimal") from None
    return mac


def format_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def mac_add(text: str, n: int) -> str:
    value = int.from_bytes(parse_mac(text), "big") + n
    return format_mac((value % (1 << 48)).to_bytes(6, "big"))


def _crc8_mac(mac: bytes) -> int:
    """The eFuse MAC CRC (CRC-8, poly 0x8C reflected, as espefuse computes it)."""
    crc = 0
    for b in mac:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ 0x8C if crc & 1 else crc >> 1
    return crc


class Flash:
    """4 MiB NOR flash backed by a file that is always up to date (shared mmap).

    Erase sets bytes to 0xFF; programming ANDs new data into old, as NOR cells can only go
    from 1 to 0 without an erase.
    """

    def __init__(self, path: str | None, size: int = FLASH_SIZE):
        self.size = size
        self.path = path
        self.dirty = False
        if path is None:
            self._mem = bytearray(b"\xff" * size)
            self._fd = None
            return
        # The flash holds the device's private key: a new image is created owner-only (a umask
        # can only narrow 0600), and an existing one left readable by others is closed up.
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            fd = os.open(path, os.O_RDWR)
            mode = os.fstat(fd).st_mode
            if stat.S_ISREG(mode) and mode & 0o077:
                os.fchmod(fd, 0o600)
        current = os.fstat(fd).st_size
        if current < size:
            # A new (or short) image is padded with erased flash, never zeroes.
            os.lseek(fd, current, os.SEEK_SET)
            os.write(fd, b"\xff" * (size - current))
        self._fd = fd
        self._mem = mmap.mmap(fd, size)

    def close(self):
        if self._fd is not None:
            self._mem.flush()
            self._mem.close()
            os.close(self._fd)
            self._fd = None

    def flush(self):
        # The mapping is MAP_SHARED: readers of the file see every change at once through the
        # page cache; msync after each modifying command also puts it on disk.
        if self._fd is not None and self.dirty:
            self._mem.flush()
            self.dirty = False

    def check(self, addr: int, length: int) -> bool:
        return addr >= 0 and length >= 0 and addr + length <= self.size

    def read(self, addr: int, length: int) -> bytes:
        return bytes(self._mem[addr : addr + length])

    def erase(self, addr: int, length: int):
        self._mem[addr : addr + length] = b"\xff" * length
        self.dirty = True

    def program(self, addr: int, data: bytes):
        old = self._mem[addr : addr + len(data)]
        new = (int.from_bytes(old, "little") & int.from_bytes(data, "little")).to_bytes(len(data), "little")
        self._mem[addr : addr + len(data)] = new
        self.dirty = True


@dataclass
class Faults:
    """Misbehaviour to inject, parsed from `--fault KIND[=VALUE]` flags."""

    hang_after_write_blocks: int | None = None
    corrupt_block: int | None = None
    chip: str = "esp32"
    # A USB-serial adapter pulled while writing: N blocks land whole, 1 KiB of the next one does, then
    # the port vanishes. It happens once per board: a replug (`esp32sim fleet start`) brings back a
    # board that stays plugged in.
    unplug_after_write_blocks: int | None = None

    KINDS = ("hang-after-write-blocks", "corrupt-block", "chip", "unplug-after-write-blocks")

    @classmethod
    def parse(cls, specs) -> "Faults":
        faults = cls()
        for spec in specs or ():
            kind, _, value = spec.partition("=")
            if kind == "hang-after-write-blocks":
                faults.hang_after_write_blocks = _positive_int(kind, value, allow_zero=True)
            elif kind == "unplug-after-write-blocks":
                faults.unplug_after_write_blocks = _positive_int(kind, value, allow_zero=True)
            elif kind == "corrupt-block":
                faults.corrupt_block = _positive_int(kind, value)
            elif kind == "chip":
                if value not in CHIP_MAGIC and value not in CHIP_MAGIC_UNKNOWN:
                    known = ", ".join(sorted({*CHIP_MAGIC, *CHIP_MAGIC_UNKNOWN}))
                    raise ValueError(f"fault chip={value!r}: known chips are {known}")
                faults.chip = value
            else:
                raise ValueError(f"unknown fault {kind!r} (known: {', '.join(cls.KINDS)})")
        return faults


def _positive_int(kind, value, allow_zero=False) -> int:
    try:
        n = int(value, 0)
    except ValueError:
        raise ValueError(f"fault {kind} needs an integer, got {value!r}") from None
    if n < 0 or (n == 0 and not allow_zero):
        raise ValueError(f"fault {kind} must be {'>= 0' if allow_zero else '>= 1'}")
    return n


@dataclass
class Registers:
    """Memory-mapped registers: eFuses, chip magic, clock calibration and the SPI0 USR unit."""

    mac: bytes
    chip: str = "esp32"
    baud: int = 115200
    spi: dict = field(default_factory=dict)
    ram: dict = field(default_factory=dict)
    # The ESP32 ROM in download mode leaves the SPI flash detached until SPI_ATTACH (esptool's
    # attach_flash); the flasher stub attaches it when it starts.
    flash_attached: bool = False

    def power_on(self):
        """A reset: peripheral registers back to their reset values, the flash detached."""
        self.spi.clear()
        self.ram.clear()
        self.flash_attached = False

    def efuse_words(self) -> list[int]:
        m = self.mac
        crc = _crc8_mac(m)
        words = [0] * 7
        # BLK0 word 1: MAC bytes 2..5; word 2: CRC, then MAC bytes 0..1 (esptool drops the CRC).
        words[1] = int.from_bytes(m[2:6], "big")
        words[2] = (crc << 16) | int.from_bytes(m[0:2], "big")
        # Word 3: package ESP32-D0WD (pkg 1 in bits 9..11), rev bit0 (bit 15) set, 240 MHz rated
        # off (bit 13 clear) - a common ESP32-D0WD-V3 of a DevKitC v4.
        words[3] = (1 << 9) | (1 << 15)
        # Word 4: 8 MHz clock calibration (bits 0..7) and ADC vref (bits 8..12).
        words[4] = 50 | (0x0A << 8)
        # Word 5: rev bit1 (bit 20); minor revision (bits 24..25) = 0.
        words[5] = 1 << 20
        words[6] = 0  # coding scheme None
        return words

    def read(self, addr: int) -> int:
        if addr == CHIP_DETECT_MAGIC_REG:
            return CHIP_MAGIC.get(self.chip, CHIP_MAGIC_UNKNOWN.get(self.chip, 0))
        if EFUSE_BASE <= addr < EFUSE_BASE + 0x100 and addr % 4 == 0:
            words = self.efuse_words()
            n = (addr - EFUSE_BASE) // 4
            return words[n] if n < len(words) else 0
        if addr == APB_CTL_DATE:
            return 1 << 31  # rev bit2: with bits 0 and 1 set, major revision 3
        if addr == UART_CLKDIV_REG:
            return (XTAL_HZ // self.baud) & 0xFFFFF
        if addr == RTCCALICFG1:
            # cali * 15625 * ck8m / 40 == 40 MHz with ck8m = 50 (eFuse word 4).
            return 2048 << 7
        if SPI0_BASE <= addr < SPI0_BASE + 0x100:
            return self.spi.get(addr - SPI0_BASE, 0)
        return self.ram.get(addr, 0)

    def write(self, addr: int, value: int, mask: int = 0xFFFFFFFF):
        old = self.read(addr)
        value = (old & ~mask) | (value & mask)
        if SPI0_BASE <= addr < SPI0_BASE + 0x100:
            off = addr - SPI0_BASE
            self.spi[off] = value
            if off == SPI_CMD and value & SPI_CMD_USR:
                self._spi_user_command()
            return
        self.ram[addr] = value

    def _spi_user_command(self):
        """Clock the SPI USR transaction esptool set up through the flash chip (flash id, SFDP...)."""
        usr = self.spi.get(SPI_USR, 0)
        command = self.spi.get(SPI_USR2, 0) & 0xFF
        addr = 0
        if usr & SPI_USR_ADDR:
            bits = ((self.spi.get(SPI_USR1, 0) >> 26) & 0x3F) + 1
            addr = self.spi.get(SPI_ADDR, 0) >> (32 - bits)  # the ESP32 shifts the address out MSB first
        nbytes = min(64, (self.spi.get(SPI_MISO_DLEN, 0) + 8) // 8) if usr & SPI_USR_MISO else 0
        if not self.flash_attached:
            # Nothing drives MISO before the flash is attached: it reads high (esptool's own
            # test_attach_flash expects "Device: ffff" and SFDP 0xff there from a real chip).
            answer = b"\xff" * nbytes
        elif command == 0x9F:  # RDID
            answer = FLASH_RDID.ljust(nbytes, b"\x00")[:nbytes]
        elif command == 0x5A:  # READ SFDP
            answer = bytes(FLASH_SFDP[(addr + i) & 0xFF] for i in range(nbytes))
        else:
            # RDSR/RDSR2/RDSR3 and the rest: an idle, unprotected flash reads 0.
            answer = bytes(nbytes)
        # MISO bytes land in W0.. from the least significant byte; the rest keeps its value.
        buf = bytearray(b"".join(pack_word(self.spi.get(SPI_W0 + 4 * i, 0)) for i in range(16)))
        buf[:nbytes] = answer
        for i in range(16):
            self.spi[SPI_W0 + 4 * i] = struct.unpack_from("<I", buf, 4 * i)[0]
        self.spi[SPI_CMD] = 0  # SPI_CMD_USR clears when done


def pack_word(value: int) -> bytes:
    return struct.pack("<I", value)
