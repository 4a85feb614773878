# Copyright: esp32-mqtt-fleet contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The one answer to "is this device revoked?", shared by the pki, mosquitto and esp32_provision roles
and playbooks/revoke.yml.

A device is revoked when its CURRENT certificate (<cert_dir>/<device_id>.crt) has a serial number on
the CA's revocation list (<pki_dir>/ca/revoked.yml, key pki_revoked_certificates, entries with
serial_number, device_id, reason and revocation_date). Only the serial counts: a device that was
re-provisioned after an older certificate was revoked is not revoked.

Filters run on the control node, so paths are controller paths (the pki role keeps its files there).
A missing revocation list or certificate means "not revoked"; a malformed list or certificate fails
with AnsibleFilterError naming the file, rather than silently granting access.
"""

from __future__ import annotations

import os

from ansible.errors import AnsibleFilterError
from ansible_collections.esp32_fleet.mqtt_fleet.plugins.module_utils.fleet_revoked import (
    RevokedListError,
    parse_entries,
)

try:
    from cryptography import x509
except ImportError:  # reported when a certificate is read, not when Ansible lists the filters
    x509 = None


def esp32_fleet_revoked_entries(document, source="revocation list"):
    """Return the entries of a revocation list document (parsed YAML or its text), each with an int
    serial_number; a malformed list fails naming its source (module_utils/fleet_revoked.py)."""
    try:
        return parse_entries(document, source)
    except RevokedListError as exc:
        raise AnsibleFilterError(str(exc)) from exc


def esp32_fleet_revoked_merge(entries, more):
    """Return entries followed by the entries of more whose serial_number is not among them yet.

    The one way the pki role adds to a revocation list (revoke.yml) or merges two (a CA rotation's
    retire), so a serial is never listed twice.
    """
    known = {int(entry["serial_number"]) for entry in entries}
    out = list(entries)
    for entry in more:
        if int(entry["serial_number"]) not in known:
            known.add(int(entry["serial_number"]))
            out.append(entry)
    return out


def _read_entries(revoked_file):
    """Entries of the revocation list file; none when the file does not exist."""
    if not isinstance(revoked_file, str) or not revoked_file:
        raise AnsibleFilterError(f"revoked_file must be a path, got {revoked_file!r}")
    if not os.path.isfile(revoked_file):
        return []
    try:
        with open(revoked_file, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as exc:
        raise AnsibleFilterError(f"cannot read {revoked_file}: {exc}") from exc
    return esp32_fleet_revoked_entries(text, source=revoked_file)


def _current_serial(cert_dir, device_id):
    """Serial number of <cert_dir>/<device_id>.crt, or None when the device has no certificate."""
    if not isinstance(device_id, str) or not device_id or "/" in device_id:
        raise AnsibleFilterError(f"not a device id: {device_id!r}")
    path = os.path.join(cert_dir, device_id + ".crt")
    if not os.path.isfile(path):
        return None
    if x509 is None:
        raise AnsibleFilterError(f"reading {path} needs the Python package cryptography on the controller")
    try:
        with open(path, "rb") as handle:
            return x509.load_pem_x509_certificate(handle.read()).serial_number
    except (OSError, ValueError) as exc:
        raise AnsibleFilterError(f"{path}: not a PEM certificate: {exc}") from exc


def esp32_fleet_revocation(device_id, cert_dir, revoked_file):
    """Return the revocation list entry of the device's current certificate, or {} when not revoked.

    The entry is returned as stored (device_id, reason, revocation_date), with an int serial_number.
    """
    entries = _read_entries(revoked_file)
    if not entries:
        return {}
    serial = _current_serial(cert_dir, device_id)
    if serial is None:
        return {}
    return next((entry for entry in entries if entry["serial_number"] == serial), {})


def esp32_fleet_revoked_ids(device_ids, cert_dir, revoked_file):
    """Return the device ids (input order) whose current certificate is on the revocation list."""
    if isinstance(device_ids, (str, bytes, dict)) or not hasattr(device_ids, "__iter__"):
        raise AnsibleFilterError(f"device ids must be a list, got {device_ids!r}")
    entries = _read_entries(revoked_file)
    if not entries:
        return []
    serials = {entry["serial_number"] for entry in entries}
    return [d for d in device_ids if _current_serial(cert_dir, d) in serials]


class FilterModule:
    """Revocation state of the fleet's devices (see the module docstring)."""

    def filters(self):
        return {
            "esp32_fleet_revoked_entries": esp32_fleet_revoked_entries,
            "esp32_fleet_revocation": esp32_fleet_revocation,
            "esp32_fleet_revoked_ids": esp32_fleet_revoked_ids,
            "esp32_fleet_revoked_merge": esp32_fleet_revoked_merge,
        }
