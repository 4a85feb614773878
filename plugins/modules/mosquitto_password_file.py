#!/usr/bin/python
# Copyright: esp32-mqtt-fleet contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Ansible module: manage a Mosquitto password file idempotently."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: mosquitto_password_file
short_description: Manage a Mosquitto 2.0 password file idempotently
description:
  - Writes a Mosquitto password file with PBKDF2-SHA512 hashes in mosquitto's C($7$) format, the
    format C(mosquitto_passwd) writes in Mosquitto 2.0.
  - An existing entry is kept as it is when its hash already verifies against the wanted password
    and has at least O(iterations) PBKDF2 iterations, so a second run changes nothing although every
    new hash has a random salt. An entry whose password changed is re-hashed; so is, once, an entry
    that verifies but has fewer iterations than O(iterations) (for example one written by
    C(mosquitto_passwd), whose default is 101). A user with O(users[].state=absent) is removed, and
    with O(exclusive=true) so is every user not listed.
  - Passwords travel in the module arguments (a file, never argv) and never appear in the result,
    the diff or error messages.
version_added: "0.1.0"
author: esp32-mqtt-fleet contributors (@esp32-mqtt-fleet)
options:
  path:
    description: Password file to manage.
    type: path
    required: true
  users:
    description: Wanted users.
    type: list
    elements: dict
    default: []
    suboptions:
      name:
        description: User name (no V(:)).
        type: str
        required: true
      password:
        description: Plain-text password; required unless O(users[].state=absent).
        type: str
      state:
        description: Whether the user is in the file.
        type: str
        choices: [present, absent]
        default: present
  exclusive:
    description: Remove users that are in the file but not in O(users).
    type: bool
    default: true
  iterations:
    description:
      - PBKDF2-SHA512 iterations for new hashes, and the minimum an existing hash must have to be kept.
      - The default follows OWASP's password storage guidance for PBKDF2-HMAC-SHA512 (210,000 in 2023,
        220,000 since 2026); mosquitto_passwd in Mosquitto 2.0 uses 101. The broker pays this cost once
        per password login.
    type: int
    default: 220000
extends_documentation_fragment:
  - ansible.builtin.files
attributes:
  check_mode:
    support: full
    description: Reports what would change without writing.
  diff_mode:
    support: full
    description: The diff lists user names with C(changed) markers, never hashes or passwords.
"""

EXAMPLES = r"""
- name: Write the broker's password file
  mosquitto_password_file:
    path: /etc/mosquitto/passwd
    owner: mosquitto
    group: mosquitto
    mode: "0600"
    users:
      - name: fleet-monitor
        password: "{{ vault_fleet_monitor_password }}"
      - name: old-dashboard
        state: absent
  no_log: true
"""

RETURN = r"""
added:
  description: Users added to the file.
  returned: always
  type: list
  elements: str
  sample: [fleet-monitor]
updated:
  description: Users whose password changed (re-hashed).
  returned: always
  type: list
  elements: str
rehashed:
  description: Users whose password was unchanged but whose hash had fewer than O(iterations)
    iterations, re-hashed at O(iterations).
  returned: always
  type: list
  elements: str
removed:
  description: Users removed from the file.
  returned: always
  type: list
  elements: str
"""

import base64
import hashlib
import hmac
import os
import secrets
import tempfile

from ansible.module_utils.basic import AnsibleModule

SALT_BYTES = 12
HASH_PREFIX = "$7$"


def hash_password(password, iterations, salt=None):
    """Return a mosquitto `$7$` hash: $7$<iterations>$<base64 salt>$<base64 PBKDF2-SHA512>."""
    salt = secrets.token_bytes(SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    salt_b64, digest_b64 = base64.b64encode(salt).decode(), base64.b64encode(digest).decode()
    return f"{HASH_PREFIX}{iterations}${salt_b64}${digest_b64}"


def iterations_of(encoded):
    """The iteration count of a `$7$` hash (0 for anything else)."""
    parts = encoded.split("$")
    return int(parts[2]) if len(parts) == 5 and parts[1] == "7" and parts[2].isdigit() else 0


def verify_password(password, encoded):
    """True when `encoded` is a `$7$` hash of `password`; False for other formats or a mismatch."""
    parts = encoded.split("$")
    if len(parts) != 5 or parts[1] != "7" or not parts[2].isdigit():
        return False
    try:
        salt = base64.b64decode(parts[3], validate=True)
        expected = base64.b64decode(parts[4], validate=True)
    except ValueError:
        return False
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, int(parts[2]))
    return hmac.compare_digest(digest, expected)


def parse(text):
    """Ordered list of (user, hash) from a password file; blank and comment lines dropped."""
    entries = []
    for line in text.splitlines():
        if not line.strip() or line.startswith("#") or ":" not in line:
            continue
        user, encoded = line.split(":", 1)
        entries.append((user, encoded.strip()))
    return entries


def plan(existing, users, exclusive, iterations):
    """Return (entries, added, updated, rehashed, removed) for the wanted users over the existing
    entries. A verifying hash below `iterations` is re-made at `iterations`: once, since the new hash
    then has enough."""
    wanted = {u["name"]: u for u in users}
    result, added, updated, rehashed, removed = [], [], [], [], []
    seen = set()
    for user, encoded in existing:
        spec = wanted.get(user)
        if user in seen:
            removed.append(user)  # duplicate line: mosquitto would use the first only
            continue
        seen.add(user)
        if spec is None:
            if exclusive:
                removed.append(user)
            else:
                result.append((user, encoded))
        elif spec["state"] == "absent":
            removed.append(user)
        elif not verify_password(spec["password"], encoded):
            result.append((user, hash_password(spec["password"], iterations)))
            updated.append(user)
        elif iterations_of(encoded) < iterations:
            result.append((user, hash_password(spec["password"], iterations)))
            rehashed.append(user)
        else:
            result.append((user, encoded))
    for name, spec in wanted.items():
        if spec["state"] == "present" and name not in seen:
            result.append((name, hash_password(spec["password"], iterations)))
            added.append(name)
    return result, added, updated, rehashed, removed


def _marker(user, updated, rehashed):
    if user in updated:
        return " (password changed)"
    return " (re-hashed: too few iterations)" if user in rehashed else ""


def render(entries):
    return "".join(f"{user}:{encoded}\n" for user, encoded in entries)


def main():
    module = AnsibleModule(
        argument_spec={
            "path": {"type": "path", "required": True},
            "users": {
                "type": "list",
                "elements": "dict",
                "default": [],
                "options": {
                    "name": {"type": "str", "required": True},
                    "password": {"type": "str", "no_log": True},
                    "state": {"type": "str", "choices": ["present", "absent"], "default": "present"},
                },
                "required_if": [("state", "present", ["password"])],
            },
            "exclusive": {"type": "bool", "default": True},
            "iterations": {"type": "int", "default": 220000},
        },
        add_file_common_args=True,
        supports_check_mode=True,
    )
    path = module.params["path"]
    bad = [u["name"] for u in module.params["users"] if ":" in u["name"] or not u["name"].strip()]
    if bad:
        module.fail_json(msg=f"user names must be non-empty and contain no ':': {bad}")
    if module.params["iterations"] < 1:
        module.fail_json(msg="iterations must be 1 or more")

    try:
        with open(path, encoding="utf-8") as handle:
            existing = parse(handle.read())
    except FileNotFoundError:
        existing = None
    except OSError as exc:
        module.fail_json(msg=f"cannot read {path}: {exc.strerror}")

    entries, added, updated, rehashed, removed = plan(
        existing or [], module.params["users"], module.params["exclusive"], module.params["iterations"]
    )
    content_changed = existing is None or bool(added or updated or rehashed or removed)
    before_names = [user for user, _hash in existing or []]
    diff = {
        "before_header": path,
        "after_header": path,
        "before": "".join(f"{u}\n" for u in before_names) if existing is not None else "",
        "after": "".join(f"{u}{_marker(u, updated, rehashed)}\n" for u, _hash in entries),
    }

    if content_changed and not module.check_mode:
        directory = os.path.dirname(path) or "."
        try:
            fd, tmp = tempfile.mkstemp(dir=directory, prefix=".mosquitto_passwd.")
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(render(entries))
        except OSError as exc:
            module.fail_json(msg=f"cannot write a temporary file in {directory}: {exc.strerror}")
        module.atomic_move(tmp, path)

    changed = content_changed
    if os.path.exists(path):
        file_args = module.load_file_common_arguments(module.params)
        changed = module.set_fs_attributes_if_different(file_args, changed)

    module.exit_json(
        changed=changed,
        added=added,
        updated=updated,
        rehashed=rehashed,
        removed=removed,
        diff=diff if changed else {},
    )


if __name__ == "__main__":
    main()
