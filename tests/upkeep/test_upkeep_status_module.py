"""fleet_status's collection step (plugins/modules/fleet_status.py) on a real PKI made by the pki
role: revoked devices, devices known only from the manifest or only from the inventory, and the
columns the manifest fills or leaves unknown."""

from __future__ import annotations

import datetime as dt
import json
import shutil
import subprocess

import pytest
from ansible_collections.esp32_fleet.mqtt_fleet.plugins.module_utils import fleet_manifest
from ansible_collections.esp32_fleet.mqtt_fleet.plugins.modules import fleet_status

NOW = dt.datetime.now(dt.UTC)


def params(pki, manifests, devices=()):
    return dict(
        pki_dir=str(pki),
        manifest_dir=str(manifests),
        manifest_name="fleet",
        devices=list(devices),
        reports={},
        period_days=1.0,
        margin_days=1.0,
        crl_renew_before_days=10.0,
        leaf_renew_before_days=30.0,
        ca_renew_before_days=365.0,
    )


def test_revoked_manifest_only_and_inventory_only_devices(installed, tmp_path):
    pki = tmp_path / "pki"
    shutil.copytree(installed.pki, pki)
    serial = subprocess.run(
        ["openssl", "x509", "-in", str(pki / "devices" / "dev-a.crt"), "-noout", "-serial"],
        capture_output=True, text=True, check=True,
    ).stdout.strip().split("=")[1]  # fmt: skip
    (pki / "ca" / "revoked.yml").write_text(
        "---\npki_revoked_certificates:\n"
        f"  - {{serial_number: {int(serial, 16)}, revocation_date: '20260101000000Z', device_id: dev-a}}\n"
    )
    manifests = tmp_path / "manifests"
    # Renewed over the air by upkeep, but sooner than one period plus the margin: the next run may be late.
    soon = (NOW + dt.timedelta(days=1.5)).strftime("%Y%m%d%H%M%SZ")
    row = {"timestamp": "2026-01-01T00:00:00Z", "device_id": "dev-z", "result": "provisioned"}
    fleet_manifest.append_rows(str(manifests), [dict(row, cert_not_after=soon)])
    # A field the manifest does not have yet (the devices' own reports will add it).
    doc = json.loads((manifests / "fleet.json").read_text())
    doc["rows"][0]["firmware_version"] = "1.4.2"
    (manifests / "fleet.json").write_text(json.dumps(doc))

    rows = {(r["kind"], r["name"]): r for r in fleet_status.collect(params(pki, manifests, ["dev-new"]), NOW)}
    assert rows[("device", "dev-a")]["state"] == "revoked" and not rows[("device", "dev-a")]["at_risk"]
    z = rows[("device", "dev-z")]
    assert z["state"] == "at-risk" and z["at_risk"] and 1.4 < z["days_left"] <= 1.5
    assert z["renewed_by"] == "upkeep (over the air)"
    assert z["firmware_version"] == "1.4.2" and z["last_seen"] == "unknown"
    new = rows[("device", "dev-new")]
    assert new["state"] == new["expires"] == "unknown" and not new["at_risk"]
    assert rows[("crl", "ca")]["state"] == "ok" and rows[("ca", "ca")]["state"] == "ok"
    assert rows[("broker", "broker2")]["renewed_by"] == "upkeep"


def test_an_unreadable_crl_is_a_clear_error(installed, tmp_path):
    pki = tmp_path / "pki"
    shutil.copytree(installed.pki, pki)
    (pki / "ca" / "crl.pem").write_text("not a CRL\n")
    with pytest.raises(fleet_status.StatusError, match=r"cannot read CRL .*crl\.pem"):
        fleet_status.collect(params(pki, tmp_path / "none"), NOW)
