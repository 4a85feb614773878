#!/usr/bin/python
# Copyright: esp32-mqtt-fleet contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

# Why this module exists: community.crypto's ownca provider copies the CSR's subject and extensions
# into the certificate. A board's renewal CSR (docs/device-protocol.md) carries only CN=<device id>;
# the certificate it gets must nevertheless be exactly the pki role's device profile (the one
# tasks/leaf.yml issues at a station): subject CN + O, basicConstraints CA:FALSE (critical),
# keyUsage digitalSignature (critical), extendedKeyUsage clientAuth, SKI and AKI.

from __future__ import annotations

DOCUMENTATION = r"""
---
module: pki_sign_csr
short_description: Sign a device's certificate signing request with the fleet CA's device profile
description:
  - Issues a client certificate for the public key of a PEM certificate signing request, signed by
    the given CA, with the subject and extensions of the pki role's device profile whatever else the
    request asks for. The request's self-signature and its common name are checked first.
  - Idempotent per request; an existing certificate at O(path) for the same public key, subject and
    CA, issued with this profile and valid for more than half its lifetime, is kept (a controller that
    crashed after signing answers the same request with the same certificate).
  - The CA key is read with O(ca_passphrase) only while signing and is never returned.
version_added: "0.2.0"
author: esp32-mqtt-fleet contributors (@esp32-mqtt-fleet)
requirements:
  - cryptography >= 41 in the Python that runs the module
attributes:
  check_mode:
    support: full
    description: Reports whether a certificate would be issued and writes nothing.
  diff_mode:
    support: none
    description: The certificate is written whole; there is no diff to show.
extends_documentation_fragment:
  - ansible.builtin.files
options:
  path:
    description: Where the certificate (PEM) is written.
    type: path
    required: true
  csr_content:
    description: The certificate signing request (PEM).
    type: str
    required: true
  common_name:
    description: The device id; the request's subject must be exactly this common name.
    type: str
    required: true
  organization:
    description: Organization name of the issued subject (the pki role's C(pki_organization)).
    type: str
    required: true
  ca_cert:
    description: The signing CA's certificate.
    type: path
    required: true
  ca_key:
    description: The signing CA's private key (PEM, encrypted with O(ca_passphrase)).
    type: path
    required: true
  ca_passphrase:
    description: Passphrase of O(ca_key).
    type: str
    required: true
  validity_days:
    description: Lifetime of the certificate in days.
    type: int
    default: 365
"""

EXAMPLES = r"""
- name: Sign the renewal request of esp32-01 with the device profile
  esp32_fleet.mqtt_fleet.pki_sign_csr:
    path: /srv/pki/renewals/esp32-01.crt
    csr_content: "{{ request.csr }}"
    common_name: esp32-01
    organization: esp32-mqtt-fleet
    ca_cert: /srv/pki/ca/ca.crt
    ca_key: /srv/pki/ca/ca.key
    ca_passphrase: "{{ pki_ca_passphrase }}"
    validity_days: 365
    mode: "0644"
  no_log: true
"""

RETURN = r"""
serial_number:
  description:
    - Serial number of the certificate (the new one, or the kept one).
    - Null in check mode when one would be issued.
  returned: success
  type: int
  sample: 1234567890
serial_hex:
  description: The serial number as lower-case hex without separators.
  returned: success
  type: str
  sample: 499602d2
sha256_fingerprint:
  description: SHA-256 fingerprint of the DER certificate, colon-separated hex.
  returned: success
  type: str
  sample: "3a:5f:..."
not_after:
  description: Expiry, ASN.1 GeneralizedTime as community.crypto reports it.
  returned: success
  type: str
  sample: "20271203012345Z"
"""

import datetime
import os

from ansible.module_utils.basic import AnsibleModule, missing_required_lib
from ansible_collections.esp32_fleet.mqtt_fleet.plugins.module_utils.fleet_manifest import atomic_write
from ansible_collections.esp32_fleet.mqtt_fleet.plugins.module_utils.pki_device import (
    build,
    facts,
    in_profile,
    spki,
    subject,
)

try:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.x509.oid import NameOID

    HAS_CRYPTOGRAPHY = True
except ImportError:  # pragma: no cover - reported through the module
    HAS_CRYPTOGRAPHY = False


class SignError(Exception):
    pass


def load_csr(pem, common_name):
    try:
        csr = x509.load_pem_x509_csr(pem.encode())
    except ValueError as exc:
        raise SignError(f"csr_content is not a PEM certificate signing request ({exc})") from None
    if not csr.is_signature_valid:
        raise SignError("the request's self-signature does not verify")
    names = [(a.oid, a.value) for a in csr.subject]
    if names != [(NameOID.COMMON_NAME, common_name)]:
        raise SignError(f"the request's subject is {csr.subject.rfc4514_string()!r}, not CN={common_name}")
    return csr


def profile_ok(cert, csr, ca, wanted_subject, now):
    """True when cert is this request's certificate in the device profile, from this CA, and fresh."""
    if not in_profile(cert, csr.public_key(), ca, wanted_subject):
        return False
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    return now < cert.not_valid_before_utc + lifetime / 2


def run(module):
    p = module.params
    now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    csr = load_csr(p["csr_content"], p["common_name"])
    try:
        with open(p["ca_cert"], "rb") as handle:
            ca = x509.load_pem_x509_certificate(handle.read())
    except (OSError, ValueError) as exc:
        raise SignError(f"cannot read the CA certificate {p['ca_cert']}: {exc}") from None
    wanted = subject(p["common_name"], p["organization"])
    existing = None
    if os.path.exists(p["path"]):
        try:
            with open(p["path"], "rb") as handle:
                existing = x509.load_pem_x509_certificate(handle.read())
        except (OSError, ValueError):
            existing = None
    if existing is not None and profile_ok(existing, csr, ca, wanted, now):
        return False, facts(existing)
    if module.check_mode:
        return True, {
            "serial_number": None,
            "serial_hex": None,
            "sha256_fingerprint": None,
            "not_after": None,
        }
    try:
        with open(p["ca_key"], "rb") as handle:
            ca_key = serialization.load_pem_private_key(handle.read(), password=p["ca_passphrase"].encode())
    except (OSError, ValueError, TypeError):
        raise SignError(f"cannot read the CA key {p['ca_key']} with the given passphrase") from None
    if spki(ca_key.public_key()) != spki(ca.public_key()):
        raise SignError(f"{p['ca_key']} is not the key of {p['ca_cert']}")
    cert = build(csr.public_key(), ca, ca_key, wanted, p["validity_days"], now)
    atomic_write(p["path"], cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return True, facts(cert)


def main():
    module = AnsibleModule(
        argument_spec=dict(
            path=dict(type="path", required=True),
            csr_content=dict(type="str", required=True),
            common_name=dict(type="str", required=True),
            organization=dict(type="str", required=True),
            ca_cert=dict(type="path", required=True),
            ca_key=dict(type="path", required=True, no_log=False),
            ca_passphrase=dict(type="str", required=True, no_log=True),
            validity_days=dict(type="int", default=365),
        ),
        supports_check_mode=True,
        add_file_common_args=True,
    )
    if not HAS_CRYPTOGRAPHY:
        module.fail_json(msg=missing_required_lib("cryptography"))
    if not 1 <= module.params["validity_days"] <= 366:
        module.fail_json(msg=f"validity_days must be 1 to 366, got {module.params['validity_days']}")
    try:
        changed, result = run(module)
    except SignError as exc:
        module.fail_json(msg=str(exc))
    file_args = module.load_file_common_arguments(module.params)
    if os.path.exists(module.params["path"]):
        changed = module.set_fs_attributes_if_different(file_args, changed)
    module.exit_json(changed=changed, **result)


if __name__ == "__main__":
    main()
