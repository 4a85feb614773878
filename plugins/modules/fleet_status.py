#!/usr/bin/python
# Copyright: esp32-mqtt-fleet contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Fleet status: what expires when on the controller, and whether anything is at risk."""

DOCUMENTATION = r"""
---
module: fleet_status
short_description: Report what expires when in the fleet's PKI, and what is at risk
description:
  - Reads, on the controller, the CA certificates and CRLs (C(<pki_dir>/ca) and, during a rotation,
    C(<pki_dir>/ca-next)), the broker certificates (C(<pki_dir>/brokers/*.crt)), the device
    certificates (C(<pki_dir>/devices/*.crt)), the fleet manifest and the upkeep timer's state file.
  - Classifies each as C(ok), C(due) (inside its renewal window; the next upkeep renews it),
    C(at-risk) (fewer days left than one upkeep period plus I(margin_days), or inside its renewal
    window while nothing renews it automatically, as for device certificates and CAs) or C(expired).
    A failed, unreadable or stale (older than two periods plus the margin) last upkeep run is at risk
    too.
  - Device columns that only the boards' own reports can fill (renewal state, last reading seen,
    firmware version) come from the device's latest manifest row where recorded, else C(unknown).
  - Never fails because something is at risk; it returns I(at_risk) and the caller decides (the
    status play fails on it).
version_added: "0.1.0"
author: esp32-mqtt-fleet contributors (@esp32-mqtt-fleet)
options:
  pki_dir:
    description: The pki role's output directory.
    type: path
    required: true
  manifest_dir:
    description: Directory of the fleet manifest (C(<name>.json)); missing is fine.
    type: path
    required: true
  manifest_name:
    description: Base name of the manifest files.
    type: str
    default: fleet
  devices:
    description: Device ids expected (the inventory's); listed even without a certificate yet.
    type: list
    elements: str
    default: []
  reports:
    description:
      - What the boards reported just now, per device id (the
        RV(esp32_fleet.mqtt_fleet.fleet_renewal#module:reports) of its
        O(esp32_fleet.mqtt_fleet.fleet_renewal#module:action=observe)); C(renewal_state),
        C(firmware_version) and C(last_reading) fill the device columns, before the manifest's values.
        A board listened to that sent no reading is C(silent).
    type: dict
    default: {}
  state_file:
    description: The upkeep wrapper's state file (JSON C({time, rc})); missing means never run.
    type: path
    required: true
  period_days:
    description: Days between two scheduled upkeep runs.
    type: float
    default: 1
  margin_days:
    description: Slack on top of I(period_days) (a failed run, a host that was off).
    type: float
    default: 1
  crl_renew_before_days:
    description: The pki role's C(pki_crl_renew_before_days).
    type: float
    default: 10
  leaf_renew_before_days:
    description: The pki role's C(pki_renew_before_days) (broker and device certificates).
    type: float
    default: 30
  ca_renew_before_days:
    description:
      - Days before a CA's notAfter from which it is at risk (a rotation takes a re-provisioning of
        every board).
    type: float
    default: 365
  dest:
    description: Write the status as JSON here (mode I(mode)), atomically. Not written in check mode.
    type: path
  mode:
    description: Mode of I(dest).
    type: raw
    default: "0640"
attributes:
  check_mode:
    description: Can run in check mode and report what it would change without changing it.
    support: full
    details: Reads as in a real run; I(dest) is not written.
  diff_mode:
    description: Reports a before/after diff of what it changes, when run with --diff.
    support: none
notes:
  - I(dest) is a report, rewritten on every real run (its days left move with the clock); writing it
    is not reported as a change, so a playbook that ends with the status stays idempotent.
requirements:
  - cryptography (on the controller)
"""

EXAMPLES = r"""
- name: Read the fleet status
  esp32_fleet.mqtt_fleet.fleet_status:
    pki_dir: /srv/fleet/pki
    manifest_dir: /srv/fleet/manifests
    state_file: /var/lib/esp32-fleet-upkeep/last-run.json
    dest: /srv/fleet/manifests/status.json
  register: status

- name: Print the table
  ansible.builtin.debug:
    msg: "{{ status.table }}"
"""

RETURN = r"""
rows:
  description: One entry per CA, CRL, broker certificate and device.
  returned: always
  type: list
  elements: dict
  contains:
    kind:
      description: C(ca), C(crl), C(broker) or C(device).
      type: str
    name:
      description: The CA directory (C(ca), C(ca-next)), broker host or device id.
      type: str
    expires:
      description: notAfter or nextUpdate (UTC, ISO-8601); C(unknown) for a device without a certificate.
      type: str
    days_left:
      description: Days until I(expires), one decimal.
      type: float
    state:
      description: C(ok), C(due), C(at-risk), C(expired), C(revoked) or C(unknown).
      type: str
    at_risk:
      description: Whether this row makes the status fail.
      type: bool
    renewed_by:
      description: What renews it, C(upkeep), C(upkeep (over the air)) or C(CA rotation (operator)).
      type: str
    renewal_state:
      description: Devices only; their renewal state from the manifest, else C(unknown).
      type: str
    last_seen:
      description: Devices only; the last reading seen, from the manifest, else C(unknown).
      type: str
    firmware_version:
      description: Devices only; the firmware version, from the manifest, else C(unknown).
      type: str
upkeep:
  description:
    - The last upkeep run, C({state, at_risk, detail}); state is C(ok), C(never), C(failed),
      C(stale) or C(unreadable).
  returned: always
  type: dict
at_risk:
  description: Rows (C(<kind> <name>)) and C(upkeep) when they are at risk; empty when all is well.
  returned: always
  type: list
  elements: str
table:
  description: The human-readable table, one string per line.
  returned: always
  type: list
  elements: str
generated_at:
  description: The time the status was taken (UTC, ISO-8601).
  returned: always
  type: str
"""

import datetime as dt
import glob
import json
import os

from ansible.module_utils.basic import AnsibleModule, missing_required_lib
from ansible_collections.esp32_fleet.mqtt_fleet.plugins.module_utils import fleet_manifest
from ansible_collections.esp32_fleet.mqtt_fleet.plugins.module_utils import fleet_status as fs

try:
    from cryptography import x509

    HAS_CRYPTOGRAPHY = True
except ImportError:  # pragma: no cover - the controller always has it (community.crypto needs it)
    HAS_CRYPTOGRAPHY = False

try:
    import yaml
except ImportError:  # pragma: no cover - ships with ansible-core
    yaml = None


class StatusError(Exception):
    pass


def _load_cert(path):
    try:
        with open(path, "rb") as handle:
            return x509.load_pem_x509_certificate(handle.read())
    except (OSError, ValueError) as exc:
        raise StatusError(f"cannot read certificate {path}: {exc}") from exc


def _next_update(path):
    try:
        with open(path, "rb") as handle:
            crl = x509.load_pem_x509_crl(handle.read())
    except (OSError, ValueError) as exc:
        raise StatusError(f"cannot read CRL {path}: {exc}") from exc
    return crl.next_update_utc


def _revoked_serials(path):
    """Serial numbers on a pki role revocation list (ca/revoked.yml)."""
    if not os.path.isfile(path) or yaml is None:
        return set()
    with open(path) as handle:
        doc = yaml.safe_load(handle) or {}
    return {
        int(e["serial_number"]) for e in doc.get("pki_revoked_certificates") or [] if "serial_number" in e
    }


def _read_state(path):
    if not os.path.exists(path):
        return None
    try:
        with open(path) as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return {"unreadable": True}


def collect(p, now):
    """Every status row, in table order: CAs, CRLs, brokers, devices."""
    rows = []
    period, margin = p["period_days"], p["margin_days"]
    revoked = set()
    for ca_dir in ("ca", "ca-next"):
        base = os.path.join(p["pki_dir"], ca_dir)
        if os.path.isfile(os.path.join(base, "ca.crt")):
            cert = _load_cert(os.path.join(base, "ca.crt"))
            rows.append(
                fs.entry(
                    "ca", ca_dir, cert.not_valid_after_utc, now, p["ca_renew_before_days"], period, margin
                )
            )
        if os.path.isfile(os.path.join(base, "crl.pem")):
            expires = _next_update(os.path.join(base, "crl.pem"))
            rows.append(fs.entry("crl", ca_dir, expires, now, p["crl_renew_before_days"], period, margin))
        revoked |= _revoked_serials(os.path.join(base, "revoked.yml"))

    for path in sorted(glob.glob(os.path.join(p["pki_dir"], "brokers", "*.crt"))):
        cert = _load_cert(path)
        name = os.path.basename(path)[: -len(".crt")]
        rows.append(
            fs.entry(
                "broker", name, cert.not_valid_after_utc, now, p["leaf_renew_before_days"], period, margin
            )
        )

    manifest = fleet_manifest.last_rows(fleet_manifest.load_rows(p["manifest_dir"], p["manifest_name"]))
    device_dir = os.path.join(p["pki_dir"], "devices")
    on_disk = [os.path.basename(f)[: -len(".crt")] for f in glob.glob(os.path.join(device_dir, "*.crt"))]
    for device in sorted(set(p["devices"]) | set(on_disk) | {d for d in manifest if d}):
        extra = fs.device_fields(manifest.get(device), p["reports"].get(device))
        path = os.path.join(device_dir, device + ".crt")
        last = manifest.get(device) or {}
        if os.path.isfile(path):
            cert = _load_cert(path)
            row = fs.entry(
                "device",
                device,
                cert.not_valid_after_utc,
                now,
                p["leaf_renew_before_days"],
                period,
                margin,
                **extra,
            )
            if cert.serial_number in revoked:
                row.update(state="revoked", at_risk=False)
        elif last.get("cert_not_after"):
            # Keys and certificates may be gone from the controller after a verified flash: the
            # manifest recorded the notAfter of what the board holds.
            expires = fs.parse_time(last["cert_not_after"])
            row = fs.entry(
                "device", device, expires, now, p["leaf_renew_before_days"], period, margin, **extra
            )
        else:
            row = dict(kind="device", name=device, expires=fs.UNKNOWN, days_left=fs.UNKNOWN, state=fs.UNKNOWN,
                       at_risk=False, renewed_by=fs.RENEWED_BY["device"], **extra)  # fmt: skip
        if last.get("result") == "revoked":
            row.update(state="revoked", at_risk=False)
        rows.append(row)
    return rows


def main():
    module = AnsibleModule(
        argument_spec=dict(
            pki_dir=dict(type="path", required=True),
            manifest_dir=dict(type="path", required=True),
            manifest_name=dict(type="str", default="fleet"),
            devices=dict(type="list", elements="str", default=[]),
            reports=dict(type="dict", default={}),
            state_file=dict(type="path", required=True),
            period_days=dict(type="float", default=1),
            margin_days=dict(type="float", default=1),
            crl_renew_before_days=dict(type="float", default=10),
            leaf_renew_before_days=dict(type="float", default=30),
            ca_renew_before_days=dict(type="float", default=365),
            dest=dict(type="path"),
            mode=dict(type="raw", default="0640"),
        ),
        supports_check_mode=True,
    )
    if not HAS_CRYPTOGRAPHY:
        module.fail_json(msg=missing_required_lib("cryptography"))
    p = module.params
    now = dt.datetime.now(dt.UTC)
    try:
        rows = collect(p, now)
    except (StatusError, fleet_manifest.ManifestError) as exc:
        module.fail_json(msg=str(exc))
    raw_state = _read_state(p["state_file"])
    state, risk, detail = fs.classify_upkeep(raw_state, now, p["period_days"], p["margin_days"])
    upkeep = {"state": state, "at_risk": risk, "detail": detail}
    at_risk = [r["kind"] + " " + r["name"] for r in rows if r["at_risk"]] + (["upkeep"] if risk else [])
    result = dict(
        changed=False,
        generated_at=now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        rows=rows,
        upkeep=upkeep,
        at_risk=at_risk,
        table=fs.render_table(rows, upkeep),
    )
    if p["dest"] and not module.check_mode:
        mode = int(p["mode"], 8) if isinstance(p["mode"], str) else int(p["mode"])
        report = {k: result[k] for k in ("generated_at", "rows", "upkeep", "at_risk")}
        try:
            os.makedirs(os.path.dirname(p["dest"]) or ".", exist_ok=True)
            fleet_manifest.atomic_write(
                p["dest"], (json.dumps(report, indent=2, sort_keys=True) + "\n").encode(), mode
            )
        except OSError as exc:
            module.fail_json(msg="cannot write {}: {}".format(p["dest"], exc))
    module.exit_json(**result)


if __name__ == "__main__":
    main()
