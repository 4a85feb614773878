# Copyright: esp32-mqtt-fleet contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Fleet manifest: an append-only run log of board provisioning, kept as JSON and CSV.

One row per board per run. JSON (``<name>.json``) is the source of truth and holds every field,
including the nested firmware list; the CSV (``<name>.csv``) is regenerated from the same rows on
each write, so the two never disagree. Both files are written atomically (temporary file in the same
directory, fsync, rename) under an exclusive lock, and earlier runs' rows are always kept. The files
are 0640 by default: a row names the board's port, station and certificate.

Pure Python (standard library only) so that pytest can exercise it without Ansible.
"""

import contextlib
import csv
import io
import json
import os
import re
import tempfile

from ansible_collections.esp32_fleet.mqtt_fleet.plugins.module_utils.fleet_lock import exclusive_lock

MANIFEST_VERSION = 1
# renewed: the board replaced its certificate over the air (docs/device-protocol.md); its flash
# (the station's nvs partition) is as the row before it recorded, the certificate is the new one.
# updated / rolled-back / ota-failed: an over-the-air firmware job (playbooks/ota.yml) ended so; the
# board's nvs is as the row before it recorded, only its app (or nothing) changed.
RESULTS = ("provisioned", "unchanged", "renewed", "updated", "rolled-back", "ota-failed", "failed", "revoked")
# Rows that describe a working board: what the next station run compares the board with.
SUCCESS_RESULTS = ("provisioned", "unchanged", "renewed", "updated", "rolled-back", "ota-failed")
# CSV column order (JSON rows carry the same keys).
FIELDS = (
    "run_id",
    "timestamp",
    "device_id",
    "host",
    "mac",
    "chip",
    "port",
    "station",
    "cert_serial",
    "cert_sha256",
    "cert_not_after",
    "nvs_sha256",
    "nvs_md5",
    "firmware",
    "esptool_version",
    "config_sha256",
    # SHA-256 of the trust bundle the station wrote into the board's nvs (mqtt/ca_cert): with it the
    # upkeep knows the board needs no retained bundle on R/pki/ca (fleet_renewal action=publish_ca).
    "ca_sha256",
    # ota: the station laid down the two-OTA partition table (docs/device-protocol.md section 1);
    # legacy: the board was provisioned before and keeps its layout; empty: no firmware was written.
    "layout",
    # The app version the board runs (its app description), and who put it there: station or ota.
    "firmware_version",
    "firmware_source",
    "seconds",
    "result",
    "reason",
)


# An unkeyed settings fingerprint of earlier releases (see fleet_config_hash.py): it exposes the
# Wi-Fi password to a dictionary attack, so it is blanked once the board has a keyed one.
_LEGACY_CONFIG_HASH = re.compile(r"^[0-9a-f]{64}$")


def is_legacy_config_hash(value):
    """True for a ``config_sha256`` of the unkeyed kind (64 hex digits, no ``hmac-sha256:`` prefix)."""
    return bool(_LEGACY_CONFIG_HASH.match(str(value or "")))


class ManifestError(Exception):
    """A manifest file cannot be read or a row is invalid."""


def paths(directory, name="fleet"):
    """Return the (json, csv) paths of the manifest called ``name`` in ``directory``."""
    return (os.path.join(directory, name + ".json"), os.path.join(directory, name + ".csv"))


def _firmware_to_text(firmware):
    """Flatten the firmware list for CSV: ``offset=sha256`` pairs joined by ``;``."""
    if not firmware:
        return ""
    if isinstance(firmware, str):
        return firmware
    return ";".join("{}={}".format(f.get("offset", ""), f.get("sha256", "")) for f in firmware)


def _firmware_from_text(text):
    items = []
    for part in (text or "").split(";"):
        if "=" in part:
            offset, sha = part.split("=", 1)
            items.append({"offset": offset, "sha256": sha})
    return items


def normalize_row(row):
    """Validate one row and return it with every field present (missing ones empty)."""
    if not isinstance(row, dict):
        raise ManifestError(f"a manifest row must be a mapping, got {type(row).__name__}")
    unknown = sorted(set(row) - set(FIELDS))
    if unknown:
        raise ManifestError("unknown manifest field(s): {}".format(", ".join(unknown)))
    if not row.get("device_id"):
        raise ManifestError("a manifest row needs a device_id")
    result = row.get("result")
    if result not in RESULTS:
        raise ManifestError(
            f"row for {row['device_id']}: result must be one of {', '.join(RESULTS)}, got {result!r}"
        )
    out = {}
    for field in FIELDS:
        value = row.get(field)
        if field == "firmware":
            value = list(value) if isinstance(value, list) else _firmware_from_text(value)
        elif value is None:
            value = ""
        out[field] = value
    return out


def _read_json(path):
    with open(path, encoding="utf-8") as handle:
        try:
            data = json.load(handle)
        except ValueError as exc:
            raise ManifestError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
        raise ManifestError(f"{path} has no 'rows' list")
    return data["rows"]


def _read_csv(path):
    with open(path, encoding="utf-8", newline="") as handle:
        rows = []
        for row in csv.DictReader(handle):
            row = {k: v for k, v in row.items() if k in FIELDS}
            row["firmware"] = _firmware_from_text(row.get("firmware"))
            rows.append(row)
        return rows


def load_rows(directory, name="fleet"):
    """Return every recorded row, oldest first ([] when there is no manifest yet).

    The JSON file wins; the CSV is read only when the JSON file is missing (e.g. someone kept just
    the CSV), so its rows are not lost on the next write.
    """
    json_path, csv_path = paths(directory, name)
    if os.path.exists(json_path):
        return _read_json(json_path)
    if os.path.exists(csv_path):
        return _read_csv(csv_path)
    return []


def render_json(rows):
    return (json.dumps({"version": MANIFEST_VERSION, "rows": rows}, indent=2, sort_keys=True) + "\n").encode()


def render_csv(rows):
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        flat = {field: row.get(field, "") for field in FIELDS}
        flat["firmware"] = _firmware_to_text(row.get("firmware"))
        writer.writerow(flat)
    return buf.getvalue().encode()


def atomic_write(path, data, mode=0o640):
    """Write ``data`` to ``path`` so that readers see the old or the new file, never a mix."""
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _locked(directory, name):
    """Serialise concurrent writers (two ansible-playbook runs) on a lock file next to the manifest."""
    return exclusive_lock(os.path.join(directory, f".{name}.lock"))


def blank_legacy_config_hashes(existing, new_rows):
    """Return ``existing`` with the unkeyed ``config_sha256`` of every device that ``new_rows`` give a
    keyed one blanked: the old value is not needed to decide any more and would let a reader of the
    manifest test guesses of the Wi-Fi password. Rows are otherwise kept as they are."""
    migrated = {
        r["device_id"]
        for r in new_rows
        if r.get("config_sha256") and not is_legacy_config_hash(r["config_sha256"])
    }
    out = []
    for row in existing:
        if row.get("device_id") in migrated and is_legacy_config_hash(row.get("config_sha256")):
            row = dict(row, config_sha256="")
        out.append(row)
    return out


def append_rows(directory, new_rows, name="fleet", mode=0o640):
    """Append ``new_rows`` to the manifest, rewriting JSON and CSV atomically. Returns all rows.

    Earlier rows are kept; only their superseded unkeyed settings fingerprints are blanked."""
    rows = [normalize_row(r) for r in new_rows]
    os.makedirs(directory, exist_ok=True)
    json_path, csv_path = paths(directory, name)
    with _locked(directory, name):
        existing = blank_legacy_config_hashes(load_rows(directory, name), rows)
        combined = existing + rows
        # CSV first: if we die between the two renames, the JSON (the source of truth) still holds
        # the previous complete state and the next write regenerates the CSV from it.
        atomic_write(csv_path, render_csv(combined), mode)
        atomic_write(json_path, render_json(combined), mode)
    return combined


def last_rows(rows, results=None):
    """Map device_id -> its most recent row (optionally only rows whose result is in ``results``)."""
    latest = {}
    for row in rows:
        if results is None or row.get("result") in results:
            latest[row.get("device_id")] = row
    return latest


def summarize(rows):
    """Group rows by result: {'provisioned': [ids], 'unchanged': [ids], 'renewed': [ids], 'revoked': [ids],
    'failed': [{device_id, reason}]}."""
    summary = {"provisioned": [], "unchanged": [], "renewed": [], "revoked": [], "failed": []}
    for row in rows:
        result = row.get("result")
        if result == "failed":
            summary["failed"].append({"device_id": row.get("device_id"), "reason": row.get("reason", "")})
        elif result in summary:
            summary[result].append(row.get("device_id"))
    return summary
