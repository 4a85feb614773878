"""The provisioned firmware: read credentials from NVS, publish sensor readings over MQTT/TLS.

Exit codes (one line on stderr, never a traceback):
  0 readings published and acknowledged
  2 flash/NVS unreadable or credentials missing/invalid
  3 a publish was not authorized (MQTT 5 PUBACK reason 0x87, e.g. an ACL denial)
  4 the TLS connection failed (handshake, certificate, refused or closed socket)
  5 the broker refused CONNECT (CONNACK reason code)
  6 no PUBACK/CONNACK in time, or the connection dropped mid-way
"""

import json
import os
import random
import ssl
import sys
import tempfile
import threading
import time
from urllib.parse import urlsplit

from .nvs import NvsError, parse_nvs

REQUIRED = ("broker_uri", "device_id", "topic_root", "ca_cert", "client_cert", "client_key")

EXIT_OK = 0
EXIT_CONFIG = 2
EXIT_NOT_AUTHORIZED = 3
EXIT_TLS = 4
EXIT_REFUSED = 5
EXIT_TIMEOUT = 6


class BootError(Exception):
    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


def read_config(flash_path: str, offset: int = 0x9000, size: int = 0x6000) -> dict:
    """The `mqtt` namespace of the NVS partition in a flash image, checked for completeness."""
    try:
        with open(flash_path, "rb") as f:
            f.seek(offset)
            image = f.read(size)
    except OSError as e:
        raise BootError(EXIT_CONFIG, f"cannot read flash image {flash_path}: {e.strerror}") from None
    if len(image) != size:
        raise BootError(EXIT_CONFIG, f"flash image {flash_path} ends before the NVS partition")
    return config_from_image(image, offset)


def config_from_image(image: bytes, offset: int = 0x9000) -> dict:
    """The checked `mqtt` namespace of an NVS partition image (offset: for messages only).

    Required strings are returned as str; other keys (renew_days, a u16) as parse_nvs reads them.
    """
    try:
        namespaces = parse_nvs(image)
    except NvsError as e:
        raise BootError(EXIT_CONFIG, f"no NVS partition at {offset:#x}: {e}") from None
    mqtt = namespaces.get("mqtt")
    if not mqtt:
        raise BootError(EXIT_CONFIG, f"NVS at {offset:#x} has no 'mqtt' namespace: board not provisioned")
    missing = [k for k in REQUIRED if not mqtt.get(k)]
    if missing:
        raise BootError(EXIT_CONFIG, f"NVS namespace 'mqtt' lacks {', '.join(missing)}")
    for k in REQUIRED:
        if isinstance(mqtt[k], bytes):
            mqtt[k] = mqtt[k].decode("utf-8", "replace")
    return mqtt


def _tls_context(cfg: dict) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_verify_locations(cadata=cfg["ca_cert"])
    except ssl.SSLError as e:
        raise BootError(
            EXIT_CONFIG, f"ca_cert from NVS is not a usable PEM certificate ({e.reason})"
        ) from None
    # OpenSSL loads a client key only from a file: a private 0600 file that lives just long
    # enough to be read.
    with tempfile.TemporaryDirectory(prefix="esp32sim-boot-") as tmp:
        cert = os.path.join(tmp, "client.crt")
        key = os.path.join(tmp, "client.key")
        with open(cert, "w") as f:
            f.write(cfg["client_cert"])
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(cfg["client_key"])
        try:
            ctx.load_cert_chain(cert, key)
        except ssl.SSLError as e:
            raise BootError(
                EXIT_CONFIG, f"client_cert/client_key from NVS do not load or do not match ({e.reason})"
            ) from None
    return ctx


def reading(device_id: str, sensor: "Sensor", seq: int) -> str:
    """One telemetry payload: {"device_id", "temperature_c", "humidity_pct", "seq"}."""
    temperature, humidity = sensor.read()
    fields = {"device_id": device_id, "temperature_c": temperature, "humidity_pct": humidity, "seq": seq}
    return json.dumps(fields)


class Sensor:
    """HTU21D-like readings: 0.01 °C / 0.04 %RH resolution, slow random walk around a room."""

    def __init__(self, seed: str):
        # Sensor noise, not secrets: a plain PRNG is the right tool.
        self.rng = random.Random(f"{seed}-{time.time_ns()}")  # noqa: S311
        self.t = self.rng.uniform(19.0, 25.0)
        self.h = self.rng.uniform(35.0, 55.0)

    def read(self):
        self.t = min(40.0, max(5.0, self.t + self.rng.gauss(0, 0.15)))
        self.h = min(95.0, max(10.0, self.h + self.rng.gauss(0, 0.6)))
        return round(self.t, 2), round(round(self.h / 0.04) * 0.04, 2)


def run(cfg: dict, interval: float, count: int | None, timeout: float, topic_override: str | None, out=print):
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion
    from paho.mqtt.properties import Properties  # noqa: F401  (MQTT 5 support is required)

    uri = urlsplit(cfg["broker_uri"])
    if uri.scheme != "mqtts" or not uri.hostname:
        raise BootError(EXIT_CONFIG, f"broker_uri {cfg['broker_uri']!r} must be mqtts://HOST[:PORT]")
    host, port = uri.hostname, uri.port or 8883
    ctx = _tls_context(cfg)
    device_id = cfg["device_id"]
    topic = topic_override or f"{cfg['topic_root'].rstrip('/')}/telemetry"

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=device_id, protocol=mqtt.MQTTv5)
    client.tls_set_context(ctx)
    cond = threading.Condition()
    state = {"connack": None, "acks": {}, "gone": None}

    def on_connect(c, u, flags, reason, props):
        with cond:
            state["connack"] = reason
            cond.notify_all()

    def on_disconnect(c, u, flags, reason, props):
        with cond:
            state["gone"] = reason
            cond.notify_all()

    def on_publish(c, u, mid, reason, props):
        with cond:
            state["acks"][mid] = reason
            cond.notify_all()

    client.on_connect = on_connect
    client.on_disconnect = on_disconnect
    client.on_publish = on_publish

    def wait(pred, what):
        deadline = time.monotonic() + timeout
        with cond:
            while not pred():
                if state["gone"] is not None and state["connack"] is None:
                    raise BootError(
                        EXIT_TLS,
                        f"{host}:{port} closed the connection before CONNACK "
                        f"({state['gone']}; client certificate rejected?)",
                    )
                if state["gone"] is not None:
                    raise BootError(
                        EXIT_TIMEOUT, f"connection to {host}:{port} lost while waiting for {what}"
                    )
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BootError(EXIT_TIMEOUT, f"no {what} from {host}:{port} within {timeout:g}s")
                cond.wait(left)

    try:
        client.connect(host, port, keepalive=max(30, int(interval * 3)))
    except ssl.SSLCertVerificationError as e:
        raise BootError(
            EXIT_TLS, f"TLS to {host}:{port}: broker certificate rejected ({e.verify_message})"
        ) from None
    except ssl.SSLError as e:
        raise BootError(EXIT_TLS, f"TLS handshake with {host}:{port} failed ({e.reason or e})") from None
    except OSError as e:
        raise BootError(EXIT_TLS, f"cannot connect to {host}:{port}: {e.strerror or e}") from None
    client.loop_start()
    try:
        wait(lambda: state["connack"] is not None, "CONNACK")
        if state["connack"].is_failure:
            raise BootError(EXIT_REFUSED, f"broker {host}:{port} refused CONNECT: {state['connack']}")
        sensor = Sensor(device_id)
        seq = 0
        while count is None or seq < count:
            if seq:
                time.sleep(interval)
            seq += 1
            payload = reading(device_id, sensor, seq)
            info = client.publish(topic, payload, qos=1)
            wait(lambda mid=info.mid: mid in state["acks"], "PUBACK")
            reason = state["acks"][info.mid]
            if reason.is_failure:
                code = EXIT_NOT_AUTHORIZED if reason.value == 0x87 else EXIT_REFUSED
                raise BootError(
                    code, f"publish to {topic} refused by the broker: {reason} ({reason.value:#04x})"
                )
            out(f"published seq={seq} to {topic}: {payload}")
    finally:
        client.disconnect()
        client.loop_stop()
    return EXIT_OK


def main(args) -> int:
    count = 1 if args.once else args.count
    if count is not None and count < 1:
        print("esp32sim boot: --count must be at least 1", file=sys.stderr)
        return EXIT_CONFIG
    try:
        cfg = read_config(args.flash, args.nvs_offset, args.nvs_size)
        return run(
            cfg, args.interval, count, args.timeout, args.topic_override, out=lambda s: print(s, flush=True)
        )
    except BootError as e:
        print(f"esp32sim boot: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        return EXIT_OK
