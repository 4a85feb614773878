"""The firmware twin: the long-running application of one provisioned board.

It is the device-side reference implementation of docs/device-protocol.md (version 1) and behaves
as an ESP-IDF application (esp-mqtt + mbedTLS + nvs_flash) written to that document would:

* flash layout (section 1): the partition table at 0x8000 when a valid one is there (0xAA50
  entries, optional MD5 entry 0xEBEB), else `nvs` at 0x9000 and `nvs_field` at 0x312000;
  `nvs` is only ever read (namespace `mqtt`), field state lives in `nvs_field` (namespace `fleet`),
  written through NvsWriter with ESP-IDF's write order, on the board's Flash object;
* MQTT 5 over TLS >= 1.2 (paho-mqtt, one fresh client per connection like esp-mqtt's reconnect),
  client id = device_id, clean start, keepalive 30 s, Last Will `{"v":1,"online":false}`
  retained on R/status; R/status retained on every connect; a reading on R/telemetry (QoS 1)
  every `interval` seconds while connected;
* reconnect with exponential backoff and full jitter (section 6);
* certificate renewal (section 4) and trust bundle updates (section 5);
* firmware updates over the air (section 7): the bootloader model of esp32sim/ota.py picks and
  checks the app at every boot (ESP-IDF's bootloader with CONFIG_BOOTLOADER_APP_ROLLBACK_ENABLE),
  the running version and project come from that image's esp_app_desc_t, jobs on R/ota/job are
  downloaded over HTTPS (esp_https_ota: client certificate, server checked against the trust
  bundle and the URL's host) into the other slot, checked, made the boot partition, and the board
  restarts; a new app marks itself valid once its self-check (a CONNACK within 30 s) passes.

Identity: the version (R/status "fw") and project of the app the bootloader loaded. Only when no
slot holds a valid app, or there is no partition table (the legacy layout), does the twin run its
built-in identity, FW_VERSION and BUILTIN_PROJECT, as it always did. The twin cannot execute an
image: one whose data holds appimage.SELFCHECK_FAIL_MARKER models an app whose self-check fails.

`Firmware(flash, ...)` runs in a thread: start(), halt() (a reset: the thread stops touching the
flash at once and drops the connection without DISCONNECT, so the broker publishes the Will),
stop() (halt + join). A restart the firmware makes itself (after an update, a failed self-check,
the ota-power-loss fault) drops the connection the same way and boots again in the same thread.
Every event goes to `log(line)` as one line, "<UTC ISO time> <event> k=v...", and to `events`
(dicts with "event", "t" (time.time()), "mono" (time.monotonic()) and the fields).
"""

import contextlib
import datetime
import hashlib
import http.client
import json
import re
import secrets
import socket
import ssl
import struct
import threading
import time
import traceback
from dataclasses import dataclass
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from . import __version__, appimage, ota
from .boot import BootError, Sensor, _tls_context, config_from_image, reading
from .nvs import PAGE_SIZE, NvsError, NvsWriteError, NvsWriter

FW_VERSION = f"esp32sim-{__version__}"
BUILTIN_PROJECT = "esp32sim"  # project_name of the built-in identity (no valid app in any slot)
SELFCHECK_TIMEOUT = 30.0
OTA_CHUNK = 4096  # bytes per read and per esp_ota_write, as esp_https_ota's buffer
HEX64 = re.compile(r"^[0-9a-f]{64}$")
PARTITION_TABLE = 0x8000
PARTITION_TABLE_SIZE = 0xC00
DEFAULT_NVS = (0x9000, 0x6000)
DEFAULT_FIELD = (0x312000, 0x6000)
FIELD_NS = "fleet"
RENEW_DAYS = 30
KEEPALIVE = 30
OFFLINE = json.dumps({"v": 1, "online": False})
ID_RE = re.compile(r"^[A-Za-z0-9_-]{16,64}$")
SLOT_PREFIX = {1: "a", 2: "b"}
STATES = ("idle", "pending", "installing", "rejected", "failed")


def read_partition_table(flash) -> dict | None:
    """{label: (type, subtype, offset, size)} of a valid partition table at 0x8000, else None.

    flash: anything with read(addr, n). Valid: 32-byte entries with magic 0xAA50 up to an end
    (0xFF) entry, and, when present, an MD5 entry (0xEBEB) matching the entries before it.
    """
    raw = flash.read(PARTITION_TABLE, PARTITION_TABLE_SIZE)
    parts = {}
    md5 = hashlib.md5(usedforsecurity=False)
    for off in range(0, len(raw), 32):
        entry = raw[off : off + 32]
        if entry[:2] == b"\xaa\x50":
            ptype, subtype, offset, size = struct.unpack_from("<BBII", entry, 2)
            label = entry[12:28].split(b"\x00", 1)[0].decode("ascii", "replace")
            parts[label] = (ptype, subtype, offset, size)
            md5.update(entry)
        elif entry[:2] == b"\xeb\xeb":
            return parts if parts and entry[16:32] == md5.digest() else None
        elif entry == b"\xff" * 32:
            break
        else:
            return None
    return parts or None


def partition_layout(flash, nvs=None, field=None):
    """((offset, size) of nvs, (offset, size) of nvs_field or None, whether a table was used).

    Explicit nvs/field arguments win; then a valid partition table (data/nvs partitions labelled
    `nvs` and `nvs_field`); without a table, the offsets of docs/device-protocol.md section 1.
    """
    table = read_partition_table(flash)

    def pick(label, default, given):
        if given:
            return tuple(given)
        if table is None:
            return default
        entry = table.get(label)
        if entry and entry[0] == 0x01 and entry[1] == 0x02:
            return entry[2], entry[3]
        return None

    return pick("nvs", DEFAULT_NVS, nvs), pick("nvs_field", DEFAULT_FIELD, field), table is not None


class _Reset(Exception):  # not an error: the board was reset or lost power
    pass


class _ConnectFailed(Exception):
    pass


class _Restart(Exception):  # esp_restart(): the firmware resets the board itself
    pass


class _PowerLoss(Exception):  # the ota-power-loss fault: the power goes, and comes back
    pass


class _OtaFailed(Exception):
    pass


def parse_ota_fault(spec: str) -> int:
    """`ota-power-loss=N`: the byte count of a download after which the power is cut (once)."""
    kind, _, value = spec.partition("=")
    if kind != "ota-power-loss":
        raise ValueError(f"not a firmware fault: {spec!r}")
    try:
        n = int(value, 0)
    except ValueError:
        raise ValueError(f"fault ota-power-loss needs a byte count, got {value!r}") from None
    if n < 0:
        raise ValueError("fault ota-power-loss must be >= 0")
    return n


class _Refused(Exception):  # a certificate or bundle that does not pass the checks
    def __init__(self, message, serial=""):
        super().__init__(message)
        self.serial = serial


class _BoardFlash:
    """The board's flash as the running firmware sees it: gone (a _Reset) once the board is reset."""

    def __init__(self, flash, lock, halted):
        self.flash, self.lock, self.halted = flash, lock, halted

    def _check(self):
        if self.halted.is_set():
            raise _Reset

    def read(self, addr, length):
        with self.lock:
            self._check()
            return self.flash.read(addr, length)

    def program(self, addr, data):
        with self.lock:
            self._check()
            self.flash.program(addr, data)

    def erase(self, addr, length):
        with self.lock:
            self._check()
            self.flash.erase(addr, length)

    def flush(self):
        with self.lock:
            if hasattr(self.flash, "flush"):
                self.flash.flush()


def pem_certificates(pem: str) -> list:
    """The certificates of a PEM bundle; ValueError unless every PEM block is a certificate."""
    if not isinstance(pem, str) or "-----BEGIN " not in pem:
        raise ValueError("not a PEM bundle")
    certs = x509.load_pem_x509_certificates(pem.encode())
    if len(certs) != pem.count("-----BEGIN "):
        raise ValueError("a PEM block is not a certificate")
    return certs


def is_ca(cert) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def issued_by(cert, ca) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def chains_to(leaf, intermediates, anchors, depth=4) -> bool:
    """leaf is issued by an anchor, directly or through CA certificates among intermediates."""
    if any(issued_by(leaf, ca) for ca in anchors):
        return True
    if depth == 0:
        return False
    for im in intermediates:
        rest = [c for c in intermediates if c is not im]
        if is_ca(im) and issued_by(leaf, im) and chains_to(im, rest, anchors, depth - 1):
            return True
    return False


def _spki(key) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def cert_fingerprint(pem: str) -> str:
    """base_fp: SHA-256 (hex) of the certificate in mqtt/client_cert (its DER, as openssl shows it)."""
    try:
        der = x509.load_pem_x509_certificate(pem.encode()).public_bytes(serialization.Encoding.DER)
    except ValueError:
        der = pem.encode()
    return hashlib.sha256(der).hexdigest()


def _quote(value) -> str:
    return json.dumps(value) if isinstance(value, str) and (not value or " " in value) else str(value)


def _iso(dt: datetime.datetime) -> str:
    return dt.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _same_bundle(a: list, b: list) -> bool:
    der = serialization.Encoding.DER
    return {c.public_bytes(der) for c in a} == {c.public_bytes(der) for c in b}


@dataclass
class Credential:
    slot: int  # 0 = mqtt/client_*, 1 = slot a, 2 = slot b
    cert_pem: str
    key_pem: str

    def __post_init__(self):
        self.cert = pem_certificates(self.cert_pem)[0]

    def tls_fields(self) -> dict:
        return {"client_cert": self.cert_pem, "client_key": self.key_pem}

    @property
    def serial(self) -> str:
        return format(self.cert.serial_number, "x")

    @property
    def not_after(self) -> datetime.datetime:
        return self.cert.not_valid_after_utc


@dataclass
class _Pending:
    req: str
    key: object
    key_pem: str
    reason: str


@dataclass
class _Candidate:
    req: str
    cred: Credential
    bundle: str | None  # the new trust bundle when the answer brought one


class _Conn:
    """One MQTT connection: a fresh paho client, driven from the firmware thread with loop()."""

    def __init__(self, fw, cred, bundle):
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.mqtt = mqtt
        self.connack = None
        self.gone = None
        self.suback = False
        self.inbox = []
        self.acks = {}  # mid -> PUBACK reason code
        self.telemetry = {}  # mid -> seq (mids are per client, so per connection)
        self.ack_mids = {}  # mid -> the R/pki/ack payload it carried
        self.report_mids = {}  # mid -> the R/ota/report payload it carried
        ctx = _tls_context({"ca_cert": bundle, **cred.tls_fields()})
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=fw.device_id, protocol=mqtt.MQTTv5)
        c.tls_set_context(ctx)
        c.connect_timeout = fw.connect_timeout
        c.will_set(fw.topic("status"), OFFLINE, qos=1, retain=True)
        c.on_connect = lambda cl, u, flags, reason, props: setattr(self, "connack", reason)
        c.on_disconnect = self._on_disconnect
        c.on_subscribe = lambda cl, u, mid, reasons, props: setattr(self, "suback", True)
        c.on_message = lambda cl, u, m: self.inbox.append((m.topic, m.payload, m.retain))
        c.on_publish = lambda cl, u, mid, reason, props: self.acks.__setitem__(mid, reason)
        self.client = c

    def _on_disconnect(self, client, userdata, flags, reason, props):
        # The first reason counts: a broker's DISCONNECT reason is followed by paho's own report of
        # the closed socket ("Unspecified error").
        if self.gone is None:
            self.gone = reason

    def open(self, host, port, timeout):
        try:
            self.client.connect(host, port, keepalive=KEEPALIVE, clean_start=True)
        except ssl.SSLCertVerificationError as e:
            raise _ConnectFailed(f"broker certificate rejected ({e.verify_message})") from None
        except ssl.SSLError as e:
            raise _ConnectFailed(f"TLS handshake failed ({e.reason or e})") from None
        except (OSError, ValueError) as e:
            why = getattr(e, "strerror", None) or e
            raise _ConnectFailed(f"cannot connect to {host}:{port} ({why})") from None
        deadline = time.monotonic() + timeout
        while self.connack is None:
            if self.gone is not None or self.client.loop(0.05) != self.mqtt.MQTT_ERR_SUCCESS:
                self.drop()
                raise _ConnectFailed(
                    f"connection closed before CONNACK ({self.gone or 'lost'}; client certificate rejected?)"
                )
            if time.monotonic() > deadline:
                self.drop()
                raise _ConnectFailed(f"no CONNACK within {timeout:g}s")
        if self.connack.is_failure:
            self.drop()
            raise _ConnectFailed(f"CONNECT refused: {self.connack}")

    def loop(self, timeout) -> bool:
        return self.client.loop(timeout) == self.mqtt.MQTT_ERR_SUCCESS and self.gone is None

    def publish(self, topic, payload, retain=False) -> int:
        return self.client.publish(topic, payload, qos=1, retain=retain).mid

    def peer_certificate(self):
        sock = self.client.socket()
        der = sock.getpeercert(binary_form=True) if sock else None
        return x509.load_der_x509_certificate(der) if der else None

    def close_clean(self, timeout=1.0):
        """DISCONNECT (normal: the broker drops the Will), after outstanding publishes are acked."""
        deadline = time.monotonic() + timeout
        while self.client.want_write() and time.monotonic() < deadline:
            self.client.loop(0.02)
        self.client.disconnect()
        while self.gone is None and time.monotonic() < deadline:
            if self.client.loop(0.02) != self.mqtt.MQTT_ERR_SUCCESS:
                break
        self.drop()

    def drop(self):
        """The link just goes (a reset or a lost network): no DISCONNECT, so the Will is published."""
        sock = self.client.socket()
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()


class Firmware:
    """One board's firmware, run in a thread. See the module docstring.

    flash: the board's device.Flash (shared with its serial port's sessions) or a flash file path.
    interval: seconds between readings. nvs/field: (offset, size) overrides of the layout.
    reject_wait: seconds a `rejected` board waits before it asks again (protocol: 1 h).
    retry_wait: the same after `failed` (default: reject_wait).
    backoff_base/backoff_cap/backoff_reset: section 6's 1 s, 60 s and 60 s.
    window_check: how often the renewal window is evaluated while connected.
    settle: after SUBACK, how long retained answers get to arrive before a pending request is
    published again and the window is checked.
    keep_events: keep only about this many events in memory (None: all). log_every_reading: log the
    first reading and then one in this many (1: all).
    selfcheck_timeout: how long a new app (PENDING_VERIFY) may take to its first CONNACK.
    ota_timeout: the HTTPS download's network timeout.
    ota_power_loss: cut the power once, after this many bytes of an OTA download are in flash
    (the `ota-power-loss=N` fault); `power_lost` says whether it happened.
    """

    def __init__(
        self,
        flash,
        *,
        interval: float = 5.0,
        log=None,
        nvs=None,
        field=None,
        reject_wait: float = 3600.0,
        retry_wait: float | None = None,
        backoff_base: float = 1.0,
        backoff_cap: float = 60.0,
        backoff_reset: float = 60.0,
        window_check: float = 3600.0,
        connect_timeout: float = 10.0,
        settle: float = 0.3,
        keep_events: int | None = None,
        log_every_reading: int = 1,
        selfcheck_timeout: float = SELFCHECK_TIMEOUT,
        ota_timeout: float = 30.0,
        ota_power_loss: int | None = None,
    ):
        self._own_flash = isinstance(flash, str)
        if self._own_flash:
            from .device import Flash

            flash = Flash(flash)
        self._raw_flash = flash
        self._lock = threading.Lock()
        self._halted = threading.Event()
        self.flash = _BoardFlash(flash, self._lock, self._halted)
        self.interval = interval
        self._log_cb = log
        # A board that runs for months (the living lab) keeps only its last keep_events events in
        # memory and logs one reading in log_every_reading; tests keep and log everything.
        self.keep_events = keep_events
        self.log_every_reading = max(1, log_every_reading)
        self._nvs_arg, self._field_arg = nvs, field
        self.reject_wait = reject_wait
        self.retry_wait = reject_wait if retry_wait is None else retry_wait
        self.backoff_base, self.backoff_cap, self.backoff_reset = backoff_base, backoff_cap, backoff_reset
        self.window_check = window_check
        self.connect_timeout = connect_timeout
        self.settle = settle
        self.selfcheck_timeout = selfcheck_timeout
        self.ota_timeout = ota_timeout
        self.ota_power_loss = ota_power_loss
        self.power_lost = False
        self.events = []
        self._cond = threading.Condition()
        self._thread = None
        self._rng = secrets.SystemRandom()
        self._conn = None
        self.state = "idle"
        self.cfg = None
        self.nvs = None
        self.cred = None
        self.pend = None
        self.device_id = None
        self.root = None
        self.fw_version = FW_VERSION
        self.project = BUILTIN_PROJECT
        self.running_slot = None
        self.ota_layout = None

    # -- thread control ------------------------------------------------------------------------

    def start(self):
        if self._thread is not None:
            raise RuntimeError("a Firmware runs once; make a new one for the next boot")
        self._thread = threading.Thread(target=self._main, name="esp32sim-firmware", daemon=True)
        self._thread.start()
        return self

    def halt(self):
        """Reset the board: from now on the firmware neither touches the flash nor publishes."""
        with self._lock:  # an NVS write in progress completes first (one flash operation)
            self._halted.set()

    def stop(self, timeout: float = 5.0) -> bool:
        self.halt()
        if self._thread is not None:
            self._thread.join(timeout)
        elif self._own_flash:
            self._own_flash = False
            self._raw_flash.close()
        return not self.alive

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wait_for(self, event: str, timeout: float = 10.0, since: int = 0, **match):
        """The first event named `event` (from index `since`) whose fields include `match`."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for e in self.events[since:]:
                    if e["event"] == event and all(e.get(k) == v for k, v in match.items()):
                        return e
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no {event} {match or ''} within {timeout:g}s: {self.events[-5:]}")
                self._cond.wait(left)

    # -- helpers -------------------------------------------------------------------------------

    def _event(self, name, **fields):
        now = time.time()
        e = {"event": name, "t": now, "mono": time.monotonic(), **fields}
        with self._cond:
            self.events.append(e)
            if self.keep_events and len(self.events) > self.keep_events:
                del self.events[: len(self.events) - self.keep_events // 2]
            self._cond.notify_all()
        seq = fields.get("seq", 1)
        if name == "published" and seq != 1 and seq % self.log_every_reading:
            return
        if self._log_cb:
            stamp = datetime.datetime.fromtimestamp(now, datetime.UTC).isoformat(timespec="milliseconds")
            parts = [f"{k}={_quote(v)}" for k, v in fields.items()]
            self._log_cb(" ".join([stamp.replace("+00:00", "Z"), name, *parts]))

    def _check_halt(self):
        if self._halted.is_set():
            raise _Reset

    def _sleep(self, seconds):
        if self._halted.wait(max(0.0, seconds)):
            raise _Reset

    def topic(self, leaf: str) -> str:
        return f"{self.root}/{leaf}"

    def _backoff(self, attempt: int) -> float:
        return self._rng.uniform(0, min(self.backoff_cap, self.backoff_base * 2**attempt))

    def _publish(self, conn, leaf, payload, retain=False):
        self._check_halt()
        text = payload if isinstance(payload, str) else json.dumps(payload)
        return conn.publish(self.topic(leaf), text, retain)

    # -- main ----------------------------------------------------------------------------------

    def _main(self):
        try:
            while True:
                try:
                    self._boot()
                    if self.cfg is None or self._idle:
                        self._halted.wait()
                        raise _Reset
                    self._run()
                except _Reset:
                    raise
                except _Restart as r:
                    self._drop()  # esp_restart(): no DISCONNECT, the broker publishes the Will
                    self._event("restart", reason=str(r))
                except _PowerLoss as p:
                    self._drop()
                    self._event("power-loss", during=str(p))
                    self._sleep(0.2)  # off, then on again
                except Exception:  # a panic: ESP-IDF prints the backtrace and reboots
                    text = traceback.format_exc(limit=4).strip().replace("\n", " | ")
                    self._event("panic", error=text)
                    self._drop()
                    self._sleep(1.0)
        except _Reset:
            self._drop()
            self._event("halted")
        finally:
            if self._own_flash:
                self._raw_flash.close()

    def _drop(self):
        if self._conn is not None:
            self._conn.drop()
            self._conn = None

    def _boot(self):
        self.cfg = self.nvs = self.cred = self.pend = None
        self.state = "idle"
        self._hold_until = None
        self._acks_due = []
        self._install = None
        self._next_reading = None
        self._seq = 0
        self._idle = False
        self._ota_reports_due = []
        self._ota_answered = set()
        self._ota_job = None
        nvs_part, field_part, table = partition_layout(self.flash, self._nvs_arg, self._field_arg)
        self._bootloader()
        fields = {"fw": self.fw_version, "partition_table": "yes" if table else "no"}
        if self.running_slot is not None:
            fields.update(
                project=self.project,
                slot=self.ota_layout.slot_name(self.running_slot),
                ota_state=ota.state_name(self.ota_state) if self.ota_state is not None else "none",
            )
        self._event("boot", **fields)
        if nvs_part is None:
            self._event("not-provisioned", error="the partition table has no nvs partition")
            return
        try:
            cfg = config_from_image(self.flash.read(*nvs_part), nvs_part[0])
            uri = urlsplit(cfg["broker_uri"])
            if uri.scheme != "mqtts" or not uri.hostname:
                raise BootError(2, f"broker_uri {cfg['broker_uri']!r} is not mqtts://HOST[:PORT]")
            self.host, self.port = uri.hostname, uri.port or 8883
            station = Credential(0, cfg["client_cert"], cfg["client_key"])
            pem_certificates(cfg["ca_cert"])
        except (BootError, ValueError) as e:
            self._event("not-provisioned", error=str(e))
            return
        self.cfg = cfg
        self.device_id = cfg["device_id"]
        self.root = cfg["topic_root"].rstrip("/")
        renew = cfg.get("renew_days")
        self.renew_days = renew if isinstance(renew, int) and not isinstance(renew, bool) else RENEW_DAYS
        self.sensor = Sensor(self.device_id)
        if field_part and field_part[0] < nvs_part[0] + nvs_part[1] and nvs_part[0] < sum(field_part):
            self._event("no-field-state", error="nvs_field overlaps nvs, which the firmware never writes")
            field_part = None
        self.nvs = self._open_field(field_part)
        self._load_field_state(station)
        self._load_ota_state()
        self._event(
            "provisioned",
            device=self.device_id,
            slot=self.cred.slot,
            serial=self.cred.serial,
            renewal=self.state,
            field="yes" if self.nvs else "no",
        )

    def _open_field(self, part):
        if part is None:
            if not any(e["event"] == "no-field-state" for e in self.events[-3:]):
                self._event("no-field-state", error="the partition table has no nvs_field partition")
            return None
        try:
            return NvsWriter(self.flash, *part)
        except NvsWriteError as e:
            if e.code not in ("ESP_ERR_NVS_NO_FREE_PAGES", "ESP_ERR_NVS_NEW_VERSION_FOUND"):
                raise
            # What every ESP-IDF application does on these two errors: erase the partition, init again.
            self._event("field-erased", error=str(e))
            for page in range(part[1] // PAGE_SIZE):
                self.flash.erase(part[0] + page * PAGE_SIZE, PAGE_SIZE)
            return NvsWriter(self.flash, *part)
        except NvsError as e:
            self._event("no-field-state", error=str(e))
            return None

    def _field(self) -> dict:
        return self.nvs.namespaces().get(FIELD_NS, {}) if self.nvs else {}

    def _load_field_state(self, station):
        fleet = self._field()
        fp = cert_fingerprint(station.cert_pem)
        if self.nvs is not None and fleet.get("base_fp") != fp:
            if fleet:
                why = "re-provisioned" if "base_fp" in fleet else "no base_fp"
                self._event("field-reset", reason=why, keys=len(fleet))
            self.nvs.erase_namespace(FIELD_NS)
            self.nvs.set_str(FIELD_NS, "base_fp", fp)
            self.nvs.commit()
            fleet = {"base_fp": fp}
        self.cred = station
        slot = fleet.get("cred_slot", 0)
        if slot in SLOT_PREFIX:
            p = SLOT_PREFIX[slot]
            try:
                cred = Credential(slot, fleet[f"{p}_cert"], fleet[f"{p}_key"])
                _tls_context({"ca_cert": self.cfg["ca_cert"], **cred.tls_fields()})
                self.cred = cred
            except (KeyError, ValueError, BootError) as e:
                self._event("slot-unusable", slot=slot, error=str(e) or type(e).__name__)
        elif slot != 0:
            self._event("slot-unusable", slot=slot, error="unknown slot")
        self.bundle = self.cfg["ca_cert"]
        if fleet.get("ca_cert"):
            try:
                pem_certificates(fleet["ca_cert"])
                self.bundle = fleet["ca_cert"]
            except ValueError as e:
                self._event("ca-unusable", error=str(e))
        self.cmd_nonce = fleet.get("cmd_nonce")
        req, key_pem = fleet.get("pend_req"), fleet.get("pend_key")
        if req and key_pem:
            try:
                key = serialization.load_pem_private_key(key_pem.encode(), None)
            except (ValueError, TypeError):
                key = None
            if key is not None and _spki(key.public_key()) == _spki(self.cred.cert.public_key()):
                # The power went after cred_slot was switched and before pend_* were erased.
                self._forget_request()
                self._acks_due.append(self._ack(req, "installed", self.cred.serial))
            elif key is not None:
                self.pend = _Pending(req, key, key_pem, self._reason())
                self.state = "pending"
            else:
                self._forget_request()
        elif req or key_pem:
            self._forget_request()  # a request the power cut short: never published

    def _reason(self) -> str:
        left = self.cred.not_after - datetime.datetime.now(datetime.UTC)
        return "window" if left <= datetime.timedelta(days=self.renew_days) else "command"

    def _forget_request(self):
        if self.nvs is not None:
            self.nvs.erase_key(FIELD_NS, "pend_key")
            self.nvs.erase_key(FIELD_NS, "pend_req")
            self.nvs.commit()
        self.pend = None

    # -- connections ---------------------------------------------------------------------------

    def _connect(self, cred) -> _Conn:
        self._check_halt()
        self._event("connecting", broker=f"{self.host}:{self.port}", slot=cred.slot)
        try:
            conn = _Conn(self, cred, self.bundle)
        except BootError as e:
            raise _ConnectFailed(str(e)) from None
        self._conn = conn
        try:
            conn.open(self.host, self.port, self.connect_timeout)
        except _ConnectFailed:
            self._conn = None
            raise
        self._check_halt()
        self._event("connected", broker=f"{self.host}:{self.port}", slot=cred.slot, serial=cred.serial)
        return conn

    def _run(self):
        attempt = 0
        conn = None
        verifying = self.ota_state == ota.PENDING_VERIFY
        deadline = time.monotonic() + self.selfcheck_timeout
        if verifying and self._selfcheck_marker:
            self._selfcheck_failed("the image's self-check fails (esp32sim:selfcheck=fail)")
        while True:
            if conn is None:
                try:
                    conn = self._connect(self.cred)
                except _ConnectFailed as e:
                    self._event("connect-failed", slot=self.cred.slot, error=str(e))
                    if verifying and time.monotonic() >= deadline:
                        self._selfcheck_failed(f"no CONNACK within {self.selfcheck_timeout:g}s ({e})")
                        return
                    attempt = self._wait_to_reconnect(attempt, deadline if verifying else None)
                    continue
                if verifying:
                    verifying = False
                    self._selfcheck_passed()
            started = time.monotonic()
            outcome, detail = self._session(conn)
            if outcome == "install":
                conn = self._try_install(conn, detail)
                continue
            conn.drop()
            self._conn = conn = None
            self._event("disconnected", reason=str(detail), lasted=round(time.monotonic() - started, 3))
            if time.monotonic() - started >= self.backoff_reset:
                attempt = 0
            attempt = self._wait_to_reconnect(attempt)

    def _wait_to_reconnect(self, attempt, deadline=None) -> int:
        delay = self._backoff(attempt)
        if deadline is not None:  # a self-check in progress is decided at its deadline
            delay = max(0.0, min(delay, deadline - time.monotonic()))
        self._event("reconnect", delay=round(delay, 3), attempt=attempt + 1)
        self._sleep(delay)
        return attempt + 1

    def _session(self, conn):
        """Until the connection is lost ("lost", reason) or a new credential is to be tried."""
        self._publish_status(conn)
        for ack in list(self._acks_due):
            conn.ack_mids[self._publish(conn, "pki/ack", ack, retain=True)] = ack
        self._check_halt()
        for report in list(self._ota_reports_due):
            conn.report_mids[self._publish(conn, "ota/report", report, retain=True)] = report
        self._check_halt()
        topics = ("pki/cert", "pki/rejected", "pki/cmd", "pki/ca", "ota/job")
        conn.client.subscribe([(self.topic(t), 1) for t in topics])
        suback_at = None
        settled = False
        next_window = None
        now = time.monotonic()
        if self._next_reading is None or self._next_reading < now:
            self._next_reading = now
        while True:
            self._check_halt()
            if not conn.loop(0.05):
                return "lost", conn.gone or "connection lost"
            now = time.monotonic()
            if conn.suback and suback_at is None:
                suback_at = now
            while conn.inbox:
                self._on_message(conn, *conn.inbox.pop(0))
            if self._install is not None:
                candidate, self._install = self._install, None
                return "install", candidate
            self._collect_acks(conn)
            if self._ota_job is not None and settled:
                job, self._ota_job = self._ota_job, None
                self._ota(conn, job)
            if not settled and suback_at is not None and now - suback_at >= self.settle:
                settled = True
                if self.state == "pending":
                    self._publish_csr(conn)  # again: the broker may have lost it, or we rebooted
                self._check_window(conn)
                next_window = now + self.window_check
            elif settled and (now >= next_window or (self._hold_until and now >= self._hold_until)):
                self._check_window(conn)
                next_window = now + self.window_check
            if now >= self._next_reading:
                self._seq += 1
                mid = self._publish(conn, "telemetry", reading(self.device_id, self.sensor, self._seq))
                conn.telemetry[mid] = self._seq
                self._next_reading += self.interval
                if self._next_reading < now:
                    self._next_reading = now + self.interval

    def _collect_acks(self, conn):
        for mid, reason in list(conn.acks.items()):
            del conn.acks[mid]
            if mid in conn.telemetry:
                seq = conn.telemetry.pop(mid)
                if reason.is_failure:
                    self._event("publish-refused", seq=seq, reason=str(reason))
                else:
                    self._event("published", seq=seq)
            elif mid in conn.report_mids:
                report = conn.report_mids.pop(mid)
                if not reason.is_failure and report in self._ota_reports_due:
                    self._ota_reports_due.remove(report)
                    self._ota_finish(conn, report)
            elif mid in conn.ack_mids:
                ack = conn.ack_mids.pop(mid)
                if not reason.is_failure and ack in self._acks_due:
                    self._acks_due.remove(ack)
                    self._event("ack", req=ack["req"], state=ack["state"], serial=ack.get("serial", ""))

    def _status(self) -> dict:
        status = {
            "v": 1,
            "online": True,
            "fw": self.fw_version,
            "cert_serial": self.cred.serial,
            "cert_not_after": _iso(self.cred.not_after),
            "renewal": self.state,
        }
        if self.running_slot is not None:
            status["slot"] = self.ota_layout.slot_name(self.running_slot)
        return status

    def _publish_status(self, conn):
        if conn is not None:
            self._publish(conn, "status", self._status(), retain=True)

    def _set_state(self, conn, state, **fields):
        if state != self.state:
            self._event("renewal", state=state, previous=self.state, **fields)
            self.state = state
            self._publish_status(conn)

    # -- messages ------------------------------------------------------------------------------

    def _on_message(self, conn, topic, payload, retained):
        leaf = topic[len(self.root) + 1 :] if topic.startswith(self.root + "/") else topic
        if not payload:
            return  # a retained message being cleared
        try:
            msg = json.loads(payload)
        except (ValueError, UnicodeDecodeError):
            self._event("ignored", topic=leaf, why="not JSON")
            return
        if not isinstance(msg, dict) or msg.get("v") != 1:
            self._event("ignored", topic=leaf, why="not version 1")
            return
        handler = {
            "pki/cert": self._on_cert,
            "pki/rejected": self._on_rejected,
            "pki/cmd": self._on_cmd,
            "pki/ca": self._on_ca,
            "ota/job": self._on_ota_job,
        }.get(leaf)
        if handler:
            handler(conn, msg)

    def _on_cmd(self, conn, msg):
        nonce = msg.get("nonce")
        if msg.get("op") != "renew" or not isinstance(nonce, str) or not ID_RE.match(nonce):
            self._event("ignored", topic="pki/cmd", why="not a renew command with a valid nonce")
            return
        if nonce == self.cmd_nonce:
            return
        self._event("command", nonce=nonce)
        self._hold_until = None  # a renew command resets the wait after `rejected`/`failed`
        if self.state not in ("pending", "installing"):
            self._start_request(conn, "command")
        if self.nvs is not None:  # after pend_*: a power cut in between acts on the command again
            self.nvs.set_str(FIELD_NS, "cmd_nonce", nonce)
            self.nvs.commit()
        self.cmd_nonce = nonce

    def _on_rejected(self, conn, msg):
        if self.state != "pending" or self.pend is None or msg.get("req") != self.pend.req:
            return
        req = self.pend.req
        self._forget_request()
        self._hold_until = time.monotonic() + self.reject_wait
        self._set_state(conn, "rejected", req=req, reason=str(msg.get("reason", "")))

    def _on_ca(self, conn, msg):
        pem = msg.get("ca")
        try:
            new = pem_certificates(pem)
            current = pem_certificates(self.bundle)
        except ValueError as e:
            self._event("ca-refused", error=f"not a PEM bundle of certificates ({e})")
            return
        if _same_bundle(new, current):
            return
        try:
            self._check_bundle(conn, new)
            self._store_bundle(pem)
        except _Refused as e:
            self._event("ca-refused", error=str(e))
            return
        except NvsError as e:
            self._event("ca-refused", error=f"cannot store it: {e}")
            return
        self._event("ca-stored", cas=len(new))
        if not any(issued_by(self.cred.cert, ca) for ca in new):
            self._event("ca-renew", why="the new bundle did not issue the current certificate")
            if self.state not in ("pending", "installing") and not self._holding():
                self._start_request(conn, "window")

    def _check_bundle(self, conn, cas):
        if not all(is_ca(c) for c in cas):
            raise _Refused("not every block of the bundle is a CA certificate")
        peer = conn.peer_certificate()
        if peer is None or not any(issued_by(peer, ca) for ca in cas):
            raise _Refused("the broker's certificate does not chain to the bundle")

    def _store_bundle(self, pem):
        if self.nvs is None:
            raise _Refused("no nvs_field partition to keep it in")
        self.nvs.set_str(FIELD_NS, "ca_cert", pem)
        self.nvs.commit()
        self.bundle = pem

    def _on_cert(self, conn, msg):
        if self.state != "pending" or self.pend is None or msg.get("req") != self.pend.req:
            return
        try:
            candidate = self._check_answer(conn, msg)
        except _Refused as e:
            self._fail(conn, self.pend.req, e.serial, str(e))
            return
        try:
            self._store_candidate(candidate)
        except NvsError as e:
            self._fail(conn, self.pend.req, candidate.cred.serial, f"cannot store the credential: {e}")
            return
        self._install = candidate
        self._set_state(conn, "installing", req=candidate.req, serial=candidate.cred.serial)

    def _check_answer(self, conn, msg) -> _Candidate:
        try:
            certs = pem_certificates(msg.get("cert"))
        except ValueError as e:
            raise _Refused(f"cert is not a PEM certificate ({e})") from None
        leaf = certs[0]
        serial = format(leaf.serial_number, "x")
        if _spki(leaf.public_key()) != _spki(self.pend.key.public_key()):
            raise _Refused("the certificate's public key is not the key of the request", serial)
        cns = [a.value for a in leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
        if cns != [self.device_id]:
            raise _Refused(f"the certificate's CN is {cns}, not {self.device_id!r}", serial)
        new_cas = []
        if msg.get("ca"):
            try:
                new_cas = pem_certificates(msg["ca"])
            except ValueError as e:
                raise _Refused(f"ca is not a PEM bundle of certificates ({e})", serial) from None
        anchors = [c for c in new_cas if is_ca(c)] + pem_certificates(self.bundle)
        if not chains_to(leaf, certs[1:], anchors):
            raise _Refused("the certificate does not chain to a CA of ca or of the current bundle", serial)
        now = datetime.datetime.now(datetime.UTC)
        if not leaf.not_valid_before_utc <= now <= leaf.not_valid_after_utc:
            raise _Refused(
                f"the certificate is not valid now ({_iso(leaf.not_valid_before_utc)} to "
                f"{_iso(leaf.not_valid_after_utc)})",
                serial,
            )
        bundle = None
        if new_cas and not _same_bundle(new_cas, pem_certificates(self.bundle)):
            try:
                self._check_bundle(conn, new_cas)
            except _Refused as e:
                raise _Refused(f"ca: {e}", serial) from None
            bundle = msg["ca"]
        target = 2 if self.cred.slot == 1 else 1
        try:
            cred = Credential(target, msg["cert"], self.pend.key_pem)
            _tls_context({"ca_cert": bundle or self.bundle, **cred.tls_fields()})
        except (ValueError, BootError) as e:
            raise _Refused(f"the credential does not load ({e})", serial) from None
        return _Candidate(self.pend.req, cred, bundle)

    def _store_candidate(self, c: _Candidate):
        """New first: the slot not in use (and the bundle); cred_slot only after a good connection."""
        if self.nvs is None:
            raise _Refused("no nvs_field partition", c.cred.serial)
        p = SLOT_PREFIX[c.cred.slot]
        self.nvs.set_str(FIELD_NS, f"{p}_cert", c.cred.cert_pem)
        self.nvs.set_str(FIELD_NS, f"{p}_key", c.cred.key_pem)
        if c.bundle is not None:
            self.nvs.set_str(FIELD_NS, "ca_cert", c.bundle)
        self.nvs.commit()
        if c.bundle is not None:
            self.bundle = c.bundle
            self._event("ca-stored", cas=len(pem_certificates(c.bundle)))

    def _try_install(self, conn, c: _Candidate):
        conn.close_clean()
        self._conn = None
        try:
            new = self._connect(c.cred)
        except _ConnectFailed as e:
            self._event("connect-failed", slot=c.cred.slot, error=str(e))
            self._fail(None, c.req, c.cred.serial, f"connection with the new certificate failed: {e}")
            try:
                return self._connect(self.cred)
            except _ConnectFailed as e2:
                self._event("connect-failed", slot=self.cred.slot, error=str(e2))
                return None
        # Proved by a CONNACK: now the pointer (one NVS write), then the request is done.
        self.nvs.set_u8(FIELD_NS, "cred_slot", c.cred.slot)
        self.nvs.commit()
        old = self.cred
        self.cred = c.cred
        self._forget_request()
        self._acks_due.append(self._ack(c.req, "installed", c.cred.serial))
        self._set_state(None, "idle", req=c.req, serial=c.cred.serial, replaced=old.serial)
        return new

    def _ack(self, req, state, serial, error=None) -> dict:
        ack = {"v": 1, "req": req, "state": state, "serial": serial}
        if error is not None:
            ack["error"] = error
        return ack

    def _fail(self, conn, req, serial, error):
        self._forget_request()
        self._hold_until = time.monotonic() + self.retry_wait
        ack = self._ack(req, "failed", serial, error)
        self._acks_due.append(ack)
        self._set_state(conn, "failed", req=req, error=error)
        if conn is not None:
            conn.ack_mids[self._publish(conn, "pki/ack", ack, retain=True)] = ack

    # -- firmware updates (OTA) ----------------------------------------------------------------

    def _bootloader(self):
        """The second-stage bootloader: pick and check the app, then take its identity."""
        self.fw_version, self.project = FW_VERSION, BUILTIN_PROJECT
        self.running_slot = self.ota_state = None
        self._selfcheck_marker = False
        self.ota_layout = ota.layout_from_table(read_partition_table(self.flash))
        if self.ota_layout is None or not self.ota_layout.slots:
            return  # no table (legacy layout) or no app partitions: the built-in firmware runs
        result = ota.boot(self.flash, self.ota_layout)
        for note in result.notes:
            self._event("bootloader", note=note)
        if result.slot is None:
            return  # a real board would stay in its bootloader; the twin runs its built-in identity
        self.running_slot, self.ota_state = result.slot, result.state
        desc = result.image.app_desc
        if desc is not None:
            self.fw_version, self.project = desc.version, desc.project_name
        self._selfcheck_marker = appimage.has_selfcheck_fail_marker(result.data, result.image)

    def _load_ota_state(self):
        """fleet/ota_job set at boot: an update was under way. If the bootloader has since given up
        on the other slot (INVALID or ABORTED, esp_ota_get_last_invalid_partition), the update
        rolled back and this, the previous app, says so."""
        fleet = self._field()
        self.ota_job_id, self.ota_done = fleet.get("ota_job"), fleet.get("ota_done")
        if not self.ota_job_id or self.running_slot is None or self.ota_state == ota.PENDING_VERIFY:
            return
        if not self.ota_layout.usable:
            return
        invalid = ota.last_invalid_slot(self.flash, self.ota_layout)
        if invalid is None or invalid[0] == self.running_slot:
            return  # no rollback: a download the power cut short; the retained job restarts it
        slot, state = invalid
        desc = appimage.describe(ota.read_slot(self.flash, self.ota_layout, slot))
        error = f"self-check failed on {desc.version if desc else '(no app description)'}"
        if state == ota.ABORTED:
            error += " (reset before it marked itself valid: ABORTED by the bootloader)"
        self._event("ota-rolled-back", job=self.ota_job_id, slot=self.ota_layout.slot_name(slot), error=error)
        self._ota_report(None, self.ota_job_id, "rolled-back", error)

    def _selfcheck_passed(self):
        ota.mark_valid(self.flash, self.ota_layout)  # esp_ota_mark_app_valid_cancel_rollback()
        self.ota_state = ota.VALID
        self._event("ota-valid", slot=self.ota_layout.slot_name(self.running_slot), fw=self.fw_version)
        if self.ota_job_id:
            self._ota_report(None, self.ota_job_id, "updated", "")

    def _selfcheck_failed(self, why):
        self._event("self-check-failed", fw=self.fw_version, error=why)
        refused = ota.mark_invalid(self.flash, self.ota_layout)
        if refused is None:  # esp_ota_mark_app_invalid_rollback_and_reboot()
            raise _Restart(f"self-check failed: {why}")
        # ESP-IDF returns the error and the app keeps running; this one cannot do its job, so it
        # idles until the next reset (the bootloader then marks it ABORTED).
        self._event("rollback-impossible", error=refused)
        self._drop()
        self._halted.wait()
        raise _Reset

    def _on_ota_job(self, conn, msg):
        job = msg.get("job")
        if not isinstance(job, str) or not ID_RE.match(job):
            self._event("ignored", topic="ota/job", why="no valid job id")
            return
        if job == self.ota_done or job in self._ota_answered:
            return  # answered already
        self._ota_job = msg  # handled in the session loop, once the retained messages are in

    def _ota(self, conn, msg):
        job = msg["job"]
        try:
            self._ota_check_job(msg)
            if msg["version"] == self.fw_version:
                # The job's version runs: either the update already happened (the power went
                # after the mark-valid, before the report) or there is nothing to do.
                state = "updated" if job == self.ota_job_id else "current"
                self._event("ota-" + state, job=job, fw=self.fw_version)
                self._ota_report(conn, job, state, "")
                return
            self._ota_download(conn, msg)
        except _OtaFailed as e:
            self._event("ota-failed", job=job, error=str(e))
            self._ota_report(conn, job, "failed", str(e))

    def _ota_check_job(self, msg):
        if self.ota_layout is None or not self.ota_layout.usable:
            raise _OtaFailed("no OTA partitions")
        bad = [
            k
            for k, ok in (
                ("project", isinstance(msg.get("project"), str) and msg.get("project")),
                ("version", isinstance(msg.get("version"), str) and msg.get("version")),
                ("url", isinstance(msg.get("url"), str) and msg["url"].startswith("https://")),
                ("sha256", isinstance(msg.get("sha256"), str) and HEX64.match(msg["sha256"].lower())),
                ("size", isinstance(msg.get("size"), int) and not isinstance(msg.get("size"), bool)),
            )
            if not ok
        ]
        if bad:
            raise _OtaFailed(f"malformed job: bad or missing {', '.join(bad)}")
        if self.running_slot is None:
            raise _OtaFailed("the running firmware is not an app in an OTA slot")
        if msg["project"] != self.project:
            raise _OtaFailed(f"project {msg['project']!r} is not the running app's {self.project!r}")
        if self.nvs is None:
            raise _OtaFailed("no nvs_field partition to keep the job in")

    def _ota_download(self, conn, msg):
        """esp_https_ota: GET, esp_ota_begin, esp_ota_write while hashing, esp_ota_end,
        esp_ota_set_boot_partition, esp_restart."""
        job, size, layout = msg["job"], msg["size"], self.ota_layout
        target = ota.next_update_slot(layout, self.running_slot)
        label, _, slot_size = layout.slots[target]
        if not 0 < size <= slot_size:
            raise _OtaFailed(f"size {size} does not fit the {label} partition ({slot_size} bytes)")
        self.nvs.set_str(FIELD_NS, "ota_job", job)  # before anything is downloaded
        self.nvs.commit()
        self.ota_job_id = job
        self._event("ota-start", job=job, version=msg["version"], slot=label, url=msg["url"])
        self._publish_report(conn, job, "downloading", "")
        url = urlsplit(msg["url"])
        try:
            ctx = _tls_context({"ca_cert": self.bundle, **self.cred.tls_fields()})
        except BootError as e:
            raise _OtaFailed(f"TLS setup failed: {e}") from None
        https = http.client.HTTPSConnection(
            url.hostname, url.port or 443, context=ctx, timeout=self.ota_timeout
        )
        try:
            https.request(
                "GET",
                url.path + (f"?{url.query}" if url.query else ""),
                headers={"User-Agent": "ESP32 HTTP Client/1.0"},
            )
            resp = https.getresponse()
            if resp.status != 200:
                raise _OtaFailed(f"download failed: HTTP {resp.status} {resp.reason}")
            length = resp.getheader("Content-Length")
            if length is not None and length.isdigit() and int(length) != size:
                raise _OtaFailed(f"size mismatch: the server sends {length} bytes, the job says {size}")
            got, digest = self._ota_stream(conn, resp, msg, target)
        except ssl.SSLCertVerificationError as e:
            raise _OtaFailed(f"download failed: server certificate rejected ({e.verify_message})") from None
        except (ssl.SSLError, OSError, http.client.HTTPException) as e:
            raise _OtaFailed(f"download failed: {type(e).__name__}: {e}") from None
        finally:
            https.close()
        if got != size:
            raise _OtaFailed(f"size mismatch: {got} bytes received, the job says {size}")
        if digest != msg["sha256"].lower():
            raise _OtaFailed(f"SHA-256 mismatch: the image is {digest}, the job says {msg['sha256']}")
        try:  # esp_ota_end and esp_ota_set_boot_partition both run esp_image_verify
            ota.validate_slot(self.flash, layout, target)
        except appimage.ImageError as e:
            raise _OtaFailed(f"image verification failed: {e}") from None
        index, seq = ota.set_boot_partition(self.flash, layout, target)
        self._event("ota-boot-set", job=job, slot=label, otadata=index, seq=seq, state="NEW")
        raise _Restart(f"update to {msg['version']} in {label}")

    def _ota_stream(self, conn, resp, msg, target) -> tuple:
        _, offset, slot_size = self.ota_layout.slots[target]
        state = ota.slot_state(self.flash, self.ota_layout, self.running_slot)
        if state == ota.PENDING_VERIFY:
            raise _OtaFailed("the running app is not confirmed yet (PENDING_VERIFY)")
        # esp_ota_begin(OTA_WITH_SEQUENTIAL_WRITES), esp_https_ota's default: each sector is erased
        # when the writes reach it; with rollback enabled it also drops the superseded otadata entry.
        if ota.invalidate_inactive(self.flash, self.ota_layout, self.running_slot):
            self._event("ota-invalidated", note="the superseded otadata entry was erased")
        sha = hashlib.sha256()
        head = b""
        written = 0
        checked = False
        next_loop = 0
        while True:
            chunk = resp.read(OTA_CHUNK)
            if not chunk:
                break
            sha.update(chunk)
            if not checked:
                head += chunk
                if len(head) < appimage.HEADER_CHECK_SIZE:
                    continue
                self._ota_check_header(head, msg)
                checked, chunk = True, head
            if written + len(chunk) > slot_size:
                raise _OtaFailed(f"the image is larger than the partition ({slot_size} bytes)")
            if self.ota_power_loss is not None and written + len(chunk) >= self.ota_power_loss:
                cut = self.ota_power_loss - written
                self._ota_write(offset, written, chunk[:cut])
                self.ota_power_loss, self.power_lost = None, True
                raise _PowerLoss(f"OTA download after {written + cut} bytes")
            self._ota_write(offset, written, chunk)
            written += len(chunk)
            if written >= next_loop:  # keep the MQTT connection serviced (esp-mqtt has its own task)
                conn.loop(0)
                next_loop = written + 0x10000
        if not checked and head:
            self._ota_check_header(head, msg)  # too short to be an image: the header check says so
        return written, sha.hexdigest()

    def _ota_check_header(self, head, msg):
        try:
            desc = appimage.check_header(head)
        except appimage.ImageError as e:
            raise _OtaFailed(f"image header rejected: {e}") from None
        if desc.project_name != self.project:
            raise _OtaFailed(f"image project {desc.project_name!r} is not the running app's {self.project!r}")
        if desc.version != msg["version"]:
            raise _OtaFailed(f"image version {desc.version!r} is not the job's {msg['version']!r}")

    def _ota_write(self, offset, written, data):
        """esp_ota_write with sequential erase: erase the sectors the data reaches, then program."""
        end = written + len(data)
        first = -(-written // ota.SECTOR) * ota.SECTOR  # first sector boundary not yet erased
        for sector in range(first, end, ota.SECTOR):
            self.flash.erase(offset + sector, ota.SECTOR)
        self.flash.program(offset + written, data)

    def _report(self, job, state, error) -> dict:
        return {"v": 1, "job": job, "state": state, "version": self.fw_version, "error": error}

    def _publish_report(self, conn, job, state, error):
        if conn is not None:
            self._publish(conn, "ota/report", self._report(job, state, error), retain=True)

    def _ota_report(self, conn, job, state, error):
        """A final report: retained on R/ota/report; once the broker has it (PUBACK), ota_done =
        job and ota_job is erased. Until then it is published again on every connection."""
        report = self._report(job, state, error)
        self._ota_answered.add(job)
        self._ota_reports_due.append(report)
        if conn is not None:
            conn.report_mids[self._publish(conn, "ota/report", report, retain=True)] = report

    def _ota_finish(self, conn, report):
        if self.nvs is not None:
            self.nvs.set_str(FIELD_NS, "ota_done", report["job"])
            self.nvs.erase_key(FIELD_NS, "ota_job")
            self.nvs.commit()
        self.ota_done, self.ota_job_id = report["job"], None
        self._event("ota-report", job=report["job"], state=report["state"], error=report["error"])
        if report["state"] == "updated":
            self._publish_status(conn)

    # -- renewal requests ----------------------------------------------------------------------

    def _holding(self) -> bool:
        return self._hold_until is not None and time.monotonic() < self._hold_until

    def _check_window(self, conn):
        if self.state in ("pending", "installing") or self._holding():
            return
        self._hold_until = None
        left = self.cred.not_after - datetime.datetime.now(datetime.UTC)
        if left <= datetime.timedelta(days=self.renew_days):
            self._start_request(conn, "window")

    def _start_request(self, conn, reason):
        if self.nvs is None:
            self._event("renewal-unavailable", error="no nvs_field partition")
            return
        key = ec.generate_private_key(ec.SECP256R1())
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,  # what mbedtls_pk_write_key_pem writes
            serialization.NoEncryption(),
        ).decode()
        req = secrets.token_urlsafe(24)  # 32 characters of [A-Za-z0-9_-]
        self.nvs.set_str(FIELD_NS, "pend_req", req)
        self.nvs.set_str(FIELD_NS, "pend_key", key_pem)  # the request exists once its key is stored
        self.nvs.commit()
        self.pend = _Pending(req, key, key_pem, reason)
        self._set_state(conn, "pending", req=req, reason=reason)
        self._publish_csr(conn)

    def _publish_csr(self, conn):
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, self.device_id)]))
            .sign(self.pend.key, hashes.SHA256())
        )
        pem = csr.public_bytes(serialization.Encoding.PEM).decode()
        payload = {"v": 1, "req": self.pend.req, "csr": pem, "reason": self.pend.reason}
        self._publish(conn, "pki/csr", payload, retain=True)
        self._event("csr", req=self.pend.req, reason=self.pend.reason)
