"""NvsWriter: ESP-IDF-style writes (append, then erase the superseded entry), power cuts at every
flash operation, page rollover, garbage collection, erase_namespace; round trips with parse_nvs and
with images from Espressif's generator."""

import contextlib
import struct

import pytest

from esp32sim.device import Flash
from esp32sim.nvs import (
    PAGE_ACTIVE,
    PAGE_FULL,
    NvsError,
    NvsWriteError,
    NvsWriter,
    parse_nvs,
    parse_nvs_report,
)

from .nvs_images import build_nvs, mqtt_namespaces

PEM = "-----BEGIN CERTIFICATE-----\n" + "QUJD" * 150 + "\n-----END CERTIFICATE-----\n"  # ~660 bytes


class PowerCut(Exception):
    pass


def _blank(pages=6):
    return bytearray(b"\xff" * (pages * 4096))


def _written(image):
    """[(page, index, key, type)] of every written item header, walked like ESP-IDF does."""
    found = []
    for p in range(len(image) // 4096):
        page = image[p * 4096 : (p + 1) * 4096]
        if struct.unpack_from("<I", page)[0] == 0xFFFFFFFF:
            continue
        i = 0
        while i < 126:
            off = 64 + 32 * i
            if (page[32 + i // 4] >> ((i % 4) * 2)) & 3 == 0b10:
                found.append((p, i, page[off + 8 : off + 24].split(b"\0")[0].decode(), page[off + 1]))
                i += max(1, page[off + 2]) if page[off + 1] in (0x21, 0x41, 0x42) else 1
            else:
                i += 1
    return found


def _page_states(image):
    return [struct.unpack_from("<II", image, p * 4096) for p in range(len(image) // 4096)]


def test_round_trip_with_a_generator_image():
    image = bytearray(build_nvs(mqtt_namespaces("esp32-sim-01", "mqtts://localhost:8883", PEM, PEM, "key")))
    before = parse_nvs(bytes(image), strict=True)
    w = NvsWriter(image)
    w.set_str("fleet", "base_fp", "ab" * 32)
    w.set_u8("fleet", "cred_slot", 2)
    w.set_u16("fleet", "renew_days", 30)
    w.set_str("fleet", "a_cert", PEM)
    w.commit()
    after = parse_nvs_report(bytes(image), strict=True)
    assert after.problems == []
    assert after.namespaces["mqtt"] == before["mqtt"] and after.namespaces["wifi"] == before["wifi"]
    assert after.namespaces["fleet"] == {
        "base_fp": "ab" * 32,
        "cred_slot": 2,
        "renew_days": 30,
        "a_cert": PEM,
    }
    # A namespace entry (ns 0, u8) was added for the new namespace with the next free index.
    ns_entries = [(k, t) for p, i, k, t in _written(image) if k in ("mqtt", "wifi", "fleet")]
    assert ns_entries == [("mqtt", 0x01), ("wifi", 0x01), ("fleet", 0x01)]
    # Reopening (ESP-IDF's init with its repairs) changes nothing on a clean image.
    snapshot = bytes(image)
    assert NvsWriter(image).namespaces() == after.namespaces
    assert bytes(image) == snapshot


def test_blank_partition_and_board_flash_file(tmp_path):
    """On the board's file-backed NOR flash, at nvs_field's offset: the file is the truth."""
    path = tmp_path / "board.flash"
    flash = Flash(str(path))
    w = NvsWriter(flash, 0x312000, 0x6000)
    w.set_str("fleet", "ca_cert", PEM)
    w.set_u8("fleet", "cred_slot", 1)
    w.commit()
    image = path.read_bytes()  # another process's view
    assert parse_nvs(image[0x312000:0x318000], strict=True) == {"fleet": {"ca_cert": PEM, "cred_slot": 1}}
    assert image[:0x312000] == b"\xff" * 0x312000 and image[0x318000:] == b"\xff" * (len(image) - 0x318000)
    flash.close()


def test_overwrite_appends_then_erases_the_old_entry():
    image = _blank()
    w = NvsWriter(image)
    w.set_str("fleet", "pend_req", "first-request-id-0001")
    ops = []
    w.hook = lambda kind, addr, n: ops.append(kind)
    w.set_str("fleet", "pend_req", "second-request-id-0002")
    # New header, its data, then (and only then) the old item marked erased and purged.
    assert ops.index("entry") < ops.index("mark-erased")
    assert ops[-1] == "purge" and "erase-page" not in ops
    assert [k for _, _, k, _ in _written(image) if k == "pend_req"] == ["pend_req"]
    assert parse_nvs(bytes(image), strict=True)["fleet"] == {"pend_req": "second-request-id-0002"}
    # The purged entries hold zeros: the old request id is gone from flash.
    assert b"first-request-id" not in image
    # Writing the same value again writes nothing at all.
    ops.clear()
    w.set_str("fleet", "pend_req", "second-request-id-0002")
    w.set_u8("fleet", "cred_slot", 1)
    ops.clear()
    w.set_u8("fleet", "cred_slot", 1)
    assert ops == []
    # A key may change type; the old item still goes.
    w.set_u16("fleet", "pend_req", 7)
    assert parse_nvs(bytes(image), strict=True)["fleet"] == {"pend_req": 7, "cred_slot": 1}


def _cut_at(kind_wanted):
    def hook(kind, addr, n):
        if kind == kind_wanted:
            raise PowerCut

    return hook


def test_power_cut_after_the_new_entry_before_the_old_is_erased():
    image = _blank()
    w = NvsWriter(image)
    w.set_u8("fleet", "cred_slot", 1)
    w.set_str("fleet", "a_key", "old key")
    w.hook = _cut_at("mark-erased")
    with pytest.raises(PowerCut):
        w.set_str("fleet", "a_key", "new key")
    # A writer that lost power is never used again; the next boot opens the partition anew.
    with pytest.raises(PowerCut):  # ESP-IDF's init repairs (erases the older copy): a write too
        NvsWriter(bytearray(image), hook=_cut_at("mark-erased"))
    # Both copies are on flash, marked written ...
    assert [k for _, _, k, _ in _written(image)].count("a_key") == 2
    # ... and a reader takes the newer one (the later entry; on another page, the higher sequence).
    assert parse_nvs(bytes(image), strict=True)["fleet"] == {"cred_slot": 1, "a_key": "new key"}
    w = NvsWriter(image)
    assert [k for _, _, k, _ in _written(image)].count("a_key") == 1
    w.hook = _cut_at("mark-erased")
    with pytest.raises(PowerCut):
        w.set_u8("fleet", "cred_slot", 2)
    assert parse_nvs(bytes(image), strict=True)["fleet"] == {"cred_slot": 2, "a_key": "new key"}
    w = NvsWriter(image)
    keys = [k for _, _, k, _ in _written(image)]
    assert keys.count("cred_slot") == 1 and keys.count("a_key") == 1
    assert w.namespaces()["fleet"] == {"cred_slot": 2, "a_key": "new key"}


def test_power_cut_before_the_new_entry_is_marked_keeps_the_old():
    image = _blank()
    w = NvsWriter(image)
    w.set_str("fleet", "a_key", "old key " * 10)
    w.hook = _cut_at("mark-written")  # header programmed, its bitmap state not yet
    with pytest.raises(PowerCut):
        w.set_str("fleet", "a_key", "new key " * 10)
    assert parse_nvs(bytes(image), strict=True)["fleet"] == {"a_key": "old key " * 10}
    w = NvsWriter(image)  # the half-written entry is marked erased; the next write goes after it
    w.set_str("fleet", "a_key", "third " * 10)
    assert NvsWriter(image).namespaces()["fleet"] == {"a_key": "third " * 10}


def test_power_cut_across_pages_newer_page_wins():
    image = _blank()
    w = NvsWriter(image)
    w.set_str("fleet", "ca_cert", "old bundle")
    w.set_str("fleet", "fill", "x" * 3600)  # the next string no longer fits on page 0
    w.hook = _cut_at("mark-erased")
    with pytest.raises(PowerCut):
        w.set_str("fleet", "ca_cert", "new bundle " * 40)
    pages = {p for p, _, k, _ in _written(image) if k == "ca_cert"}
    assert pages == {0, 1}
    assert _page_states(image)[:2] == [(PAGE_FULL, 0), (PAGE_ACTIVE, 1)]
    assert parse_nvs(bytes(image))["fleet"]["ca_cert"] == "new bundle " * 40
    assert NvsWriter(image).namespaces()["fleet"]["ca_cert"] == "new bundle " * 40
    assert [p for p, _, k, _ in _written(image) if k == "ca_cert"] == [1]


def _ops_of(action, image):
    ops = []
    w = NvsWriter(image)
    w.hook = lambda kind, addr, n: ops.append(kind)
    action(w)
    return ops


@pytest.mark.parametrize("scenario", ["same page", "rollover", "garbage collection"])
def test_a_power_cut_at_any_flash_operation_leaves_old_or_new(scenario):
    """Cut the power before each single flash operation of an overwrite in turn: the value read
    back (by parse_nvs, and after ESP-IDF's repairs on reopen) is always the old or the new one, the
    other keys are untouched, and the partition stays writable."""
    base = _blank(4)
    w = NvsWriter(base)
    others = {"base_fp": "f" * 64, "cred_slot": 1}
    w.set_str("fleet", "base_fp", others["base_fp"])
    w.set_u8("fleet", "cred_slot", 1)
    old, new = "A" * 700, "B" * 1100
    w.set_str("fleet", "a_cert", old)
    if scenario == "rollover":
        w.set_str("fleet", "fill", "x" * 3000)  # page 0 then has no room for the new a_cert
    if scenario == "garbage collection":
        # Page 0 keeps a_cert and the small keys among many erased entries; pages 1 and 2 are
        # nearly full of live data; page 3 is the one free page. The new a_cert fits nowhere: page 0
        # is collected (its live items copied to page 3, then erased) to make room.
        w.set_str("fleet", "fill", "x" * 3000)
        w.set_str("fleet", "fill", "y" * 3000)
        w.set_str("fleet", "fill2", "z" * 3000)
        assert [s for _, s, _, _ in w.pages()] == ["full", "full", "active", "empty"]
    expected_others = {k: v for k, v in w.namespaces()["fleet"].items() if k != "a_cert"}

    def action(w):
        w.set_str("fleet", "a_cert", new)

    ops = _ops_of(action, bytearray(base))
    if scenario == "garbage collection":
        assert "erase-page" in ops and ops.count("page-state") == 2  # FULL, then FREEING
    elif scenario == "rollover":
        assert "page-header" in ops and "erase-page" not in ops
    assert len(ops) > 5
    for n in range(len(ops) + 1):
        image = bytearray(base)
        seen = []

        def hook(kind, addr, length, seen=seen, n=n):
            if len(seen) == n:
                raise PowerCut
            seen.append(kind)

        w = NvsWriter(image, hook=hook)
        with contextlib.suppress(PowerCut):
            action(w)
        read = parse_nvs(bytes(image))["fleet"]
        assert read.get("a_cert") in (old, new), f"cut before op {n} ({ops[n] if n < len(ops) else 'end'})"
        w = NvsWriter(image)  # the next boot
        fleet = w.namespaces()["fleet"]
        assert fleet["a_cert"] == read["a_cert"], f"reopen changed the value (cut before op {n})"
        assert {k: v for k, v in fleet.items() if k != "a_cert"} == expected_others
        assert [k for _, _, k, _ in _written(image)].count("a_cert") == 1
        w.set_str("fleet", "a_cert", "C" * 500)  # still writable: NOR rules held throughout
        assert NvsWriter(image).namespaces()["fleet"]["a_cert"] == "C" * 500


def test_page_rollover_sequence_numbers():
    image = bytearray(build_nvs({"mqtt": {"device_id": ("string", "esp32-sim-01")}}, size=0x4000))
    w = NvsWriter(image)
    values = {f"k{i}": chr(65 + i) * 1000 for i in range(8)}
    for k, v in values.items():
        w.set_str("fleet", k, v)
    states = _page_states(image)
    assert states[0] == (PAGE_FULL, 0) and states[1] == (PAGE_FULL, 1) and states[2] == (PAGE_ACTIVE, 2)
    assert states[3][0] == 0xFFFFFFFF  # ESP-IDF keeps the last free page free
    assert parse_nvs(bytes(image), strict=True) == {"mqtt": {"device_id": "esp32-sim-01"}, "fleet": values}


def test_garbage_collection_keeps_a_free_page_and_every_value():
    image = _blank(3)
    w = NvsWriter(image)
    w.set_str("fleet", "base_fp", "f" * 64)
    for i in range(40):
        w.set_str("fleet", "a_cert", PEM.replace("QUJD", f"Q{i:02d}D", 1))
        w.set_str("fleet", "a_key", f"key {i} " * 30)
        assert any(s == "empty" for _, s, _, _ in w.pages())
    assert w.gc_count > 0
    fleet = NvsWriter(image).namespaces()["fleet"]
    assert fleet == {"base_fp": "f" * 64, "a_cert": PEM.replace("QUJD", "Q39D", 1), "a_key": "key 39 " * 30}


def test_not_enough_space_is_an_error_not_a_corruption():
    image = _blank(3)
    w = NvsWriter(image)
    with pytest.raises(NvsWriteError) as e:
        for i in range(100):
            w.set_str("fleet", f"k{i}", "v" * 1500)
    assert e.value.code == "ESP_ERR_NVS_NOT_ENOUGH_SPACE"
    written = parse_nvs(bytes(image), strict=True)["fleet"]
    assert len(written) >= 2 and all(v == "v" * 1500 for v in written.values())
    with pytest.raises(NvsWriteError, match="VALUE_TOO_LONG"):
        w.set_str("fleet", "big", "x" * 4000)  # 4000 + NUL
    with pytest.raises(NvsWriteError, match="KEY_TOO_LONG"):
        w.set_u8("fleet", "a_key_that_is_too_long", 1)
    with pytest.raises(NvsError):
        w.set_u8("fleet", "small", 256)


def test_erase_namespace_and_erase_key():
    image = bytearray(build_nvs({"mqtt": {"device_id": ("string", "esp32-sim-01")}}))
    w = NvsWriter(image)
    for k in ("a_cert", "a_key", "pend_key"):
        w.set_str("fleet", k, k * 50)
    w.set_u8("fleet", "cred_slot", 1)
    w.set_blob("fleet", "blob", bytes(range(256)) * 20)  # a multi-page blob goes too
    assert w.erase_key("fleet", "pend_key") is True
    assert w.erase_key("fleet", "pend_key") is False
    assert w.erase_key("nowhere", "x") is False
    assert w.erase_namespace("fleet") == 6  # a_cert, a_key, cred_slot, blob index and 2 chunks
    ns = parse_nvs(bytes(image), strict=True)
    assert ns == {"mqtt": {"device_id": "esp32-sim-01"}, "fleet": {}}  # the namespace entry stays
    w.set_str("fleet", "base_fp", "0" * 64)
    assert NvsWriter(image).namespaces()["fleet"] == {"base_fp": "0" * 64}
    assert w.erase_namespace("never-used") == 0


def test_blobs_span_pages_and_alternate_versions():
    image = _blank(5)
    w = NvsWriter(image)
    first, second = bytes(range(256)) * 20, b"\x01\x02" * 3000
    w.set_blob("fleet", "bundle", first)
    assert parse_nvs(bytes(image), strict=True)["fleet"]["bundle"] == first
    w.set_blob("fleet", "bundle", second)
    assert NvsWriter(image).namespaces()["fleet"]["bundle"] == second
    chunks = [(p, k, t) for p, _, k, t in _written(image) if k == "bundle"]
    assert {t for _, _, t in chunks} == {0x42, 0x48} and len({p for p, _, t in chunks if t == 0x42}) == 2


def test_garbage_in_an_empty_page_is_erased_before_use():
    image = _blank(4)
    image[4096 + 100] = 0x00  # header says empty, body is not: ESP-IDF calls the page corrupt
    w = NvsWriter(image)
    assert w.pages()[1] == (1, "corrupt", None, 0)
    for i in range(3):
        w.set_str("fleet", f"k{i}", "z" * 1500)  # two fit on page 0, the third needs page 1
    assert _page_states(image)[1] == (PAGE_ACTIVE, 1)
    # The zero byte fell into k2's header entry: had the page not been erased first, its CRC
    # would not match and the strict reader would raise.
    assert parse_nvs(bytes(image), strict=True)["fleet"] == {f"k{i}": "z" * 1500 for i in range(3)}


def test_nor_writes_never_set_bits():
    """The writer refuses to program a 0 bit back to 1 (that needs a page erase)."""
    image = _blank(2)
    w = NvsWriter(image)
    w.set_u8("fleet", "x", 1)
    image[64 + 32 * 2] = 0x00  # something programmed the next free entry behind the writer's back
    w2 = NvsWriter(image)  # ESP-IDF sees a half-written entry there and marks it erased
    w2.set_u8("fleet", "x", 2)
    assert parse_nvs(bytes(image))["fleet"] == {"x": 2}
    with pytest.raises(NvsError, match="NOR"):
        w2._program("entry", 64 + 32 * 2, b"\xff" * 32)
