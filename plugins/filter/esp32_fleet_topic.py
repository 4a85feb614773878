# Copyright: esp32-mqtt-fleet contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The one rule for a board's MQTT topic root, shared by the esp32_provision role (written to NVS),
the mosquitto role (the device's ACL) and playbooks/smoke.yml (the topics it checks).

A board's topic root is its esp32_topic_root, else <esp32_provision_topic_prefix>/<device id>, where
the device id is esp32_device_id, else the inventory name. Every value is read from the BOARD's
hostvars, so the broker host, which has none of the devices' group_vars, computes the same root as
the board's own play. A prefix set only in a play's vars is invisible to the broker: the
esp32_provision role refuses that (tasks/assert.yml) rather than write a root the ACL does not grant.
"""

from __future__ import annotations

from collections.abc import Mapping

from ansible.errors import AnsibleFilterError

# Keep equal to esp32_provision_topic_prefix in roles/esp32_provision/defaults/main.yml (tested).
DEFAULT_PREFIX = "devices"


def _check(root, board):
    # A wildcard or empty level in a root would make the ACL grant other devices' topics.
    if not root or "+" in root or "#" in root or "" in root.split("/"):
        raise AnsibleFilterError(
            f"{board}: topic root {root!r} must be non-empty levels separated by '/', without + or #"
        )
    return root


def esp32_fleet_topic_root(board, prefix_default=DEFAULT_PREFIX):
    """Return the topic root of the board whose hostvars are `board` (e.g. hostvars['esp32-01']).

    prefix_default is the prefix when the board's hostvars set no esp32_provision_topic_prefix.
    """
    if not isinstance(board, Mapping):
        raise AnsibleFilterError(f"expected a board's hostvars, got {type(board).__name__}")
    name = board.get("inventory_hostname")
    device_id = board.get("esp32_device_id") or name
    if not device_id:
        raise AnsibleFilterError("a board's hostvars carry neither esp32_device_id nor inventory_hostname")
    root = board.get("esp32_topic_root")
    if root:
        return _check(str(root), name)
    prefix = str(board.get("esp32_provision_topic_prefix") or prefix_default).strip("/")
    return _check(f"{prefix}/{device_id}", name)


class FilterModule:
    """Topic roots of the fleet's boards (see the module docstring)."""

    def filters(self):
        return {"esp32_fleet_topic_root": esp32_fleet_topic_root}
