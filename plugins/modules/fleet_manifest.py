#!/usr/bin/python
# Copyright: esp32-mqtt-fleet contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Append rows to the fleet manifest (JSON + CSV, atomic, earlier rows kept)."""

DOCUMENTATION = r"""
---
module: fleet_manifest
short_description: Append one run's rows to the ESP32 fleet manifest
description:
  - Appends one row per board to C(<path>/<name>.json) and C(<path>/<name>.csv).
  - Both files are rewritten atomically (temporary file and rename) under an exclusive lock; rows of
    earlier runs are always kept, so the manifest is a run log of every provisioning attempt.
  - The JSON file is the source of truth; the CSV is regenerated from the same rows.
  - Earlier rows are kept as written, except that an unkeyed settings fingerprint (C(config_sha256)
    of earlier releases, 64 hex digits) is blanked once a new row gives the same device a keyed one
    (M(esp32_fleet.mqtt_fleet.fleet_config_hash)), because the old value would let a reader test
    guesses of the Wi-Fi password.
  - Also returns a summary of the appended rows grouped by result.
version_added: "0.1.0"
author: esp32-mqtt-fleet contributors (@esp32-mqtt-fleet)
options:
  path:
    description: Directory holding the manifest files; created when missing.
    type: path
    required: true
  name:
    description: Base name of the manifest files.
    type: str
    default: fleet
  rows:
    description:
      - Rows to append. Keys are the manifest fields (C(device_id) and C(result) are required;
        C(result) is one of C(provisioned), C(unchanged), C(renewed), C(updated), C(rolled-back),
        C(ota-failed), C(failed), C(revoked)).
      - C(firmware) is a list of mappings (C(offset), C(sha256), ...).
    type: list
    elements: dict
    required: true
  mode:
    description:
      - File mode of the manifest files (each file gets it before it is renamed into place).
      - Rows name ports, stations and certificates; keep the files away from other users.
    type: raw
    default: "0640"
attributes:
  check_mode:
    description: Can run in check mode and report what it would change without changing it.
    support: full
    details: In check mode nothing is written; the module reports what it would append.
  diff_mode:
    description: Reports a before/after diff of what it changes, when run with --diff.
    support: none
notes:
  - Appending always changes the files, so the module reports C(changed=true) whenever it writes rows.
    Playbooks that treat the manifest as a run log (a row saying C(unchanged) is not a change of the
    fleet) set C(changed_when) accordingly.
"""

EXAMPLES = r"""
- name: Record this run's boards
  fleet_manifest:
    path: /srv/fleet/manifests
    rows:
      - device_id: esp32-sim-01
        mac: "24:0a:c4:00:00:01"
        result: provisioned
      - device_id: esp32-sim-02
        result: failed
        reason: "MAC mismatch"
"""

RETURN = r"""
json_path:
  description: Path of the JSON manifest.
  returned: always
  type: str
csv_path:
  description: Path of the CSV manifest.
  returned: always
  type: str
rows_appended:
  description: Number of rows appended by this call.
  returned: always
  type: int
rows_total:
  description: Number of rows in the manifest after this call (in check mode, what it would hold).
  returned: always
  type: int
summary:
  description: The appended rows grouped by result.
  returned: always
  type: dict
  sample:
    provisioned: [esp32-sim-01]
    unchanged: []
    revoked: []
    failed: [{device_id: esp32-sim-02, reason: MAC mismatch}]
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.esp32_fleet.mqtt_fleet.plugins.module_utils.fleet_manifest import (
    ManifestError,
    append_rows,
    load_rows,
    normalize_row,
    paths,
    summarize,
)


def main():
    module = AnsibleModule(
        argument_spec={
            "path": {"type": "path", "required": True},
            "name": {"type": "str", "default": "fleet"},
            "rows": {"type": "list", "elements": "dict", "required": True},
            "mode": {"type": "raw", "default": "0640"},
        },
        supports_check_mode=True,
    )
    p = module.params
    json_path, csv_path = paths(p["path"], p["name"])
    try:
        mode = int(str(p["mode"]), 8)
        rows = [normalize_row(r) for r in p["rows"]]
        if module.check_mode:
            total = len(load_rows(p["path"], p["name"])) + len(rows)
        else:
            total = len(append_rows(p["path"], rows, p["name"], mode))
    except (ManifestError, OSError, ValueError) as exc:
        module.fail_json(msg=f"fleet manifest {json_path}: {exc}")
    module.exit_json(
        changed=bool(rows),
        json_path=json_path,
        csv_path=csv_path,
        rows_appended=len(rows),
        rows_total=total,
        summary=summarize(rows),
    )


if __name__ == "__main__":
    main()
