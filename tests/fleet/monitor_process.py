"""The application user of tests/fleet/living.py as its own process, so that it can run under the
same moving clock (libfaketime) as the broker and the boards: a broker certificate issued on a
faked day is not yet valid to a process on the real one.

    python monitor_process.py PORT CAFILE     (password in $MONITOR_PASSWORD)

Prints one JSON line per message on devices/+/telemetry: {"mono": <CLOCK_MONOTONIC, the real one
(FAKETIME_DONT_FAKE_MONOTONIC=1)>, "topic": ...}, and {"mono", "error"} for a failed connection.
Reconnects every second, re-reading CAFILE each time: a CA rotation changes the trust bundle. It
never calls time.sleep, which libfaketime's clock_nanosleep breaks while the clock moves; paho's
loop() waits in select() and the reconnect waits on an Event."""

import json
import os
import ssl
import sys
import threading
import time

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion


def say(**fields):
    print(json.dumps({"mono": time.monotonic(), **fields}), flush=True)


def main(port: int, cafile: str) -> None:
    pause = threading.Event()
    while True:
        client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        client.username_pw_set("fleet-monitor", os.environ["MONITOR_PASSWORD"])
        client.tls_set_context(ssl.create_default_context(cafile=cafile))
        client.on_connect = lambda c, u, f, r, p: c.subscribe("devices/+/telemetry", qos=1)
        client.on_message = lambda c, u, msg: say(topic=msg.topic)
        try:
            client.connect("localhost", port, keepalive=30)
            while client.loop(1.0) == mqtt.MQTT_ERR_SUCCESS:
                pass
        except (OSError, ssl.SSLError) as exc:
            say(error=str(exc))
        pause.wait(1.0)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
