# Copyright: esp32-mqtt-fleet contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""ESP32 app images and the fleet's two-OTA flash layout, on the controller.

parse_app_image checks an image the way ESP-IDF's esp_image_verify does before it is ever sent to a
board (header magic 0xE9, segment bounds, the XOR checksum, the appended SHA-256) and reads its
esp_app_desc_t (project name and version). esptool's `image-info` reads the same fields; the tests
compare the two. The firmware twin's bootloader (esp32sim/) is a separate implementation on purpose.

partition_table builds the binary table of docs/device-protocol.md section 1 in ESP-IDF's
gen_esp32part.py format; ota_data_initial is ESP-IDF's ota_data_initial.bin (erased: boot ota_0).

Pure Python (standard library only): unit tests run it without Ansible.
"""

from __future__ import annotations

import hashlib
import struct

IMAGE_MAGIC = 0xE9
APP_DESC_MAGIC = 0xABCD5432
CHECKSUM_SEED = 0xEF
# esp_image_header_t (8 bytes) + the extended header (16 bytes, esptool's ESP32FirmwareImage).
_HEADER = struct.Struct("<BBBBI")
_EXTENDED = struct.Struct("<BBBBHBHH4sB")
_SEGMENT = struct.Struct("<II")
_MAX_SEGMENTS = 16
# esp_app_desc_t: magic, secure_version, 2 reserved words, version[32], project_name[32], time[16],
# date[16], idf_ver[32], app_elf_sha256[32].
_APP_DESC = struct.Struct("<II8x32s32s16s16s32s32s")
# The image header's chip id (esp_chip_id_t).
CHIP_IDS = {
    0x0000: "esp32",
    0x0002: "esp32s2",
    0x0005: "esp32c3",
    0x0009: "esp32s3",
    0x000C: "esp32c2",
    0x000D: "esp32c6",
    0x0010: "esp32h2",
    0x0012: "esp32p4",
}
# An ESP32 app's first segment is DROM (mapped flash data); esp_app_desc_t is at its start.
_ESP32_DROM = (0x3F400000, 0x3F800000)

# docs/device-protocol.md section 1: (label, type, subtype, offset, size).
PARTITION_TABLE_OFFSET = 0x8000
PARTITION_TABLE_SIZE = 0xC00
BOOTLOADER_OFFSET = 0x1000
TWO_OTA_LAYOUT = (
    ("nvs", 0x01, 0x02, 0x9000, 0x6000),
    ("phy_init", 0x01, 0x01, 0xF000, 0x1000),
    ("ota_0", 0x00, 0x10, 0x10000, 0x180000),
    ("ota_1", 0x00, 0x11, 0x190000, 0x180000),
    ("otadata", 0x01, 0x00, 0x310000, 0x2000),
    ("nvs_field", 0x01, 0x02, 0x312000, 0x6000),
)
_ENTRY = struct.Struct("<2sBBII16sI")


class ImageError(Exception):
    """The file is not a usable ESP32 app image (the message says why)."""


def _text(raw):
    return raw.split(b"\x00", 1)[0].decode("utf-8", "replace")


def parse_app_image(data):
    """The facts of an ESP32 app image; raises ImageError naming the first problem.

    Returns {chip, chip_id, entry, segments: [{address, size}], checksum_ok, hash_appended,
    sha256_ok, project, version, idf_ver, time, date, size, sha256 (of the whole file)}.
    """
    if len(data) < _HEADER.size + _EXTENDED.size:
        raise ImageError(f"{len(data)} bytes: too short for an ESP32 image header")
    magic, count, _mode, _size_freq, entry = _HEADER.unpack_from(data, 0)
    if magic != IMAGE_MAGIC:
        raise ImageError(f"image magic is {magic:#04x}, not {IMAGE_MAGIC:#04x}: not an ESP32 app image")
    if not 0 < count <= _MAX_SEGMENTS:
        raise ImageError(f"{count} segments: an image has 1 to {_MAX_SEGMENTS}")
    ext = _EXTENDED.unpack_from(data, _HEADER.size)
    chip_id, hash_appended = ext[4], ext[9]
    pos = _HEADER.size + _EXTENDED.size
    checksum = CHECKSUM_SEED
    segments = []
    first = None
    for index in range(count):
        if pos + _SEGMENT.size > len(data):
            raise ImageError(f"segment {index}: header beyond the end of the file ({len(data)} bytes)")
        address, length = _SEGMENT.unpack_from(data, pos)
        pos += _SEGMENT.size
        if pos + length > len(data):
            raise ImageError(
                f"segment {index} ({length} bytes at {address:#x}) runs past the end of the file"
            )
        body = data[pos : pos + length]
        for byte in body:
            checksum ^= byte
        if first is None:
            first = (address, body)
        segments.append({"address": address, "size": length})
        pos += length
    # The checksum byte sits in the last byte of a 16-byte block after the segments.
    pos += 15 - (pos % 16)
    if pos >= len(data):
        raise ImageError("the file ends before the checksum byte")
    checksum_ok = data[pos] == checksum
    if not checksum_ok:
        raise ImageError(f"checksum {data[pos]:#04x} does not match the segments ({checksum:#04x})")
    pos += 1
    sha256_ok = None
    if hash_appended:
        if pos + 32 > len(data):
            raise ImageError("hash_appended is set but the file ends before the SHA-256")
        sha256_ok = hashlib.sha256(data[:pos]).digest() == data[pos : pos + 32]
        if not sha256_ok:
            raise ImageError("the appended SHA-256 does not match the image (corrupted?)")
        pos += 32
    facts = {
        "chip": CHIP_IDS.get(chip_id, f"unknown chip id {chip_id:#06x}"),
        "chip_id": chip_id,
        "entry": entry,
        "segments": segments,
        "checksum_ok": checksum_ok,
        "hash_appended": bool(hash_appended),
        "sha256_ok": sha256_ok,
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    facts.update(_app_desc(first))
    return facts


def _app_desc(first):
    address, body = first
    if len(body) < _APP_DESC.size or struct.unpack_from("<I", body, 0)[0] != APP_DESC_MAGIC:
        raise ImageError(
            f"the first segment ({address:#x}) does not start with an app description "
            f"(esp_app_desc_t magic {APP_DESC_MAGIC:#x}): not an ESP-IDF application"
        )
    fields = _APP_DESC.unpack_from(body, 0)
    return {
        "secure_version": fields[1],
        "version": _text(fields[2]),
        "project": _text(fields[3]),
        "time": _text(fields[4]),
        "date": _text(fields[5]),
        "idf_ver": _text(fields[6]),
        "elf_sha256": fields[7].hex(),
    }


def read_app_image(path):
    """parse_app_image of a file; ImageError also for a file that cannot be read."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        raise ImageError(f"{path}: {exc.strerror or exc}") from None
    return parse_app_image(data)


def partition_table(layout=TWO_OTA_LAYOUT):
    """The binary partition table (gen_esp32part.py format: 32-byte entries, MD5 entry, 0xFF fill)."""
    entries = b"".join(
        _ENTRY.pack(b"\xaa\x50", ptype, subtype, offset, size, label.encode(), 0)
        for label, ptype, subtype, offset, size in layout
    )
    md5 = hashlib.md5(entries, usedforsecurity=False).digest()
    table = entries + b"\xeb\xeb" + b"\xff" * 14 + md5
    return table + b"\xff" * (PARTITION_TABLE_SIZE - len(table))


def partition(label, layout=TWO_OTA_LAYOUT):
    """(offset, size) of the partition called label."""
    for name, _ptype, _subtype, offset, size in layout:
        if name == label:
            return offset, size
    raise KeyError(label)


def ota_data_initial(layout=TWO_OTA_LAYOUT):
    """(offset, bytes) of ESP-IDF's ota_data_initial.bin: the otadata partition erased (boot ota_0)."""
    offset, size = partition("otadata", layout)
    return offset, b"\xff" * size


def in_app_slot(offset, layout=TWO_OTA_LAYOUT):
    """True when offset lies in an app partition (ota_0, ota_1, factory): the app OTA replaces."""
    return any(ptype == 0x00 and start <= offset < start + size for _l, ptype, _s, start, size in layout)
