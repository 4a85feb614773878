# Copyright: esp32-mqtt-fleet contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""esp32_flash logic: load and check images on the controller, compare with the board, write the rest.

Idempotence comes from the board's own MD5 of each target region (SPI_FLASH_MD5: 16 bytes on the
wire, whatever the region size), compared with the MD5 of the image; only differing images are
written. Everything that can be checked without a board (alignment, overlap, readable sources) is
checked before the port is opened.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import itertools
import os

from ansible_collections.esp32_fleet.mqtt_fleet.plugins.module_utils.esp32_errors import Esp32Error
from ansible_collections.esp32_fleet.mqtt_fleet.plugins.module_utils.esp32_esptool import (
    SECTOR_SIZE,
    md5_hex,
    normalize_mac,
)


def parse_int(value, what):
    """Offsets and sizes: int, or a string in any base Python accepts ("0x9000", "36864")."""
    if isinstance(value, bool):
        raise Esp32Error(f"{what} must be an integer, got {value!r}", kind="invalid")
    if isinstance(value, int):
        return value
    text = str(value).strip()
    try:
        return int(text, 0) if not text.isdigit() else int(text, 10)  # "036864" is decimal, not an error
    except ValueError:
        raise Esp32Error(
            f"{what} must be an integer or a hex string, got {value!r}", kind="invalid"
        ) from None


def sector_span(offset, size):
    """The flash range [start, end) that writing `size` bytes at `offset` changes: esptool erases whole
    4 KiB sectors, so the start rounds down and the end rounds up to a sector boundary."""
    start = offset // SECTOR_SIZE * SECTOR_SIZE
    end = -(-(offset + size) // SECTOR_SIZE) * SECTOR_SIZE
    return start, end


def flash_overlaps(regions):
    """Every pair of regions whose sector spans intersect, in offset order.

    `regions` is a list of {name, offset, size} (ints): images to write and regions that must survive
    (the NVS partition). Each overlap is {first, second}, each {name, offset, size, start, end} with
    the sector span [start, end); every pair is checked, so one large image overlapping two others is
    reported twice.
    """
    spans = []
    for region in regions:
        start, end = sector_span(region["offset"], region["size"])
        spans.append(dict(region, start=start, end=end))
    spans.sort(key=lambda r: (r["start"], r["end"]))
    return [
        dict(first=first, second=second)
        for first, second in itertools.combinations(spans, 2)
        if second["start"] < first["end"] and first["start"] < second["end"]
    ]


def describe_overlap(overlap):
    """One line naming both regions and the sectors they share, e.g. for a failure message."""

    def where(r):
        sectors = f"sectors {r['start']:#x}-{r['end'] - 1:#x}"
        return f"{r['name']} ({r['size']:#x} bytes at {r['offset']:#x}, {sectors})"

    first, second = overlap["first"], overlap["second"]
    shared = f"{max(first['start'], second['start']):#x}-{min(first['end'], second['end']) - 1:#x}"
    return f"{where(first)} overlaps {where(second)}: both cover {shared}"


class Image:
    """One image to place on the board: bytes, offset and the region it must occupy."""

    def __init__(self, offset, data, source, region_size):
        self.offset = offset
        self.data = data
        self.source = source
        self.region_size = region_size

    @property
    def payload(self):
        """What the region must hold: the image, padded with erased flash (0xFF) to the region size."""
        return self.data + b"\xff" * (self.region_size - len(self.data))

    def report(self, status):
        return dict(
            offset=self.offset,
            size=len(self.data),
            region_size=self.region_size,
            source=self.source,
            sha256=hashlib.sha256(self.data).hexdigest(),
            md5=md5_hex(self.data),
            status=status,
            wire_bytes=0,
            seconds=0.0,
        )


def load_images(specs, erase):
    """Read and validate `images` (list of {offset, path|content_b64, size}); return [Image]."""
    if not specs:
        raise Esp32Error("images must list at least one image", kind="invalid")
    images = []
    for index, spec in enumerate(specs):
        label = f"images[{index}]"
        offset = parse_int(spec.get("offset"), f"{label}.offset")
        if offset < 0 or offset % SECTOR_SIZE:
            raise Esp32Error(
                f"{label}.offset {offset:#x} is not aligned to the {SECTOR_SIZE:#x}-byte flash sector: "
                "writing there would erase the bytes before it in the same sector",
                kind="offset_unaligned",
            )
        if spec.get("path"):
            path = spec["path"]
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except OSError as e:
                raise Esp32Error(f"{label}.path {path}: {e.strerror}", kind="image_source") from None
            source = os.path.basename(path)
        else:
            try:
                data = base64.b64decode(spec.get("content_b64") or "", validate=True)
            except (binascii.Error, ValueError):
                raise Esp32Error(f"{label}.content_b64 is not valid base64", kind="image_source") from None
            source = "content_b64"
        if not data:
            raise Esp32Error(f"{label} ({source}) is empty", kind="image_source")
        # esptool pads images with 0xFF to 4 bytes: the compared region is what ends up on flash.
        region = -(-len(data) // 4) * 4
        partition = None
        if spec.get("size") is not None:
            partition = parse_int(spec["size"], f"{label}.size")
            if partition % SECTOR_SIZE or partition <= 0:
                raise Esp32Error(
                    f"{label}.size {partition:#x} is not a positive multiple of {SECTOR_SIZE:#x}",
                    kind="invalid",
                )
            if len(data) > partition:
                raise Esp32Error(
                    f"{label} ({source}) is {len(data):#x} bytes, larger than its {partition:#x}-byte region",
                    kind="image_too_large",
                )
        if erase == "regions":
            region = partition or -(-len(data) // SECTOR_SIZE) * SECTOR_SIZE
        images.append(Image(offset, data, source, region))
    overlaps = flash_overlaps([dict(name=i.source, offset=i.offset, size=i.region_size) for i in images])
    if overlaps:
        raise Esp32Error(
            "images overlap, writing one erases sectors of the other: "
            + "; ".join(describe_overlap(o) for o in overlaps),
            kind="overlap",
        )
    return images


def check_board(board, expected_mac, images):
    """Refuse the wrong board, and images that do not fit its flash, before anything is written."""
    if expected_mac and normalize_mac(expected_mac) != board["mac"]:
        raise Esp32Error(
            f"refusing to flash: the board on this port has MAC {board['mac']}, expected "
            f"{normalize_mac(expected_mac)} (wrong board on this port?)",
            kind="mac_mismatch",
            mac=board["mac"],
        )
    flash_size = board.get("flash_size")
    if flash_size:
        for image in images:
            if image.offset + image.region_size > flash_size:
                raise Esp32Error(
                    f"image {image.source} ({image.region_size} bytes at {image.offset:#x}) ends at "
                    f"{image.offset + image.region_size:#x}, past the end of the {flash_size:#x}-byte flash",
                    kind="image_too_large",
                )


def flash_images(session, params, images, check_mode, reports):
    """Compare, then (unless check mode) write what differs. Fills `reports` as it goes, so a
    failure part way still tells which images were written."""
    board = session.info()
    check_board(board, params.get("expected_mac"), images)
    erase_all = params["erase"] == "all"
    pending = []
    diff_before, diff_after = [], []
    for image in images:
        board_md5 = None if erase_all else session.md5(image.offset, image.region_size)
        wanted = md5_hex(image.payload)
        differs = erase_all or board_md5 != wanted
        report = image.report("would_write" if differs else "skipped")
        reports.append(report)
        if differs:
            pending.append((image, report))
            where = f"{image.offset:#08x}+{image.region_size:#x}"
            diff_before.append(f"{where} md5={board_md5 or 'erased (erase=all)'}\n")
            diff_after.append(f"{where} md5={wanted} ({image.source})\n")
    changed = bool(pending)
    if changed and not check_mode:
        session.prepare_transfer()  # stub and working baud only now: comparing needed neither
        if erase_all:
            session.erase_all()
        for image, report in pending:
            report["status"] = "failed"  # until write() returns: a failure must never read as written
            report.update(session.write(image.offset, image.payload, params["compress"]))
            report["status"] = "written"
        if params["verify"]:
            for image, report in zip(images, reports, strict=True):
                board_md5 = session.md5(image.offset, image.region_size)
                if board_md5 != md5_hex(image.payload):
                    report["status"] = "verify_failed"
                    raise Esp32Error(
                        f"verification failed: the region at {image.offset:#x} ({image.source}) holds md5 "
                        f"{board_md5}, expected {md5_hex(image.payload)}",
                        kind="verify_failed",
                    )
    return dict(
        changed=changed,
        mac=board["mac"],
        chip=board["chip"],
        description=board["description"],
        flash_size=board["flash_size"],
        diff=dict(
            before_header=f"board {board['mac']}",
            after_header="images",
            before="".join(diff_before),
            after="".join(diff_after),
        ),
    )
