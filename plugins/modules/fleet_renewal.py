#!/usr/bin/python
# Copyright: esp32-mqtt-fleet contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

# Why this module exists: the controller's half of over-the-air renewal (docs/device-protocol.md) is
# a conversation on retained MQTT topics whose every step must be checked (the request, the broker's
# PUBACK, the confirmation) and remembered (a request answered once is never answered again). The
# decisions live in module_utils/fleet_csr.py (unit tested without a broker); this module is the MQTT
# side and the state file's read-modify-write under one lock.

from __future__ import annotations

DOCUMENTATION = r"""
---
module: fleet_renewal
short_description: The controller's MQTT exchange of over-the-air device certificate renewal
description:
  - Connects to the broker over TLS with the controller's service identity (a client certificate,
    e.g. C(fleet-pki)) and does one step of docs/device-protocol.md (version 1) for the boards in
    O(devices), each under its topic root C(R).
  - O(action=collect) reads every board's retained request (C(R/pki/csr)) and confirmation
    (C(R/pki/ack)). Requests are checked (size, JSON, version, request id, one self-signed PEM CSR,
    subject exactly C(CN=<device id>) and no extensions, key per O(policy), revocation, replay, rate
    limit); a refused one is answered on C(R/pki/rejected) with its reason and C(R/pki/csr) is
    cleared. Accepted requests are returned (for the pki role to sign), not recorded; only
    O(action=answer) makes a request answered.
  - O(action=answer) publishes each signed certificate retained on C(R/pki/cert) with the trust
    bundle O(ca_bundle), clears C(R/pki/csr), and records the certificate as pending confirmation and
    the request and its key as answered. The state is written before the certificate is published;
    a publish the broker refuses is taken back. An answer whose board has made a newer request since,
    or whose request was answered and finished already, is skipped. The same answer again changes
    nothing. With O(wait), it then waits that long for the boards' confirmations.
  - O(action=finish) closes the renewals the playbook has finished (new certificate adopted,
    superseded serial revoked); clears the retained C(R/pki/cert) and C(R/pki/ack) of that request
    and the open C(R/pki/cmd), and records the issue time (the rate limit counts from it). A board whose
    retained confirmation is not the matching one is skipped.
  - O(action=command) publishes a retained renew command (C(R/pki/cmd), a random nonce) to every board
    in O(devices) that has none open; an open command whose retained message is missing is published
    again with its nonce. A rerun changes nothing.
  - O(action=publish_ca) makes every board's retained C(R/pki/ca) carry O(ca_bundle); only boards whose
    retained bundle differs are published to. A board with no retained bundle whose station wrote this
    bundle into its flash (O(devices[].ca_sha256)) has it already and is not published to either, so
    upkeep after a fresh provisioning changes nothing.
  - O(action=observe) only reads (also in check mode) each board's retained C(R/status) (its firmware
    version, certificate serial, renewal state, online or its Last Will) and the readings it sends on
    C(R/telemetry) during O(wait) seconds (give it one reading interval). The service identity may read
    these two topics (the mosquitto role's ACL). Needs no O(state_file).
  - Revoked boards (O(devices[].revoked=true)) are never published a command or bundle; their requests
    are refused with C(revoked) while the broker still lets the controller read them.
  - Retained messages arrive right after the SUBACK; the module waits after the SUBACK until no
    retained message has arrived for O(settle) seconds, then decides. Every publish is QoS 1 and waits
    for its PUBACK; a refused one (for example C(0x87) Not authorized, the broker's ACL) fails naming
    the topic, with what was done before it in the result.
  - State file (O(state_file), JSON, mode 0600, replaced atomically) under an exclusive lock on
    C(.<name>.lock) next to it, held for the whole action, so two runs never answer one request twice.
    Its directory is created when missing.
version_added: "0.3.0"
author: esp32-mqtt-fleet contributors (@esp32-mqtt-fleet)
options:
  action:
    description: The step of the exchange to do.
    type: str
    required: true
    choices: [collect, answer, finish, command, publish_ca, observe]
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
    description: The controller's service identity certificate (PEM), e.g. C(services/fleet-pki.crt).
    type: path
    required: true
  client_key:
    description: The service identity's private key (PEM, unencrypted). Only its path is handled.
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
    description: Seconds without a retained message, after the SUBACK, after which all retained messages
      are taken to have arrived.
    type: float
    default: 0.5
  state_file:
    description:
      - The exchange's state (JSON), e.g. C(pki/renewals/state.json). Required by every action but
        O(action=publish_ca).
    type: path
  devices:
    description:
      - The boards. O(action=command) sends the command to every board listed here.
      - Every device id named in O(answers), O(finished) and O(wait_for) must be listed.
    type: list
    elements: dict
    default: []
    suboptions:
      id:
        description: Device id (the certificate CN).
        type: str
        required: true
      root:
        description: The board's topic root C(R), e.g. C(devices/esp32-01).
        type: str
        required: true
      cert:
        description: Path of the board's current certificate on the controller; may be absent.
        type: path
      revoked:
        description: Whether the board's current certificate is on the CRL.
        type: bool
        default: false
      ca_sha256:
        description:
          - SHA-256 (hex) of the trust bundle the board's station wrote into its flash (the fleet
            manifest's C(ca_sha256)); empty when unknown.
        type: str
        default: ""
  policy:
    description: The pki role's leaf key policy and the renewal rate limit (O(action=collect)).
    type: dict
    suboptions:
      key_type:
        description: Key type a request must have (as C(pki_leaf_key_type)).
        type: str
        choices: [EC, RSA]
        default: EC
      key_curve:
        description: Curve of an EC key (as C(pki_leaf_key_curve)); only this curve is accepted.
        type: str
        choices: [secp256r1, secp384r1, secp521r1]
        default: secp256r1
      key_size:
        description: Minimum size of an RSA key in bits (as C(pki_leaf_key_size)).
        type: int
        default: 2048
      min_interval_hours:
        description:
          - A board gets at most one certificate over the air per this many hours (counted from the
            last confirmed one and from one still pending) unless an operator command is open. 0 turns
            the limit off.
        type: float
        default: 24
  wait_for:
    description: With O(action=collect), device ids whose request to wait for (up to O(wait) seconds),
      e.g. the boards just sent a command.
    type: list
    elements: str
    default: []
  wait:
    description:
      - With O(action=collect) and O(wait_for), seconds to wait for those boards' requests.
      - With O(action=observe), seconds to listen for readings (also in check mode).
      - With O(action=answer), seconds to wait after publishing for the answered boards' confirmations
        (returned in RV(acks) and RV(failed_acks); later ones are found by the next O(action=collect)).
      - Not in check mode.
    type: float
    default: 0
  answers:
    description: With O(action=answer), the certificates to publish.
    type: list
    elements: dict
    default: []
    suboptions:
      id:
        description: Device id.
        type: str
        required: true
      req:
        description: The request id the certificate answers.
        type: str
        required: true
      cert:
        description: Path of the certificate the pki role signed from that request (PEM).
        type: path
        required: true
  ca_bundle:
    description: The fleet's trust bundle (PEM), published in C(R/pki/cert) and C(R/pki/ca). Required by
      O(action=answer) and O(action=publish_ca).
    type: path
  finished:
    description: With O(action=finish), device ids whose confirmed renewal the playbook has finished.
    type: list
    elements: str
    default: []
attributes:
  check_mode:
    description: Can run in check mode and report what it would change without changing it.
    support: full
    details: Reads the retained messages, reports what it would publish and record; publishes and
      writes nothing (takes the lock only if its file exists) and does not wait.
  diff_mode:
    description: Reports a before/after diff of what it changes, when run with --diff.
    support: none
requirements:
  - paho-mqtt >= 2.0 and cryptography in the Python that runs the module (the controller's)
notes:
  - A broker that makes the certificate CN the client id (C(use_username_as_clientid)) lets one
    connection of the service identity at a time; the state file's lock keeps the runs of one
    controller from overlapping.
  - Serials in RV(acks) and RV(answered) are given both as the protocol writes them (C(serial),
    lower-case hex) and as integers (C(serial_number), C(replaces_serial)), as
    M(esp32_fleet.mqtt_fleet.pki_crl) takes them.
"""

EXAMPLES = r"""
- name: Collect the boards' requests and confirmations
  esp32_fleet.mqtt_fleet.fleet_renewal:
    action: collect
    host: broker.example.net
    ca_cert: /srv/fleet/pki/ca/bundle.pem
    client_cert: /srv/fleet/pki/services/fleet-pki.crt
    client_key: /srv/fleet/pki/services/fleet-pki.key
    state_file: /srv/fleet/pki/renewals/state.json
    devices:
      - {id: esp32-01, root: devices/esp32-01, cert: /srv/fleet/pki/devices/esp32-01.crt, revoked: false}
    policy: {key_type: EC, key_curve: secp256r1, min_interval_hours: 24}
    wait_for: [esp32-01]
    wait: 30
  register: collected

- name: Publish the signed certificates and wait for the confirmations
  esp32_fleet.mqtt_fleet.fleet_renewal:
    action: answer
    host: broker.example.net
    ca_cert: /srv/fleet/pki/ca/bundle.pem
    client_cert: /srv/fleet/pki/services/fleet-pki.crt
    client_key: /srv/fleet/pki/services/fleet-pki.key
    state_file: /srv/fleet/pki/renewals/state.json
    devices: "{{ renewal_devices }}"
    ca_bundle: /srv/fleet/pki/ca/bundle.pem
    answers:
      - {id: esp32-01, req: "{{ collected.requests[0].req }}", cert: /srv/fleet/pki/renewals/esp32-01.crt}
    wait: 30
  register: answered

- name: Clear the finished exchanges
  esp32_fleet.mqtt_fleet.fleet_renewal:
    action: finish
    host: broker.example.net
    ca_cert: /srv/fleet/pki/ca/bundle.pem
    client_cert: /srv/fleet/pki/services/fleet-pki.crt
    client_key: /srv/fleet/pki/services/fleet-pki.key
    state_file: /srv/fleet/pki/renewals/state.json
    devices: "{{ renewal_devices }}"
    finished: "{{ answered.acks | map(attribute='device_id') | list }}"

- name: Ask a board to renew now
  esp32_fleet.mqtt_fleet.fleet_renewal:
    action: command
    host: broker.example.net
    ca_cert: /srv/fleet/pki/ca/bundle.pem
    client_cert: /srv/fleet/pki/services/fleet-pki.crt
    client_key: /srv/fleet/pki/services/fleet-pki.key
    state_file: /srv/fleet/pki/renewals/state.json
    devices: "{{ renewal_devices | selectattr('id', 'equalto', 'esp32-01') | list }}"

- name: Keep every board's retained trust bundle current
  esp32_fleet.mqtt_fleet.fleet_renewal:
    action: publish_ca
    host: broker.example.net
    ca_cert: /srv/fleet/pki/ca/bundle.pem
    client_cert: /srv/fleet/pki/services/fleet-pki.crt
    client_key: /srv/fleet/pki/services/fleet-pki.key
    devices: "{{ renewal_devices }}"
    ca_bundle: /srv/fleet/pki/ca/bundle.pem

- name: What the boards report (status and readings during one 5 s interval)
  esp32_fleet.mqtt_fleet.fleet_renewal:
    action: observe
    host: broker.example.net
    ca_cert: pki/ca/bundle.pem
    client_cert: pki/services/fleet-pki.crt
    client_key: pki/services/fleet-pki.key
    devices:
      - {id: esp32-01, root: devices/esp32-01}
    wait: 6
  register: observed
"""

RETURN = r"""
action:
  description: The action done.
  returned: always
  type: str
  sample: collect
reports:
  description:
    - Per device id, what the board itself reports. C(online) from its retained status (false for its Last
      Will, or no status at all); C(firmware_version), C(cert_serial) (hex), C(renewal_state) as the board
      wrote them (C(offline) when offline, C(no report) when it never published a status);
      C(last_reading) the UTC time of the last reading seen while listening (null when none came) and
      C(readings) how many.
  returned: action=observe
  type: dict
  sample:
    esp32-01: {online: true, firmware_version: esp32sim-0.1.0, cert_serial: 6be0b37e88d7, renewal_state: idle,
               last_reading: "2026-12-03T06:28:18Z", readings: 1}
requests:
  description:
    - Accepted requests, to be signed (C(csr) is the CSR in PEM). C(reason) is the board's
      (C(window), C(command), or null). C(repeat) is true for the request answered already and still
      waiting for confirmation, sent again by the board; answer it again (with the same certificate).
  returned: action=collect
  type: list
  elements: dict
  sample:
    - {device_id: esp32-01, req: Qm9hcmQtcmVxdWVzdC0wMDAx, csr: "-----BEGIN CERTIFICATE REQUEST-----...",
       public_key_sha256: 3f1d..., reason: command, repeat: false}
refused:
  description: Refused requests (answered on C(R/pki/rejected), C(R/pki/csr) cleared). C(reason) is a code
    of the protocol's refusals table (malformed, too_large, wrong_cn, wrong_key, revoked, replayed,
    rate_limited); C(req) is null when the request had none.
  returned: action=collect
  type: list
  elements: dict
  sample:
    - {device_id: esp32-02, req: Qm9hcmQtcmVxdWVzdC0wMDAy, reason: wrong_key,
       detail: "the key is RSA 1024; the policy is EC secp256r1"}
acks:
  description:
    - Matching confirmations (C(installed), for the pending request, with the serial issued for it).
      C(serial) as the board wrote it (hex), C(serial_number) its integer, C(replaces_serial) the
      integer serial of the certificate the board had when it was answered (null when none was known),
      the one to revoke.
  returned: action=collect or action=answer
  type: list
  elements: dict
  sample:
    - {device_id: esp32-01, req: Qm9hcmQtcmVxdWVzdC0wMDAx, serial: 5f3a9c, serial_number: 6240924,
       replaces_serial: 1234567890}
failed_acks:
  description: Confirmations of the pending request that report a failed install (or another serial),
    with the board's C(error).
  returned: action=collect or action=answer
  type: list
  elements: dict
  sample:
    - {device_id: esp32-01, req: Qm9hcmQtcmVxdWVzdC0wMDAx, serial: 5f3a9c,
       error: "connection with the new certificate failed: ..."}
stale_acks:
  description: Retained confirmations that are not of a pending request (for example one already finished).
  returned: action=collect
  type: list
  elements: dict
answered:
  description:
    - The answers published (or found published already). C(published) says whether the certificate was
      (in check mode would be) published in this run; C(orphaned_serial) is the integer serial of an
      earlier certificate issued for this board and never confirmed, which this answer supersedes
      (worth revoking), else null.
  returned: action=answer
  type: list
  elements: dict
  sample:
    - {device_id: esp32-01, req: Qm9hcmQtcmVxdWVzdC0wMDAx, serial: 5f3a9c, serial_number: 6240924,
       replaces_serial: 1234567890, published: true, orphaned_serial: null}
skipped:
  description: Devices or answers left alone, each with C(device_id) and C(reason) (and C(req) for answers).
  returned: action=answer or action=finish or action=command or action=publish_ca
  type: list
  elements: dict
  sample: [{device_id: esp32-01, req: Qm9hcmQtcmVxdWVzdC0wMDAx, reason: the board has made a newer request}]
completed:
  description: Renewals finished in this run (retained exchange cleared, state closed).
  returned: action=finish
  type: list
  elements: dict
  sample: [{device_id: esp32-01, req: Qm9hcmQtcmVxdWVzdC0wMDAx, serial: 5f3a9c, replaces_serial: 1234567890}]
commanded:
  description: Device ids a renew command was (in check mode would be) published to in this run.
  returned: action=command
  type: list
  elements: str
  sample: [esp32-01]
already_open:
  description: Device ids whose renew command was open and retained already (nothing published).
  returned: action=command
  type: list
  elements: str
published:
  description: Device ids whose retained trust bundle was (in check mode would be) published.
  returned: action=publish_ca
  type: list
  elements: str
unchanged:
  description: Device ids whose retained trust bundle was current.
  returned: action=publish_ca
  type: list
  elements: str
"""

import contextlib
import datetime
import hashlib
import os
import secrets

from ansible.module_utils.basic import AnsibleModule, missing_required_lib
from ansible_collections.esp32_fleet.mqtt_fleet.plugins.module_utils import fleet_csr
from ansible_collections.esp32_fleet.mqtt_fleet.plugins.module_utils.fleet_mqtt import (
    MqttError,
    Session,
    mqtt,
)
from ansible_collections.esp32_fleet.mqtt_fleet.plugins.module_utils.fleet_mqtt import parse_json as _parse
from ansible_collections.esp32_fleet.mqtt_fleet.plugins.module_utils.fleet_mqtt import to_json as _json

# The session's errors are this module's one-line failures.
RenewalError = MqttError

# -- helpers ------------------------------------------------------------------------------------------


def topic(device, leaf):
    return f"{device['root']}/pki/{leaf}"


def _devices(params):
    out = {}
    for index, dev in enumerate(params["devices"]):
        root = (dev["root"] or "").strip()
        if not dev["id"] or not root or root.endswith("/") or "+" in root or "#" in root:
            raise RenewalError(
                f"devices[{index}]: id and root are required; root has no wildcard or trailing /"
            )
        if dev["id"] in out:
            raise RenewalError(f"devices: {dev['id']} is listed twice")
        out[dev["id"]] = dict(dev, root=root)
    return out


def _not_revoked(devices, skipped=None):
    """The ids of the boards that may be published to; revoked ones are added to skipped."""
    targets = []
    for device_id, dev in devices.items():
        if not dev["revoked"]:
            targets.append(device_id)
        elif skipped is not None:
            skipped.append({"device_id": device_id, "reason": "revoked"})
    return targets


def _known(devices, ids, option):
    unknown = [i for i in ids if i not in devices]
    if unknown:
        raise RenewalError(f"{option} names devices not in devices: {', '.join(unknown)}")


def _read_text(path, what):
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise RenewalError(f"{what}: cannot read {path}: {exc}") from None


def _current_cert(device):
    """The board's current certificate (PEM text) on the controller, None when absent."""
    path = device.get("cert")
    if not path or not os.path.exists(path):
        return None
    pem = _read_text(path, f"devices[{device['id']}].cert")
    try:
        fleet_csr.load_certificate(pem)
    except ValueError:
        raise RenewalError(f"devices[{device['id']}].cert: {path} is not a PEM certificate") from None
    return pem


def _ca_bundle(params):
    if not params["ca_bundle"]:
        raise RenewalError(f"action={params['action']} needs ca_bundle")
    text = _read_text(params["ca_bundle"], "ca_bundle")
    try:
        fleet_csr.load_certificate(text)
    except ValueError:
        raise RenewalError(f"ca_bundle: {params['ca_bundle']} holds no PEM certificate") from None
    return text


def _int_serial(hex_serial):
    return fleet_csr.serial_int(hex_serial) if hex_serial else None


@contextlib.contextmanager
def _state_lock(module):
    path = module.params["state_file"]
    directory = os.path.dirname(path) or "."
    if module.check_mode:
        # Check mode writes nothing, not even the lock file; it only reads.
        if os.path.exists(fleet_csr.lock_path(path)):
            with fleet_csr.locked(path):
                yield
        else:
            yield
        return
    if not os.path.isdir(directory):
        try:
            os.makedirs(directory, 0o755)
        except OSError as exc:
            raise RenewalError(f"state_file: cannot create {directory}: {exc}") from None
    with fleet_csr.locked(path):
        yield


def _load_state(path):
    try:
        return fleet_csr.load_state(path)
    except fleet_csr.StateError as exc:
        raise RenewalError(str(exc)) from None


def _save_state(module, state):
    if module.check_mode:
        return
    try:
        fleet_csr.save_state(module.params["state_file"], state)
    except OSError as exc:
        raise RenewalError(f"state_file: cannot write {module.params['state_file']}: {exc}") from None


def _now():
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0)


def _ack_lists(devices, session, state, ids):
    """The confirmations on R/pki/ack of the boards ids, decided against state."""
    acks, failed, stale = [], [], []
    for device_id in ids:
        payload = session.retained(topic(devices[device_id], "ack"))
        if not payload:
            continue
        entry = fleet_csr.device_entry(state, device_id)
        decision = fleet_csr.check_ack(device_id, payload, entry)
        if decision["result"] == "matched":
            pending = entry["pending"]
            acks.append(
                {
                    "device_id": device_id,
                    "req": decision["req"],
                    "serial": decision["serial"],
                    "serial_number": fleet_csr.serial_int(decision["serial"]),
                    "replaces_serial": _int_serial(pending.get("replaces_serial")),
                }
            )
        elif decision["result"] == "failed":
            failed.append(
                {
                    "device_id": device_id,
                    "req": decision["req"],
                    "serial": decision["serial"],
                    "error": decision["detail"],
                }
            )
        else:
            stale.append({"device_id": device_id, "req": decision["req"], "detail": decision["detail"]})
    return acks, failed, stale


def _settled_ack(device_id, devices, session, state):
    payload = session.messages.get(topic(devices[device_id], "ack"), b"")
    if not payload:
        return False
    entry = fleet_csr.device_entry(state, device_id)
    return fleet_csr.check_ack(device_id, payload, entry)["result"] in ("matched", "failed")


# -- actions ------------------------------------------------------------------------------------------


def collect(module, devices, session):
    p = module.params
    result = {"requests": [], "refused": [], "acks": [], "failed_acks": [], "stale_acks": []}
    _known(devices, p["wait_for"], "wait_for")
    try:
        policy = fleet_csr.normalize_policy(p["policy"])
    except ValueError as exc:
        raise RenewalError(str(exc)) from None
    currents = {device_id: _current_cert(dev) for device_id, dev in devices.items()}
    with _state_lock(module):
        state = _load_state(p["state_file"])
        if not devices:
            return False, result
        session.open()
        topics, tolerate = [], []
        for dev in devices.values():
            for leaf in ("csr", "ack"):
                topics.append(topic(dev, leaf))
                if dev["revoked"]:
                    tolerate.append(topic(dev, leaf))
        session.subscribe(topics, tolerate)
        if p["wait_for"] and p["wait"] > 0 and not module.check_mode:
            wanted = [topic(devices[i], "csr") for i in p["wait_for"]]
            session.wait_until(lambda: all(session.messages.get(t) for t in wanted), p["wait"])
        now = _now()
        acks, failed, stale = _ack_lists(devices, session, state, list(devices))
        result.update(acks=acks, failed_acks=failed, stale_acks=stale)
        changed = False
        for device_id, dev in devices.items():
            payload = session.retained(topic(dev, "csr"))
            if not payload:
                continue
            entry = fleet_csr.device_entry(state, device_id)
            decision = fleet_csr.check_request(
                device_id, payload, policy, entry, currents[device_id], dev["revoked"], now
            )
            if decision["accepted"]:
                result["requests"].append(
                    {
                        "device_id": device_id,
                        "req": decision["req"],
                        "csr": decision["csr_pem"],
                        "public_key_sha256": decision["public_key_sha256"],
                        "reason": decision["reason"],
                        "repeat": decision["repeat"],
                    }
                )
                continue
            refusal = {k: decision[k] for k in ("req", "reason", "detail")}
            if not module.check_mode:
                try:
                    session.publish(topic(dev, "rejected"), fleet_csr.rejection_payload(decision))
                    session.publish(topic(dev, "csr"), b"")
                except RenewalError as exc:
                    exc.partial = result
                    raise
            result["refused"].append(dict(device_id=device_id, **refusal))
            changed = True
    return changed, result


def answer(module, devices, session):
    p = module.params
    result = {"answered": [], "skipped": [], "acks": [], "failed_acks": []}
    bundle = _ca_bundle(p)
    ids = [a["id"] for a in p["answers"]]
    _known(devices, ids, "answers")
    if len(set(ids)) != len(ids):
        raise RenewalError("answers: one answer per device")
    prepared = []
    for item in p["answers"]:
        dev = devices[item["id"]]
        if dev["revoked"]:
            raise RenewalError(f"answers: {item['id']} is revoked; its requests are refused, never answered")
        if not fleet_csr.ID_RE.match(item["req"]):
            raise RenewalError(f"answers: {item['id']}: req {item['req']!r} is not a request id")
        if module.check_mode and not os.path.exists(item["cert"]):
            # The pki role's check mode signs nothing: report the answer without its certificate.
            prepared.append((item, dev, None, None))
            continue
        pem = _read_text(item["cert"], f"answers[{item['id']}].cert")
        try:
            facts = fleet_csr.certificate_facts(pem)
        except ValueError:
            raise RenewalError(
                f"answers[{item['id']}].cert: {item['cert']} is not a PEM certificate"
            ) from None
        if facts["common_names"] != [item["id"]]:
            raise RenewalError(
                f"answers[{item['id']}].cert: {item['cert']} is for CN {facts['common_names']}, "
                f"not {item['id']}"
            )
        prepared.append((item, dev, pem, facts))
    currents = {step[0]["id"]: _current_cert(step[1]) for step in prepared}
    with _state_lock(module):
        state = _load_state(p["state_file"])
        if not prepared:
            return False, result
        session.open()
        session.subscribe([topic(step[1], leaf) for step in prepared for leaf in ("csr", "cert", "ack")])
        now = _now()
        plan = []
        for item, dev, pem, facts in prepared:
            device_id, req = item["id"], item["req"]
            entry = fleet_csr.device_entry(state, device_id)
            pending = entry["pending"] or {}
            csr_msg = _parse(session.retained(topic(dev, "csr")))
            csr_req = csr_msg.get("req") if csr_msg else None
            if csr_msg is not None and csr_req != req:
                result["skipped"].append(
                    {
                        "device_id": device_id,
                        "req": req,
                        "reason": f"the board has made a newer request ({csr_req})",
                    }
                )
                continue
            if pending.get("req") != req and req in entry["answered_reqs"]:
                result["skipped"].append(
                    {
                        "device_id": device_id,
                        "req": req,
                        "reason": "the request was answered and finished already",
                    }
                )
                continue
            if facts is not None and csr_msg is not None:
                key_sha = fleet_csr.request_public_key_sha256(session.retained(topic(dev, "csr")))
                if key_sha is not None and key_sha != facts["public_key_sha256"]:
                    raise RenewalError(
                        f"answers[{device_id}].cert: {item['cert']} is not for request {req}: "
                        "its public key is not the CSR's",
                        {"answered": result["answered"], "skipped": result["skipped"]},
                    )
            same = (
                facts is not None
                and pending.get("req") == req
                and pending.get("cert_sha256") == facts["cert_sha256"]
            )
            replaces = None
            if same:
                replaces = _int_serial(pending.get("replaces_serial"))
            elif currents[device_id]:
                replaces = fleet_csr.load_certificate(currents[device_id]).serial_number
            orphaned = None
            if not same and pending and pending.get("serial"):
                orphaned = _int_serial(pending["serial"])
            payload = None
            retained_cert = _parse(session.retained(topic(dev, "cert")))
            if pem is not None:
                body = {"v": fleet_csr.VERSION, "req": req, "cert": pem, "ca": bundle}
                payload = _json(body)
                publish_cert = retained_cert != body
            else:
                publish_cert = True
            plan.append(
                {
                    "item": item,
                    "dev": dev,
                    "facts": facts,
                    "payload": payload,
                    "record": not same,
                    "before": entry,
                    "publish_cert": publish_cert,
                    "clear_csr": csr_msg is not None,
                    "replaces": replaces,
                    "orphaned": orphaned,
                }
            )
        # Write-ahead: the state says answered before the certificate leaves, so a run that dies after
        # the publish never lets the same request be answered twice.
        for step in plan:
            if step["record"] and step["facts"] is not None:
                facts = step["facts"]
                set_to = fleet_csr.record_answer(
                    step["before"],
                    step["item"]["req"],
                    facts["public_key_sha256"],
                    facts["serial"],
                    facts["cert_sha256"],
                    step["replaces"],
                    now,
                )
                fleet_csr.set_entry(state, step["item"]["id"], set_to)
        if any(step["record"] for step in plan):
            _save_state(module, state)
        changed = False
        for index, step in enumerate(plan):
            item, dev, facts = step["item"], step["dev"], step["facts"]
            if not module.check_mode:
                try:
                    if step["publish_cert"]:
                        session.publish(topic(dev, "cert"), step["payload"])
                except RenewalError as exc:
                    # Take back the records of the answers certainly not published (this one when the
                    # broker refused it, all later ones), so a refused publish leaves no trace. After a
                    # timeout this one may have been published: its record stays.
                    start = index if exc.refused else index + 1
                    for later in plan[start:]:
                        if later["record"]:
                            fleet_csr.set_entry(state, later["item"]["id"], later["before"])
                    _save_state(module, state)
                    exc.partial = result
                    raise
                try:
                    if step["clear_csr"]:
                        session.publish(topic(dev, "csr"), b"")
                except RenewalError as exc:
                    exc.partial = result
                    raise
            changed = changed or step["record"] or step["publish_cert"] or step["clear_csr"]
            result["answered"].append(
                {
                    "device_id": item["id"],
                    "req": item["req"],
                    "serial": facts["serial"] if facts else None,
                    "serial_number": facts["serial_number"] if facts else None,
                    "replaces_serial": step["replaces"],
                    "published": step["publish_cert"],
                    "orphaned_serial": step["orphaned"],
                }
            )
        answered_ids = [s["item"]["id"] for s in plan]
        if p["wait"] > 0 and answered_ids and not module.check_mode:
            session.wait_until(
                lambda: all(_settled_ack(i, devices, session, state) for i in answered_ids), p["wait"]
            )
        acks, failed = _ack_lists(devices, session, state, answered_ids)[:2]
        result.update(acks=acks, failed_acks=failed)
    return changed, result


def finish(module, devices, session):
    p = module.params
    result = {"completed": [], "skipped": []}
    ids = list(dict.fromkeys(p["finished"]))
    _known(devices, ids, "finished")
    with _state_lock(module):
        state = _load_state(p["state_file"])
        todo = []
        for device_id in ids:
            entry = fleet_csr.device_entry(state, device_id)
            if entry["pending"]:
                todo.append(device_id)
            else:
                result["skipped"].append(
                    {"device_id": device_id, "reason": "no renewal waits to be finished"}
                )
        if not todo:
            return False, result
        session.open()
        session.subscribe([topic(devices[i], leaf) for i in todo for leaf in ("cert", "ack", "cmd")])
        changed = False
        try:
            for device_id in todo:
                dev = devices[device_id]
                entry = fleet_csr.device_entry(state, device_id)
                pending = entry["pending"]
                ack = session.retained(topic(dev, "ack"))
                if ack and fleet_csr.check_ack(device_id, ack, entry)["result"] != "matched":
                    result["skipped"].append(
                        {"device_id": device_id, "reason": "the board's retained confirmation does not match"}
                    )
                    continue
                clears = []
                cert = _parse(session.retained(topic(dev, "cert")))
                if cert is not None and cert.get("req") == pending["req"]:
                    clears.append(topic(dev, "cert"))
                if ack:
                    clears.append(topic(dev, "ack"))
                cmd = _parse(session.retained(topic(dev, "cmd")))
                if entry["command"] and cmd is not None and cmd.get("nonce") == entry["command"].get("nonce"):
                    clears.append(topic(dev, "cmd"))
                if not module.check_mode:
                    for where in clears:
                        session.publish(where, b"")
                fleet_csr.set_entry(state, device_id, fleet_csr.record_finish(entry))
                changed = True
                result["completed"].append(
                    {
                        "device_id": device_id,
                        "req": pending["req"],
                        "serial": pending.get("serial"),
                        "replaces_serial": _int_serial(pending.get("replaces_serial")),
                    }
                )
        except RenewalError as exc:
            exc.partial = result
            raise
        finally:
            # The retained exchange is cleared first, the state closed last: a run that dies in between
            # finishes the renewal again on the next run (its confirmation then is gone: that is allowed).
            if changed:
                _save_state(module, state)
    return changed, result


def command(module, devices, session):
    p = module.params
    result = {"commanded": [], "already_open": [], "skipped": []}
    with _state_lock(module):
        state = _load_state(p["state_file"])
        targets = _not_revoked(devices, result["skipped"])
        if not targets:
            return False, result
        session.open()
        session.subscribe([topic(devices[i], "cmd") for i in targets])
        changed = False
        try:
            for device_id in targets:
                dev = devices[device_id]
                entry = fleet_csr.device_entry(state, device_id)
                retained = _parse(session.retained(topic(dev, "cmd")))
                open_nonce = (entry["command"] or {}).get("nonce")
                if open_nonce and retained is not None and retained.get("nonce") == open_nonce:
                    result["already_open"].append(device_id)
                    continue
                nonce = open_nonce or secrets.token_hex(16)
                if not module.check_mode:
                    session.publish(
                        topic(dev, "cmd"), _json({"v": fleet_csr.VERSION, "op": "renew", "nonce": nonce})
                    )
                if not open_nonce:
                    fleet_csr.set_entry(state, device_id, fleet_csr.record_command(entry, nonce, _now()))
                changed = True
                result["commanded"].append(device_id)
        except RenewalError as exc:
            exc.partial = result
            raise
        finally:
            if changed:
                _save_state(module, state)
    return changed, result


def publish_ca(module, devices, session):
    p = module.params
    result = {"published": [], "unchanged": [], "skipped": []}
    bundle = _ca_bundle(p)
    want = {"v": fleet_csr.VERSION, "ca": bundle}
    targets = _not_revoked(devices, result["skipped"])
    if not targets:
        return False, result
    session.open()
    session.subscribe([topic(devices[i], "ca") for i in targets])
    changed = False
    # The station wrote the bundle file's text into NVS (mqtt/ca_cert): the same bytes hash the same.
    bundle_sha256 = hashlib.sha256(bundle.encode("utf-8")).hexdigest()
    for device_id in targets:
        where = topic(devices[device_id], "ca")
        retained = session.retained(where)
        from_station = not retained and devices[device_id].get("ca_sha256") == bundle_sha256
        if from_station or _parse(retained) == want:
            result["unchanged"].append(device_id)
            continue
        if not module.check_mode:
            try:
                session.publish(where, _json(want))
            except RenewalError as exc:
                exc.partial = result
                raise
        changed = True
        result["published"].append(device_id)
    return changed, result


def observe(module, devices, session):
    """Read only: each board's retained status and the readings it sends while we listen."""
    p = module.params
    targets = _not_revoked(devices)
    reports = {}
    if not targets:
        return False, {"reports": reports}
    session.open()
    roots = {i: devices[i]["root"] for i in targets}
    session.subscribe([f"{roots[i]}/status" for i in targets] + [f"{roots[i]}/telemetry" for i in targets])
    session.wait_until(lambda: False, p["wait"])
    for device_id in targets:
        status = _parse(session.retained(f"{roots[device_id]}/status"))
        status = status if isinstance(status, dict) else {}
        with session.cond:
            seen = list(session.arrivals.get(f"{roots[device_id]}/telemetry", []))
        online = status.get("online") is True
        reports[device_id] = {
            "online": online,
            "firmware_version": status.get("fw"),
            "cert_serial": status.get("cert_serial"),
            "renewal_state": (status.get("renewal") or "unknown")
            if online
            else ("offline" if status else "no report"),
            "last_reading": seen[-1] if seen else None,
            "readings": len(seen),
        }
    return False, {"reports": reports}


ACTIONS = {
    "collect": collect,
    "answer": answer,
    "finish": finish,
    "command": command,
    "publish_ca": publish_ca,
    "observe": observe,
}


def run(module):
    params = module.params
    if params["action"] not in ("publish_ca", "observe") and not params["state_file"]:
        raise RenewalError(f"action={params['action']} needs state_file")
    for name in ("timeout", "settle", "wait"):
        if params[name] < 0:
            raise RenewalError(f"{name} must not be negative")
    devices = _devices(params)
    session = Session(params)
    try:
        changed, lists = ACTIONS[params["action"]](module, devices, session)
    finally:
        session.close()
    return dict(lists, changed=changed, action=params["action"])


def main():
    module = AnsibleModule(
        argument_spec={
            "action": {
                "type": "str",
                "required": True,
                "choices": ["collect", "answer", "finish", "command", "publish_ca", "observe"],
            },
            "host": {"type": "str", "required": True},
            "port": {"type": "int", "default": 8883},
            "ca_cert": {"type": "path", "required": True},
            "client_cert": {"type": "path", "required": True},
            "client_key": {"type": "path", "required": True},
            "verify_hostname": {"type": "bool", "default": True},
            "timeout": {"type": "float", "default": 10},
            "settle": {"type": "float", "default": 0.5},
            "state_file": {"type": "path"},
            "devices": {
                "type": "list",
                "elements": "dict",
                "default": [],
                "options": {
                    "id": {"type": "str", "required": True},
                    "root": {"type": "str", "required": True},
                    "cert": {"type": "path"},
                    "revoked": {"type": "bool", "default": False},
                    "ca_sha256": {"type": "str", "default": ""},
                },
            },
            "policy": {
                "type": "dict",
                "options": {
                    "key_type": {"type": "str", "choices": ["EC", "RSA"], "default": "EC"},
                    "key_curve": {
                        "type": "str",
                        "choices": ["secp256r1", "secp384r1", "secp521r1"],
                        "default": "secp256r1",
                    },
                    "key_size": {"type": "int", "default": 2048},
                    "min_interval_hours": {"type": "float", "default": 24},
                },
            },
            "wait_for": {"type": "list", "elements": "str", "default": []},
            "wait": {"type": "float", "default": 0},
            "answers": {
                "type": "list",
                "elements": "dict",
                "default": [],
                "options": {
                    "id": {"type": "str", "required": True},
                    "req": {"type": "str", "required": True},
                    "cert": {"type": "path", "required": True},
                },
            },
            "ca_bundle": {"type": "path"},
            "finished": {"type": "list", "elements": "str", "default": []},
        },
        required_if=[("action", "answer", ("ca_bundle",)), ("action", "publish_ca", ("ca_bundle",))],
        supports_check_mode=True,
    )
    if mqtt is None:
        module.fail_json(msg=missing_required_lib("paho-mqtt"))
    if not fleet_csr.HAS_CRYPTOGRAPHY:
        module.fail_json(msg=missing_required_lib("cryptography"))
    try:
        result = run(module)
    except RenewalError as exc:
        module.fail_json(msg=str(exc), action=module.params["action"], **exc.partial)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
