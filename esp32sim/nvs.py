"""A reader and a writer for ESP-IDF NVS partitions (format version 1 and 2).

Layout: 4 KiB pages; each has a 32-byte header (state, sequence number, version, CRC32 over
bytes 4..28), a 32-byte bitmap of entry states (2 bits per entry: 11 empty, 10 written,
00 erased) and 126 entries of 32 bytes: ns, type, span, chunk index, CRC32 (over the entry
without that field), key[16], data[8]. Strings and blobs keep their bytes in the `span - 1`
entries that follow their header entry; a version-2 blob is split into BLOB_DATA chunks
(possibly on several pages) tied together by a BLOB_IDX entry.

`parse_nvs(image)` returns ``{namespace: {key: value}}``. Like ESP-IDF, it ignores entries and
pages whose CRC does not match; `strict=True` raises `NvsError` instead, and the skipped items
are listed in `NvsReport.problems` when `parse_nvs_report` is used. A string or blob whose data
entries are not all marked written (a power cut mid-write) is skipped too, as ESP-IDF erases it.

`NvsWriter(flash, offset, size)` opens a partition read/write the way ESP-IDF's nvs_flash does
(set_str, set_u8, set_u16, set_blob, erase_key, erase_namespace, commit); see its docstring.
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


def _state(bitmap, i: int) -> int:
    return (bitmap[i // 4] >> ((i % 4) * 2)) & 0b11


def key_of(entry: bytes) -> str:
    return entry[8:24].split(b"\x00", 1)[0].decode("utf-8", "replace")


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
    for seq, pno, _pstate, page in pages:
        bitmap = page[32:64]
        i = 0
        while i < ENTRIES_PER_PAGE:
            st = _state(bitmap, i)
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
            if etype in (T_SZ, T_BLOB, T_BLOB_DATA) and any(
                _state(bitmap, j) != ENTRY_WRITTEN for j in range(i + 1, i + span)
            ):
                # A power cut between writing a value's entries and marking them written: ESP-IDF
                # erases such an item when it loads the page (a previous value, if any, stays).
                problem(f"{where}: {key_of(entry)!r} is not completely written, skipped")
                i += 1
                continue
            key = key_of(entry)
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


# -- Writing: what ESP-IDF's nvs_flash does on a read/write partition --------------------------
#
# Modelled on components/nvs_flash/src (nvs_page.cpp, nvs_pagemanager.cpp, nvs_storage.cpp):
#   * a value is appended to the active page: its header entry is written and marked WRITTEN,
#     then its data entries are written and marked (two bitmap updates), and only then is the
#     entry it supersedes marked ERASED (and purged, i.e. overwritten with zeros, as ESP-IDF v5.5+
#     does by default) - so a power cut leaves the old value, or both (newer wins), never neither;
#   * a page that cannot take the next value is marked FULL and the next free page becomes active
#     with sequence number + 1; when only one free page is left, the page with the fewest live
#     entries is garbage-collected first (marked FREEING, its live entries copied into the free
#     page, then erased) - the one free page ESP-IDF always keeps is what makes that possible;
#   * on open (`nvs_flash_init_partition`) half-written entries, incompletely written values,
#     duplicates left by a power cut (the older copy is erased) and an interrupted garbage
#     collection are repaired, and blob chunks without a matching index are dropped.
# Flash is NOR: programming can only clear bits, erasing works on whole 4 KiB pages. A write that
# would need to set a bit raises NvsError rather than silently corrupting the image.

NVS_VERSION = 0xFE  # format version 2 (v1 pages, 0xFF, are read and kept)
CHUNK_MAX_SIZE = ENTRY_SIZE * (ENTRIES_PER_PAGE - 1)  # 4000 bytes: the largest string or blob chunk
MAX_KEY_LENGTH = 15
VER_0, VER_1 = 0x00, 0x80  # the two chunk index ranges a v2 blob alternates between
ENTRY_ILLEGAL = 0b01
_EMPTY, _CORRUPT = "uninitialized", "corrupt"  # in-memory page states besides the header words
_VARLEN = (T_SZ, T_BLOB, T_BLOB_DATA)
_PRIMITIVE = tuple(INT_FORMATS)


class NvsWriteError(NvsError):
    """An ESP-IDF error from a write: `code` is the esp_err_t name (ESP_ERR_NVS_NOT_ENOUGH_SPACE...)."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{message} ({code})")
        self.code = code


class BufferFlash:
    """NOR semantics over a writable buffer (bytearray, mmap, memoryview) for NvsWriter."""

    def __init__(self, buf):
        self.buf = buf

    def __len__(self):
        return len(self.buf)

    def read(self, addr: int, length: int) -> bytes:
        return bytes(self.buf[addr : addr + length])

    def program(self, addr: int, data: bytes):
        old = self.buf[addr : addr + len(data)]
        self.buf[addr : addr + len(data)] = bytes(a & b for a, b in zip(old, data, strict=True))

    def erase(self, addr: int, length: int):
        self.buf[addr : addr + length] = b"\xff" * length


class _Page:
    __slots__ = ("next_free", "no", "seq", "state", "states")

    def __init__(self, no):
        self.no = no
        self.state = _EMPTY
        self.seq = None
        self.states = [ENTRY_EMPTY] * ENTRIES_PER_PAGE
        self.next_free = 0

    def used(self) -> int:
        return sum(1 for s in self.states if s == ENTRY_WRITTEN)


@dataclass
class _Entry:
    index: int
    ns: int
    type: int
    span: int
    chunk: int
    key: str
    data: bytes  # the 8-byte data field

    @property
    def size(self) -> int:  # variable-length types
        return struct.unpack_from("<H", self.data, 0)[0]

    @property
    def blob_index(self):  # BLOB_IDX: (size, chunk count, chunk start)
        return struct.unpack_from("<IBB", self.data, 0)


def _header_consistent(entry: bytes, index: int) -> bool:
    """Item::checkHeaderConsistency: CRC, a known type, and a span that fits type, size and page."""
    if _crc(entry[0:4] + entry[8:32]) != struct.unpack_from("<I", entry, 4)[0]:
        return False
    etype, span, chunk = entry[1], entry[2], entry[3]
    if etype in _PRIMITIVE:
        return span == 1
    if etype == T_BLOB_IDX:
        size = struct.unpack_from("<I", entry, 24)[0]
        return span == 1 and chunk == CHUNK_ANY and size <= (255 // 2) * CHUNK_MAX_SIZE
    if etype in _VARLEN:
        if etype == T_BLOB_DATA and chunk == CHUNK_ANY:
            return False
        size = struct.unpack_from("<H", entry, 24)[0]
        if size > (ENTRIES_PER_PAGE - index - 1) * ENTRY_SIZE or span > ENTRIES_PER_PAGE - index:
            return False
        return span == (size + ENTRY_SIZE - 1) // ENTRY_SIZE + 1
    return False


def _check_name(kind: str, name: str) -> bytes:
    raw = name.encode()
    if not raw or len(raw) > MAX_KEY_LENGTH or b"\x00" in raw:
        raise NvsWriteError("ESP_ERR_NVS_KEY_TOO_LONG", f"{kind} {name!r} must be 1 to 15 bytes")
    return raw


class NvsWriter:
    """ESP-IDF NVS on one partition of a flash, opened read/write (`nvs_flash_init_partition`).

    flash: the board's `device.Flash` (anything with read(addr, n), program(addr, data) with NOR
    semantics and erase(addr, n); flush() is used by commit()), or a writable buffer such as a
    bytearray, which is wrapped in BufferFlash. offset/size: the partition (default: all of it).
    hook: called as hook(kind, addr, length) before every flash operation (kind: page-header,
    page-state, entry, data, mark-written, mark-erased, purge or erase-page); raising there models
    a power cut or a reset at exactly that point, since the operation then never happens.
    purge: overwrite erased entries with zeros (ESP-IDF's DEFAULT_PURGE_AFTER_ERASE, v5.5+).

    Opening repairs what a power cut left (see above) and may therefore write, like ESP-IDF.
    Values are written as soon as a set_*/erase_* call returns, as in ESP-IDF's nvs_flash;
    commit() only flushes the flash file (msync).
    """

    def __init__(self, flash, offset: int = 0, size: int | None = None, *, hook=None, purge: bool = True):
        if not all(hasattr(flash, a) for a in ("read", "program", "erase")):
            flash = BufferFlash(flash)
        if size is None:
            size = len(flash) - offset
        if size < 2 * PAGE_SIZE or size % PAGE_SIZE or offset % PAGE_SIZE:
            raise NvsError(
                f"an NVS partition is 4 KiB aligned and at least 2 pages, not {size:#x}@{offset:#x}"
            )
        self.flash = flash
        self.offset = offset
        self.size = size
        self.hook = hook
        self.purge = purge
        self._load()

    # -- flash primitives ----------------------------------------------------------------------

    def _addr(self, page: _Page, index: int | None = None) -> int:
        base = self.offset + page.no * PAGE_SIZE
        return base if index is None else base + FIRST_ENTRY + index * ENTRY_SIZE

    def _program(self, kind: str, addr: int, data: bytes):
        if self.hook:
            self.hook(kind, addr, len(data))
        old = self.flash.read(addr, len(data))
        if any(o & d != d for o, d in zip(old, data, strict=True)):
            raise NvsError(f"NOR flash at {addr:#x}: {kind} would have to set bits that only an erase sets")
        self.flash.program(addr, data)

    def _erase_page(self, page: _Page):
        addr = self._addr(page)
        if self.hook:
            self.hook("erase-page", addr, PAGE_SIZE)
        self.flash.erase(addr, PAGE_SIZE)
        page.state, page.seq, page.next_free = _EMPTY, None, 0
        page.states = [ENTRY_EMPTY] * ENTRIES_PER_PAGE

    def _read_entry(self, page: _Page, index: int) -> bytes:
        return self.flash.read(self._addr(page, index), ENTRY_SIZE)

    def _bitmap_word(self, page: _Page, word: int, state: int):
        value = 0
        for k in range(16):  # the bitmap has room for 128 entries; the last two stay 11
            i = word * 16 + k
            value |= (page.states[i] if i < ENTRIES_PER_PAGE else ENTRY_EMPTY) << (2 * k)
        kind = "mark-written" if state == ENTRY_WRITTEN else "mark-erased"
        self._program(kind, self._addr(page) + 32 + 4 * word, struct.pack("<I", value))

    def _set_state(self, page: _Page, index: int, state: int):
        page.states[index] = state
        self._bitmap_word(page, index // 16, state)

    def _set_range(self, page: _Page, begin: int, end: int, state: int):
        # Page::alterEntryRangeState: from the last entry down, one bitmap word at a time.
        word = (end - 1) // 16
        for i in range(end - 1, begin - 1, -1):
            page.states[i] = state
            nxt = (i - 1) // 16 if i > begin else -1
            if nxt != word:
                self._bitmap_word(page, word, state)
            word = nxt

    def _set_page_state(self, page: _Page, state: int):
        self._program("page-state", self._addr(page), struct.pack("<I", state))
        page.state = state

    def _init_page(self, page: _Page):
        header = struct.pack("<II", PAGE_ACTIVE, page.seq) + bytes([NVS_VERSION]) + b"\xff" * 19
        self._program("page-header", self._addr(page), header + struct.pack("<I", _crc(header[4:28])))
        page.state, page.next_free = PAGE_ACTIVE, 0
        page.states = [ENTRY_EMPTY] * ENTRIES_PER_PAGE

    def _purge(self, page: _Page, begin: int, end: int):
        if self.purge:
            for i in range(begin, end):
                self._program("purge", self._addr(page, i), bytes(ENTRY_SIZE))

    # -- entries -------------------------------------------------------------------------------

    def _entry(self, page: _Page, index: int) -> _Entry | None:
        raw = self._read_entry(page, index)
        if not _header_consistent(raw, index):
            return None
        return _Entry(index, raw[0], raw[1], raw[2], raw[3], key_of(raw), raw[24:32])

    def _end(self, page: _Page) -> int:
        return page.next_free if page.state == PAGE_ACTIVE else ENTRIES_PER_PAGE

    def _live(self, page: _Page):
        """The items of a page (Page::findItem's walk): written, consistent headers."""
        if page.state not in (PAGE_ACTIVE, PAGE_FULL, PAGE_FREEING):
            return
        i, end = 0, self._end(page)
        while i < end:
            if page.states[i] != ENTRY_WRITTEN:
                i += 1
                continue
            item = self._entry(page, i)
            if item is None:
                i += 1
                continue
            yield item
            i += item.span if item.type in _VARLEN else 1

    def _erase_entry_and_span(self, page: _Page, index: int):
        """Page::eraseEntryAndSpan: mark the item (all its entries) ERASED, then purge it."""
        span = 1
        if page.states[index] == ENTRY_WRITTEN:
            item = self._entry(page, index)
            if item is not None:
                span = item.span
        if span == 1:
            self._set_state(page, index, ENTRY_ERASED)
        else:
            self._set_range(page, index, index + span, ENTRY_ERASED)
        self._purge(page, index, index + span)
        if page.state == PAGE_ACTIVE and index + span > page.next_free:
            page.next_free = index + span

    def _write_entry(self, page: _Page, raw: bytes, kind: str = "entry") -> int:
        """Page::writeEntry: one entry, then its state."""
        index = page.next_free
        self._program(kind, self._addr(page, index), raw)
        self._set_state(page, index, ENTRY_WRITTEN)
        page.next_free += 1
        return index

    def _page_write_item(self, page: _Page, ns: int, etype: int, key: str, data: bytes, chunk=CHUNK_ANY):
        """Page::writeItem; returns the entry index or None when the page cannot take the item."""
        if page.state == _EMPTY:
            self._init_page(page)
        if page.state != PAGE_ACTIVE:
            return None
        entries = 1
        if etype in _VARLEN:
            entries += (len(data) + ENTRY_SIZE - 1) // ENTRY_SIZE
        if page.next_free + entries > ENTRIES_PER_PAGE:
            return None
        head = bytearray(b"\xff" * ENTRY_SIZE)
        head[0:4] = bytes([ns, etype, entries, chunk])
        head[8:24] = key.encode().ljust(16, b"\x00")
        if etype in _VARLEN:
            struct.pack_into("<HHI", head, 24, len(data), 0xFFFF, _crc(data))
        else:
            head[24 : 24 + len(data)] = data
        struct.pack_into("<I", head, 4, _crc(bytes(head[0:4] + head[8:32])))
        index = self._write_entry(page, bytes(head))
        if etype in _VARLEN:
            whole = len(data) - len(data) % ENTRY_SIZE
            if whole:
                start = page.next_free
                self._program("data", self._addr(page, start), data[:whole])
                self._set_range(page, start, start + whole // ENTRY_SIZE, ENTRY_WRITTEN)
                page.next_free += whole // ENTRY_SIZE
            if len(data) > whole:
                self._write_entry(page, data[whole:].ljust(ENTRY_SIZE, b"\xff"), kind="data")
        return index

    # -- pages ---------------------------------------------------------------------------------

    def _activate(self) -> _Page:
        """PageManager::activatePage: the first free page gets the next sequence number."""
        if not self._free:
            raise NvsWriteError("ESP_ERR_NVS_NOT_ENOUGH_SPACE", "no free page left")
        page = self._free.pop(0)
        if page.state == _CORRUPT:
            self._erase_page(page)
        page.seq = self._next_seq
        self._next_seq += 1
        self._pages.append(page)
        return page

    def _copy_items(self, src: _Page, dst: _Page):
        """Page::copyItems: every live item, entry by entry, into dst."""
        if dst.state == _EMPTY:
            self._init_page(dst)
        i = 0
        while i < ENTRIES_PER_PAGE:
            if src.states[i] != ENTRY_WRITTEN:
                i += 1
                continue
            raw = self._read_entry(src, i)
            span = max(1, raw[2]) if raw[1] in _VARLEN else 1
            self._write_entry(dst, raw)
            for j in range(i + 1, min(i + span, ENTRIES_PER_PAGE)):
                self._write_entry(dst, self._read_entry(src, j), kind="data")
            i += span

    def _request_new_page(self):
        """PageManager::requestNewPage: a free page, garbage-collecting one when only one is left."""
        if not self._free:
            raise NvsWriteError("ESP_ERR_NVS_INVALID_STATE", "no free page")
        if len(self._free) >= 2:
            self._activate()
            return
        victim, most = None, 0
        for page in self._pages:
            unused = ENTRIES_PER_PAGE - page.used()
            if unused > most:
                victim, most = page, unused
        if victim is None:
            raise NvsWriteError("ESP_ERR_NVS_NOT_ENOUGH_SPACE", "every page is full of live values")
        self._set_page_state(victim, PAGE_FREEING)
        fresh = self._activate()
        self._copy_items(victim, fresh)
        self._erase_page(victim)
        self._pages.remove(victim)
        self._free.append(victim)
        self.gc_count += 1

    def _tailroom(self, page: _Page) -> int:
        if page.state == _EMPTY:
            return CHUNK_MAX_SIZE
        if page.state != PAGE_ACTIVE:
            return 0
        # One entry is kept back for the header of the chunk.
        return max(0, ENTRIES_PER_PAGE - page.next_free - 1) * ENTRY_SIZE

    def _current(self) -> _Page:
        return self._pages[-1]

    def _mark_full(self, page: _Page):
        if page.state == PAGE_ACTIVE:
            self._set_page_state(page, PAGE_FULL)

    # -- load ----------------------------------------------------------------------------------

    def _load(self):
        self.gc_count = 0
        pages = [self._load_page(no) for no in range(self.size // PAGE_SIZE)]
        with_seq = [p for p in pages if p.state in (PAGE_ACTIVE, PAGE_FULL, PAGE_FREEING)]
        self._pages = sorted(with_seq, key=lambda p: p.seq)  # stable: equal numbers keep page order
        self._free = [p for p in pages if p.state in (_EMPTY, _CORRUPT)]
        if not self._pages:
            self._next_seq = 0
            self._activate()
        else:
            self._next_seq = self._pages[-1].seq + 1
            self._drop_duplicate_of_last_write()
            self._finish_freeing()
            if not self._free:
                raise NvsWriteError("ESP_ERR_NVS_NO_FREE_PAGES", "the partition has no free page")
        self._load_namespaces()
        self._check_blobs()

    def _load_page(self, no: int) -> _Page:
        page = _Page(no)
        raw = self.flash.read(self.offset + no * PAGE_SIZE, PAGE_SIZE)
        state, seq = struct.unpack_from("<II", raw, 0)
        if state == PAGE_EMPTY:
            page.state = _EMPTY if raw == b"\xff" * PAGE_SIZE else _CORRUPT
            return page
        if _crc(raw[4:28]) != struct.unpack_from("<I", raw, 28)[0] or state not in (
            PAGE_ACTIVE,
            PAGE_FULL,
            PAGE_FREEING,
        ):
            page.state = _CORRUPT
            return page
        if raw[8] < NVS_VERSION:
            raise NvsWriteError("ESP_ERR_NVS_NEW_VERSION_FOUND", f"page {no} has format version {raw[8]:#x}")
        page.state, page.seq = state, seq
        page.states = [_state(raw[32:64], i) for i in range(ENTRIES_PER_PAGE)]
        if state == PAGE_ACTIVE:
            self._load_active(page, raw)
        else:
            self._load_full(page)
        return page

    def _load_active(self, page: _Page, raw: bytes):
        """Page::mLoadEntryTable for the active page."""
        page.next_free = next((i for i, s in enumerate(page.states) if s == ENTRY_EMPTY), ENTRIES_PER_PAGE)
        # An entry written but not yet marked (power cut in between) is half-written: erased.
        while page.next_free < ENTRIES_PER_PAGE:
            off = FIRST_ENTRY + page.next_free * ENTRY_SIZE
            if raw[off : off + 4] == b"\xff\xff\xff\xff":
                break
            self._set_state(page, page.next_free, ENTRY_ERASED)
            self._purge(page, page.next_free, page.next_free + 1)
            page.next_free += 1
        seen = {}
        i = 0
        while i < page.next_free:
            st = page.states[i]
            if st == ENTRY_ERASED:
                i += 1
                continue
            if st != ENTRY_WRITTEN:  # illegal (01)
                self._erase_entry_and_span(page, i)
                i += 1
                continue
            item = self._entry(page, i)
            if item is None:
                self._erase_entry_and_span(page, i)
                i += 1
                continue
            span = 1
            if item.type in _VARLEN:
                span = item.span
                if any(page.states[j] != ENTRY_WRITTEN for j in range(i, i + span)):
                    self._erase_entry_and_span(page, i)
                    i += span
                    continue
            ident = (item.ns, item.key, item.chunk)
            if ident in seen:  # the same key twice on a page: the later write wins
                self._erase_entry_and_span(page, seen[ident])
            seen[ident] = i
            i += span

    def _load_full(self, page: _Page):
        page.next_free = ENTRIES_PER_PAGE
        i = 0
        while i < ENTRIES_PER_PAGE:
            if page.states[i] != ENTRY_WRITTEN:
                i += 1
                continue
            item = self._entry(page, i)
            if item is None:
                self._erase_entry_and_span(page, i)
                i += 1
                continue
            if item.type in _VARLEN and any(page.states[j] != ENTRY_WRITTEN for j in range(i, i + item.span)):
                self._erase_entry_and_span(page, i)
            i += item.span if item.type in _VARLEN else 1

    def _drop_duplicate_of_last_write(self):
        """PageManager::load: the newest item may have an older copy that a power cut left."""
        last = None
        for last in self._live(self._pages[-1]):  # noqa: B007 - the loop finds the last item
            pass
        if last is None:
            return
        for page in self._pages[:-1]:
            if page.state == PAGE_FREEING:
                continue
            for item in self._live(page):
                if (item.ns, item.key, item.type, item.chunk) == (last.ns, last.key, last.type, last.chunk):
                    self._erase_entry_and_span(page, item.index)
                    return

    def _finish_freeing(self):
        """PageManager::load: redo a garbage collection a power cut interrupted."""
        for page in self._pages:
            if page.state != PAGE_FREEING:
                continue
            newest = self._pages[-1]
            if newest.state == PAGE_ACTIVE:
                self._erase_page(newest)
                self._pages.remove(newest)
                self._free.append(newest)
            fresh = self._activate()
            self._copy_items(page, fresh)
            self._erase_page(page)
            self._pages.remove(page)
            self._free.append(page)
            return

    def _load_namespaces(self):
        self._ns = {}
        for page in self._pages:
            for item in self._live(page):
                if item.ns == 0 and item.type == T_U8:
                    self._ns[item.key] = item.data[0]

    def _check_blobs(self):
        """Storage::init: blob indexes whose chunks do not add up, and chunks without an index, go."""
        indexes, chunks = [], []
        for page in self._pages:
            for item in self._live(page):
                if item.type == T_BLOB_IDX:
                    indexes.append((page, item))
                elif item.type == T_BLOB_DATA:
                    chunks.append((page, item))
        good = []
        for page, idx in indexes:
            size, count, start = idx.blob_index
            limit = VER_1 if start == VER_0 else CHUNK_ANY
            mine = [c for _, c in chunks if (c.ns, c.key) == (idx.ns, idx.key) and start <= c.chunk < limit]
            if sum(c.size for c in mine) != size or len(mine) != count:
                self._erase_entry_and_span(page, idx.index)
            else:
                good.append(idx)
        for page, c in chunks:
            owned = any(
                (c.ns, c.key) == (i.ns, i.key)
                and i.blob_index[2] <= c.chunk < i.blob_index[2] + i.blob_index[1]
                for i in good
            )
            if not owned:
                self._erase_entry_and_span(page, c.index)

    # -- lookups -------------------------------------------------------------------------------

    def _find(self, ns: int, key: str, exclude=None):
        """The first (oldest) live item (ns, key), not a blob chunk: (page, item) or None."""
        for page in self._pages:
            for item in self._live(page):
                if item.ns == ns and item.key == key and item.chunk == CHUNK_ANY:
                    if exclude is not None and (page.no, item.index) == exclude:
                        continue
                    return page, item
        return None

    def _payload(self, page: _Page, item: _Entry) -> bytes:
        raw = self.flash.read(self._addr(page, item.index + 1), (item.span - 1) * ENTRY_SIZE)
        return raw[: item.size]

    def _namespace(self, name: str, create: bool) -> int | None:
        _check_name("namespace", name)
        if name in self._ns:
            return self._ns[name]
        if not create:
            return None
        used = set(self._ns.values())
        index = next((n for n in range(1, 255) if n not in used), None)
        if index is None:
            raise NvsWriteError("ESP_ERR_NVS_NOT_ENOUGH_SPACE", "254 namespaces already exist")
        self._write_item(0, T_U8, name, bytes([index]))
        self._ns[name] = index
        return index

    # -- Storage::writeItem / eraseItem --------------------------------------------------------

    def _write_item(self, ns: int, etype: int, key: str, data: bytes):
        _check_name("key", key)
        if etype in _VARLEN and len(data) > CHUNK_MAX_SIZE:
            raise NvsWriteError(
                "ESP_ERR_NVS_VALUE_TOO_LONG", f"{key!r}: {len(data)} bytes > {CHUNK_MAX_SIZE}"
            )
        found = self._find(ns, key)
        if found is not None:
            page, old = found
            if old.type == etype:
                same = self._payload(page, old) == data if etype in _VARLEN else old.data[: len(data)] == data
                if same:
                    return  # unchanged: nothing is written (ESP-IDF compares first)
        page = self._current()
        index = self._page_write_item(page, ns, etype, key, data)
        if index is None:
            self._mark_full(page)
            self._request_new_page()
            page = self._current()
            index = self._page_write_item(page, ns, etype, key, data)
            if index is None:
                raise NvsWriteError("ESP_ERR_NVS_NOT_ENOUGH_SPACE", f"{key!r} does not fit on an empty page")
        if found is not None:
            # The superseded value, found again: a garbage collection may have moved it.
            if found[1].type == T_BLOB_IDX:
                self._erase_blob(ns, key, found[1].blob_index[2])
            else:
                again = self._find(ns, key, exclude=(page.no, index))
                if again is not None:
                    self._erase_entry_and_span(again[0], again[1].index)

    def _erase_blob(self, ns: int, key: str, start: int):
        """Storage::eraseMultiPageBlob: the index first (the chunks become orphans), then the chunks."""
        count = None
        for page in self._pages:
            for item in self._live(page):
                if (item.ns, item.key, item.type) == (ns, key, T_BLOB_IDX) and item.blob_index[2] == start:
                    count = item.blob_index[1]
                    self._erase_entry_and_span(page, item.index)
                    break
            if count is not None:
                break
        self._erase_chunks(ns, key, start, count or 0)

    def _erase_chunks(self, ns: int, key: str, start: int, count: int):
        for page in self._pages:
            for item in list(self._live(page)):
                mine = (item.ns, item.key, item.type) == (ns, key, T_BLOB_DATA)
                if mine and 0 <= item.chunk - start < count:
                    self._erase_entry_and_span(page, item.index)

    # -- public API (nvs_set_* / nvs_erase_* / nvs_commit) --------------------------------------

    def set_str(self, namespace: str, key: str, value: str):
        """nvs_set_str: the string and its terminating NUL, at most 4000 bytes together."""
        self._write_item(self._namespace(namespace, True), T_SZ, key, value.encode() + b"\x00")

    def _set_int(self, namespace: str, key: str, etype: int, value: int):
        try:
            data = struct.pack(INT_FORMATS[etype], value)
        except struct.error:
            raise NvsError(f"{key!r}: {value} does not fit type {etype:#04x}") from None
        self._write_item(self._namespace(namespace, True), etype, key, data)

    def set_u8(self, namespace: str, key: str, value: int):
        self._set_int(namespace, key, T_U8, value)

    def set_u16(self, namespace: str, key: str, value: int):
        self._set_int(namespace, key, T_U16, value)

    def set_u32(self, namespace: str, key: str, value: int):
        self._set_int(namespace, key, T_U32, value)

    def set_i32(self, namespace: str, key: str, value: int):
        self._set_int(namespace, key, T_I32, value)

    def set_blob(self, namespace: str, key: str, value: bytes):
        """nvs_set_blob (format v2): BLOB_DATA chunks, on as many pages as needed, then a BLOB_IDX."""
        ns = self._namespace(namespace, True)
        _check_name("key", key)
        value = bytes(value)
        found = self._find(ns, key)
        start = VER_0
        if found is not None and found[1].type == T_BLOB_IDX:
            if self.get(namespace, key) == value:
                return
            start = VER_1 if found[1].blob_index[2] == VER_0 else VER_0
        max_pages = min(self.size // PAGE_SIZE - 1, (CHUNK_ANY - 1) // 2)
        if len(value) > max_pages * CHUNK_MAX_SIZE:
            raise NvsWriteError("ESP_ERR_NVS_VALUE_TOO_LONG", f"{key!r}: {len(value)} bytes")
        count, offset, remaining = 0, 0, len(value)
        while True:
            page = self._current()
            tail = self._tailroom(page)
            if (
                count == 0
                and (tail < len(value) or (tail == 0 and not value))
                and tail < CHUNK_MAX_SIZE // 10
            ):
                self._mark_full(page)
                self._request_new_page()
                if self._tailroom(self._current()) == tail:
                    raise NvsWriteError("ESP_ERR_NVS_NOT_ENOUGH_SPACE", f"no room for blob {key!r}")
                continue
            if not tail:
                self._erase_chunks(ns, key, start, count)
                raise NvsWriteError("ESP_ERR_NVS_NOT_ENOUGH_SPACE", f"no room for blob {key!r}")
            size = min(remaining, tail)
            remaining -= size
            chunk = value[offset : offset + size]
            self._page_write_item(page, ns, T_BLOB_DATA, key, chunk, chunk=start + count)
            count += 1
            if remaining or tail - size < ENTRY_SIZE:
                self._mark_full(page)
                try:
                    self._request_new_page()
                except NvsWriteError:
                    self._erase_chunks(ns, key, start, count)
                    raise
            offset += size
            if not remaining:
                index = struct.pack("<IBB", len(value), count, start) + b"\xff\xff"
                self._page_write_item(self._current(), ns, T_BLOB_IDX, key, index)
                break
        if found is not None:
            if found[1].type == T_BLOB_IDX:
                self._erase_blob(ns, key, found[1].blob_index[2])
            else:
                again = self._find(ns, key)
                if again is not None and again[1].type != T_BLOB_IDX:
                    self._erase_entry_and_span(again[0], again[1].index)

    def erase_key(self, namespace: str, key: str) -> bool:
        """nvs_erase_key; False where ESP-IDF returns ESP_ERR_NVS_NOT_FOUND."""
        ns = self._namespace(namespace, False)
        found = None if ns is None else self._find(ns, key)
        if found is None:
            return False
        page, item = found
        if item.type == T_BLOB_IDX:
            self._erase_blob(ns, key, item.blob_index[2])
        else:
            self._erase_entry_and_span(page, item.index)
        return True

    def erase_namespace(self, namespace: str) -> int:
        """nvs_erase_all: every item of the namespace (its name entry stays); returns how many."""
        ns = self._namespace(namespace, False)
        if ns is None:
            return 0
        erased = 0
        for page in self._pages:
            for item in list(self._live(page)):
                if item.ns == ns:
                    self._erase_entry_and_span(page, item.index)
                    erased += 1
        return erased

    def commit(self):
        """nvs_commit: values are already on flash; this flushes the flash file to disk."""
        flush = getattr(self.flash, "flush", None)
        if flush:
            flush()

    # -- reading -------------------------------------------------------------------------------

    def image(self) -> bytes:
        return self.flash.read(self.offset, self.size)

    def namespaces(self) -> dict:
        """{namespace: {key: value}} as parse_nvs reads the partition now."""
        return parse_nvs(self.image())

    def get(self, namespace: str, key: str, default=None):
        return self.namespaces().get(namespace, {}).get(key, default)

    def pages(self) -> list:
        """[(page number, state, sequence number, used entries)] in sequence order, then free pages."""
        names = {PAGE_ACTIVE: "active", PAGE_FULL: "full", PAGE_FREEING: "freeing"}
        out = [(p.no, names.get(p.state, p.state), p.seq, p.used()) for p in self._pages]
        return out + [(p.no, p.state if p.state != _EMPTY else "empty", None, 0) for p in self._free]
