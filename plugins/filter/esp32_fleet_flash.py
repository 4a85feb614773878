# Copyright: esp32-mqtt-fleet contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""What a board's flash receives, decided once for the esp32_provision role's checks and its writes.

esp32_fleet_firmware_images: the board's firmware list (explicit images win; otherwise the
<offset>_<name>.bin files of the firmware directory).
esp32_fleet_flash_overlaps: every overlap between those images and the NVS partition, by whole 4 KiB
sectors (what esptool erases), through the same function the esp32_flash module refuses overlaps with
(plugins/module_utils/esp32_flashplan.py).

Filters run on the control node, so image paths are controller paths (as the role's stat and copy
tasks already require of the controller).
"""

from __future__ import annotations

import os
import re

from ansible.errors import AnsibleFilterError
from ansible_collections.esp32_fleet.mqtt_fleet.plugins.module_utils.esp32_errors import Esp32Error
from ansible_collections.esp32_fleet.mqtt_fleet.plugins.module_utils.esp32_flashplan import (
    describe_overlap,
    flash_overlaps,
    parse_int,
)

# 0x10000_app.bin: the offset, an underscore, a name.
_DIR_IMAGE = re.compile(r"^(0x[0-9A-Fa-f]+)_.+\.bin$")


def esp32_fleet_firmware_images(explicit, found=()):
    """Return the board's firmware images as [{offset, path}].

    explicit is the board's esp32_firmware_images (or the fleet's esp32_provision_firmware_images):
    when non-empty it is the list, unchanged. Otherwise found, the files of the firmware directory
    (ansible.builtin.find results or paths), each at the offset its <offset>_<name>.bin name gives,
    in path order.
    """
    if explicit:
        return list(explicit)
    out = []
    for entry in found or []:
        path = entry["path"] if isinstance(entry, dict) else entry
        match = _DIR_IMAGE.match(os.path.basename(path))
        if not match:
            raise AnsibleFilterError(f"{path}: a firmware directory image must be named <offset>_<name>.bin")
        out.append({"offset": match.group(1), "path": path})
    return sorted(out, key=lambda image: image["path"])


def esp32_fleet_flash_overlaps(images, nvs_offset, nvs_size):
    """Return one message per overlap among the images and the NVS partition (empty: none).

    images is [{offset, path}] on the control node; each image's size is its file's size.
    """
    try:
        regions = [
            {
                "name": "the NVS partition",
                "offset": parse_int(nvs_offset, "NVS offset"),
                "size": parse_int(nvs_size, "NVS size"),
            }
        ]
        for image in images:
            path = image["path"]
            try:
                size = os.path.getsize(path)
            except OSError as exc:
                raise AnsibleFilterError(f"firmware image {path}: {exc.strerror}") from exc
            regions.append(
                {"name": path, "offset": parse_int(image["offset"], f"{path} offset"), "size": size}
            )
    except Esp32Error as exc:
        raise AnsibleFilterError(str(exc)) from exc
    return [describe_overlap(overlap) for overlap in flash_overlaps(regions)]


class FilterModule:
    """Flash layout of a board (see the module docstring)."""

    def filters(self):
        return {
            "esp32_fleet_firmware_images": esp32_fleet_firmware_images,
            "esp32_fleet_flash_overlaps": esp32_fleet_flash_overlaps,
        }
