# Copyright: esp32-mqtt-fleet contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The controller's decisions of an over-the-air firmware rollout (docs/device-protocol.md section 7):
which boards get a job, what a board's report means, and the manifest row of each board. No I/O:
the fleet_ota module does the MQTT side (unit tests: tests/modules/test_fleet_ota.py).
"""

from __future__ import annotations

import re
import secrets

JOB_ID = re.compile(r"^[A-Za-z0-9_-]{16,64}$")
# What a board may report on R/ota/report, and what ends its job.
TERMINAL = ("updated", "rolled-back", "failed", "current")
# A board's outcome in this rollout (fleet_ota's boards[].state).
OK_STATES = ("updated", "current", "revoked")
# Manifest result of each outcome; the credential fields are the board's last successful row's.
RESULT = {
    "updated": "updated",
    "current": "unchanged",
    "rolled-back": "rolled-back",
    "failed": "ota-failed",
    "timeout": "ota-failed",
}
_CREDENTIAL_FIELDS = (
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
    "ca_sha256",
    "layout",
    "firmware_version",
    "firmware_source",
)


def new_job_id():
    """A random job id (24 characters of [A-Za-z0-9_-])."""
    return secrets.token_urlsafe(18)


def job_payload(job_id, image):
    """The retained R/ota/job message of one board."""
    return {
        "v": 1,
        "job": job_id,
        "project": image["project"],
        "version": image["version"],
        "url": image["url"],
        "sha256": image["sha256"],
        "size": int(image["size"]),
    }


def needs_job(device, status, version):
    """(needs a job, why) for one board, from its retained R/status (None when it has none).

    A revoked board gets no job (the image server refuses its certificate anyway). A board whose
    status says it runs the version is current. Any other board gets one; a board that is offline
    picks its retained job up when it connects, within the rollout's wait.
    """
    if device.get("revoked"):
        return False, "revoked"
    running = (status or {}).get("fw")
    if running == version:
        return False, "current"
    return True, f"runs {running}" if running else "no status yet"


def report_outcome(report, job_id):
    """The board's outcome from its retained R/ota/report, or None while it is not final for job_id."""
    if not isinstance(report, dict) or report.get("job") != job_id:
        return None
    state = report.get("state")
    if state not in TERMINAL:
        return None
    return {"state": state, "version": str(report.get("version", "")), "error": str(report.get("error", ""))}


def manifest_row(device_id, previous, outcome, image, now_text, seconds):
    """The board's manifest row for its outcome (previous: its last successful row, {} when none)."""
    row = {key: previous.get(key, "") for key in _CREDENTIAL_FIELDS}
    row.update(device_id=device_id, timestamp=now_text, seconds=f"{seconds:.2f}")
    state = outcome["state"]
    if state == "revoked":
        row.update(result="revoked", reason="certificate revoked: no job")
        return row
    row["result"] = RESULT[state]
    if state == "updated":
        row.update(
            firmware_version=image["version"],
            firmware_source="ota",
            reason=f"ota: {outcome.get('before') or 'unknown'} -> {image['version']}",
        )
    elif state == "current":
        row.update(firmware_version=image["version"], reason=f"ota: runs {image['version']} already")
    else:
        if outcome.get("version"):
            row["firmware_version"] = outcome["version"]
        detail = outcome.get("error") or state
        row["reason"] = f"ota {state} ({image['version']}): {detail}"[:300]
    return row
