# Copyright: esp32-mqtt-fleet contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""What one board needs, decided in Python (the esp32_provision_board action; unit tests in
tests/modules/test_esp32_provision_plan.py). No I/O: the action reads the files and the board.

With esp32_provision_keep_device_keys false the key is gone after a verified flash, so the NVS image
cannot be rebuilt to compare. The last successful manifest row is the reference instead: the board
must still report the recorded NVS MD5 and MAC, the settings fingerprint must be the same, and the
recorded certificate must still be the one on the controller and outside the renewal window.
"""

from __future__ import annotations

import datetime

NO_RECORD = "no successful run recorded"
# Where ESP-IDF's bootloader and the first app slot are (docs/device-protocol.md section 1).
BOOTLOADER = 0x1000
OTA_0 = 0x10000


def _not_after_text(not_after):
    return not_after.strftime("%Y%m%d%H%M%SZ")


def credential_reasons(previous, config_matches, recorded_cert, renew_days, now, board=None):
    """Why the board needs new credentials (empty: it holds the recorded ones).

    previous: the board's last successful manifest row ({} when none). recorded_cert: {serial_number
    (int), not_after (aware datetime)} of the controller's certificate for the board, or None.
    board: {mac, nvs_md5} as the board reports them, or None when the board was not read (the board's
    part is then left out: the caller writes a new image anyway, or reads the board first).
    """
    if not previous:
        return [NO_RECORD]
    reasons = []
    if board is not None:
        if str(previous.get("mac", "")).lower() != str(board["mac"]).lower():
            reasons.append("another board on this port")
        if board["nvs_md5"] != previous.get("nvs_md5"):
            reasons.append("NVS partition differs from the recorded image")
    if not config_matches:
        reasons.append("settings changed")
    if recorded_cert is None:
        reasons.append("recorded certificate not found on the controller")
    elif str(recorded_cert["serial_number"]) != str(previous.get("cert_serial", "")):
        reasons.append("certificate on the controller replaced")
    elif recorded_cert["not_after"] < now + datetime.timedelta(days=int(renew_days)):
        reasons.append(f"certificate renewed (expires {_not_after_text(recorded_cert['not_after'])})")
    return reasons


def firmware_reasons(firmware, board_md5s):
    """The firmware images whose region on the board differs (board_md5s: one per image, in order)."""
    return [
        f"firmware {image['name']} differs"
        for image, md5 in zip(firmware, board_md5s, strict=True)
        if md5 != image["md5"]
    ]


def revocation(previous, new_serial, device_id, revoke_replaced):
    """The certificate the board held before, to revoke once the new one is on the board, or None."""
    old = str(previous.get("cert_serial", "") or "")
    if not revoke_replaced or not old or old == str(new_serial):
        return None
    return {"serial_number": old, "device_id": device_id}


def recorded_credentials(previous):
    """The credential fields of a row, copied from the previous row (firmware update, unchanged)."""
    return {
        key: previous.get(key, "")
        for key in ("cert_serial", "cert_sha256", "cert_not_after", "nvs_sha256", "nvs_md5")
    }


def firmware_row(firmware):
    """The manifest's firmware field: offset in hex, name, checksums and size of each image."""
    return [
        {
            "offset": f"{image['offset']:#x}",
            "name": image["name"],
            "sha256": image["sha256"],
            "md5": image["md5"],
            "size": image["size"],
        }
        for image in firmware
    ]


def ota_layout(offsets, previous, wanted, migrate):
    """How the station lays out the board's flash: (layout, write_otadata, notes).

    offsets: the offsets of the board's firmware images. The two-OTA partition table goes down
    together with a bootloader (0x1000) and an app in ota_0 (0x10000), the one moment (USB) the
    bootloader that makes OTA and rollback possible can be written. A new board gets table, the
    erased otadata (boot ota_0), bootloader and app; a board recorded with that layout keeps its
    otadata (the bootloader and OTA own it from then on). A board provisioned before this layout
    existed is reported and left as it is, unless migrate says to lay the table down.
    """
    if not wanted or BOOTLOADER not in offsets or OTA_0 not in offsets:
        return str(previous.get("layout", "") or ""), False, []
    if not previous:
        return "ota", True, []
    if previous.get("layout") == "ota":
        return "ota", False, []
    if migrate:
        return "ota", True, ["migrated to the two-OTA layout (partition table, erased otadata)"]
    return (
        "legacy",
        False,
        [
            "provisioned before the two-OTA layout: its partition table was not written (set "
            "esp32_ota_migrate: true on the board to lay it down; OTA needs it)"
        ],
    )


def field_managed(previous):
    """True when the board's app came over the air: the station leaves its app slots alone then."""
    return str(previous.get("firmware_source", "") or "") == "ota"
