#!/usr/bin/python
# Copyright: esp32-mqtt-fleet contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

# Why this module exists: one stage of a firmware rollout is a conversation on retained MQTT topics
# (job out, report back) with every board of the stage at once, each one waited for and bounded. The
# decisions live in module_utils/fleet_ota.py (unit tested); this is the MQTT side.

from __future__ import annotations

DOCUMENTATION = r"""
---
module: fleet_ota
short_description: Send one stage of an over-the-air firmware rollout and wait for the boards
description:
  - Connects to the broker over TLS with the controller's service identity (e.g. C(fleet-pki)) and,
    for the boards in O(devices), does one stage of docs/device-protocol.md section 7.
  - Reads each board's retained C(R/status) first. A board that runs O(image.version) already is
    C(current) and gets no job; a revoked board (O(devices[].revoked)) gets none either (and any job
    the broker's ACL no longer lets anyone reach it).
  - Publishes every other board a job (retained, QoS 1, on C(R/ota/job), with version, URL, SHA-256,
    size and a fresh job id) and waits up to O(wait) seconds for all of their reports on C(R/ota/report),
    C(updated), C(rolled-back), C(failed), C(current); a board that sent none is C(timeout).
  - Clears the job and the report of every board it waited for (also after a timeout, so that a board
    that comes back later does not update outside a supervised rollout).
  - With O(manifest_dir), appends one manifest row per board (result C(updated), C(unchanged),
    C(rolled-back), C(ota-failed) or C(revoked), with the version it runs), its credential fields
    copied from the board's last successful row.
  - In check mode it only reads the statuses and says which boards would get a job.
version_added: "0.6.0"
author: esp32-mqtt-fleet contributors (@esp32-mqtt-fleet)
options:
  host:
    description: Broker host name or address (a name in the broker certificate).
    type: str
    required: true
  port:
    description: Broker TLS port of the certificate listener.
    type: int
    default: 8883
  ca_cert:
    description: CA bundle the broker certificate must chain to.
    type: path
    required: true
  client_cert:
    description: The controller's service identity certificate (PEM).
    type: path
    required: true
  client_key:
    description: The service identity's private key (PEM). Only its path is handled.
    type: path
    required: true
  verify_hostname:
    description: Check that the broker certificate names O(host).
    type: bool
    default: true
  timeout:
    description: Seconds to wait for the CONNACK, each SUBACK and each PUBACK.
    type: float
    default: 10
  settle:
    description: Seconds without a retained message, after the SUBACK, after which all retained
      messages are taken to have arrived.
    type: float
    default: 0.5
  wait:
    description: Seconds to wait for the reports of the stage's boards (download, reboot, self-check).
    type: float
    default: 600
  devices:
    description: The boards of this stage.
    type: list
    elements: dict
    required: true
    suboptions:
      id:
        description: Device id.
        type: str
        required: true
      root:
        description: The board's topic root C(R).
        type: str
        required: true
      revoked:
        description: The board's certificate is revoked.
        type: bool
        default: false
  image:
    description: The image every board of the stage is to run.
    type: dict
    required: true
    suboptions:
      project:
        description: The app description's project name.
        type: str
        required: true
      version:
        description: The app description's version.
        type: str
        required: true
      url:
        description: HTTPS URL the boards download it from (the image server).
        type: str
        required: true
      sha256:
        description: SHA-256 of the image file.
        type: str
        required: true
      size:
        description: Size of the image file in bytes.
        type: int
        required: true
  manifest_dir:
    description: Directory of the fleet manifest to append the stage's rows to; empty appends none.
    type: path
    default: ""
  manifest_name:
    description: Base name of the manifest files.
    type: str
    default: fleet
attributes:
  check_mode:
    support: full
    description: Reads the boards' statuses, publishes nothing, writes no row.
  diff_mode:
    support: none
    description: The boards' versions before and after are in RV(boards).
"""

EXAMPLES = r"""
- name: Roll the image out to this stage's boards
  esp32_fleet.mqtt_fleet.fleet_ota:
    host: broker.example.net
    ca_cert: pki/ca/bundle.pem
    client_cert: pki/services/fleet-pki.crt
    client_key: pki/services/fleet-pki.key
    devices:
      - {id: esp32-01, root: devices/esp32-01}
    image:
      project: fleet-sensor
      version: 1.1.0
      url: https://broker.example.net:8443/ota/fleet-sensor-1.1.0-0123456789ab.bin
      sha256: "{{ image.sha256 }}"
      size: "{{ image.size }}"
    wait: 300
  delegate_to: localhost
  run_once: true
"""

RETURN = r"""
boards:
  description: Device id to its outcome.
  returned: always
  type: dict
  contains:
    state:
      description: C(updated), C(current), C(rolled-back), C(failed), C(timeout), C(revoked), or in check
        mode C(would-update).
      type: str
    before:
      description: The version its status reported before the job (empty when it had no status).
      type: str
    version:
      description: The version it runs now, as it reported it.
      type: str
    error:
      description: The board's error text (rolled-back, failed) or the timeout.
      type: str
    seconds:
      description: Seconds from the job to the report.
      type: float
  sample:
    esp32-01: {state: updated, before: 1.0.0, version: 1.1.0, error: "", seconds: 7.4}
failed_boards:
  description: Device ids whose outcome is not C(updated), C(current) or C(revoked).
  returned: always
  type: list
  elements: str
"""

import datetime
import time

from ansible.module_utils.basic import AnsibleModule, missing_required_lib
from ansible_collections.esp32_fleet.mqtt_fleet.plugins.module_utils import fleet_ota as plan
from ansible_collections.esp32_fleet.mqtt_fleet.plugins.module_utils.fleet_manifest import (
    SUCCESS_RESULTS,
    ManifestError,
    append_rows,
    last_rows,
    load_rows,
)
from ansible_collections.esp32_fleet.mqtt_fleet.plugins.module_utils.fleet_mqtt import (
    MqttError,
    Session,
    mqtt,
    parse_json,
    to_json,
)


def _topic(device, leaf):
    return f"{device['root']}/{leaf}"


def run_stage(session, params, check):
    """Send the jobs of the stage and wait for the reports; returns {id: outcome}."""
    devices = params["devices"]
    image = params["image"]
    topics = [_topic(d, t) for d in devices for t in ("status", "ota/report")]
    session.subscribe(topics)
    boards, jobs = {}, {}
    for dev in devices:
        status = parse_json(session.retained(_topic(dev, "status")))
        before = str((status or {}).get("fw") or "")
        wanted, why = plan.needs_job(dev, status, image["version"])
        if not wanted:
            boards[dev["id"]] = dict(state=why, before=before, version=before, error="", seconds=0.0)
            continue
        if check:
            boards[dev["id"]] = dict(
                state="would-update", before=before, version=before, error=why, seconds=0.0
            )
            continue
        job_id = plan.new_job_id()
        jobs[dev["id"]] = (dev, job_id, before)
    started = time.monotonic()
    for dev, job_id, _before in jobs.values():
        session.publish(_topic(dev, "ota/job"), to_json(plan.job_payload(job_id, image)))

    def outcomes():
        out = {}
        for device_id, (dev, job_id, _before) in jobs.items():
            got = plan.report_outcome(parse_json(session.retained(_topic(dev, "ota/report"))), job_id)
            if got is not None:
                out[device_id] = got
        return out

    done = {}
    deadline = started + params["wait"]
    while len(done) < len(jobs):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        session.wait_until(lambda: len(outcomes()) > len(done), min(left, 1.0))
        for device_id, got in outcomes().items():
            done.setdefault(device_id, dict(got, seconds=round(time.monotonic() - started, 1)))
    for device_id, (dev, _job_id, before) in jobs.items():
        got = done.get(device_id) or dict(
            state="timeout",
            version=before,
            error=f"no report within {params['wait']:g} s",
            seconds=round(params["wait"], 1),
        )
        boards[device_id] = dict(got, before=before)
        session.publish(_topic(dev, "ota/job"), b"")
        if device_id in done:
            session.publish(_topic(dev, "ota/report"), b"")
    return boards


def record(params, boards):
    """Append one manifest row per board of the stage."""
    rows = load_rows(params["manifest_dir"], params["manifest_name"])
    previous = last_rows(rows, SUCCESS_RESULTS)
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    run_id = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    new = []
    for device_id, outcome in boards.items():
        row = plan.manifest_row(
            device_id, previous.get(device_id, {}), outcome, params["image"], now, outcome["seconds"]
        )
        new.append(dict(row, run_id=run_id))
    append_rows(params["manifest_dir"], new, params["manifest_name"])


def main():
    module = AnsibleModule(
        argument_spec=dict(
            host=dict(type="str", required=True),
            port=dict(type="int", default=8883),
            ca_cert=dict(type="path", required=True),
            client_cert=dict(type="path", required=True),
            client_key=dict(type="path", required=True),
            verify_hostname=dict(type="bool", default=True),
            timeout=dict(type="float", default=10),
            settle=dict(type="float", default=0.5),
            wait=dict(type="float", default=600),
            devices=dict(
                type="list",
                elements="dict",
                required=True,
                options=dict(
                    id=dict(type="str", required=True),
                    root=dict(type="str", required=True),
                    revoked=dict(type="bool", default=False),
                ),
            ),
            image=dict(
                type="dict",
                required=True,
                options=dict(
                    project=dict(type="str", required=True),
                    version=dict(type="str", required=True),
                    url=dict(type="str", required=True),
                    sha256=dict(type="str", required=True),
                    size=dict(type="int", required=True),
                ),
            ),
            manifest_dir=dict(type="path", default=""),
            manifest_name=dict(type="str", default="fleet"),
        ),
        supports_check_mode=True,
    )
    if mqtt is None:
        module.fail_json(msg=missing_required_lib("paho-mqtt"))
    params = module.params
    if not params["image"]["url"].startswith("https://"):
        module.fail_json(msg=f"image.url must be an https:// URL, got {params['image']['url']!r}")
    session = Session(params)
    try:
        session.open()
        boards = run_stage(session, params, module.check_mode)
    except MqttError as exc:
        module.fail_json(msg=str(exc))
    finally:
        session.close()
    if params["manifest_dir"] and not module.check_mode:
        try:
            record(params, boards)
        except (ManifestError, OSError) as exc:
            module.fail_json(msg=f"cannot append to the fleet manifest: {exc}", boards=boards)
    failed = sorted(d for d, b in boards.items() if b["state"] not in (*plan.OK_STATES, "would-update"))
    changed = any(b["state"] in ("updated", "rolled-back", "would-update") for b in boards.values())
    module.exit_json(changed=changed, boards=boards, failed_boards=failed)


if __name__ == "__main__":
    main()
