# Copyright: esp32-mqtt-fleet contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Which boards must renew onto a CA: those whose current certificate (<cert_dir>/<id>.crt) was not
issued by it (its authority key identifier is not the CA's subject key identifier, or, without those
extensions, its issuer is not the CA's subject). Used by the renewal role during a CA rotation: the
boards still on the old CA are sent a renew command, and their requests are signed by the new one.

Runs on the control node. A device without a certificate file is not listed (it has nothing to renew
over the air: a station provisions it); an unreadable certificate fails naming the file.
"""

from __future__ import annotations

import os

from ansible.errors import AnsibleFilterError

try:
    from cryptography import x509
except ImportError:  # reported when a certificate is read, not when Ansible lists the filters
    x509 = None


def _load(path):
    if x509 is None:
        raise AnsibleFilterError("esp32_fleet_not_issued_by needs the cryptography library on the controller")
    try:
        with open(path, "rb") as handle:
            return x509.load_pem_x509_certificate(handle.read())
    except (OSError, ValueError) as exc:
        raise AnsibleFilterError(f"cannot read the certificate {path}: {exc}") from exc


def _key_id(cert, cls):
    try:
        value = cert.extensions.get_extension_for_class(cls).value
    except x509.ExtensionNotFound:
        return None
    return value.key_identifier if cls is x509.AuthorityKeyIdentifier else value.digest


def issued_by(cert, ca):
    aki = _key_id(cert, x509.AuthorityKeyIdentifier)
    ski = _key_id(ca, x509.SubjectKeyIdentifier)
    if aki is not None and ski is not None:
        return aki == ski
    return cert.issuer == ca.subject


def esp32_fleet_not_issued_by(device_ids, cert_dir, ca_cert):
    """Return the ids (in order) whose <cert_dir>/<id>.crt exists and was not issued by ca_cert."""
    if not isinstance(device_ids, list | tuple):
        raise AnsibleFilterError(
            f"esp32_fleet_not_issued_by expects a list of device ids, got {device_ids!r}"
        )
    ca = _load(ca_cert)
    out = []
    for device_id in device_ids:
        path = os.path.join(cert_dir, f"{device_id}.crt")
        if os.path.isfile(path) and not issued_by(_load(path), ca):
            out.append(device_id)
    return out


class FilterModule:
    def filters(self):
        return {"esp32_fleet_not_issued_by": esp32_fleet_not_issued_by}
