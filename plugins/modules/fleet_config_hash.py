#!/usr/bin/python
# Copyright: esp32-mqtt-fleet contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Fingerprint a board's settings with the controller's key and compare with the recorded one."""

DOCUMENTATION = r"""
---
module: fleet_config_hash
short_description: Fingerprint an ESP32 board's settings for the fleet manifest, keyed
description:
  - Computes the settings fingerprint the fleet manifest records per board (its C(config_sha256)
    column) as C(hmac-sha256:<hex>), an HMAC-SHA256 of O(settings) and O(secrets) under a random key
    kept on the controller in O(key_path). Without the key a manifest reader cannot test guesses of
    the Wi-Fi password against the fingerprint.
  - Creates O(key_path) on first use, mode 0600 from its first byte (32 random bytes, hex). Keep it
    with the manifest backups; when it is lost every board is re-provisioned once, because its
    recorded fingerprint can no longer be compared.
  - Compares the fingerprint with O(recorded), the value of the board's last successful manifest
    row. A value written by earlier releases (unkeyed sha256 of the settings and the sha256 of each
    secret) is accepted when it matches, so an upgrade does not re-flash the fleet; the next row
    records the keyed value.
version_added: "0.2.0"
author: esp32-mqtt-fleet contributors (@esp32-mqtt-fleet)
options:
  key_path:
    description: File holding the HMAC key on the controller; created (0600) when missing.
    type: path
    required: true
  settings:
    description: Settings that are not secret (names to plain values), hashed as given.
    type: dict
    required: true
  secrets:
    description: Secret settings (names to values), hashed inside the HMAC; never logged or returned.
    type: dict
    default: {}
  recorded:
    description: The fingerprint recorded for the board (empty when none).
    type: str
    default: ""
attributes:
  check_mode:
    description: Can run in check mode and report what it would change without changing it.
    support: full
    details: A missing key is not created; O(recorded) is then compared in the unkeyed form only.
  diff_mode:
    description: Reports a before/after diff of what it changes, when run with --diff.
    support: none
"""

EXAMPLES = r"""
- name: Fingerprint the board's settings
  esp32_fleet.mqtt_fleet.fleet_config_hash:
    key_path: /srv/fleet/manifests/.config-hmac.key
    settings:
      device_id: esp32-sim-01
      wifi_ssid: lab
    secrets:
      wifi_password: "{{ vault_wifi_password }}"
    recorded: "{{ manifest.last_success['esp32-sim-01'].config_sha256 | default('') }}"
  delegate_to: localhost
  register: config
  no_log: true
"""

RETURN = r"""
config_sha256:
  description: The keyed fingerprint to record (empty in check mode when the key does not exist yet).
  returned: always
  type: str
  sample: hmac-sha256:9f2c0e...
recorded_matches:
  description: Whether O(recorded) is the fingerprint of these settings (keyed or in the old form).
  returned: always
  type: bool
recorded_style:
  description: C(keyed) or C(legacy) (matches), C(none) (nothing recorded) or C(different).
  returned: always
  type: str
key_created:
  description: Whether this call created O(key_path) (then C(changed) is true).
  returned: always
  type: bool
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.esp32_fleet.mqtt_fleet.plugins.module_utils.fleet_config_hash import (
    ConfigHashError,
    decide,
    ensure_key,
    keyed,
    read_key,
)


def main():
    module = AnsibleModule(
        argument_spec={
            "key_path": {"type": "path", "required": True, "no_log": False},
            "settings": {"type": "dict", "required": True},
            "secrets": {"type": "dict", "default": {}, "no_log": True},
            "recorded": {"type": "str", "default": ""},
        },
        supports_check_mode=True,
    )
    p = module.params
    try:
        if module.check_mode:
            key, created = read_key(p["key_path"]), False
            would_create = key is None
        else:
            key, created = ensure_key(p["key_path"])
            would_create = created
        matches, style = decide(p["recorded"], p["settings"], p["secrets"], key)
        value = keyed(key, p["settings"], p["secrets"]) if key is not None else ""
    except (ConfigHashError, OSError) as exc:
        module.fail_json(msg=f"settings fingerprint ({p['key_path']}): {exc}")
    module.exit_json(
        changed=would_create,
        config_sha256=value,
        recorded_matches=matches,
        recorded_style=style,
        key_created=created,
    )


if __name__ == "__main__":
    main()
