# Copyright: esp32-mqtt-fleet contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The controller's MQTT session with the broker (paho-mqtt, MQTT 5, TLS with a client certificate):
retained messages collected after each SUBACK, QoS 1 publishes that wait for their PUBACK, every wait
bounded. Shared by fleet_renewal (over-the-air renewal) and fleet_ota (firmware rollouts)."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import ssl
import threading
import time

try:
    import paho.mqtt.client as mqtt
    from paho.mqtt.subscribeoptions import SubscribeOptions
except ImportError:
    mqtt = None

_SUBSCRIBE_CHUNK = 64


class MqttError(Exception):
    """A one-line failure; partial holds the result lists of what was done before it."""

    def __init__(self, message, partial=None, refused=False):
        super().__init__(message)
        self.partial = partial or {}
        # True when the broker certainly did not take a publish (PUBACK failure, or never sent).
        self.refused = refused


def to_json(body):
    return json.dumps(body, separators=(",", ":")).encode()


def parse_json(payload):
    """A payload as a JSON object, or None."""
    try:
        value = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, AttributeError):
        return None
    return value if isinstance(value, dict) else None


def _rc_text(reason_code):
    value = getattr(reason_code, "value", reason_code)
    try:
        return f"{reason_code} (0x{int(value):02X})"
    except (TypeError, ValueError):
        return str(reason_code)


class Session:
    """One MQTT v5 connection: subscriptions with the retained messages they bring, QoS 1 publishes
    that wait for their PUBACK. Every wait is bounded by timeout; errors are MqttError."""

    def __init__(self, params):
        self.p = params
        self.cond = threading.Condition()
        self.connected = False
        self.connect_error = None
        self.gone = None
        self.subacks = {}
        self.pubacks = {}
        self.messages = {}
        self.arrivals = {}  # topic -> [UTC time of each live (not retained) message]
        self.last_retained = None
        self.client = None

    # paho callbacks (its network thread) ---------------------------------------------------------
    def _on_connect(self, _client, _userdata, _flags, reason_code, _props):
        with self.cond:
            if reason_code.is_failure:
                self.connect_error = f"the broker refused the connection: {_rc_text(reason_code)}"
            else:
                self.connected = True
            self.cond.notify_all()

    def _on_disconnect(self, _client, _userdata, _flags, reason_code, _props):
        with self.cond:
            self.gone = _rc_text(reason_code)
            self.cond.notify_all()

    def _on_subscribe(self, _client, _userdata, mid, reason_codes, _props):
        with self.cond:
            self.subacks[mid] = list(reason_codes)
            self.cond.notify_all()

    def _on_publish(self, _client, _userdata, mid, reason_code, _props):
        with self.cond:
            self.pubacks[mid] = reason_code
            self.cond.notify_all()

    def _on_message(self, _client, _userdata, msg):
        with self.cond:
            self.messages[msg.topic] = bytes(msg.payload)
            if msg.retain:
                self.last_retained = time.monotonic()
            else:
                self.arrivals.setdefault(msg.topic, []).append(
                    datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
                )
            self.cond.notify_all()

    # -------------------------------------------------------------------------------------------------
    def _where(self):
        return f"{self.p['host']}:{self.p['port']}"

    def _wait(self, predicate, seconds, what):
        """Wait (holding cond) until predicate(); MqttError naming what on timeout or a lost connection."""
        deadline = time.monotonic() + seconds
        while not predicate():
            if self.gone is not None:
                raise MqttError(f"lost the connection to {self._where()} waiting for {what}: {self.gone}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise MqttError(f"no {what} from {self._where()} within {seconds:g} s")
            self.cond.wait(min(left, 0.1))

    def _wait_quietly(self, predicate, seconds):
        """Wait (holding cond) until predicate(); False on a timeout or a lost connection."""
        deadline = time.monotonic() + seconds
        while not predicate():
            left = deadline - time.monotonic()
            if self.gone is not None or left <= 0:
                return False
            self.cond.wait(min(left, 0.1))
        return True

    def open(self):
        p = self.p
        for name in ("ca_cert", "client_cert", "client_key"):
            if not os.path.isfile(p[name]):
                raise MqttError(f"{name}: {p[name]} is not a file")
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        try:
            client.tls_set(
                ca_certs=p["ca_cert"],
                certfile=p["client_cert"],
                keyfile=p["client_key"],
                cert_reqs=ssl.CERT_REQUIRED,
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
        except (OSError, ssl.SSLError, ValueError) as exc:
            raise MqttError(f"cannot load ca_cert, client_cert and client_key: {exc}") from None
        client.tls_insecure_set(not p["verify_hostname"])
        client.connect_timeout = p["timeout"]
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        try:
            client.connect(p["host"], p["port"], keepalive=30)
        except ssl.SSLCertVerificationError as exc:
            raise MqttError(
                f"TLS with {self._where()} failed: {exc.verify_message or exc} (ca_cert, verify_hostname)"
            ) from None
        except (OSError, ssl.SSLError, ValueError) as exc:
            raise MqttError(f"cannot connect to {self._where()}: {exc}") from None
        self.client = client
        client.loop_start()
        with self.cond:
            if not self._wait_quietly(lambda: self.connected or self.connect_error, p["timeout"]):
                if self.gone is not None:
                    raise MqttError(
                        f"{self._where()} closed the connection before its CONNACK ({self.gone}): does it "
                        f"accept the identity {p['client_cert']} (issued by its CA, not revoked)?"
                    )
                raise MqttError(f"no CONNACK from {self._where()} within {p['timeout']:g} s")
            if self.connect_error:
                raise MqttError(f"{self.connect_error} ({self._where()}, identity {p['client_cert']})")

    def subscribe(self, topics, tolerate=()):
        """Subscribe (QoS 1, no local) and wait for the SUBACKs, then for the retained messages to
        settle. A refused topic fails unless it is in tolerate; returns the refused tolerated topics."""
        refused = {}
        options = SubscribeOptions(qos=1, noLocal=True)
        for start in range(0, len(topics), _SUBSCRIBE_CHUNK):
            chunk = topics[start : start + _SUBSCRIBE_CHUNK]
            rc, mid = self.client.subscribe([(t, options) for t in chunk])
            if rc != mqtt.MQTT_ERR_SUCCESS:
                raise MqttError(f"cannot subscribe at {self._where()}: {mqtt.error_string(rc)}")
            with self.cond:
                self._wait(lambda mid=mid: mid in self.subacks, self.p["timeout"], "SUBACK")
                codes = self.subacks.pop(mid)
            for topic, code in zip(chunk, codes, strict=False):
                if code.is_failure:
                    refused[topic] = _rc_text(code)
        bad = {t: c for t, c in refused.items() if t not in tolerate}
        if bad:
            listed = ", ".join(f"{t}: {c}" for t, c in sorted(bad.items()))
            raise MqttError(f"the broker refused the subscription to {listed} (its ACL for the identity?)")
        started = time.monotonic()
        settle = max(self.p["settle"], 0.0)
        with self.cond:
            while True:
                if self.gone is not None:
                    raise MqttError(f"lost the connection to {self._where()}: {self.gone}")
                quiet_since = max(started, self.last_retained or started)
                now = time.monotonic()
                if now - quiet_since >= settle or now - started >= self.p["timeout"]:
                    break
                self.cond.wait(min(settle - (now - quiet_since), 0.1) if settle else 0)
        return sorted(refused)

    def retained(self, topic):
        with self.cond:
            return self.messages.get(topic, b"")

    def wait_until(self, predicate, seconds):
        """Wait up to seconds for predicate() (called holding the lock); True when it came true."""
        deadline = time.monotonic() + seconds
        with self.cond:
            while not predicate():
                if self.gone is not None:
                    raise MqttError(f"lost the connection to {self._where()}: {self.gone}")
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.cond.wait(min(left, 0.1))
        return True

    def publish(self, topic, payload, retain=True):
        """QoS 1 publish; returns once the broker's PUBACK says success."""
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise MqttError(f"cannot publish on {topic}: {mqtt.error_string(info.rc)}", refused=True)
        with self.cond:
            self._wait(lambda: info.mid in self.pubacks, self.p["timeout"], f"PUBACK for {topic}")
            code = self.pubacks.pop(info.mid)
        if code is not None and getattr(code, "is_failure", False):
            raise MqttError(f"the broker refused the publish on {topic}: {_rc_text(code)}", refused=True)

    def close(self):
        if self.client is not None:
            with contextlib.suppress(Exception):
                self.client.disconnect()
            self.client.loop_stop()
