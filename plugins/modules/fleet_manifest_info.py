#!/usr/bin/python
# Copyright: esp32-mqtt-fleet contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Read the fleet manifest: the last recorded row of every device."""

DOCUMENTATION = r"""
---
module: fleet_manifest_info
short_description: Read the ESP32 fleet manifest
description:
  - Reads C(<path>/<name>.json) (or the CSV when only that exists) written by
    M(esp32_fleet.mqtt_fleet.fleet_manifest).
  - Returns, per device id, the most recent row and the most recent successful row (result
    C(provisioned) or C(unchanged)); the provisioning role compares the latter with what the board
    reports to decide whether the board still holds its credentials.
version_added: "0.1.0"
author: esp32-mqtt-fleet contributors (@esp32-mqtt-fleet)
options:
  path:
    description: Directory holding the manifest files.
    type: path
    required: true
  name:
    description: Base name of the manifest files.
    type: str
    default: fleet
attributes:
  check_mode:
    description: Can run in check mode and report what it would change without changing it.
    support: full
    details: Read-only.
  diff_mode:
    description: Reports a before/after diff of what it changes, when run with --diff.
    support: none
"""

EXAMPLES = r"""
- name: Read the manifest
  fleet_manifest_info:
    path: /srv/fleet/manifests
  register: manifest

- name: Show the last result of one board
  ansible.builtin.debug:
    msg: "{{ manifest.last['esp32-sim-01'].result | default('never provisioned') }}"
"""

RETURN = r"""
rows_total:
  description: Number of rows in the manifest (0 when it does not exist yet).
  returned: always
  type: int
last:
  description: Device id to its most recent row.
  returned: always
  type: dict
last_success:
  description: Device id to its most recent row that describes a working board (result C(provisioned),
    C(unchanged), C(renewed), C(updated), C(rolled-back) or C(ota-failed)).
  returned: always
  type: dict
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.esp32_fleet.mqtt_fleet.plugins.module_utils.fleet_manifest import (
    SUCCESS_RESULTS,
    ManifestError,
    last_rows,
    load_rows,
)


def main():
    module = AnsibleModule(
        argument_spec={
            "path": {"type": "path", "required": True},
            "name": {"type": "str", "default": "fleet"},
        },
        supports_check_mode=True,
    )
    try:
        rows = load_rows(module.params["path"], module.params["name"])
    except (ManifestError, OSError) as exc:
        module.fail_json(msg=f"cannot read the fleet manifest in {module.params['path']}: {exc}")
    module.exit_json(
        changed=False,
        rows_total=len(rows),
        last=last_rows(rows),
        last_success=last_rows(rows, SUCCESS_RESULTS),
    )


if __name__ == "__main__":
    main()
