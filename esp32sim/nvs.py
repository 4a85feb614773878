"""A reader for ESP-IDF NVS partitions (format version 1 and 2).

Layout: 4 KiB pages; each has a 32-byte header (state, sequence number, version, CRC32 over
bytes 4..28), a 32-byte bitmap of entry states (2 bits per entry: 11 empty, 10 written,
00 erased) and 126 entries of 32 bytes: ns, type, span, chunk index, CRC32 (over the entry
without that field), key[16], data[8]. Strings and blobs keep their bytes in the `span - 1`
entries that follow their header entry; a version-2 blob is split into BLOB_DATA chunks
(possibly on several pages) tied together by a BLOB_IDX entry.

`parse_nvs(image)` returns ``{namespace: {key: value}}``. Like ESP-IDF, it ignores entries and
pages whose CRC does not match; `strict=True` raises `NvsError` instead, and the skipped items
are listed in `NvsReport.problems` when `parse_nvs_report` is used.
"""

import struct
import zlib
from dataclasses import dataclass, field

PAGE_SIZE = 4096
ENTRY_SIZE = 32
ENTRIES_PER_PAGE = 126
FIRST_ENTRY = 64

PAGE_ACTIVE = 0xFFFFFFFE
PAGE_FULL = 0xFFFFFFFC
PAGE_FREEING = 0xFFFFFFF8
PAGE_EMPTY = 0xFFFFFFFF

ENTRY_EMPTY = 0b11
ENTRY_WRITTEN = 0b10
ENTRY_ERASED = 0b00

T_U8, T_I8, T_U16, T_I16, T_U32, T_I32, T_U64, T_I64 = 0x01, 0x11, 0x02, 0x12, 0x04, 0x14, 0x08, 0x18
T_SZ, T_BLOB, T_BLOB_DATA, T_BLOB_IDX = 0x21, 0x41, 0x42, 0x48
INT_FORMATS = {
    T_U8: "<B",
    T_I8: "<b",
    T_U16: "<H",
    T_I16: "<h",
    T_U32: "<I",
    T_I32: "<i",
    T_U64: "<Q",
    T_I64: "<q",
}
CHUNK_ANY = 0xFF


class NvsError(ValueError):
    """The image is not an NVS partition, or (strict mode) a CRC does not match."""


def _crc(data: bytes) -> int:
    # ESP-IDF's crc32_le with an all-ones seed, as esp_idf_nvs_partition_gen computes it.
    return zlib.crc32(data, 0xFFFFFFFF) & 0xFFFFFFFF


@dataclass
class NvsReport:
    namespaces: dict = field(default_factory=dict)
    problems: list = field(default_factory=list)
    pages: int = 0


@dataclass
class _Item:
    ns: int
    type: int
    chunk: int
    key: str
    data: bytes  # the 8-byte data field
    payload: bytes  # the bytes of the following span-1 entries (strings, blobs)
    seq: int
    where: str


def parse_nvs(image: bytes, strict: bool = False) -> dict:
    """Parse an NVS partition image into {namespace: {key: value}}."""
    return parse_nvs_report(image, strict=strict).namespaces


def parse_nvs_report(image: bytes, strict: bool = False) -> NvsReport:
    if len(image) < PAGE_SIZE or len(image) % PAGE_SIZE:
        raise NvsError(f"NVS image size {len(image)} is not a positive multiple of {PAGE_SIZE}")
    report = NvsReport()

    def problem(msg):
        if strict:
            raise NvsError(msg)
        report.problems.append(msg)

    items = []
    pages = []
    for pno in range(len(image) // PAGE_SIZE):
        page = image[pno * PAGE_SIZE : (pno + 1) * PAGE_SIZE]
        state, seq = struct.unpack_from("<II", page, 0)
        if state == PAGE_EMPTY:
            continue
        if state not in (PAGE_ACTIVE, PAGE_FULL, PAGE_FREEING):
            problem(f"page {pno}: unknown state {state:#010x}, skipped")
            continue
        (hcrc,) = struct.unpack_from("<I", page, 28)
        if _crc(page[4:28]) != hcrc:
            problem(f"page {pno}: header CRC mismatch, skipped")
            continue
        pages.append((seq, pno, state, page))
    # Later pages (higher sequence numbers) hold newer values; a page being freed is a copy
    # source whose live entries were (or are being) moved, so it ranks below the others.
    pages.sort(key=lambda p: (p[2] != PAGE_FREEING, p[0]))
    report.pages = len(pages)
    for seq, pno, _state, page in pages:
        bitmap = page[32:64]
        i = 0
        while i < ENTRIES_PER_PAGE:
            st = (bitmap[i // 4] >> ((i % 4) * 2)) & 0b11
            if st != ENTRY_WRITTEN:
                i += 1
                continue
            off = FIRST_ENTRY + i * ENTRY_SIZE
            entry = page[off : off + ENTRY_SIZE]
            ns, etype, span, chunk = entry[0], entry[1], entry[2], entry[3]
            (ecrc,) = struct.unpack_from("<I", entry, 4)
            where = f"page {pno} entry {i}"
            if _crc(entry[0:4] + entry[8:32]) != ecrc:
                problem(f"{where}: entry CRC mismatch, skipped")
                i += 1
                continue
            if span < 1 or i + span > ENTRIES_PER_PAGE:
                problem(f"{where}: bad span {span}, skipped")
                i += 1
                continue
            key = entry[8:24].split(b"\x00", 1)[0].decode("utf-8", "replace")
            payload = b""
            if etype in (T_SZ, T_BLOB, T_BLOB_DATA):
                size, _rsv, dcrc = struct.unpack_from("<HHI", entry, 24)
                raw = page[off + ENTRY_SIZE : off + span * ENTRY_SIZE]
                if size > len(raw):
                    problem(f"{where}: {key!r} size {size} exceeds its span, skipped")
                    i += span
                    continue
                payload = raw[:size]
                if _crc(payload) != dcrc:
                    problem(f"{where}: {key!r} data CRC mismatch, skipped")
                    i += span
                    continue
            items.append(_Item(ns, etype, chunk, key, entry[24:32], payload, seq, where))
            i += span

    names = {}  # namespace index -> name
    for it in items:
        if it.ns == 0 and it.type == T_U8:
            names[it.data[0]] = it.key
    chunks = {}
    for it in items:
        if it.type == T_BLOB_DATA:
            chunks[(it.ns, it.key, it.chunk)] = it.payload
    for it in items:
        if it.ns == 0:
            continue
        ns_name = names.get(it.ns)
        if ns_name is None:
            problem(f"{it.where}: {it.key!r} in unknown namespace index {it.ns}, skipped")
            continue
        if it.type in INT_FORMATS:
            fmt = INT_FORMATS[it.type]
            value = struct.unpack_from(fmt, it.data, 0)[0]
        elif it.type == T_SZ:
            value = it.payload[:-1].decode("utf-8") if it.payload.endswith(b"\x00") else it.payload.decode()
        elif it.type == T_BLOB:  # version-1 blob: one piece
            value = it.payload
        elif it.type == T_BLOB_IDX:
            size, count, start = struct.unpack_from("<IBB", it.data, 0)
            parts = [chunks.get((it.ns, it.key, start + n)) for n in range(count)]
            if any(p is None for p in parts):
                problem(f"{it.where}: blob {it.key!r} is missing chunks, skipped")
                continue
            value = b"".join(parts)
            if len(value) != size:
                problem(f"{it.where}: blob {it.key!r} is {len(value)} bytes, index says {size}")
                continue
        else:
            continue  # BLOB_DATA chunks are assembled through their index
        report.namespaces.setdefault(ns_name, {})[it.key] = value
    for name in names.values():
        report.namespaces.setdefault(name, {})
    return report
