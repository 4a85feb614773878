#!/usr/bin/python
# Copyright: esp32-mqtt-fleet contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

# Documentation only: the work is done by the action plugin of the same name (plugins/action/).

from __future__ import annotations

DOCUMENTATION = r"""
---
module: esp32_provision_board
short_description: Provision one ESP32 board, or prove it still holds its credentials, in one task
description:
  - The esp32_provision role's one task per board. The controller's part runs in the controller's
    Python (this is an action plugin, with no module run) - the revocation list, the keyed settings
    fingerprint, the recorded certificate, the board's key and client certificate (the pki role's
    device profile, signed by the CA that signs devices now) and the NVS image, built in memory.
  - The board's part runs on its station, through the task's connection (C(delegate_to) the
    station), with the collection's esptool modules. A board the controller already knows needs
    credentials (no record, settings changed, certificate replaced or due for renewal) gets ONE
    session (M(esp32_fleet.mqtt_fleet.esp32_flash)) that refuses a wrong board (pinned MAC, chip
    family) before writing, compares every image with the board, writes what differs and verifies.
    Any other board is read first (M(esp32_fleet.mqtt_fleet.esp32_info) - chip, MAC, the board's own
    MD5 of its NVS partition and firmware regions); one that holds its recorded credentials and
    firmware ends there, having written nothing, and only one that differs gets the second session.
  - The key and certificate are issued in memory and recorded on the controller only after a
    verified flash (the certificate always, the key only with O(keep_key)). Credentials issued for a
    board that is refused, or whose session wrote nothing, are dropped unwritten; a session that
    wrote part of an image records them, so the rerun flashes the same ones.
  - The NVS image, which holds the key, is never written to a file; a remote station receives it (and the
    firmware) inside the module's arguments, so nothing is staged there.
  - Must run on the Ansible control node's view of the controller (O(pki_profile) paths are read
    there) and is meant to be used through the esp32_provision role, which fills every option.
version_added: "0.5.0"
author: esp32-mqtt-fleet contributors (@esp32-mqtt-fleet)
requirements:
  - cryptography and esp-idf-nvs-partition-gen in the controller's Python; esptool on the station
attributes:
  action:
    support: full
    description: An action plugin; the board's part runs as a module on the station.
  check_mode:
    support: full
    description: >-
      Reads the board (a port absent in check mode reads as a board that would be provisioned) and
      reports what would be done; issues no key or certificate and writes nothing.
  diff_mode:
    support: partial
    description: In check mode, the recorded state against the reasons for writing (never any secret).
options:
  device_id:
    description: The board's device id (certificate CN, MQTT user name, file name of its key and certificate).
    type: str
    required: true
  port:
    description: >-
      Serial port of the board on its station (as esp32_flash's
      O(esp32_fleet.mqtt_fleet.esp32_flash#module:port)).
    type: str
    required: true
  baud:
    description: Baud rate of the esptool session after the connection is made.
    type: int
    default: 460800
  chip:
    description: Chip family of the fleet firmware; esptool refuses a board of another family.
    type: str
    default: esp32
  mac:
    description: >-
      The MAC the inventory pins for this board; another board on the port is refused before anything
      is written.
    type: str
    default: ""
  station:
    description: The station's inventory name (for messages and the manifest row).
    type: str
    default: localhost
  station_is_controller:
    description: The station is the controller itself; firmware is then read from its path instead of sent.
    type: bool
    default: true
  station_ready:
    description: >-
      False in check mode on a station whose esptool venv does not exist yet (the board reads as one
      that would be provisioned).
    type: bool
    default: true
  topic_root:
    description: The board's topic root as written into its NVS.
    type: str
    required: true
  topic_root_broker:
    description:
      - The board's topic root as the broker's ACL computes it from the board's inventory variables.
      - When it differs from O(topic_root) the board is refused before anything is done.
    type: str
    required: true
  previous:
    description: The board's last successful manifest row (V({}) when none).
    type: dict
    default: {}
  firmware:
    description: Firmware images written with the credentials, C(offset) and C(path) on the controller.
    type: list
    elements: dict
    default: []
    suboptions:
      offset:
        description: Flash offset (integer or string such as V(0x10000)).
        type: raw
        required: true
      path:
        description: The image file on the controller.
        type: path
        required: true
  nvs_offset:
    description: Offset of the NVS partition.
    type: int
    required: true
  nvs_size:
    description: Size of the NVS partition.
    type: int
    required: true
  nvs_namespaces:
    description: >-
      The NVS content, as M(esp32_fleet.mqtt_fleet.esp32_nvs)'s
      O(esp32_fleet.mqtt_fleet.esp32_nvs#module:namespaces).
    type: dict
    required: true
  ca_cert:
    description:
      - The trust bundle written into the board's NVS (C(mqtt/ca_cert)); its SHA-256 joins
        O(config_settings) as C(ca_sha256), so a new bundle re-provisions the board.
      - Missing outside check mode, the board fails (run C(playbooks/pki.yml) first).
    type: path
    required: true
  config_key_path:
    description: >-
      The controller's key for the settings fingerprint (created 0600 when missing, outside check
      mode).
    type: path
    required: true
  config_settings:
    description: >-
      Every setting written to NVS except the per-issue certificate and key (as
      M(esp32_fleet.mqtt_fleet.fleet_config_hash)).
    type: dict
    required: true
  config_secrets:
    description: Secret settings (the Wi-Fi password), fingerprinted but never returned.
    type: dict
    default: {}
  renew_days:
    description: A recorded certificate expiring within this many days makes the board get a new one.
    type: int
    required: true
  revoked_file:
    description: >-
      The CA's revocation list (ca/revoked.yml); a board whose current certificate is on it is not
      touched.
    type: path
    required: true
  pki_profile:
    description:
      - The pki role's device profile (its variable C(pki_device_profile)) - C(devices_dir),
        C(signer_cert), C(signer_key), C(organization), C(validity_days), C(renew_before_days),
        C(key_type), C(key_curve), C(key_size), C(owner), C(group).
    type: dict
    required: true
  pki_passphrase:
    description: Passphrase of the signing CA's key (read only when a certificate is signed).
    type: str
    required: true
  keep_key:
    description: Keep the private key on the controller after a verified flash.
    type: bool
    default: false
  revoke_replaced:
    description: Return the certificate the board held before in RV(revoke) when it got a new one.
    type: bool
    default: true
  ota_layout:
    description:
      - Lay down ESP-IDF's two-OTA layout (docs/device-protocol.md section 1) when the firmware has a
        bootloader at C(0x1000) and an app at C(0x10000) (the partition table at C(0x8000), and on a new
        board the erased otadata, which boots C(ota_0)). From then on the bootloader and OTA own the otadata.
      - A board recorded before this layout existed is reported (a warning, row C(layout=legacy)) and
        left as it is unless O(ota_migrate).
      - A board whose app came over the air (row C(firmware_source=ota)) keeps its app slots.
    type: bool
    default: true
  ota_migrate:
    description: Lay the two-OTA layout down on a board provisioned before it (partition table and
      erased otadata, after which the board boots the app in C(ota_0)).
    type: bool
    default: false
seealso:
  - module: esp32_fleet.mqtt_fleet.esp32_flash
  - module: esp32_fleet.mqtt_fleet.esp32_info
  - module: esp32_fleet.mqtt_fleet.fleet_manifest
"""

EXAMPLES = r"""
# The esp32_provision role fills every option (roles/esp32_provision/tasks/board.yml); a sketch:
- name: Provision the board, or prove it still holds its credentials
  esp32_fleet.mqtt_fleet.esp32_provision_board:
    device_id: "{{ inventory_hostname }}"
    port: "{{ esp32_port }}"
    previous: "{{ manifest.last_success[inventory_hostname] | default({}) }}"
    nvs_offset: 0x9000
    nvs_size: 0x6000
    nvs_namespaces:
      mqtt:
        device_id: "{{ inventory_hostname }}"
        client_cert: {file: "{{ pki_dir }}/devices/{{ inventory_hostname }}.crt"}
        client_key: {file: "{{ pki_dir }}/devices/{{ inventory_hostname }}.key"}
    config_key_path: manifests/.config-hmac.key
    config_settings: {device_id: "{{ inventory_hostname }}"}
    renew_days: 30
    revoked_file: "{{ pki_dir }}/ca/revoked.yml"
    pki_profile: "{{ pki_device_profile }}"
    pki_passphrase: "{{ pki_ca_passphrase }}"
  delegate_to: "{{ esp32_station | default('localhost') }}"
  register: board
"""

RETURN = r"""
row:
  description: The board's manifest row of this run (every field but C(run_id)), also on failure.
  returned: always
  type: dict
  sample: {device_id: b1, result: provisioned, reason: no successful run recorded, mac: "24:0a:c4:00:00:01"}
reasons:
  description: Why the board was (or would be) written; empty when it holds the recorded credentials.
  returned: success
  type: list
  elements: str
images:
  description: M(esp32_fleet.mqtt_fleet.esp32_flash)'s report of each image, when the board was written.
  returned: when the board was written
  type: list
  elements: dict
revoke:
  description: >-
    The certificate the board held before (C(serial_number), C(device_id)), to revoke now that it
    holds a new one.
  returned: when the board got a new certificate and O(revoke_replaced)
  type: dict
kind:
  description: On a failure of the board's esptool session, the esptool modules' stable failure kind.
  returned: failure
  type: str
  sample: mac_mismatch
"""
