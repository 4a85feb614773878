# Copyright: esp32-mqtt-fleet contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The controller's decisions in over-the-air certificate renewal (docs/device-protocol.md, version 1),
without any network: is a board's request (R/pki/csr) answered or refused, and with which reason; is a
board's confirmation (R/pki/ack) the one for the certificate issued to it; and the exchange's state
file (what was answered, what waits for confirmation, which operator command is open), read and
written atomically under the fleet's one lock (fleet_lock). Used by the fleet_renewal module.

The state file is JSON: {"v": 1, "devices": {<device id>: entry}}, each entry
{"answered_reqs": [...], "answered_keys": [...], "last_issued": ISO 8601 or null,
 "pending": {req, serial, cert_sha256, public_key_sha256, issued_at, replaces_serial} or null,
 "command": {nonce, at} or null}. Serials are lower-case hex as in the protocol; the answered lists
keep the last MAX_ANSWERED entries.

Needs cryptography for the request checks (reported when a request is checked, not at import).
"""

from __future__ import annotations

import copy
import datetime
import hashlib
import json
import os
import re

from ansible_collections.esp32_fleet.mqtt_fleet.plugins.module_utils.fleet_lock import exclusive_lock
from ansible_collections.esp32_fleet.mqtt_fleet.plugins.module_utils.fleet_manifest import atomic_write

try:
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.x509.oid import NameOID, ObjectIdentifier

    _EXTENSION_REQUEST = ObjectIdentifier("1.2.840.113549.1.9.14")  # PKCS #9 extensionRequest
    HAS_CRYPTOGRAPHY = True
except ImportError:  # the module reports it with missing_required_lib
    HAS_CRYPTOGRAPHY = False

VERSION = 1
MAX_PAYLOAD = 8192
MAX_ANSWERED = 20
ID_RE = re.compile(r"^[A-Za-z0-9_-]{16,64}$")
CURVES = ("secp256r1", "secp384r1", "secp521r1")
KEY_TYPES = ("EC", "RSA")
REFUSALS = ("malformed", "too_large", "wrong_cn", "wrong_key", "revoked", "replayed", "rate_limited")
ACK_RESULTS = ("matched", "failed", "stale")
_PEM_BLOCK = re.compile(r"-----BEGIN ([A-Z0-9 ]+)-----.*?-----END \1-----", re.DOTALL)
_PEM_BEGIN = re.compile(r"-----BEGIN [A-Z0-9 ]+-----")
_CSR_LABELS = ("CERTIFICATE REQUEST", "NEW CERTIFICATE REQUEST")
# Longest request id echoed back in a refusal when it does not match ID_RE (the board matches on it).
_ECHO_REQ_MAX = 256


class StateError(ValueError):
    """The state file cannot be used; the message names it."""


# -- time and small helpers -------------------------------------------------------------------------


def iso(when):
    """ISO 8601 UTC, seconds, with Z."""
    return when.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_iso(text):
    """A time written by iso() (or any ISO 8601 with offset, Z or naive = UTC); None when unreadable."""
    if not isinstance(text, str) or not text:
        return None
    try:
        when = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return when


def serial_hex(number):
    """A certificate serial as the protocol writes it: lower-case hex without separators."""
    return format(int(number), "x")


def serial_int(text):
    """The integer of a protocol serial (hex); None when it is not one."""
    if isinstance(text, bool) or not isinstance(text, (str, int)):
        return None
    if isinstance(text, int):
        return text
    try:
        return int(text.strip().lower().replace(":", ""), 16)
    except ValueError:
        return None


def public_key_der(public_key):
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def public_key_sha256(public_key):
    """SHA-256 (hex) of the SubjectPublicKeyInfo DER: how answered keys are remembered."""
    return hashlib.sha256(public_key_der(public_key)).hexdigest()


def load_certificate(pem):
    """The first certificate of a PEM text (str or bytes); ValueError when there is none."""
    if isinstance(pem, str):
        pem = pem.encode()
    return x509.load_pem_x509_certificate(pem)


def certificate_facts(pem):
    """{serial (hex), serial_number (int), cert_sha256, public_key_sha256, common_names} of a PEM cert."""
    cert = load_certificate(pem)
    return {
        "serial": serial_hex(cert.serial_number),
        "serial_number": cert.serial_number,
        "cert_sha256": hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest(),
        "public_key_sha256": public_key_sha256(cert.public_key()),
        "common_names": [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)],
    }


def normalize_policy(policy):
    """The leaf key policy as {type, curve, size, min_interval_hours}.

    Takes the pki role's names (key_type, key_curve, key_size, as pki_leaf_key_*) or the short ones
    (type, curve, size). Defaults: EC secp256r1, RSA 2048, 24 hours. ValueError when unusable.
    """
    policy = dict(policy or {})

    def pick(*names, default=None):
        for name in names:
            if policy.get(name) is not None:
                return policy[name]
        return default

    key_type = str(pick("type", "key_type", default="EC")).upper()
    curve = str(pick("curve", "key_curve", default="secp256r1")).lower()
    try:
        size = int(pick("size", "key_size", default=2048))
        hours = float(pick("min_interval_hours", default=24))
    except (TypeError, ValueError):
        raise ValueError(f"policy: key_size and min_interval_hours must be numbers, got {policy!r}") from None
    if key_type not in KEY_TYPES:
        raise ValueError(f"policy: key_type must be one of {', '.join(KEY_TYPES)}, got {key_type!r}")
    if key_type == "EC" and curve not in CURVES:
        raise ValueError(f"policy: key_curve must be one of {', '.join(CURVES)}, got {curve!r}")
    if size < 1 or hours < 0:
        raise ValueError("policy: key_size must be positive and min_interval_hours not negative")
    return {"type": key_type, "curve": curve, "size": size, "min_interval_hours": hours}


# -- the request ------------------------------------------------------------------------------------


def _refuse(req, reason, detail):
    return {"accepted": False, "req": req, "reason": reason, "detail": detail}


def _echo_req(value):
    """The request id to name in a refusal: the board's own string when it is one, else None."""
    if isinstance(value, str) and 0 < len(value) <= _ECHO_REQ_MAX:
        return value
    return None


def _one_csr(text):
    """The CSR of a text that is exactly one PEM CSR block (whitespace around it only), or a why-not."""
    blocks = list(_PEM_BLOCK.finditer(text))
    if len(_PEM_BEGIN.findall(text)) != 1 or len(blocks) != 1:
        return None, f"csr must be exactly one PEM block, found {len(_PEM_BEGIN.findall(text))}"
    block = blocks[0]
    if block.group(1) not in _CSR_LABELS:
        return None, f"csr is a PEM {block.group(1)}, not a CERTIFICATE REQUEST"
    if (text[: block.start()] + text[block.end() :]).strip():
        return None, "csr has text outside its PEM block"
    try:
        csr = x509.load_pem_x509_csr(block.group(0).encode())
    except (ValueError, UnsupportedAlgorithm) as exc:
        return None, f"csr does not parse: {exc}"
    try:
        valid = csr.is_signature_valid
    except (ValueError, UnsupportedAlgorithm, InvalidSignature) as exc:
        return None, f"the CSR's self-signature cannot be checked: {exc}"
    if not valid:
        return None, "the CSR's self-signature does not verify"
    return csr, None


def _subject_problem(csr, device_id):
    rdns = list(csr.subject.rdns)
    attrs = [attr for rdn in rdns for attr in rdn]
    if len(rdns) != 1 or len(attrs) != 1 or attrs[0].oid != NameOID.COMMON_NAME:
        return f"the subject must be exactly CN={device_id}, got {csr.subject.rfc4514_string()!r}"
    if attrs[0].value != device_id:
        return f"the subject's CN is {attrs[0].value!r}, not the topic's device id {device_id!r}"
    try:
        extensions = list(csr.extensions)
    except ValueError as exc:  # duplicate or unparsable extensions
        return f"the CSR's extensions are not readable: {exc}"
    if extensions:
        names = ", ".join(getattr(e.oid, "_name", None) or e.oid.dotted_string for e in extensions)
        return f"the CSR asks for extensions ({names}); only CN={device_id} may be requested"
    try:
        others = [a.oid for a in csr.attributes if a.oid != _EXTENSION_REQUEST]
    except ValueError as exc:
        return f"the CSR's attributes are not readable: {exc}"
    if others:
        names = ", ".join(getattr(o, "_name", None) or o.dotted_string for o in others)
        return f"the CSR carries attributes ({names})"
    return None


def _key_problem(public_key, policy):
    if policy["type"] == "EC":
        if not isinstance(public_key, ec.EllipticCurvePublicKey):
            return f"the key is {_key_name(public_key)}; the policy is EC {policy['curve']}"
        if public_key.curve.name != policy["curve"]:
            return f"the key is EC {public_key.curve.name}; the policy is EC {policy['curve']}"
        return None
    if not isinstance(public_key, rsa.RSAPublicKey):
        return f"the key is {_key_name(public_key)}; the policy is RSA of at least {policy['size']} bits"
    if public_key.key_size < policy["size"]:
        return f"the key is RSA {public_key.key_size}; the policy is RSA of at least {policy['size']} bits"
    return None


def _key_name(public_key):
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return f"EC {public_key.curve.name}"
    if isinstance(public_key, rsa.RSAPublicKey):
        return f"RSA {public_key.key_size}"
    return type(public_key).__name__.replace("PublicKey", "").lstrip("_") or "unknown"


def last_issuance(entry):
    """When a certificate was last issued over the air to this board: the later of last_issued (a
    confirmed one) and the pending one's issued_at (answered, not confirmed yet); None when never."""
    times = [parse_iso(entry.get("last_issued"))]
    if entry.get("pending"):
        times.append(parse_iso(entry["pending"].get("issued_at")))
    times = [t for t in times if t is not None]
    return max(times) if times else None


def check_request(device_id, payload_bytes, policy, state, current_cert_pem, revoked, now):
    """Decide one board's request (the retained payload of R/pki/csr).

    state is the board's entry of the state file (device_entry()), current_cert_pem its current
    certificate on the controller (None when there is none), revoked whether that certificate is on
    the CRL, now an aware datetime. Returns either
      {"accepted": True, "req", "csr_pem", "public_key_sha256", "reason", "repeat"}: answer it (reason
      is the board's "window"/"command", None when absent; repeat=True when it is the request answered
      already and still waiting for confirmation, sent again after a reboot: answer it again with the
      same certificate, it is exempt from replayed and rate_limited), or
      {"accepted": False, "req" (None when the payload has none), "reason": one of REFUSALS, "detail"}.
    Checks in the order: too_large (before parsing), malformed, wrong_cn, wrong_key, revoked,
    replayed, rate_limited.
    """
    if not HAS_CRYPTOGRAPHY:
        raise RuntimeError("checking a renewal request needs the Python library cryptography")
    policy = normalize_policy(policy)
    entry = device_entry({"devices": {device_id: state or {}}}, device_id)
    if isinstance(payload_bytes, str):
        payload_bytes = payload_bytes.encode()
    payload_bytes = bytes(payload_bytes or b"")
    if len(payload_bytes) > MAX_PAYLOAD:
        return _refuse(None, "too_large", f"the request is {len(payload_bytes)} bytes, over {MAX_PAYLOAD}")
    try:
        msg = json.loads(payload_bytes.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return _refuse(None, "malformed", "the request is not JSON")
    if not isinstance(msg, dict):
        return _refuse(None, "malformed", "the request is not a JSON object")
    req = _echo_req(msg.get("req"))
    missing = [k for k in ("v", "req", "csr") if k not in msg]
    if missing:
        return _refuse(req, "malformed", f"the request lacks {', '.join(missing)}")
    if isinstance(msg["v"], bool) or msg["v"] != VERSION:
        return _refuse(req, "malformed", f"unknown protocol version {msg['v']!r} (this controller speaks 1)")
    if not isinstance(msg["req"], str) or not ID_RE.match(msg["req"]):
        return _refuse(req, "malformed", "req must be 16 to 64 characters of [A-Za-z0-9_-]")
    if not isinstance(msg["csr"], str):
        return _refuse(req, "malformed", "csr must be a PEM string")
    csr, why = _one_csr(msg["csr"])
    if csr is None:
        return _refuse(req, "malformed", why)
    why = _subject_problem(csr, device_id)
    if why:
        return _refuse(req, "wrong_cn", why)
    try:
        public_key = csr.public_key()
    except (ValueError, UnsupportedAlgorithm) as exc:
        return _refuse(req, "wrong_key", f"the CSR's key is not usable: {exc}")
    why = _key_problem(public_key, policy)
    if why:
        return _refuse(req, "wrong_key", why)
    if revoked:
        return _refuse(req, "revoked", "the board's current certificate is on the CRL")
    key_sha = public_key_sha256(public_key)
    pending = entry["pending"] or {}
    accepted = {
        "accepted": True,
        "req": req,
        "csr_pem": csr.public_bytes(serialization.Encoding.PEM).decode(),
        "public_key_sha256": key_sha,
        "reason": msg.get("reason") if isinstance(msg.get("reason"), str) else None,
        "repeat": False,
    }
    if pending.get("req") == req and pending.get("public_key_sha256") == key_sha:
        return dict(accepted, repeat=True)
    if current_cert_pem:
        try:
            current = load_certificate(current_cert_pem)
        except ValueError:
            current = None  # the module reads the file; an unreadable one is its error to report
        if current is not None and public_key_der(current.public_key()) == public_key_der(public_key):
            return _refuse(req, "replayed", "the CSR's key is the key of the board's current certificate")
    if key_sha in entry["answered_keys"]:
        return _refuse(req, "replayed", "the CSR's key is the key of a request answered already")
    if req in entry["answered_reqs"]:
        return _refuse(req, "replayed", f"request {req} was answered already")
    hours = policy["min_interval_hours"]
    last = last_issuance(entry)
    if hours > 0 and last is not None and not entry["command"]:
        since = now - last
        if since < datetime.timedelta(hours=hours):
            return _refuse(
                req,
                "rate_limited",
                f"a certificate was issued over the air {since.total_seconds() / 3600:.1f} h ago "
                f"({iso(last)}); the minimum interval is {hours:g} h unless an operator asks (R/pki/cmd)",
            )
    return accepted


def request_public_key_sha256(payload_bytes):
    """The public_key_sha256 of the CSR in a request payload, None when it holds no readable CSR (no
    other check: that is check_request's)."""
    msg = None
    try:
        msg = json.loads(bytes(payload_bytes or b"").decode("utf-8"))
    except (UnicodeDecodeError, ValueError, TypeError):
        return None
    if not isinstance(msg, dict) or not isinstance(msg.get("csr"), str):
        return None
    try:
        return public_key_sha256(x509.load_pem_x509_csr(msg["csr"].encode()).public_key())
    except (ValueError, UnsupportedAlgorithm):
        return None


def rejection_payload(refusal):
    """The R/pki/rejected payload (bytes) of a refusal."""
    body = {"v": VERSION, "req": refusal["req"], "reason": refusal["reason"], "detail": refusal["detail"]}
    return json.dumps(body, separators=(",", ":")).encode()


# -- the confirmation -------------------------------------------------------------------------------


def check_ack(device_id, payload, state):
    """Decide one board's confirmation (the payload of R/pki/ack) against its state entry.

    Returns {"result": "matched"|"failed"|"stale", "device_id", "req", "serial", "detail"}:
    matched = state installed, for the pending request, with the serial issued for it; failed = the
    pending request's install failed (or installed another serial); stale = anything else (no request
    waits for confirmation, another request, not a version 1 confirmation).
    """
    entry = device_entry({"devices": {device_id: state or {}}}, device_id)
    out = {"result": "stale", "device_id": device_id, "req": None, "serial": None, "detail": ""}
    if isinstance(payload, (bytes, bytearray)):
        try:
            payload = payload.decode("utf-8")
        except UnicodeDecodeError:
            return dict(out, detail="the confirmation is not UTF-8")
    if isinstance(payload, str):
        try:
            payload = json.loads(payload)
        except ValueError:
            return dict(out, detail="the confirmation is not JSON")
    if not isinstance(payload, dict) or isinstance(payload.get("v"), bool) or payload.get("v") != VERSION:
        return dict(out, detail="not a version 1 confirmation")
    req = _echo_req(payload.get("req"))
    serial = payload.get("serial") if isinstance(payload.get("serial"), str) else None
    out.update(req=req, serial=serial)
    pending = entry["pending"]
    if not pending:
        return dict(out, detail="no certificate of this board waits for confirmation")
    if req != pending.get("req"):
        return dict(out, detail=f"confirms request {req}, the pending one is {pending.get('req')}")
    status = payload.get("state")
    if status == "failed":
        error = payload.get("error") if isinstance(payload.get("error"), str) else ""
        return dict(out, result="failed", detail=error or "the board reports the install failed")
    if status != "installed":
        return dict(out, detail=f"unknown state {status!r}")
    if serial_int(serial) is None or serial_int(serial) != serial_int(pending.get("serial")):
        return dict(
            out,
            result="failed",
            detail=f"the board installed serial {serial}, the certificate issued is {pending.get('serial')}",
        )
    return dict(out, result="matched", detail="installed")


# -- the state file ---------------------------------------------------------------------------------


def empty_entry():
    return {"answered_reqs": [], "answered_keys": [], "last_issued": None, "pending": None, "command": None}


def device_entry(state, device_id):
    """The board's entry of a state (a normalized copy; defaults when the board has none)."""
    raw = (state.get("devices") or {}).get(device_id) or {}
    entry = empty_entry()
    for key in ("answered_reqs", "answered_keys"):
        values = raw.get(key) or []
        entry[key] = [v for v in values if isinstance(v, str)][-MAX_ANSWERED:]
    entry["last_issued"] = raw.get("last_issued") if isinstance(raw.get("last_issued"), str) else None
    entry["pending"] = copy.deepcopy(raw["pending"]) if isinstance(raw.get("pending"), dict) else None
    entry["command"] = copy.deepcopy(raw["command"]) if isinstance(raw.get("command"), dict) else None
    return entry


def set_entry(state, device_id, entry):
    """Put the board's entry into the state (in place); returns the state."""
    state.setdefault("devices", {})[device_id] = entry
    return state


def _remember(values, value):
    values = [v for v in values if v != value] + [value]
    return values[-MAX_ANSWERED:]


def record_answer(entry, req, public_key_sha, serial, cert_sha256, replaces_serial, now):
    """The transition of answering request req with a certificate: it is pending confirmation, and the
    request and its key are answered (never accepted again). Returns a new entry."""
    entry = device_entry({"devices": {"d": entry}}, "d")
    entry["answered_reqs"] = _remember(entry["answered_reqs"], req)
    entry["answered_keys"] = _remember(entry["answered_keys"], public_key_sha)
    entry["pending"] = {
        "req": req,
        "serial": serial_hex(serial_int(serial)),
        "cert_sha256": cert_sha256,
        "public_key_sha256": public_key_sha,
        "issued_at": iso(now),
        "replaces_serial": None if replaces_serial is None else serial_hex(serial_int(replaces_serial)),
    }
    return entry


def record_finish(entry):
    """The transition of a confirmed renewal being finished: nothing pending, last_issued is the
    pending certificate's issue time, the operator command (if any) is closed. Returns a new entry."""
    entry = device_entry({"devices": {"d": entry}}, "d")
    if entry["pending"]:
        entry["last_issued"] = entry["pending"].get("issued_at") or entry["last_issued"]
    entry["pending"] = None
    entry["command"] = None
    return entry


def record_command(entry, nonce, now):
    """The transition of an operator renew command being published. Returns a new entry."""
    entry = device_entry({"devices": {"d": entry}}, "d")
    entry["command"] = {"nonce": nonce, "at": iso(now)}
    return entry


def new_state():
    return {"v": VERSION, "devices": {}}


def load_state(path):
    """The state at path (a new empty one when the file does not exist). StateError when unusable:
    never silently reset, it is what stops a replayed request."""
    if not os.path.exists(path):
        return new_state()
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise StateError(f"state file {path} is not readable JSON: {exc}") from None
    if (
        not isinstance(data, dict)
        or data.get("v") != VERSION
        or not isinstance(data.get("devices", {}), dict)
    ):
        raise StateError(f"state file {path} is not a version {VERSION} renewal state")
    state = new_state()
    for device_id in data.get("devices", {}):
        set_entry(state, device_id, device_entry(data, device_id))
    return state


def save_state(path, state):
    """Write the state atomically, mode 0600 (fleet_manifest.atomic_write: 0600 from the first byte)."""
    text = json.dumps(state, indent=2, sort_keys=True) + "\n"
    atomic_write(path, text.encode("utf-8"), 0o600)


def lock_path(path):
    return os.path.join(os.path.dirname(path) or ".", f".{os.path.basename(path)}.lock")


def locked(path):
    """The exclusive lock (fleet_lock) guarding the state file at path, as a context manager."""
    return exclusive_lock(lock_path(path), 0o600)
