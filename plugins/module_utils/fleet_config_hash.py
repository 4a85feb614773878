# Copyright: esp32-mqtt-fleet contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The settings fingerprint recorded in the fleet manifest (its ``config_sha256`` column).

A board is re-provisioned when what would be written to its NVS changes (broker, ids, Wi-Fi, CA,
partition). The manifest records a fingerprint of those settings to notice that. The fingerprint
covers the Wi-Fi password, so it must not let anyone who reads the manifest test password guesses:
it is an HMAC-SHA256 under a random key that exists only on the controller (0600, created on first
use), written as ``hmac-sha256:<hex>``.

Manifests written before carry an unkeyed value (plain hex): sha256 of the settings with the password
replaced by its own sha256, which a dictionary attack reverses in a few guesses. ``decide`` still
accepts such a value when it matches the current settings, so upgrading does not re-flash the fleet;
the board's next row records the keyed value, and ``fleet_manifest`` then blanks the old values.

Standard library only (and the manifest's own rules), so that pytest can exercise it directly.
"""

import contextlib
import hashlib
import hmac
import json
import os
import secrets as _random
import tempfile

from ansible_collections.esp32_fleet.mqtt_fleet.plugins.module_utils.fleet_manifest import (
    is_legacy_config_hash,
)

PREFIX = "hmac-sha256:"
KEY_BYTES = 32


class ConfigHashError(Exception):
    """The key file cannot be used, or the settings are not hashable."""


def _canonical(data):
    try:
        return json.dumps(data, sort_keys=True).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise ConfigHashError(f"settings are not plain data: {exc}") from None


def _merged(settings, secret_values):
    clash = sorted(set(settings) & set(secret_values))
    if clash:
        raise ConfigHashError("name(s) both in settings and secrets: {}".format(", ".join(clash)))
    return {**settings, **secret_values}


def keyed(key, settings, secret_values):
    """The fingerprint recorded from now on: HMAC-SHA256 of settings and secrets under ``key``."""
    digest = hmac.new(key, _canonical(_merged(settings, secret_values)), hashlib.sha256).hexdigest()
    return PREFIX + digest


def legacy(settings, secret_values):
    """The unkeyed fingerprint of earlier releases, computed exactly as their Jinja did:
    ``{settings, <secret>_sha256: sha256(secret)} | to_json(sort_keys=true) | hash('sha256')``."""
    hashed = {
        f"{name}_sha256": hashlib.sha256(str(value).encode("utf-8")).hexdigest()
        for name, value in secret_values.items()
    }
    return hashlib.sha256(_canonical(_merged(settings, hashed))).hexdigest()


def decide(recorded, settings, secret_values, key):
    """Compare the fingerprint recorded for a board with the current settings.

    Returns (matches, style): style is ``keyed`` or ``legacy`` when the recorded value matches (an
    upgraded controller accepts the old unkeyed value once, instead of re-flashing every board),
    ``none`` when nothing is recorded and ``different`` otherwise. ``key`` is None when there is no
    key yet (check mode on a controller that never had one): only a legacy value can match then.
    """
    if not recorded:
        return False, "none"
    if key is not None and hmac.compare_digest(recorded, keyed(key, settings, secret_values)):
        return True, "keyed"
    if is_legacy_config_hash(recorded) and hmac.compare_digest(recorded, legacy(settings, secret_values)):
        return True, "legacy"
    return False, "different"


def _parse_key(path, text):
    value = text.strip()
    try:
        key = bytes.fromhex(value)
    except ValueError:
        key = b""
    if len(key) < KEY_BYTES:
        raise ConfigHashError(
            f"{path} does not hold a key of {KEY_BYTES} random bytes in hex; restore it from a backup "
            "(or delete it: every board is then re-provisioned once, as its settings cannot be compared)"
        )
    return key


def read_key(path):
    """Return the key in ``path``, or None when the file does not exist."""
    try:
        with open(path, encoding="ascii", errors="replace") as handle:
            return _parse_key(path, handle.read())
    except FileNotFoundError:
        return None


def ensure_key(path):
    """Return (key, created): read the key, or create it 0600 from its first byte.

    Boards run in parallel and each may be the first to need the key: the new file is written in
    full under a temporary name and hard-linked into place, which fails when another process linked
    its key first; that key is then read and used.
    """
    key = read_key(path)
    if key is not None:
        return key, False
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".config-hmac.", dir=directory)  # mkstemp creates it 0600
    try:
        with os.fdopen(fd, "w", encoding="ascii") as handle:
            handle.write(_random.token_hex(KEY_BYTES) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(tmp, path)
            created = True
        except FileExistsError:
            created = False
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    return read_key(path), created
