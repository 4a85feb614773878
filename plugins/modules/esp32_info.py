#!/usr/bin/python
# Copyright: esp32-mqtt-fleet contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: esp32_info
short_description: Read chip, MAC and flash facts from an ESP32 board in download mode
description:
  - Connects to the ROM bootloader of an Espressif chip through esptool's Python API (C(esptool.cmds)),
    optionally uploads the flasher stub, and returns the chip type, revision, crystal, MAC, flash id and
    flash size.
  - Optionally returns the board's own MD5 of flash regions (O(md5_regions)), so a playbook can check
    that the board still holds an image it recorded without reading the image back.
  - Never writes to the board.
  - Output of esptool is captured through its logger; nothing is printed.
version_added: "0.1.0"
author: esp32-mqtt-fleet contributors (@esp32-mqtt-fleet)
requirements:
  - esptool >= 5.2 in the Python that runs the module (the provisioning station)
attributes:
  check_mode:
    support: full
    description: The module only reads; it behaves the same in check mode.
  diff_mode:
    support: none
    description: Nothing changes, so there is nothing to diff.
extends_documentation_fragment:
  - esp32_fleet.mqtt_fleet.esp32_connection
options:
  timeout:
    default: 60
  md5_regions:
    description:
      - Flash regions whose MD5 the board should compute and return in RV(regions).
    type: list
    elements: dict
    default: []
    suboptions:
      offset:
        description: Start of the region (integer or string such as V(0x9000)).
        type: raw
        required: true
      size:
        description: Length of the region in bytes (integer or string such as V(0x6000)).
        type: raw
        required: true
seealso:
  - module: esp32_fleet.mqtt_fleet.esp32_flash
  - name: esptool scripting API
    description: The supported library interface this module uses.
    link: https://docs.espressif.com/projects/esptool/en/latest/esp32/esptool/scripting.html
"""

EXAMPLES = r"""
- name: Read the board's facts
  esp32_info:
    port: /dev/ttyUSB0
  register: board

- name: Refuse a board whose MAC differs from the inventory
  ansible.builtin.assert:
    that: board.mac == esp32_mac

- name: Check that the board still holds the recorded NVS image
  esp32_info:
    port: socket://127.0.0.1:5555
    md5_regions:
      - offset: 0x9000
        size: 0x6000
  register: nvs_region
"""

RETURN = r"""
chip:
  description: Chip family as esptool names it.
  returned: success
  type: str
  sample: ESP32
description:
  description: Chip model and revision.
  returned: success
  type: str
  sample: ESP32-D0WD-V3 (revision v3.0)
revision:
  description: Chip revision.
  returned: success
  type: str
  sample: v3.0
crystal_mhz:
  description: Crystal frequency in MHz.
  returned: success
  type: int
  sample: 40
features:
  description: Chip features esptool reports.
  returned: success
  type: list
  elements: str
  sample: [Wi-Fi, BT, Dual Core + LP Core, 240MHz]
mac:
  description: Base MAC address, lower case, colon separated.
  returned: success
  type: str
  sample: "24:0a:c4:00:00:01"
flash_id:
  description: JEDEC id of the SPI flash (manufacturer, type, capacity).
  returned: success
  type: str
  sample: "0x1640ef"
flash_size:
  description: Flash size in bytes, or null when esptool cannot decode the flash id.
  returned: success
  type: int
  sample: 4194304
stub:
  description: Whether the flasher stub ran for this session.
  returned: success
  type: bool
  sample: true
esptool_version:
  description: Version of the esptool library used.
  returned: always
  type: str
  sample: 5.6.0
regions:
  description: The board's MD5 of each region of O(md5_regions), in order.
  returned: success
  type: list
  elements: dict
  sample: [{offset: 36864, size: 24576, md5: 0f343b0931126a20f133d67c2b018a3b}]
kind:
  description: On failure, a stable name for what went wrong (for example V(port_missing), V(no_answer)).
  returned: failure
  type: str
  sample: no_answer
log:
  description: The last lines of esptool's output, on failure.
  returned: failure
  type: list
  elements: str
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.esp32_fleet.mqtt_fleet.plugins.module_utils.esp32_errors import Esp32Error
from ansible_collections.esp32_fleet.mqtt_fleet.plugins.module_utils.esp32_esptool import (
    ESPTOOL_VERSION,
    check_esptool,
    connection_argument_spec,
    esptool_call,
)
from ansible_collections.esp32_fleet.mqtt_fleet.plugins.module_utils.esp32_flashplan import parse_int


def read_board(session, regions):
    session.prepare_transfer()  # honour `stub` and `baud` as documented (facts alone would not need them)
    result = session.info()
    result["regions"] = [
        dict(offset=offset, size=size, md5=session.md5(offset, size)) for offset, size in regions
    ]
    return result


def main():
    argument_spec = connection_argument_spec(timeout=60)
    argument_spec.update(
        md5_regions=dict(
            type="list",
            elements="dict",
            default=[],
            options=dict(offset=dict(type="raw", required=True), size=dict(type="raw", required=True)),
        ),
    )
    module = AnsibleModule(argument_spec=argument_spec, supports_check_mode=True)
    check_esptool(module)
    try:
        regions = [
            (
                parse_int(r["offset"], f"md5_regions[{i}].offset"),
                parse_int(r["size"], f"md5_regions[{i}].size"),
            )
            for i, r in enumerate(module.params["md5_regions"])
        ]
        result = esptool_call(module.params, lambda session: read_board(session, regions))
    except Esp32Error as e:
        module.fail_json(msg=e.msg, kind=e.kind, esptool_version=ESPTOOL_VERSION, **e.details)
    module.exit_json(changed=False, esptool_version=ESPTOOL_VERSION, **result)


if __name__ == "__main__":
    main()
