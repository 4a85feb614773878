#!/usr/bin/python
# Copyright: esp32-mqtt-fleet contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

# Why this module exists: community.crypto 3.0.5 (bundled with ansible 12.3) cannot create EC keys
# with cryptography >= 46.0.5 ("Your cryptography version does not support SECP256R1", fixed upstream
# in community.crypto PR #981). Everything else of the PKI still uses community.crypto; this module
# only creates and checks private keys, and stays correct with either library version.

from __future__ import annotations

DOCUMENTATION = r"""
---
module: pki_private_key
short_description: Ensure an EC or RSA private key file exists with the wanted type, curve or size
description:
  - Creates a private key (PKCS#8 PEM) when the file is missing, and replaces it when the existing key
    is not of the wanted type, curve or size, or is not readable with the given passphrase.
  - With O(regenerate=false) a mismatching or unreadable existing key is never replaced; the module
    fails and names the reason (used for the CA key, which must never be replaced silently).
  - The file is written atomically with mode 0600 from the start; O(mode), O(owner) and O(group) then
    apply as for M(ansible.builtin.file).
  - Stands in for M(community.crypto.openssl_privatekey), whose EC key generation fails with
    cryptography 46.0.5 and later in community.crypto 3.0.5.
version_added: "0.1.0"
author: esp32-mqtt-fleet contributors (@esp32-mqtt-fleet)
requirements:
  - cryptography >= 41 in the Python that runs the module
attributes:
  check_mode:
    support: full
    description: Reports what would change and writes nothing.
  diff_mode:
    support: full
    description: Shows key type, curve or size and public key fingerprint before and after.
extends_documentation_fragment:
  - ansible.builtin.files
options:
  path:
    description: Path of the private key file.
    type: path
    required: true
  type:
    description: Key algorithm.
    type: str
    choices: [EC, RSA]
    default: EC
  curve:
    description: Named curve when O(type=EC).
    type: str
    choices: [secp256r1, secp384r1, secp521r1]
    default: secp256r1
  size:
    description: Modulus size in bits when O(type=RSA).
    type: int
    choices: [2048, 3072, 4096]
    default: 2048
  passphrase:
    description:
      - Encrypt the key with this passphrase (PKCS#8, best available encryption). Without it the key is
        written unencrypted, and an existing encrypted key counts as a mismatch.
    type: str
  regenerate:
    description:
      - Replace an existing key that does not match O(type), O(curve), O(size) or O(passphrase).
      - When V(false), fail instead (the existing file is left untouched).
    type: bool
    default: true
"""

EXAMPLES = r"""
- name: Ensure the CA key exists (never replaced)
  pki_private_key:
    path: /srv/pki/ca/ca.key
    type: EC
    curve: secp256r1
    passphrase: "{{ pki_ca_passphrase }}"
    regenerate: false
    mode: "0600"
  no_log: true

- name: Ensure a broker key exists (unencrypted, replaced when the type changes)
  pki_private_key:
    path: /srv/pki/brokers/broker1.key
    type: RSA
    size: 3072
    mode: "0600"
  no_log: true
"""

RETURN = r"""
type:
  description: Algorithm of the key now in place (the wanted one in check mode).
  returned: success
  type: str
  sample: EC
curve:
  description: Curve of an EC key, else null.
  returned: success
  type: str
  sample: secp256r1
size:
  description: Key size in bits.
  returned: success
  type: int
  sample: 256
public_key:
  description: The public key (PEM SubjectPublicKeyInfo); null in check mode when a key would be created.
  returned: success
  type: str
  sample: "-----BEGIN PUBLIC KEY-----..."
public_key_sha256:
  description:
    - SHA-256 of the DER SubjectPublicKeyInfo, colon-separated hex.
    - Null in check mode when a key would be created.
  returned: success
  type: str
  sample: "3a:5f:..."
reason:
  description: Why the key was (or would be) created or replaced; null when nothing changed.
  returned: success
  type: str
  sample: key file missing
"""

import os

from ansible.module_utils.basic import AnsibleModule, missing_required_lib
from ansible_collections.esp32_fleet.mqtt_fleet.plugins.module_utils.pki_device import (
    describe,
    generate,
    write_key,
)

try:
    from cryptography.hazmat.primitives import hashes, serialization

    HAS_CRYPTOGRAPHY = True
except ImportError:  # pragma: no cover - reported through the module
    HAS_CRYPTOGRAPHY = False


def public_pem(key):
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def fingerprint(key):
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    digest = hashes.Hash(hashes.SHA256())
    digest.update(der)
    return ":".join(f"{b:02x}" for b in digest.finalize())


def load_existing(path, passphrase):
    """Return (key, problem): the key, or None and why it cannot be used."""
    with open(path, "rb") as handle:
        data = handle.read()
    encrypted = b"ENCRYPTED" in data
    if passphrase is None and encrypted:
        return None, "the existing key is encrypted but no passphrase is wanted"
    try:
        key = serialization.load_pem_private_key(
            data, password=passphrase.encode() if passphrase is not None and encrypted else None
        )
    except (ValueError, TypeError) as exc:
        if passphrase is not None and encrypted:
            return None, f"the passphrase does not decrypt the existing key ({exc})"
        return None, f"the existing file is not a readable private key ({exc})"
    if passphrase is not None and not encrypted:
        return None, "the existing key is not encrypted but a passphrase is wanted"
    return key, None


def main():
    module = AnsibleModule(
        argument_spec={
            "path": {"type": "path", "required": True},
            "type": {"type": "str", "choices": ["EC", "RSA"], "default": "EC"},
            "curve": {
                "type": "str",
                "choices": ["secp256r1", "secp384r1", "secp521r1"],
                "default": "secp256r1",
            },
            "size": {"type": "int", "choices": [2048, 3072, 4096], "default": 2048},
            "passphrase": {"type": "str", "no_log": True},
            "regenerate": {"type": "bool", "default": True},
        },
        add_file_common_args=True,
        supports_check_mode=True,
    )
    if not HAS_CRYPTOGRAPHY:
        module.fail_json(msg=missing_required_lib("cryptography"))
    params = module.params
    path = params["path"]
    passphrase = params["passphrase"] or None
    if passphrase is not None and len(passphrase) < 4:
        module.fail_json(msg="passphrase: at least 4 characters are needed to encrypt a PEM key")
    want = (params["type"], params["curve"] if params["type"] == "EC" else None)
    want_size = params["size"] if params["type"] == "RSA" else None

    if os.path.isdir(path):
        module.fail_json(msg=f"path: {path} is a directory")
    if not os.path.isdir(os.path.dirname(path) or ".") and not module.check_mode:
        module.fail_json(msg=f"path: directory {os.path.dirname(path)} does not exist")

    before = {}
    reason = None
    key = None
    if os.path.exists(path):
        key, problem = load_existing(path, passphrase)
        if key is None:
            reason = problem
        else:
            kind, curve, size = describe(key)
            before = {"type": kind, "curve": curve, "size": size, "public_key_sha256": fingerprint(key)}
            if (kind, curve) != want or (want_size is not None and size != want_size):
                wanted = f"{want[0]} {want[1] or want_size}"
                reason = f"the existing key is {kind} {curve or size}, wanted {wanted}"
    else:
        reason = "key file missing"

    if reason is not None and os.path.exists(path) and not params["regenerate"]:
        module.fail_json(msg=f"{path}: {reason}; refusing to replace it (regenerate=false)")

    changed = reason is not None
    if changed and not module.check_mode:
        key = generate(params["type"], params["curve"], params["size"])
        write_key(key, path, passphrase)

    result = {"changed": changed, "reason": reason}
    if key is not None and (not changed or not module.check_mode):
        kind, curve, size = describe(key)
        result.update(
            type=kind, curve=curve, size=size, public_key=public_pem(key), public_key_sha256=fingerprint(key)
        )
    else:
        result.update(
            type=want[0],
            curve=want[1],
            size=want_size or int(want[1][4:7]),
            public_key=None,
            public_key_sha256=None,
        )
    if os.path.exists(path):
        file_args = module.load_file_common_arguments(params)
        result["changed"] = module.set_fs_attributes_if_different(file_args, result["changed"])
    after = {k: result[k] for k in ("type", "curve", "size", "public_key_sha256")}
    result["diff"] = {"before": before, "after": after}
    module.exit_json(**result)


if __name__ == "__main__":
    main()
