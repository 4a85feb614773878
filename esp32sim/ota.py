"""OTA slots, otadata and the second-stage bootloader, as ESP-IDF has them.

Modelled on ESP-IDF (read for this, not copied): components/bootloader_support/src/
bootloader_common_loader.c (the otadata CRC, which entry is valid and active),
bootloader_utility.c (bootloader_utility_get_selected_boot_partition and
bootloader_utility_load_boot_image, built with CONFIG_BOOTLOADER_APP_ROLLBACK_ENABLE and
without anti-rollback or secure boot) and components/app_update/esp_ota_ops.c (esp_ota_begin,
esp_ota_set_boot_partition, esp_ota_mark_app_valid_cancel_rollback, ..._invalid_rollback,
esp_ota_get_last_invalid_partition, esp_ota_get_state_partition).

otadata is a data/ota partition of two flash sectors; each starts with one
esp_ota_select_entry_t (32 bytes, little-endian):

    uint32 ota_seq | uint8 seq_label[20] | uint32 ota_state | uint32 crc

crc = esp_rom_crc32_le(UINT32_MAX, &ota_seq, 4). The ROM's crc32_le inverts the value it is given
on entry and its result on exit, so this is zlib.crc32(ota_seq as 4 LE bytes, 0xFFFFFFFF): for
ota_seq = 1 it is 0x4743989A (otatool.py computes the same with binascii.crc32(..., 0xFFFFFFFF)).
An entry is valid when ota_seq != 0xFFFFFFFF, its state is neither INVALID nor ABORTED and the crc
matches; of two valid entries the higher ota_seq is active, and it selects OTA slot
(ota_seq - 1) % number_of_ota_app_partitions. Each write erases the entry's sector first.

The partition table comes from esp32sim/firmware.py's read_partition_table; partitions are found
by type and subtype, as ESP-IDF does (app/ota_N = 0/0x10+N, data/ota = 1/0x00, app/factory = 0/0).
"""

import struct
import zlib
from dataclasses import dataclass, field

from .appimage import ImageError, ImageInfo, verify_image

SECTOR = 0x1000
ENTRY_SIZE = 32
NEW, PENDING_VERIFY, VALID, INVALID, ABORTED, UNDEFINED = 0, 1, 2, 3, 4, 0xFFFFFFFF
STATE_NAMES = {
    NEW: "NEW",
    PENDING_VERIFY: "PENDING_VERIFY",
    VALID: "VALID",
    INVALID: "INVALID",
    ABORTED: "ABORTED",
    UNDEFINED: "UNDEFINED",
}
SEQ_ERASED = 0xFFFFFFFF
APP, DATA = 0x00, 0x01
SUBTYPE_FACTORY, SUBTYPE_OTA_MIN, SUBTYPE_OTADATA = 0x00, 0x10, 0x00


def ota_select_crc(seq: int) -> int:
    """bootloader_common_ota_select_crc: esp_rom_crc32_le(UINT32_MAX, &ota_seq, 4)."""
    return zlib.crc32(struct.pack("<I", seq), 0xFFFFFFFF)


def state_name(state: int) -> str:
    return STATE_NAMES.get(state, f"{state:#x}")


@dataclass
class Entry:
    """esp_ota_select_entry_t."""

    seq: int = SEQ_ERASED
    label: bytes = b"\xff" * 20
    state: int = UNDEFINED
    crc: int = 0xFFFFFFFF

    @classmethod
    def unpack(cls, raw: bytes) -> "Entry":
        seq, label, state, crc = struct.unpack("<I20sII", raw[:ENTRY_SIZE])
        return cls(seq, label, state, crc)

    def pack(self) -> bytes:
        return struct.pack("<I20sII", self.seq, self.label, self.state, self.crc)

    @property
    def crc_ok(self) -> bool:
        return self.crc == ota_select_crc(self.seq)

    @property
    def invalid(self) -> bool:  # bootloader_common_ota_select_invalid
        return self.seq == SEQ_ERASED or self.state in (INVALID, ABORTED)

    @property
    def valid(self) -> bool:  # bootloader_common_ota_select_valid
        return not self.invalid and self.crc_ok


def _select(entries, usable, highest=True) -> int:
    """bootloader_common_select_otadata: the index of the usable entry with the highest (lowest)
    seq, the only usable one, or -1."""
    if usable[0] and usable[1]:
        pick = max if highest else min
        return 0 if pick(entries[0].seq, entries[1].seq) == entries[0].seq else 1
    for i in (0, 1):
        if usable[i]:
            return i
    return -1


def active_entry(entries) -> int:
    """bootloader_common_get_active_otadata."""
    return _select(entries, [e.valid for e in entries])


@dataclass
class Layout:
    """The OTA-relevant partitions of a table: app/ota_N slots in subtype order, otadata, factory."""

    slots: list  # [(label, offset, size)] for ota_0, ota_1, ... (consecutive subtypes from 0x10)
    otadata: tuple | None  # (offset, size)
    factory: tuple | None = None

    @property
    def usable(self) -> bool:
        """Two OTA slots and an otadata of at least two sectors: OTA updates are possible."""
        return len(self.slots) >= 2 and self.otadata is not None and self.otadata[1] >= 2 * SECTOR

    def slot_name(self, index) -> str:
        return self.slots[index][0] if index is not None and 0 <= index < len(self.slots) else "factory"


def layout_from_table(table: dict | None) -> Layout | None:
    """table: read_partition_table's {label: (type, subtype, offset, size)}; None without a table."""
    if not table:
        return None
    by_subtype = {}
    otadata = factory = None
    for label, (ptype, subtype, offset, size) in table.items():
        if ptype == APP and SUBTYPE_OTA_MIN <= subtype < SUBTYPE_OTA_MIN + 16:
            by_subtype.setdefault(subtype, (label, offset, size))
        elif ptype == APP and subtype == SUBTYPE_FACTORY and factory is None:
            factory = (offset, size)
        elif ptype == DATA and subtype == SUBTYPE_OTADATA and otadata is None:
            otadata = (offset, size)
    slots = []
    while SUBTYPE_OTA_MIN + len(slots) in by_subtype:  # esp_ota_get_app_partition_count
        slots.append(by_subtype[SUBTYPE_OTA_MIN + len(slots)])
    return Layout(slots, otadata, factory)


class Otadata:
    """The otadata partition on a flash (anything with read/erase/program)."""

    def __init__(self, flash, layout: Layout):
        self.flash, self.layout = flash, layout
        self.offset = layout.otadata[0]

    def read(self) -> list:
        return [Entry.unpack(self.flash.read(self.offset + i * SECTOR, ENTRY_SIZE)) for i in (0, 1)]

    def write(self, index: int, entry: Entry):
        """write_otadata / rewrite_ota_seq: erase the entry's sector, program the 32 bytes."""
        self.flash.erase(self.offset + index * SECTOR, SECTOR)
        self.flash.program(self.offset + index * SECTOR, entry.pack())

    def slot_of(self, entry: Entry) -> int:
        return (entry.seq - 1) % len(self.layout.slots)


def read_slot(flash, layout: Layout, index: int) -> bytes:
    _, offset, size = layout.slots[index]
    return flash.read(offset, size)


def validate_slot(flash, layout: Layout, index: int) -> ImageInfo:
    """esp_image_verify of OTA slot `index`; ImageError when it would not boot."""
    _, offset, size = layout.slots[index]
    return verify_image(flash.read(offset, size), offset=offset, part_size=size)


# -- the bootloader ------------------------------------------------------------------------------


@dataclass
class BootResult:
    slot: int | None  # the OTA slot index that was loaded, None when no app could be loaded
    image: ImageInfo | None = None
    data: bytes = b""  # the loaded slot's bytes
    notes: list = field(default_factory=list)  # what the bootloader logged, one line each
    state: int | None = None  # the loaded slot's otadata state after the bootloader's writes


def boot(flash, layout: Layout) -> BootResult:
    """What the second-stage bootloader does on a reset, writes to otadata included."""
    notes = []
    start = None  # None = FACTORY_INDEX
    initial = False  # ota_has_initial_contents
    od = Otadata(flash, layout) if layout.otadata and layout.otadata[1] >= 2 * SECTOR else None
    if layout.otadata is None:
        notes.append("no otadata partition: factory app")
    elif od is None:
        notes.append("otadata partition too small")
    else:
        entries = od.read()
        for i, e in enumerate(entries):  # CONFIG_BOOTLOADER_APP_ROLLBACK_ENABLE
            if e.state == PENDING_VERIFY:
                e.state = ABORTED
                od.write(i, e)
                notes.append(f"otadata[{i}] (seq {e.seq}) was PENDING_VERIFY: marked ABORTED")
        if (entries[0].invalid and entries[1].invalid) or not layout.slots:
            if layout.factory is None:
                start = 0
                initial = all(e.seq == SEQ_ERASED or not e.crc_ok for e in entries)
                notes.append("no valid otadata entry and no factory app: trying OTA 0")
        else:
            active = active_entry(entries)
            if active != -1:
                start = od.slot_of(entries[active])
                if entries[active].state == NEW:
                    entries[active].state = PENDING_VERIFY
                    od.write(active, entries[active])
                    notes.append(f"otadata[{active}] (seq {entries[active].seq}) NEW: now PENDING_VERIFY")
            else:
                notes.append("otadata invalid and no factory app: trying all partitions")

    # bootloader_utility_load_boot_image: from start down to the factory app, then upwards.
    order = [] if start is None else list(range(start, -1, -1))
    order += list(range((start if start is not None else -1) + 1, len(layout.slots)))
    for index in order:
        if index >= len(layout.slots):
            continue  # index_to_partition: no such partition
        try:
            info = validate_slot(flash, layout, index)
        except ImageError as e:
            notes.append(f"{layout.slot_name(index)} is not bootable: {e}")
            continue
        if initial and od is not None:  # set_actual_ota_seq
            e = Entry(seq=index + 1, state=VALID)
            e.crc = ota_select_crc(e.seq)
            od.write(0, e)
            notes.append(f"set actual ota_seq={e.seq} in otadata[0]")
        result = BootResult(index, info, read_slot(flash, layout, index), notes)
        result.state = slot_state(flash, layout, index)
        return result
    notes.append("no bootable app partitions in the partition table")
    return BootResult(None, notes=notes)


# -- the app's side (esp_ota_ops.c) --------------------------------------------------------------


def slot_state(flash, layout: Layout, index: int) -> int | None:
    """esp_ota_get_state_partition: the state of the first entry (crc ok) that maps to the slot."""
    if layout.otadata is None or not layout.slots:
        return None
    od = Otadata(flash, layout)
    for e in od.read():
        if od.slot_of(e) == index and e.crc_ok:
            return e.state
    return None


def next_update_slot(layout: Layout, running: int) -> int:
    """esp_ota_get_next_update_partition: the OTA slot after the running one."""
    return (running + 1) % len(layout.slots)


def invalidate_inactive(flash, layout: Layout, running: int) -> bool:
    """esp_ota_invalidate_inactive_ota_data_slot (called by esp_ota_begin with rollback enabled):
    erase the sector of the inactive entry when it is intact and names a slot other than the
    running one. True when it erased something."""
    od = Otadata(flash, layout)
    entries = od.read()
    active = active_entry(entries)
    if active == -1:
        return False
    inactive = active ^ 1
    e = entries[inactive]
    if e.seq == SEQ_ERASED or not e.crc_ok or od.slot_of(e) == running:
        return False
    flash.erase(od.offset + inactive * SECTOR, SECTOR)
    return True


def _seq_for_slot(current: int, slot: int, count: int) -> int:
    """compute_ota_seq_for_target_slot: the smallest seq >= current that selects slot."""
    base = (slot + 1) % count
    i = 0
    while current > base + i * count:
        i += 1
    return base + i * count


def set_boot_partition(flash, layout: Layout, slot: int) -> tuple:
    """esp_ota_set_boot_partition (the image is validated by the caller): esp_rewrite_ota_data with
    state NEW. Returns (the entry index written, the new seq)."""
    od = Otadata(flash, layout)
    entries = od.read()
    count = len(layout.slots)
    active = active_entry(entries)
    if active != -1:
        if od.slot_of(entries[active]) == slot:
            index, seq = active, entries[active].seq
        else:
            index, seq = active ^ 1, _seq_for_slot(entries[active].seq, slot, count)
    else:
        index, seq = 0, slot + 1
    e = entries[index]
    e.state = NEW
    e.seq = seq
    e.crc = ota_select_crc(seq)
    od.write(index, e)
    return index, seq


def rollback_possible(flash, layout: Layout) -> bool:
    """esp_ota_check_rollback_is_possible."""
    od = Otadata(flash, layout)
    entries = od.read()
    valid = [e.valid for e in entries]
    active = _select(entries, valid)
    if active == -1:
        return False
    other = active ^ 1
    candidates = []
    if not valid[other] and layout.factory is not None:
        return True  # a factory app (not in this project's layout) would be validated here
    if valid[other]:
        candidates.append(od.slot_of(entries[other]))
    for index in candidates:
        try:
            validate_slot(flash, layout, index)
            return True
        except ImageError:
            pass
    return False


def mark_valid(flash, layout: Layout) -> bool:
    """esp_ota_mark_app_valid_cancel_rollback: the active entry becomes VALID. False when there is
    no active entry (the running firmware is not an OTA app selected by otadata)."""
    od = Otadata(flash, layout)
    entries = od.read()
    active = active_entry(entries)
    if active == -1:
        return False
    if entries[active].state != VALID:
        entries[active].state = VALID
        od.write(active, entries[active])
    return True


def mark_invalid(flash, layout: Layout) -> str | None:
    """esp_ota_mark_app_invalid_rollback: the active entry becomes INVALID (the caller reboots).
    Returns None on success, else the reason ESP-IDF refuses."""
    od = Otadata(flash, layout)
    entries = od.read()
    active = active_entry(entries)
    if active == -1:
        return "running firmware is factory"
    if not rollback_possible(flash, layout):
        return "rollback is not possible, do not have any suitable apps in slots"
    entries[active].state = INVALID
    od.write(active, entries[active])
    return None


def last_invalid_slot(flash, layout: Layout) -> tuple | None:
    """esp_ota_get_last_invalid_partition: (slot index, state) of the INVALID/ABORTED entry (crc
    ok; of two, the lower seq) when that slot still holds a valid image, else None."""
    if layout.otadata is None or not layout.slots:
        return None
    od = Otadata(flash, layout)
    entries = od.read()
    usable = [e.seq != SEQ_ERASED and e.crc_ok and e.state in (INVALID, ABORTED) for e in entries]
    i = _select(entries, usable, highest=False)
    if i == -1:
        return None
    slot = od.slot_of(entries[i])
    try:
        validate_slot(flash, layout, slot)
    except ImageError:
        return None
    return slot, entries[i].state
