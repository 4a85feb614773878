#!/usr/bin/python
# Copyright: esp32-mqtt-fleet contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: esp32_flash
short_description: Write images to an ESP32's flash, only where the board differs
description:
  - Writes one or more images to the SPI flash of an Espressif chip through esptool's Python API
    (C(esptool.cmds.write_flash)).
  - Idempotent. Before writing, the board computes the MD5 of each target region itself (16 bytes on the
    wire) and the module compares it with the image; only images that differ are written, and the task
    reports V(changed=false) when the board already holds them all.
  - Refuses (fails) before writing anything when O(expected_mac) does not match the board, when an
    offset is not sector-aligned, when images overlap, or when an image ends beyond the flash.
  - A failure part way reports which images were written; it is never reported as ok.
  - Output of esptool is captured through its logger; nothing is printed.
version_added: "0.1.0"
author: esp32-mqtt-fleet contributors (@esp32-mqtt-fleet)
requirements:
  - esptool >= 5.2 in the Python that runs the module (the provisioning station)
attributes:
  check_mode:
    support: full
    description: Connects, reads the MD5 of each region and reports what would be written; writes nothing.
  diff_mode:
    support: full
    description: Lists the regions that differ (offset, size, MD5 on board and of image), not the bytes.
extends_documentation_fragment:
  - esp32_fleet.mqtt_fleet.esp32_connection
options:
  stub:
    description:
      - Upload and run the flasher stub for writing (much faster); V(false) writes through the ROM
        bootloader.
      - The stub is uploaded (and O(baud) set) only when something must be written; the comparison
        uses the ROM's own MD5 command, so an unchanged board costs no stub upload.
      - O(erase=all) needs the stub.
  timeout:
    default: 600
  images:
    description:
      - Images to place on the board. Each has an O(images[].offset) and exactly one of
        O(images[].path) (a file on the station) or O(images[].content_b64).
    type: list
    elements: dict
    required: true
    suboptions:
      offset:
        description: Flash offset, a multiple of 0x1000 (integer or string such as V(0x9000)).
        type: raw
        required: true
      path:
        description: Image file on the host that runs the module.
        type: path
      content_b64:
        description: Image content, base64 encoded.
        type: str
      size:
        description:
          - Size of the flash region (partition) that holds the image, a multiple of 0x1000 (integer or
            string such as V(0x6000)). An image larger than its region fails the task before connecting.
          - With O(erase=regions) the whole region is compared and written; it defaults to the image size
            rounded up to a sector.
        type: raw
  erase:
    description:
      - V(none) compares and writes each image's own bytes (esptool erases the sectors it writes).
      - V(regions) makes each image's whole region (O(images[].size)) hold the image followed by erased
        flash (0xFF), so no stale data from a longer old image survives after it (for example old NVS
        pages); still idempotent, the comparison covers the whole region.
      - V(all) erases the entire flash first. This is never idempotent (every run erases and writes).
    type: str
    default: none
    choices: [none, regions, all]
  expected_mac:
    description:
      - MAC the board must have (any of V(aa:bb:cc:dd:ee:ff), V(aa-bb-...), V(aabbcc...)). The task
        fails before writing anything when the board's MAC differs, so the wrong board is never flashed.
    type: str
  verify:
    description:
      - After writing, have the board compute the MD5 of every image region again and fail on a mismatch.
      - esptool already checks each write's MD5; this second pass also catches a region changed by a
        later write in the same run.
    type: bool
    default: true
  compress:
    description: Send images deflate-compressed (esptool's default); V(false) sends them raw.
    type: bool
    default: true
notes:
  - The idempotence check reads only MD5s, so an unchanged board costs one connection plus a few
    milliseconds per image.
seealso:
  - module: esp32_fleet.mqtt_fleet.esp32_info
  - module: esp32_fleet.mqtt_fleet.esp32_nvs
"""

EXAMPLES = r"""
- name: Flash firmware and the device's NVS partition
  esp32_flash:
    port: /dev/ttyUSB0
    expected_mac: "24:0a:c4:00:00:01"
    images:
      - offset: 0x10000
        path: files/firmware/app.bin
      - offset: 0x9000
        path: "{{ fleet_root }}/nvs/esp32-sim-01.bin"
  register: flashed

- name: Make the NVS partition hold exactly the new image (no stale pages after it)
  esp32_flash:
    port: socket://127.0.0.1:5555
    erase: regions
    images:
      - offset: "0x9000"
        size: "0x6000"
        content_b64: "{{ nvs_image_b64 }}"
"""

RETURN = r"""
images:
  description: One entry per image, in the order given.
  returned: always
  type: list
  elements: dict
  contains:
    offset:
      description: Flash offset.
      type: int
    size:
      description: Image size in bytes.
      type: int
    region_size:
      description: Bytes of flash compared and written (the image padded to 4 bytes, or its region with
        O(erase=regions)).
      type: int
    source:
      description: File name of the image, or V(content_b64).
      type: str
    sha256:
      description: SHA-256 of the image.
      type: str
    md5:
      description: MD5 of the image.
      type: str
    status:
      description: V(written), V(skipped) (board already holds it), V(would_write) (check mode), or on
        failure V(failed) / V(verify_failed).
      type: str
    wire_bytes:
      description: Bytes sent to the board for this image (after compression); 0 when not written.
      type: int
    seconds:
      description: Time spent writing this image; 0 when not written.
      type: float
  sample:
    - offset: 36864
      size: 24576
      region_size: 24576
      source: nvs.bin
      sha256: 9f2c7e0d9b1e0f6b0d1b8f7a6a0a52a9e2f3b8c2f6c3e1d0a9b8c7d6e5f4a3b2
      md5: 0f343b0931126a20f133d67c2b018a3b
      status: written
      wire_bytes: 3911
      seconds: 0.41
mac:
  description: MAC of the board, lower case, colon separated.
  returned: when the board answered
  type: str
  sample: "24:0a:c4:00:00:01"
chip:
  description: Chip family as esptool names it.
  returned: when the board answered
  type: str
  sample: ESP32
description:
  description: The chip as esptool describes it (model and revision).
  returned: when the board answered
  type: str
  sample: ESP32-D0WD-V3 (revision v3.1)
flash_size:
  description: Flash size in bytes, or null when esptool cannot decode the flash id.
  returned: when the board answered
  type: int
  sample: 4194304
esptool_version:
  description: Version of the esptool library used.
  returned: always
  type: str
  sample: 5.6.0
diff:
  description: With C(--diff), the differing regions (offset+size and MD5), never their bytes.
  returned: when diff mode is on and the board answered
  type: dict
kind:
  description: On failure, a stable name for what went wrong (for example V(mac_mismatch), V(no_answer),
    V(connection_lost), V(verify_failed)).
  returned: failure
  type: str
  sample: mac_mismatch
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
    normalize_mac,
)
from ansible_collections.esp32_fleet.mqtt_fleet.plugins.module_utils.esp32_flashplan import (
    flash_images,
    load_images,
)


def main():
    argument_spec = connection_argument_spec(timeout=600)
    argument_spec.update(
        images=dict(
            type="list",
            elements="dict",
            required=True,
            options=dict(
                offset=dict(type="raw", required=True),
                path=dict(type="path"),
                content_b64=dict(type="str", no_log=True),  # an NVS image holds the private key
                size=dict(type="raw"),
            ),
            mutually_exclusive=[("path", "content_b64")],
            required_one_of=[("path", "content_b64")],
        ),
        erase=dict(type="str", default="none", choices=["none", "regions", "all"]),
        expected_mac=dict(type="str"),
        verify=dict(type="bool", default=True),
        compress=dict(type="bool", default=True),
    )
    module = AnsibleModule(argument_spec=argument_spec, supports_check_mode=True)
    check_esptool(module)
    reports = []
    try:
        images = load_images(module.params["images"], module.params["erase"])
        if module.params["erase"] == "all" and not module.params["stub"]:
            raise Esp32Error("erase=all needs the flasher stub (stub: true)", kind="invalid")
        if module.params["expected_mac"]:
            normalize_mac(module.params["expected_mac"])  # a typo fails here, before the port is opened
        result = esptool_call(
            module.params,
            lambda session: flash_images(session, module.params, images, module.check_mode, reports),
        )
    except Esp32Error as e:
        # A write that failed part way changed the board only if some image completed.
        written = any(r["status"] == "written" for r in reports)
        module.fail_json(
            msg=e.msg,
            kind=e.kind,
            changed=written,
            images=reports,
            esptool_version=ESPTOOL_VERSION,
            **e.details,
        )
    diff = result.pop("diff")
    if module._diff:
        result["diff"] = diff
    module.exit_json(images=reports, esptool_version=ESPTOOL_VERSION, **result)


if __name__ == "__main__":
    main()
