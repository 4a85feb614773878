"""The simulator's "SDK": ESP32 app and bootloader images, built and checked byte by byte.

The format is ESP-IDF's (components/bootloader_support/include/esp_app_format.h, checked by
esp_image_format.c) as esptool's bin_image.py reads and writes it:

    esp_image_header_t (24 bytes): magic 0xE9, segment count, SPI mode, SPI size/speed, entry
        point, then the extended header: WP pin, pin drive bytes, chip id (u16, 0 = ESP32),
        min_chip_rev, min/max_chip_rev_full, 4 reserved bytes, hash_appended
    segments: esp_image_segment_header_t (load address, length) + data, lengths multiples of 4
    padding to the last byte of a 16-byte block, which holds the checksum (0xEF XOR every byte of
        segment data)
    SHA-256 of everything before it (when hash_appended = 1)

An app's first segment is DROM (mapped flash, 0x3F400020: its data sits 0x20 into a 64 KiB MMU
page, as the segment data does in the file) and starts with esp_app_desc_t (256 bytes: magic
0xABCD5432, secure_version, version[32], project_name[32], time[16], date[16], idf_ver[32],
app_elf_sha256[32], eFuse block revisions, mmu_page_size, spi_flash_mode). A bootloader's first
segment is DRAM and starts with esp_bootloader_desc_t (magic byte 0x50, version, idf_ver,
date_time). There is no ELF and no code that runs: the segments other than the app description
are deterministic filler, app_elf_sha256 is the SHA-256 of the inputs, and idf_ver names the
simulator. What the image claims about itself is exact.

Simulator convention: data containing SELFCHECK_FAIL_MARKER models a firmware whose post-update
self-check fails (the twin cannot execute the image; see esp32sim/README.md).
"""

import datetime
import hashlib
import os
import struct
from dataclasses import dataclass, field

from . import __version__

IMAGE_MAGIC = 0xE9
APP_DESC_MAGIC = 0xABCD5432
BOOTLOADER_DESC_MAGIC = 0x50
CHECKSUM_INITIAL = 0xEF
CHIP_ID_ESP32 = 0
CHIP_REVISION = 300  # the simulated ESP32-D0WD-V3 is v3.0 (device.py's eFuses)
MAX_SEGMENTS = 16
HEADER_SIZE = 24
SEGMENT_HEADER_SIZE = 8
APP_DESC_SIZE = 256
# What esp_https_ota needs before it can check an image: header, first segment header, app desc.
HEADER_CHECK_SIZE = HEADER_SIZE + SEGMENT_HEADER_SIZE + APP_DESC_SIZE
MMU_PAGE = 0x10000
SELFCHECK_FAIL_MARKER = b"esp32sim:selfcheck=fail"
IDF_VER = f"esp32sim-{__version__}"

DROM_ADDR = 0x3F400020
DRAM_ADDR = 0x3FFB0000
IRAM_ADDR = 0x40080000
BOOTLOADER_DRAM = 0x3FFF0030
BOOTLOADER_IRAM_LOADER = 0x40078000
BOOTLOADER_IRAM = 0x40080400

FLASH_MODES = {"qio": 0, "qout": 1, "dio": 2, "dout": 3}
FLASH_SIZES = {"1MB": 0x00, "2MB": 0x10, "4MB": 0x20, "8MB": 0x30, "16MB": 0x40}
FLASH_FREQS = {"40m": 0x0, "26m": 0x1, "20m": 0x2, "80m": 0xF}
_MAPPED = ((0x3F400000, 0x3F800000), (0x400D0000, 0x40400000))  # DROM, IROM (esptool's ESP32 map)
# esptool's ESP32 MEMORY_MAP, enough to tell a segment that lands nowhere.
_REGIONS = (
    (0x3F400000, 0x3F800000),
    (0x3FF80000, 0x3FF82000),
    (0x3FFAE000, 0x40000000),
    (0x40070000, 0x400BFFFC),
    (0x400C0000, 0x400C2000),
    (0x400D0000, 0x40400000),
    (0x50000000, 0x50002000),
)
_APP_DESC_FMT = "<II8s32s32s16s16s32s32sHHBB2s72s"
_EXT_HEADER_FMT = "<BBBBHBHH4sB"


class ImageError(ValueError):
    """An image esp_image_verify() would refuse; the message is the reason, as ESP-IDF logs it."""


@dataclass
class AppDesc:
    version: str
    project_name: str
    time: str = ""
    date: str = ""
    idf_ver: str = ""
    secure_version: int = 0
    app_elf_sha256: bytes = b"\x00" * 32
    mmu_page_size: int = 0
    spi_flash_mode: int = 0


@dataclass
class ImageInfo:
    chip_id: int
    entry: int
    flash_mode: int
    flash_size_freq: int
    hash_appended: bool
    segments: list = field(default_factory=list)  # (load address, file offset of the data, length)
    length: int = 0  # bytes of the image, the appended digest included
    checksum: int = 0
    digest: bytes = b""  # the appended SHA-256 (b"" without one)
    app_desc: AppDesc | None = None


def _cstr(text: str, size: int, what: str) -> bytes:
    raw = text.encode()
    if len(raw) >= size:
        raise ValueError(f"{what} {text!r} is longer than {size - 1} bytes (esp_app_desc_t.{what}[{size}])")
    return raw.ljust(size, b"\x00")


def _text(raw: bytes) -> str:
    return raw.split(b"\x00", 1)[0].decode("utf-8", "replace")


def _filler(seed: bytes, n: int) -> bytes:
    return hashlib.shake_256(seed).digest(n) if n else b""


def _build_time(built):
    if built is None:
        epoch = os.environ.get("SOURCE_DATE_EPOCH")  # reproducible builds, as CMake honours it
        built = (
            datetime.datetime.fromtimestamp(int(epoch), datetime.UTC)
            if epoch and epoch.isdigit()
            else datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
        )
    # __TIME__ and __DATE__ as the C preprocessor writes them: "12:34:56", "Jan  1 2026".
    return built.strftime("%H:%M:%S"), f"{built.strftime('%b')} {built.day:2d} {built.year}"


def app_desc_bytes(
    project: str,
    version: str,
    *,
    secure_version: int = 0,
    idf_ver: str = IDF_VER,
    built: datetime.datetime | None = None,
    elf_sha256: bytes | None = None,
    flash_mode: str = "dio",
) -> bytes:
    """esp_app_desc_t, 256 bytes."""
    tm, date = _build_time(built)
    elf = elf_sha256 or hashlib.sha256(f"{project}\x00{version}".encode()).digest()
    return struct.pack(
        _APP_DESC_FMT,
        APP_DESC_MAGIC,
        secure_version,
        b"\x00" * 8,
        _cstr(version, 32, "version"),
        _cstr(project, 32, "project_name"),
        _cstr(tm, 16, "time"),
        _cstr(date, 16, "date"),
        _cstr(idf_ver, 32, "idf_ver"),
        elf,
        0,  # min_efuse_blk_rev_full
        0,  # max_efuse_blk_rev_full (0: not set, what ESP-IDF's ESP32 builds write)
        16,  # mmu_page_size: log2(64 KiB), the ESP32's fixed MMU page
        FLASH_MODES[flash_mode],  # spi_flash_mode = CONFIG_ESPTOOLPY_FLASHMODE_VAL
        b"\x00" * 2,
        b"\x00" * 72,
    )


def parse_app_desc(data: bytes) -> AppDesc | None:
    """The esp_app_desc_t at the start of data (a first segment's data), or None without its magic."""
    if len(data) < APP_DESC_SIZE:
        return None
    f = struct.unpack(_APP_DESC_FMT, data[:APP_DESC_SIZE])
    if f[0] != APP_DESC_MAGIC:
        return None
    return AppDesc(
        version=_text(f[3]),
        project_name=_text(f[4]),
        time=_text(f[5]),
        date=_text(f[6]),
        idf_ver=_text(f[7]),
        secure_version=f[1],
        app_elf_sha256=f[8],
        mmu_page_size=f[11],
        spi_flash_mode=f[12],
    )


def _header(segments, entry, *, chip_id, flash_mode, flash_size, flash_freq, hash_appended) -> bytes:
    common = struct.pack(
        "<BBBBI",
        IMAGE_MAGIC,
        len(segments),
        FLASH_MODES[flash_mode],
        FLASH_SIZES[flash_size] | FLASH_FREQS[flash_freq],
        entry,
    )
    # WP pin 0xEE (disabled, what the IDF bootloader writes), default pin drive, chip id, chip
    # revision v0.0 up to v3.99 (ESP-IDF's default for the ESP32), hash_appended.
    ext = struct.pack(_EXT_HEADER_FMT, 0xEE, 0, 0, 0, chip_id, 0, 0, 399, b"\x00" * 4, int(hash_appended))
    return common + ext


def _assemble(header: bytes, segments, hash_appended: bool) -> bytes:
    out = bytearray(header)
    checksum = CHECKSUM_INITIAL
    for addr, data in segments:
        if len(data) % 4:
            raise ValueError(f"segment at {addr:#x}: length {len(data)} is not a multiple of 4")
        out += struct.pack("<II", addr, len(data)) + data
        checksum = _xor(data, checksum)
    out += b"\x00" * (15 - len(out) % 16) + bytes([checksum])
    if hash_appended:
        out += hashlib.sha256(out).digest()
    return bytes(out)


def _xor(data: bytes, value: int) -> int:
    # XOR of all bytes: fold the big integer of the data down to one byte.
    if not data:
        return value
    n = int.from_bytes(data, "little")
    width = len(data)
    while width > 1:
        half = (width + 1) // 2
        n = (n & ((1 << (8 * half)) - 1)) ^ (n >> (8 * half))
        width = half
    return value ^ (n & 0xFF)


def build_app_image(
    project: str,
    version: str,
    *,
    extra: bytes = b"",
    size: int | None = None,
    selfcheck_fail: bool = False,
    chip_id: int = CHIP_ID_ESP32,
    secure_version: int = 0,
    idf_ver: str = IDF_VER,
    built: datetime.datetime | None = None,
    flash_mode: str = "dio",
    flash_size: str = "4MB",
    flash_freq: str = "40m",
    hash_appended: bool = True,
) -> bytes:
    """An ESP32 app image (what `idf.py build` leaves in build/<project>.bin).

    extra: bytes placed in the DROM segment right after the app description (rodata).
    selfcheck_fail: add SELFCHECK_FAIL_MARKER to extra (the simulator convention).
    size: pad the DROM segment with filler so the file is `size` bytes (rounded up to 16;
    at least the size without padding). Same inputs, same bytes.
    chip_id: the extended header's chip id (0 = ESP32; 9 = ESP32-S3 makes a wrong-chip image).
    """
    if selfcheck_fail:
        extra = extra + SELFCHECK_FAIL_MARKER
    desc = app_desc_bytes(
        project,
        version,
        secure_version=secure_version,
        idf_ver=idf_ver,
        built=built,
        elf_sha256=hashlib.sha256(b"\x00".join([project.encode(), version.encode(), extra])).digest(),
        flash_mode=flash_mode,
    )
    seed = hashlib.sha256(desc + extra).digest()
    rodata = desc + extra
    rodata += b"\x00" * (-len(rodata) % 4)
    dram = _filler(seed + b"dram", 64)
    iram = _filler(seed + b"iram", 1024)

    def image(pad: int) -> bytes:
        segs = [(DROM_ADDR, rodata + _filler(seed + b"rodata", pad)), (DRAM_ADDR, dram), (IRAM_ADDR, iram)]
        hdr = _header(
            segs,
            IRAM_ADDR + 0x20,
            chip_id=chip_id,
            flash_mode=flash_mode,
            flash_size=flash_size,
            flash_freq=flash_freq,
            hash_appended=hash_appended,
        )
        return _assemble(hdr, segs, hash_appended)

    if size is None:
        return image(0)
    base = len(image(0))
    target = size + (-size % 16)
    if target < base:
        raise ValueError(f"size {size}: the image is {base} bytes without padding")
    return image(target - base)


def bootloader_desc_bytes(version: int = 1, idf_ver: str = IDF_VER, built=None) -> bytes:
    """esp_bootloader_desc_t, 80 bytes (the first DRAM segment of a bootloader)."""
    tm, date = _build_time(built)
    return struct.pack(
        "<B3sI32s24s16s",
        BOOTLOADER_DESC_MAGIC,
        b"\x00" * 3,
        version,
        _cstr(idf_ver, 32, "idf_ver"),
        _cstr(f"{date} {tm}", 24, "date_time"),
        b"\x00" * 16,
    )


def build_bootloader_image(*, version: int = 1, idf_ver: str = IDF_VER, built=None) -> bytes:
    """A second-stage bootloader image for 0x1000 (what build/bootloader/bootloader.bin is).

    The twin models its behaviour (esp32sim/ota.py: ESP-IDF's bootloader with
    CONFIG_BOOTLOADER_APP_ROLLBACK_ENABLE); the image is there so the flash looks like a real
    board's and esptool can read it back.
    """
    desc = bootloader_desc_bytes(version, idf_ver, built)
    seed = hashlib.sha256(desc).digest()
    segs = [
        (BOOTLOADER_DRAM, desc + _filler(seed + b"dram", 0x2E0 - len(desc))),
        (BOOTLOADER_IRAM_LOADER, _filler(seed + b"loader", 0x1000)),
        (BOOTLOADER_IRAM, _filler(seed + b"iram", 0x2000)),
    ]
    hdr = _header(
        segs,
        BOOTLOADER_IRAM + 0x5C4,
        chip_id=CHIP_ID_ESP32,
        flash_mode="dio",
        flash_size="4MB",
        flash_freq="40m",
        hash_appended=True,
    )
    return _assemble(hdr, segs, True)


# -- checking -----------------------------------------------------------------------------------


def check_header(data: bytes, *, chip_id: int = CHIP_ID_ESP32) -> AppDesc:
    """What esp_ota_write() and esp_https_ota check once the first HEADER_CHECK_SIZE bytes are in:
    the magic byte, the chip id and revision, and an app description. Returns the app description."""
    if len(data) < HEADER_CHECK_SIZE:
        raise ImageError(f"image too short for a header ({len(data)} bytes)")
    if data[0] != IMAGE_MAGIC:
        raise ImageError(f"OTA image has invalid magic byte (expected 0xE9, saw {data[0]:#04x})")
    _check_chip(data, chip_id, bootloader=False)
    desc = parse_app_desc(data[HEADER_SIZE + SEGMENT_HEADER_SIZE :])
    if desc is None:
        raise ImageError("the first segment does not start with an app description (esp_app_desc_t)")
    return desc


def _check_chip(data, chip_id, bootloader):
    image_chip, _, min_rev, max_rev = struct.unpack_from("<HBHH", data, 12)
    if image_chip != chip_id:
        raise ImageError(f"mismatch chip ID, expected {chip_id}, found {image_chip}")
    if min_rev > CHIP_REVISION:
        raise ImageError(f"chip revision check failed. Required >= v{min_rev // 100}.{min_rev % 100}")
    if not bootloader and max_rev not in (0, 0xFFFF) and max_rev < CHIP_REVISION:
        raise ImageError(f"chip revision check failed. Required <= v{max_rev // 100}.{max_rev % 100}")


def verify_image(
    data: bytes, *, offset: int = 0x10000, part_size: int | None = None, chip_id: int = CHIP_ID_ESP32
) -> ImageInfo:
    """esp_image_verify(ESP_IMAGE_VERIFY) of the image at the start of data (a partition's bytes
    or an image file), as if it lay at flash address `offset`.

    Checks the magic byte, chip id and revision, the segment count (<= 16), each segment's length
    (a multiple of 4, within data), an app's first segment long enough for its description, mapped
    (DROM/IROM) segments aligned to their flash address modulo the 64 KiB MMU page, the checksum,
    the appended SHA-256 (not for a bootloader at 0x1000: ESP-IDF skips it there without secure
    boot), and that the whole image fits in part_size. Raises ImageError; returns ImageInfo.
    """
    bootloader = offset == 0x1000
    limit = len(data) if part_size is None else min(part_size, len(data))
    if limit < HEADER_SIZE:
        raise ImageError("image too short for a header")
    if data[0] != IMAGE_MAGIC:
        raise ImageError(f"image at {offset:#x} has invalid magic byte (nothing flashed here?)")
    _check_chip(data, chip_id, bootloader)
    _, count, mode, size_freq, entry = struct.unpack_from("<BBBBI", data, 0)
    hash_appended = data[23]
    if count > MAX_SEGMENTS:
        raise ImageError(f"image at {offset:#x} segment count {count} exceeds max {MAX_SEGMENTS}")
    info = ImageInfo(chip_id, entry, mode, size_freq, hash_appended == 1)
    pos = HEADER_SIZE
    checksum = CHECKSUM_INITIAL
    for i in range(count):
        if pos + SEGMENT_HEADER_SIZE > limit:
            raise ImageError(f"segment {i} header at {pos:#x} is beyond the end of the image")
        addr, length = struct.unpack_from("<II", data, pos)
        start = pos + SEGMENT_HEADER_SIZE
        if length % 4 or length >= 0x1000000:
            raise ImageError(f"invalid segment length {length:#x}")
        if i == 0 and not bootloader and length < APP_DESC_SIZE:
            raise ImageError(f"Segment 0: length {length:#x} is too short for app description")
        mapped = any(lo <= addr < hi for lo, hi in _MAPPED)
        if mapped and (offset + start) % MMU_PAGE != addr % MMU_PAGE:
            raise ImageError(
                f"Segment {i} load address {addr:#010x}, doesn't match data {offset + start:#010x}"
            )
        if addr >= 0x10000000 and not any(lo <= addr and addr + length <= hi for lo, hi in _REGIONS):
            raise ImageError(
                f"Segment {i} {addr:#010x}-{addr + length:#010x} invalid: bad load address range"
            )
        if start + length > limit:
            raise ImageError(f"segment {i} ({length} bytes at {start:#x}) runs past the end of the image")
        checksum = _xor(data[start : start + length], checksum)
        info.segments.append((addr, start, length))
        pos = start + length
    end = pos + 16 - pos % 16  # the checksum is the last byte of the 16-byte block
    if end > limit:
        raise ImageError("the image ends before its checksum")
    info.checksum = data[end - 1]
    if info.checksum != checksum:
        raise ImageError(f"Checksum failed. Calculated {checksum:#x} read {info.checksum:#x}")
    info.length = end
    if info.hash_appended:
        if end + 32 > limit:
            raise ImageError(f"Image length {end + 32} doesn't fit in partition length {limit}")
        info.digest = bytes(data[end : end + 32])
        if not bootloader and hashlib.sha256(data[:end]).digest() != info.digest:
            raise ImageError("Image hash failed - image is corrupt")
        info.length = end + 32
    if part_size is not None and info.length > part_size:
        raise ImageError(f"Image length {info.length} doesn't fit in partition length {part_size}")
    if not bootloader and info.segments:
        _, start, length = info.segments[0]
        info.app_desc = parse_app_desc(data[start : start + length])
    return info


def describe(data: bytes) -> AppDesc | None:
    """The app description where ESP-IDF looks for it (bootloader_common_get_partition_description:
    right after the image header and the first segment header), or None."""
    return parse_app_desc(data[HEADER_SIZE + SEGMENT_HEADER_SIZE : HEADER_CHECK_SIZE])


def has_selfcheck_fail_marker(data: bytes, info: ImageInfo) -> bool:
    return SELFCHECK_FAIL_MARKER in data[: info.length]


# -- partition table ------------------------------------------------------------------------------

# docs/device-protocol.md section 1: (label, type, subtype, offset, size).
OTA_LAYOUT = (
    ("nvs", 0x01, 0x02, 0x9000, 0x6000),
    ("phy_init", 0x01, 0x01, 0xF000, 0x1000),
    ("ota_0", 0x00, 0x10, 0x10000, 0x180000),
    ("ota_1", 0x00, 0x11, 0x190000, 0x180000),
    ("otadata", 0x01, 0x00, 0x310000, 0x2000),
    ("nvs_field", 0x01, 0x02, 0x312000, 0x6000),
)


def build_partition_table(entries=OTA_LAYOUT) -> bytes:
    """A binary partition table as gen_esp32part.py writes it (32-byte entries, magic 0xAA50, an
    MD5 entry 0xEBEB), padded with 0xFF to 0xC00 bytes; the station writes it at 0x8000."""
    table = bytearray()
    for label, ptype, subtype, offset, size in entries:
        table += struct.pack("<2sBBII16sI", b"\xaa\x50", ptype, subtype, offset, size, label.encode(), 0)
    table += b"\xeb\xeb" + b"\xff" * 14 + hashlib.md5(bytes(table), usedforsecurity=False).digest()
    return bytes(table).ljust(0xC00, b"\xff")
