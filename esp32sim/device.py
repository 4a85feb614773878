"""The device model: NOR flash (file backed), eFuses and the registers esptool reads."""

import mmap
import os
import struct
from dataclasses import dataclass, field

FLASH_SIZE = 4 * 1024 * 1024
SECTOR = 0x1000

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
# Winbond W25Q32 (JEDEC EF 40 16): 4 MiB. The SPI W0 register holds the bytes LSB first.
FLASH_JEDEC = 0x1640EF


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
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
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
            if off == 0x00 and value & (1 << 18):
                self._spi_user_command()
            return
        self.ram[addr] = value

    def _spi_user_command(self):
        """Run the SPI USR command esptool set up (flash id, status registers)."""
        command = self.spi.get(0x24, 0) & 0xFFFF
        # RDID answers the JEDEC id; RDSR/RDSR2/RDSR3, SFDP...: an idle, unprotected flash reads 0.
        self.spi[0x80] = FLASH_JEDEC if command == 0x9F else 0
        self.spi[0x00] = 0  # SPI_CMD_USR clears when done


def pack_word(value: int) -> bytes:
    return struct.pack("<I", value)
