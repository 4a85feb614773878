#!/usr/bin/python
# Copyright: esp32-mqtt-fleet contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: esp32_nvs
short_description: Build an ESP-IDF NVS partition image from a structured dict
description:
  - Builds an NVS (non-volatile storage) partition image with the Python API of Espressif's
    esp-idf-nvs-partition-gen and writes it to O(dest), atomically and only when its content changes
    (the generator's output is deterministic, so the SHA-256 decides).
  - Validates before building and names the offending key - key and namespace names of at most 15
    bytes, strings of at most 4000 bytes including the NUL, integers within their type, everything
    fitting in O(size) - where the upstream tool fails obscurely.
  - The image holds secrets (client key, Wi-Fi password). O(namespaces) is C(no_log), and every string
    value is masked in the output whatever its length (numbers, booleans and file paths are not), and
    only the image's SHA-256, MD5, size and key names are returned. A short string value made only of
    hex digits may therefore mask part of a returned digest; the image is not affected.
version_added: "0.1.0"
author: esp32-mqtt-fleet contributors (@esp32-mqtt-fleet)
requirements:
  - esp-idf-nvs-partition-gen >= 0.3 in the Python that runs the module
attributes:
  check_mode:
    support: full
    description: Builds the image in memory and reports whether O(dest) would change; writes nothing.
  diff_mode:
    support: full
    description: Shows the SHA-256 and size before and after, never the content.
options:
  dest:
    description: Path of the image file to write.
    type: path
    required: true
  namespaces:
    description:
      - Dict of namespace name to a dict of key to value, written in the order given.
      - A string becomes an NVS string; an integer an V(i32); a boolean a V(u8).
      - "A dict gives the type explicitly: C({type: u8|i8|u16|i16|u32|i32|u64|i64, value: N}),
        C({value: STR}) (string), C({file: PATH}) (the file's text as a string) or
        C({file: PATH, type: blob}) (its bytes as a blob). Relative paths resolve against the
        module's working directory; give absolute paths."
      - Never logged (it holds the device's private key and the Wi-Fi password).
    type: dict
    required: true
  size:
    description: Partition size in bytes (integer or string such as V(0x6000)); a multiple of 4096, >= 0x3000.
    type: raw
    default: "0x6000"
  version:
    description: NVS format version. V(2) (ESP-IDF 4.x and later) allows multi-page blobs.
    type: int
    default: 2
    choices: [1, 2]
  mode:
    description: File mode of O(dest); the default keeps the private key readable by the owner only.
    type: raw
    default: "0600"
seealso:
  - module: esp32_fleet.mqtt_fleet.esp32_flash
  - name: NVS partition generator
    description: The upstream tool whose Python API builds the image.
    link: https://docs.espressif.com/projects/esp-idf/en/stable/esp32/api-reference/storage/nvs_partition_gen.html
"""

EXAMPLES = r"""
- name: Build the device's credentials partition
  esp32_nvs:
    dest: "{{ fleet_root }}/nvs/{{ inventory_hostname }}.bin"
    size: 0x6000
    namespaces:
      mqtt:
        broker_uri: "mqtts://broker.example.net:8883"
        device_id: "{{ inventory_hostname }}"
        topic_root: "fleet/{{ inventory_hostname }}"
        ca_cert: {file: "{{ pki_dir }}/ca/ca.crt"}
        client_cert: {file: "{{ pki_dir }}/devices/{{ inventory_hostname }}.crt"}
        client_key: {file: "{{ pki_dir }}/devices/{{ inventory_hostname }}.key"}
      wifi:
        ssid: lab
        password: "{{ vault_wifi_password }}"
      app:
        interval_s: {type: u16, value: 30}
  register: nvs
"""

RETURN = r"""
dest:
  description: Path of the image.
  returned: always
  type: str
sha256:
  description: SHA-256 of the image.
  returned: success
  type: str
  sample: 5f1c0b0e4f0d5e7a8e3f1d2c4b6a8e0f1d3c5b7a9e1f3d5c7b9a1e3f5d7c9b1a
md5:
  description: MD5 of the image (what the board's SPI_FLASH_MD5 returns for the partition once flashed).
  returned: success
  type: str
  sample: 0f343b0931126a20f133d67c2b018a3b
size:
  description: Image size in bytes (the partition size).
  returned: success
  type: int
  sample: 24576
keys:
  description: The C(namespace.key) names written (names only, never values).
  returned: success
  type: list
  elements: str
  sample: [mqtt.broker_uri, mqtt.device_id, wifi.ssid]
"""

import hashlib
import os
import tempfile

from ansible.module_utils.basic import AnsibleModule, missing_required_lib
from ansible_collections.esp32_fleet.mqtt_fleet.plugins.module_utils.esp32_errors import Esp32Error
from ansible_collections.esp32_fleet.mqtt_fleet.plugins.module_utils.esp32_esptool import md5_hex
from ansible_collections.esp32_fleet.mqtt_fleet.plugins.module_utils.esp32_nvsbuild import (
    HAS_NVSGEN,
    NVSGEN_IMPORT_ERROR,
    NVSGEN_REQUIREMENT,
    build,
    parse_size,
    secret_strings,
)


def sha256_file(path):
    if not os.path.exists(path):
        return None
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def main():
    module = AnsibleModule(
        argument_spec=dict(
            dest=dict(type="path", required=True),
            namespaces=dict(type="dict", required=True, no_log=True),
            size=dict(type="raw", default="0x6000"),
            version=dict(type="int", default=2, choices=[1, 2]),
            mode=dict(type="raw", default="0600"),
        ),
        supports_check_mode=True,
    )
    # no_log on `namespaces` makes Ansible mask every value of it wherever it appears in the result,
    # numbers and type names too ("30" occurs in most sha256 digests). Mask exactly the string values,
    # whatever their length: those are the secrets. The result never contains values anyway.
    module.no_log_values = secret_strings(module.params["namespaces"])
    if not HAS_NVSGEN:
        module.fail_json(msg=missing_required_lib(NVSGEN_REQUIREMENT), exception=NVSGEN_IMPORT_ERROR)
    dest = module.params["dest"]
    try:
        size = parse_size(module.params["size"])
        image = build(module.params["namespaces"], size, module.params["version"])
    except Esp32Error as e:
        module.fail_json(msg=e.msg, kind=e.kind, dest=dest)
    keys = [f"{ns}.{key}" for ns, entries in module.params["namespaces"].items() for key in entries]
    wanted = hashlib.sha256(image).hexdigest()
    current = sha256_file(dest)
    changed = current != wanted
    if changed and not module.check_mode:
        directory = os.path.dirname(os.path.abspath(dest))
        if not os.path.isdir(directory):
            module.fail_json(msg=f"directory {directory} of dest does not exist", dest=dest)
        # mkstemp creates the file 0600 and it gets its final mode before it is renamed into place:
        # the private key is never readable by others, not even for a moment (atomic_move would
        # create a new dest with the umask's mode first).
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".esp32_nvs.")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(image)
                f.flush()
                os.fsync(f.fileno())
            module.set_mode_if_different(tmp, module.params["mode"], False)
            os.replace(tmp, dest)
        except OSError as e:
            os.unlink(tmp) if os.path.exists(tmp) else None
            module.fail_json(msg=f"cannot write {dest}: {e}", dest=dest)
    if os.path.exists(dest):  # in check mode this only reports a mode that would change
        file_args = module.load_file_common_arguments(dict(path=dest, mode=module.params["mode"]))
        changed = module.set_fs_attributes_if_different(file_args, changed)
    result = dict(changed=changed, dest=dest, sha256=wanted, md5=md5_hex(image), size=len(image), keys=keys)
    if module._diff:
        result["diff"] = dict(
            before=f"sha256: {current}\n" if current else "",
            after=f"sha256: {wanted}\nsize: {len(image)}\n",
            before_header=dest,
            after_header=dest,
        )
    module.exit_json(**result)


if __name__ == "__main__":
    main()
