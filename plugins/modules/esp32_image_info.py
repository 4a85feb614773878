#!/usr/bin/python
# Copyright: esp32-mqtt-fleet contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Check an ESP32 app image before it goes anywhere near a board (logic: module_utils/esp32_image.py)."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: esp32_image_info
short_description: Check an ESP32 app image and read its app description
description:
  - Reads an ESP-IDF application image (the C(build/<project>.bin) that C(idf.py build) writes, or
    what C(esptool elf2image) makes) and checks it as ESP-IDF's C(esp_image_verify) does (header magic
    C(0xE9), segment count and bounds, the XOR checksum, and the appended SHA-256 when the header says
    it is there).
  - Returns the chip the image was built for (the extended header's chip id), the project name and
    version of its C(esp_app_desc_t), and the SHA-256 and size of the file, which an over-the-air job
    gives the board to check the download against.
  - With O(chip) or O(project), an image built for another chip or another project fails the task
    before anything is published (a board would refuse it too, after downloading it).
  - Runs where the image is (normally the controller); never changes anything.
version_added: "0.6.0"
author: esp32-mqtt-fleet contributors (@esp32-mqtt-fleet)
options:
  path:
    description: The app image file.
    type: path
    required: true
  chip:
    description: Fail unless the image is built for this chip (e.g. C(esp32)). Empty accepts any.
    type: str
    default: ""
  project:
    description: Fail unless the image's project name (C(esp_app_desc_t.project_name)) is this one.
      Empty accepts any.
    type: str
    default: ""
  require_hash:
    description: Fail when the image carries no appended SHA-256 (ESP-IDF appends one by default,
      C(CONFIG_APP_NO_BLOBS) aside; the bootloader checks it on every boot).
    type: bool
    default: true
attributes:
  check_mode:
    support: full
    description: Read-only; the same in check mode.
  diff_mode:
    support: none
    description: Nothing changes.
seealso:
  - name: ESP-IDF app image format
    description: The image header, segments, checksum and appended hash.
    link: https://docs.espressif.com/projects/esp-idf/en/latest/esp32/api-reference/system/app_image_format.html
"""

EXAMPLES = r"""
- name: Check the image to roll out
  esp32_fleet.mqtt_fleet.esp32_image_info:
    path: build/fleet-sensor.bin
    chip: esp32
    project: fleet-sensor
  register: image

- name: Show what it is
  ansible.builtin.debug:
    msg: "{{ image.project }} {{ image.version }} ({{ image.size }} bytes, sha256 {{ image.sha256 }})"
"""

RETURN = r"""
chip:
  description: The chip the image is built for (from the extended header's chip id).
  returned: success
  type: str
  sample: esp32
project:
  description: The app description's project name.
  returned: success
  type: str
  sample: fleet-sensor
version:
  description: The app description's version (what the board reports once it runs the image).
  returned: success
  type: str
  sample: 1.1.0
idf_ver:
  description: The ESP-IDF version the image was built with.
  returned: success
  type: str
sha256:
  description: SHA-256 of the whole file (lower-case hex).
  returned: success
  type: str
size:
  description: Size of the file in bytes.
  returned: success
  type: int
segments:
  description: Load address and size of each segment.
  returned: success
  type: list
  elements: dict
hash_appended:
  description: Whether the image carries an appended SHA-256 (checked).
  returned: success
  type: bool
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.esp32_fleet.mqtt_fleet.plugins.module_utils.esp32_image import (
    ImageError,
    read_app_image,
)


def problems(facts, chip, project, require_hash):
    """Why the image must not be rolled out (empty: it may)."""
    out = []
    if chip and facts["chip"] != chip:
        out.append(f"the image is built for {facts['chip']}, the fleet is {chip}")
    if project and facts["project"] != project:
        out.append(f"the image is the project {facts['project']!r}, the fleet runs {project!r}")
    if require_hash and not facts["hash_appended"]:
        out.append("the image has no appended SHA-256 (require_hash)")
    return out


def main():
    module = AnsibleModule(
        argument_spec=dict(
            path=dict(type="path", required=True),
            chip=dict(type="str", default=""),
            project=dict(type="str", default=""),
            require_hash=dict(type="bool", default=True),
        ),
        supports_check_mode=True,
    )
    path = module.params["path"]
    try:
        facts = read_app_image(path)
    except ImageError as exc:
        module.fail_json(msg=f"{path} is not a valid ESP32 app image: {exc}")
    refused = problems(facts, module.params["chip"], module.params["project"], module.params["require_hash"])
    if refused:
        module.fail_json(msg=f"{path} refused: " + "; ".join(refused), **facts)
    module.exit_json(changed=False, **facts)


if __name__ == "__main__":
    main()
