# Copyright: esp32-mqtt-fleet contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The one parser of the CA's revocation list (ca/revoked.yml, key pki_revoked_certificates), shared
by the esp32_fleet_revoked_* filters (controller-side decisions) and the pki_crl module (which signs
the CRL from it). Needs PyYAML only (part of ansible-core's requirements)."""

try:
    import yaml
except ImportError:  # reported when a list is parsed, not when the plugin is loaded
    yaml = None

KEY = "pki_revoked_certificates"


class RevokedListError(ValueError):
    """The revocation list is not usable; the message names its source."""


def parse_entries(document, source="revocation list"):
    """Return the entries of a revocation list document, each with an int serial_number.

    document is the parsed YAML (a mapping or None) or its text. An empty document or a missing/empty
    key means no entries. Anything else fails: an entry without an integer serial_number would
    otherwise be skipped and its device silently left trusted.
    """
    if isinstance(document, (str, bytes)):
        if yaml is None:
            raise RevokedListError(f"{source}: reading it needs the Python package PyYAML")
        try:
            document = yaml.safe_load(document)
        except yaml.YAMLError as exc:
            raise RevokedListError(f"{source}: not YAML: {exc}") from exc
    if document is None:
        return []
    if not isinstance(document, dict):
        raise RevokedListError(f"{source}: expected a mapping with {KEY}, got {type(document).__name__}")
    entries = document.get(KEY) or []
    if not isinstance(entries, list):
        raise RevokedListError(f"{source}: {KEY} must be a list, got {type(entries).__name__}")
    out = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or "serial_number" not in entry:
            raise RevokedListError(f"{source}: {KEY}[{index}] is not a mapping with serial_number: {entry!r}")
        serial = entry["serial_number"]
        # bool is an int in Python; "true" is never a serial.
        if isinstance(serial, bool):
            serial = None
        try:
            serial = int(serial)
        except (TypeError, ValueError):
            raise RevokedListError(
                f"{source}: {KEY}[{index}].serial_number is not an integer: {entry['serial_number']!r}"
            ) from None
        out.append(dict(entry, serial_number=serial))
    return out
