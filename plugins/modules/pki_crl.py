#!/usr/bin/python
# Copyright: esp32-mqtt-fleet contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

# Why this module exists: the revocation list and the CRL are one read-modify-write (read the list,
# add serials, write it, sign the CRL from it). Done as several tasks, two overlapping runs
# (playbooks/revoke.yml twice, or revoke.yml and a fleet run revoking a replaced certificate) each
# read the old list and the last writer wins: a revoked certificate silently drops off the list and
# the CRL. This module does all of it under one exclusive lock on the CA directory.

from __future__ import annotations

DOCUMENTATION = r"""
---
module: pki_crl
short_description: Add serials to a CA's revocation list and keep its CRL signed, under one lock
description:
  - Under an exclusive lock on C(.revoked.lock) in the directory of O(revoked_file), reads the
    revocation list (YAML, key C(pki_revoked_certificates)), adds the entries of O(add) whose serial is
    not on it yet, writes it atomically, and signs the CRL O(crl) from that list with the CA's key.
    Two runs at the same time therefore never lose each other's revocations.
  - The revocation list is created (empty) when missing.
  - The CRL is (re-)signed when it is missing, unreadable, not signed by O(ca_cert)'s key, lists other
    entries than the revocation list, expires within O(renew_before_days), or O(force=true). Otherwise
    it is kept byte for byte (last and next update are not compared).
  - The revocation list is written 0600, the CRL 0644 (both from their first byte); O(owner) and
    O(group) then apply.
version_added: "0.2.0"
author: esp32-mqtt-fleet contributors (@esp32-mqtt-fleet)
requirements:
  - cryptography >= 42 and PyYAML in the Python that runs the module (the controller's)
attributes:
  check_mode:
    description: Can run in check mode and report what it would change without changing it.
    support: full
    details: Reports what would change and writes nothing (takes the lock only if its file exists).
  diff_mode:
    description: Reports a before/after diff of what it changes, when run with --diff.
    support: full
    details: Shows the revoked serials before and after.
options:
  revoked_file:
    description: The revocation list (YAML). Entries have serial_number, device_id, reason, revocation_date.
    type: path
    required: true
  crl:
    description: The CRL file (PEM).
    type: path
    required: true
  ca_cert:
    description: The CA certificate; its subject is the CRL's issuer.
    type: path
    required: true
  ca_key:
    description: The CA's private key (PEM).
    type: path
    required: true
  ca_passphrase:
    description: Passphrase of O(ca_key). Never logged.
    type: str
  add:
    description:
      - Entries to revoke, each with C(serial_number) (int) and optionally C(device_id) and C(reason).
      - An entry whose serial is on the list already is left as it is (its first revocation counts).
      - Added entries get C(revocation_date), the time of this run (ASN.1 TIME, UTC).
    type: list
    elements: dict
    default: []
  reason:
    description: CRL reason of an O(add) entry without its own.
    type: str
    default: cessation_of_operation
    choices: [unspecified, key_compromise, ca_compromise, affiliation_changed, superseded,
              cessation_of_operation, certificate_hold, privilege_withdrawn, aa_compromise]
  validity_days:
    description: Lifetime of a newly signed CRL (its nextUpdate), in days.
    type: int
    default: 30
  renew_before_days:
    description: Re-sign a CRL that expires within this many days.
    type: int
    default: 10
  force:
    description: Re-sign the CRL even if it is current (e.g. the CA certificate was created in this run).
    type: bool
    default: false
  owner:
    description: Owner of both files (as for M(ansible.builtin.file)); unchanged when omitted.
    type: str
  group:
    description: Group of both files; unchanged when omitted.
    type: str
"""

EXAMPLES = r"""
- name: Revoke a device's certificate and re-sign the CRL
  esp32_fleet.mqtt_fleet.pki_crl:
    revoked_file: /srv/pki/ca/revoked.yml
    crl: /srv/pki/ca/crl.pem
    ca_cert: /srv/pki/ca/ca.crt
    ca_key: /srv/pki/ca/ca.key
    ca_passphrase: "{{ pki_ca_passphrase }}"
    add:
      - {serial_number: 1234567890, device_id: esp32-0042, reason: key_compromise}
  no_log: true

- name: Keep the CRL signed (re-signed 10 days before it expires)
  esp32_fleet.mqtt_fleet.pki_crl:
    revoked_file: /srv/pki/ca/revoked.yml
    crl: /srv/pki/ca/crl.pem
    ca_cert: /srv/pki/ca/ca.crt
    ca_key: /srv/pki/ca/ca.key
    ca_passphrase: "{{ pki_ca_passphrase }}"
  no_log: true
"""

RETURN = r"""
added:
  description: The entries added to the revocation list in this run (also in check mode); empty when none.
  returned: success
  type: list
  elements: dict
  sample:
    - {serial_number: 1234567890, device_id: esp32-0042, reason: superseded,
       revocation_date: "20260101120000Z"}
revoked_serials:
  description: Every serial on the revocation list after this run.
  returned: success
  type: list
  elements: int
crl_signed:
  description: Whether the CRL was (or in check mode would be) signed in this run.
  returned: success
  type: bool
crl_reason:
  description: Why the CRL was signed; null when it was kept.
  returned: success
  type: str
  sample: the CRL expires within 10 days
"""

import datetime
import os
import tempfile

from ansible.module_utils.basic import AnsibleModule, missing_required_lib
from ansible_collections.esp32_fleet.mqtt_fleet.plugins.module_utils.fleet_lock import exclusive_lock
from ansible_collections.esp32_fleet.mqtt_fleet.plugins.module_utils.fleet_revoked import (
    KEY,
    RevokedListError,
    parse_entries,
)

try:
    import yaml

    HAS_YAML = True
except ImportError:  # pragma: no cover - reported through the module
    HAS_YAML = False

try:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    HAS_CRYPTOGRAPHY = True
except ImportError:  # pragma: no cover - reported through the module
    HAS_CRYPTOGRAPHY = False

_TIME = "%Y%m%d%H%M%SZ"
# Backdated lastUpdate: a broker whose clock lags the controller's must not see a CRL from the future
# (OpenSSL then refuses every client certificate).
_BACKDATE = datetime.timedelta(hours=1)


class CrlError(Exception):
    """The revocation list or a CA file cannot be used; the message names the file."""


def read_entries(path):
    """Entries of the revocation list at path (None when the file does not exist), int serials."""
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    try:
        return parse_entries(text, path)
    except RevokedListError as exc:
        raise CrlError(str(exc)) from exc


def merge(entries, add, default_reason, now):
    """Return (entries with the new ones appended, the new ones). A known serial is never added twice."""
    known = {entry["serial_number"] for entry in entries}
    added = []
    for wanted in add:
        serial = wanted.get("serial_number")
        if isinstance(serial, bool):
            serial = None
        try:
            serial = int(serial)
        except (TypeError, ValueError):
            raise CrlError(f"add: serial_number is not an integer: {wanted!r}") from None
        if serial in known:
            continue
        known.add(serial)
        entry = {"serial_number": serial, "reason": wanted.get("reason") or default_reason}
        if wanted.get("device_id"):
            entry["device_id"] = wanted["device_id"]
        entry["revocation_date"] = now.strftime(_TIME)
        added.append(entry)
    return entries + added, added


def render_list(entries, crl_path):
    where = os.path.join(os.path.basename(os.path.dirname(crl_path)), os.path.basename(crl_path))
    return (
        f"---\n# Revoked certificates, managed by the pki role: the CRL {where} is built from this list.\n"
    ) + yaml.safe_dump({KEY: entries}, default_flow_style=False, indent=2, sort_keys=True)


def atomic_write(path, text, mode):
    """Write text to path via a temp file in the same directory: mode from the first byte, then rename."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=f".{os.path.basename(path)}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(text if isinstance(text, bytes) else text.encode())
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _wanted_revoked(entries):
    """{serial: (revocation date, reason or None)} as they must appear in the CRL."""
    out = {}
    for entry in entries:
        try:
            date = datetime.datetime.strptime(str(entry["revocation_date"]), _TIME)
        except (KeyError, ValueError):
            serial = entry["serial_number"]
            raise CrlError(f"entry {serial}: revocation_date must be ASN.1 TIME ({_TIME})") from None
        reason = entry.get("reason")
        if reason is not None and not hasattr(x509.ReasonFlags, reason):
            raise CrlError(f"entry {entry['serial_number']}: unknown reason {reason!r}")
        out[entry["serial_number"]] = (date.replace(tzinfo=datetime.UTC), reason)
    return out


def _crl_revoked(crl):
    out = {}
    for revoked in crl:
        try:
            reason = revoked.extensions.get_extension_for_class(x509.CRLReason).value.reason.name
        except x509.ExtensionNotFound:
            reason = None
        out[revoked.serial_number] = (revoked.revocation_date_utc, reason)
    return out


def resign_reason(crl_path, ca_cert, wanted, renew_before_days, now):
    """Why the CRL at crl_path must be signed again, or None when it is current."""
    if not os.path.exists(crl_path):
        return "the CRL is missing"
    try:
        with open(crl_path, "rb") as handle:
            crl = x509.load_pem_x509_crl(handle.read())
    except ValueError:
        return "the CRL is not a readable PEM CRL"
    if crl.issuer != ca_cert.subject or not crl.is_signature_valid(ca_cert.public_key()):
        return "the CRL is not signed by the CA"
    if _crl_revoked(crl) != wanted:
        return "the CRL does not list what the revocation list holds"
    if crl.next_update_utc is None or crl.next_update_utc - now < datetime.timedelta(days=renew_before_days):
        return f"the CRL expires within {renew_before_days} days"
    return None


def sign_crl(ca_cert, ca_key, wanted, validity_days, now):
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - _BACKDATE)
        .next_update(now + datetime.timedelta(days=validity_days))
    )
    for serial, (date, reason) in sorted(wanted.items()):
        item = x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(date)
        if reason is not None:
            item = item.add_extension(x509.CRLReason(getattr(x509.ReasonFlags, reason)), critical=False)
        builder = builder.add_revoked_certificate(item.build())
    # SHA-256 like x509_crl's default; keys without a separate digest (Ed25519) take None.
    hashed = isinstance(ca_key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey))
    algorithm = hashes.SHA256() if hashed else None
    return builder.sign(ca_key, algorithm).public_bytes(serialization.Encoding.PEM)


def _load_ca(params):
    try:
        with open(params["ca_cert"], "rb") as handle:
            cert = x509.load_pem_x509_certificate(handle.read())
    except (OSError, ValueError) as exc:
        raise CrlError(f"ca_cert: cannot read {params['ca_cert']}: {exc}") from None
    return cert


def _load_key(params):
    passphrase = params["ca_passphrase"]
    try:
        with open(params["ca_key"], "rb") as handle:
            return serialization.load_pem_private_key(
                handle.read(), password=passphrase.encode() if passphrase else None
            )
    except (OSError, ValueError, TypeError):
        # Not the exception text: it says nothing useful and the key file is secret.
        raise CrlError(f"ca_key: cannot read {params['ca_key']} with ca_passphrase") from None


def run(module):
    """The locked read-modify-write; returns the result dict."""
    params = module.params
    revoked_file, crl_path = params["revoked_file"], params["crl"]
    directory = os.path.dirname(revoked_file) or "."
    if not os.path.isdir(directory):
        raise CrlError(f"revoked_file: directory {directory} does not exist")
    now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    ca_cert = _load_ca(params)
    lock = os.path.join(directory, ".revoked.lock")
    # Check mode writes nothing, not even the lock file: it only reads, so it needs no lock to write.
    if module.check_mode and not os.path.exists(lock):
        return _locked_section(module, ca_cert, revoked_file, crl_path, now)
    with exclusive_lock(lock, 0o600):
        return _locked_section(module, ca_cert, revoked_file, crl_path, now)


def _locked_section(module, ca_cert, revoked_file, crl_path, now):
    params = module.params
    existing = read_entries(revoked_file)
    entries, added = merge(existing or [], params["add"], params["reason"], now)
    list_changed = existing is None or bool(added)
    wanted = _wanted_revoked(entries)
    crl_reason = "the CA certificate was created in this run" if params["force"] else None
    crl_reason = crl_reason or resign_reason(crl_path, ca_cert, wanted, params["renew_before_days"], now)
    if not module.check_mode:
        if list_changed:
            atomic_write(revoked_file, render_list(entries, crl_path), 0o600)
        if crl_reason is not None:
            pem = sign_crl(ca_cert, _load_key(params), wanted, params["validity_days"], now)
            atomic_write(crl_path, pem, 0o644)
    changed = list_changed or crl_reason is not None
    for path, mode in ((revoked_file, 0o600), (crl_path, 0o644)):
        if os.path.exists(path):
            changed = module.set_mode_if_different(path, mode, changed)
            changed = module.set_owner_if_different(path, params["owner"], changed)
            changed = module.set_group_if_different(path, params["group"], changed)
    before = sorted(entry["serial_number"] for entry in existing or [])
    return {
        "changed": changed,
        "added": added,
        "revoked_serials": sorted(wanted),
        "crl_signed": crl_reason is not None,
        "crl_reason": crl_reason,
        "diff": {"before": {"revoked_serials": before}, "after": {"revoked_serials": sorted(wanted)}},
    }


def main():
    module = AnsibleModule(
        argument_spec={
            "revoked_file": {"type": "path", "required": True},
            "crl": {"type": "path", "required": True},
            "ca_cert": {"type": "path", "required": True},
            "ca_key": {"type": "path", "required": True},
            "ca_passphrase": {"type": "str", "no_log": True},
            "add": {"type": "list", "elements": "dict", "default": []},
            "reason": {
                "type": "str",
                "default": "cessation_of_operation",
                "choices": [
                    "unspecified",
                    "key_compromise",
                    "ca_compromise",
                    "affiliation_changed",
                    "superseded",
                    "cessation_of_operation",
                    "certificate_hold",
                    "privilege_withdrawn",
                    "aa_compromise",
                ],
            },
            "validity_days": {"type": "int", "default": 30},
            "renew_before_days": {"type": "int", "default": 10},
            "force": {"type": "bool", "default": False},
            "owner": {"type": "str"},
            "group": {"type": "str"},
        },
        supports_check_mode=True,
    )
    if not HAS_CRYPTOGRAPHY:
        module.fail_json(msg=missing_required_lib("cryptography"))
    if not HAS_YAML:
        module.fail_json(msg=missing_required_lib("PyYAML"))
    if module.params["validity_days"] <= module.params["renew_before_days"]:
        module.fail_json(msg="validity_days must exceed renew_before_days (else every run re-signs the CRL)")
    try:
        result = run(module)
    except (CrlError, OSError) as exc:
        module.fail_json(msg=str(exc))
    module.exit_json(**result)


if __name__ == "__main__":
    main()
