# Copyright: esp32-mqtt-fleet contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Filters that turn inventory host names and addresses into typed subjectAltName entries.

Jinja has no IP address test, and community.crypto needs "DNS:" / "IP:" prefixes, so the pki role
classifies each name here: an IPv4/IPv6 literal becomes IP:, a valid host name DNS:, anything else
is reported by pki_san_invalid so that the role's asserts can name it before any file is written.
"""

from __future__ import annotations

import ipaddress
import re

from ansible.errors import AnsibleFilterError

# RFC 1123 labels; a leading "*." wildcard is allowed; the last label must not be all digits
# (so that "999.1.1.1" is rejected instead of being taken as a host name).
_LABEL = r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)"
_DNS = re.compile(rf"^(\*\.)?({_LABEL}\.)*(?=[A-Za-z0-9-]*[A-Za-z-])({_LABEL})\.?$")


def _classify(value):
    """Return the typed entry ("IP:..." or "DNS:...") for value, or None when it is neither."""
    if not isinstance(value, str):
        return None
    text = value.strip()
    prefix = None
    if ":" in text and text.split(":", 1)[0].upper() in ("DNS", "IP"):
        prefix, text = text.split(":", 1)
        prefix = prefix.upper()
    if prefix in (None, "IP"):
        try:
            return "IP:" + str(ipaddress.ip_address(text))
        except ValueError:
            if prefix == "IP":
                return None
    if len(text.rstrip(".")) <= 253 and _DNS.match(text):
        return "DNS:" + text.rstrip(".").lower()
    return None


def pki_san_invalid(values):
    """Return the items of values that are neither an IP address nor a DNS name."""
    if isinstance(values, str) or not isinstance(values, (list, tuple)):
        return [values]
    return [v for v in values if _classify(v) is None]


def pki_san_entries(values):
    """Return the typed SAN entries for values (duplicates removed, order kept)."""
    bad = pki_san_invalid(values)
    if bad:
        raise AnsibleFilterError(f"neither a DNS name nor an IP address: {bad}")
    out = []
    for value in values:
        entry = _classify(value)
        if entry not in out:
            out.append(entry)
    return out


class FilterModule:
    """Subject alternative name helpers for the pki role."""

    def filters(self):
        return {"pki_san_invalid": pki_san_invalid, "pki_san_entries": pki_san_entries}
