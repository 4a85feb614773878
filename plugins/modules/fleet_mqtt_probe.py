#!/usr/bin/python
# Copyright: esp32-mqtt-fleet contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Subscribe to an MQTT topic over TLS, optionally run a command, and report what arrived."""

DOCUMENTATION = r"""
---
module: fleet_mqtt_probe
short_description: Watch an MQTT topic while a board boots (smoke test of a provisioned device)
description:
  - Connects to the broker over TLS as an application user, subscribes to O(topic) (QoS 1) and, once
    the subscription is acknowledged, runs O(command) if given (for example the simulator's boot of a
    board's flash). Then waits up to O(timeout) seconds for a message on the topic.
  - Only observes; never reports a change. Asserting what should have happened is left to the
    playbook (a reading expected, or none, and the command's exit code).
version_added: "0.1.0"
author: esp32-mqtt-fleet contributors (@esp32-mqtt-fleet)
options:
  host:
    description: Broker host name or address.
    type: str
    required: true
  port:
    description: Broker TLS port.
    type: int
    default: 8883
  ca_cert:
    description: CA certificate the broker certificate must chain to.
    type: path
    required: true
  verify_hostname:
    description: Check that the broker certificate names O(host).
    type: bool
    default: true
  username:
    description: MQTT user name (password listener).
    type: str
  password:
    description: MQTT password.
    type: str
  client_cert:
    description: Client certificate (certificate listener), with O(client_key).
    type: path
  client_key:
    description: Client private key.
    type: path
  topic:
    description: Topic filter to subscribe to.
    type: str
    required: true
  command:
    description: Command (argument list, no shell) run after the subscription is acknowledged.
    type: list
    elements: str
  command_timeout:
    description: Seconds after which the command is killed (reported as rc -9).
    type: float
    default: 60
  timeout:
    description: Seconds to wait for a message once the command (if any) has finished.
    type: float
    default: 15
  stop_after:
    description: Stop waiting once this many messages have arrived.
    type: int
    default: 1
attributes:
  check_mode:
    description: Can run in check mode and report what it would change without changing it.
    support: full
    details: Runs in check mode too; it only observes (the command is run as given).
  diff_mode:
    description: Reports a before/after diff of what it changes, when run with --diff.
    support: none
requirements:
  - paho-mqtt >= 2.0
"""

EXAMPLES = r"""
- name: Boot the simulated board and wait for its reading
  fleet_mqtt_probe:
    host: 127.0.0.1
    port: 8884
    ca_cert: /srv/fleet/pki/ca/ca.crt
    username: fleet-monitor
    password: "{{ monitor_password }}"
    topic: devices/esp32-sim-01/telemetry
    command: [esp32sim, boot, --flash, /srv/lab/ttyUSB0.flash, --once]
  register: probe
"""

RETURN = r"""
messages:
  description: Messages received on the topic (payload decoded as UTF-8, replaced when not text).
  returned: always
  type: list
  elements: dict
  sample: [{"topic": "devices/esp32-sim-01/telemetry", "payload": "{\"temperature\": 21.4}"}]
command_rc:
  description: Exit code of O(command) (null when no command was given).
  returned: always
  type: int
command_stdout:
  description: Standard output of O(command).
  returned: always
  type: str
command_stderr:
  description: Standard error of O(command).
  returned: always
  type: str
seconds:
  description: Wall time of the probe.
  returned: always
  type: float
"""

import ssl
import subprocess
import threading
import time

from ansible.module_utils.basic import AnsibleModule, missing_required_lib

try:
    import paho.mqtt.client as mqtt
except ImportError:
    mqtt = None


def probe(module):
    p = module.params
    started = time.monotonic()
    messages = []
    subscribed = threading.Event()
    connected = threading.Event()
    state = {"error": None}

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.tls_set(
        ca_certs=p["ca_cert"],
        certfile=p["client_cert"],
        keyfile=p["client_key"],
        cert_reqs=ssl.CERT_REQUIRED,
        tls_version=ssl.PROTOCOL_TLS_CLIENT,
    )
    client.tls_insecure_set(not p["verify_hostname"])
    if p["username"]:
        client.username_pw_set(p["username"], p["password"])

    def on_connect(_client, _userdata, _flags, reason_code, _props):
        if reason_code.is_failure:
            state["error"] = f"broker refused the probe's connection: {reason_code}"
            connected.set()
            subscribed.set()
            return
        connected.set()
        _client.subscribe(p["topic"], qos=1)

    def on_subscribe(_client, _userdata, _mid, reason_codes, _props):
        failed = [str(rc) for rc in reason_codes if rc.is_failure]
        if failed:
            state["error"] = f"subscription to {p['topic']} refused: {', '.join(failed)}"
        subscribed.set()

    def on_message(_client, _userdata, msg):
        messages.append({"topic": msg.topic, "payload": msg.payload.decode("utf-8", "replace")})

    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    try:
        client.connect(p["host"], p["port"], keepalive=30)
    except (OSError, ssl.SSLError) as exc:
        module.fail_json(msg=f"cannot connect to {p['host']}:{p['port']}: {exc}")
    client.loop_start()
    try:
        if not subscribed.wait(15) or state["error"]:
            module.fail_json(msg=state["error"] or f"no SUBACK from {p['host']}:{p['port']} within 15 s")
        rc, out, err = None, "", ""
        if p["command"]:
            try:
                done = subprocess.run(
                    p["command"], capture_output=True, text=True, timeout=p["command_timeout"], check=False
                )
                rc, out, err = done.returncode, done.stdout, done.stderr
            except subprocess.TimeoutExpired as exc:
                rc, out, err = -9, exc.stdout or "", f"killed after {p['command_timeout']} s"
            except OSError as exc:
                module.fail_json(msg=f"cannot run {p['command'][0]}: {exc}")
        deadline = time.monotonic() + p["timeout"]
        while len(messages) < p["stop_after"] and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        client.loop_stop()
        client.disconnect()
    return {
        "changed": False,
        "messages": messages,
        "command_rc": rc,
        "command_stdout": out if isinstance(out, str) else out.decode("utf-8", "replace"),
        "command_stderr": err,
        "seconds": round(time.monotonic() - started, 3),
    }


def main():
    module = AnsibleModule(
        argument_spec={
            "host": {"type": "str", "required": True},
            "port": {"type": "int", "default": 8883},
            "ca_cert": {"type": "path", "required": True},
            "verify_hostname": {"type": "bool", "default": True},
            "username": {"type": "str"},
            "password": {"type": "str", "no_log": True},
            "client_cert": {"type": "path"},
            "client_key": {"type": "path"},
            "topic": {"type": "str", "required": True},
            "command": {"type": "list", "elements": "str"},
            "command_timeout": {"type": "float", "default": 60},
            "timeout": {"type": "float", "default": 15},
            "stop_after": {"type": "int", "default": 1},
        },
        required_together=[("client_cert", "client_key")],
        supports_check_mode=True,
    )
    if mqtt is None:
        module.fail_json(msg=missing_required_lib("paho-mqtt"))
    module.exit_json(**probe(module))


if __name__ == "__main__":
    main()
