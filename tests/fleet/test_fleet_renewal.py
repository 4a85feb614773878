"""playbooks/renew.yml against a living fleet (tests/fleet/living.py): the board asked to renew
makes a new key itself, gets its certificate over MQTT, switches to it and keeps publishing; the
superseded serial goes on the CRL and the broker refuses it after the reload; the other board is
untouched; a rerun changes nothing. Also the ACL shape a real broker gets: no board can answer
another board's request, and the read-only monitor cannot answer any."""

from __future__ import annotations

import json
import ssl
import subprocess
import tempfile
import time
from pathlib import Path

import paho.mqtt.client as mqtt
from cryptography import x509
from paho.mqtt.enums import CallbackAPIVersion

from .living import MONITOR_PASSWORD, current_credential, field_state, station_state


def serial_of(pem: str) -> int:
    return x509.load_pem_x509_certificate(pem.encode()).serial_number


def connect_rc(port: int, ca: str, cert: str, key: str) -> str:
    """Connect once with a credential: 'ok', or what went wrong."""
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "c.crt").write_text(cert)
        key_path = Path(tmp) / "c.key"
        key_path.touch(mode=0o600)
        key_path.write_text(key)
        ctx = ssl.create_default_context(cafile=ca)
        ctx.load_cert_chain(str(Path(tmp) / "c.crt"), str(key_path))
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="probe", protocol=mqtt.MQTTv5)
    client.tls_set_context(ctx)
    result = {}
    client.on_connect = lambda c, u, f, r, p: result.setdefault("rc", str(r))
    try:
        client.connect("localhost", port)
    except (ssl.SSLError, OSError) as exc:
        return f"tls: {exc}"
    client.loop_start()
    deadline = time.monotonic() + 10
    while "rc" not in result and time.monotonic() < deadline and client.is_connected() is not None:
        time.sleep(0.05)
    client.loop_stop()
    client.disconnect()
    return "ok" if result.get("rc") == "Success" else f"refused: {result.get('rc', 'closed')}"


# This machine's own broker (make site's), which no test may reconfigure.
HOST_BROKER_DIR = Path("/etc/mosquitto")


def host_broker_conf():
    """Every file of this machine's broker configuration, with its content."""
    if not HOST_BROKER_DIR.is_dir():
        return None
    return {str(p): p.read_bytes() for p in sorted(HOST_BROKER_DIR.rglob("*")) if p.is_file()}


def test_renew_on_request_switches_one_board_and_revokes_its_old_serial(living_fleet):
    project, broker, monitor = living_fleet, living_fleet.broker, living_fleet.monitor
    host_conf = host_broker_conf()
    ca = str(project.pki / "ca" / "bundle.pem")
    monitor.wait_for("devices/b1/telemetry", timeout=60)
    monitor.wait_for("devices/b2/telemetry", timeout=60)
    b1_old = station_state(project, 0)
    b1_old_serial = serial_of(b1_old["client_cert"])
    b2_cert_before = (project.pki / "devices" / "b2.crt").read_text()
    b2_field_before = field_state(project, 1)

    # --limit localhost: the test's broker is run by the test (living.py), not by the mosquitto role;
    # renew.yml's broker play would otherwise configure this machine's own Mosquitto.
    rc, out, recap = project.run_playbook("playbooks/renew.yml", "-e", "device=b1", "--limit", "localhost")
    assert rc == 0, out[-5000:]
    assert recap["localhost"]["changed"] > 0, recap

    # The board holds the new credential in its own partition and uses it; the controller never saw
    # its key (only the certificate is on the controller, and no key for b1 is left there).
    b1_field = field_state(project, 0)
    cert, key = current_credential(b1_field, station_state(project, 0))
    new_serial = serial_of(cert)
    assert new_serial != b1_old_serial
    assert serial_of((project.pki / "devices" / "b1.crt").read_text()) == new_serial
    assert not (project.pki / "devices" / "b1.key").exists()
    assert key not in json.dumps(
        [p.read_text(errors="replace") for p in project.pki.rglob("*") if p.is_file()]
    )
    row = project.last()["b1"]
    assert row["result"] == "renewed" and row["cert_serial"] == str(new_serial), row
    assert row["nvs_md5"] == project.rows()[0]["nvs_md5"]  # the station's partition is untouched

    # The old serial is on the CRL; once the broker reloaded it, the old credential is refused.
    crl = subprocess.run(
        ["openssl", "crl", "-noout", "-text", "-in", str(project.pki / "ca" / "crl.pem")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert (
        f"{b1_old_serial:X}".rjust(2, "0") in crl.replace(":", "").upper()
        or f"{b1_old_serial:X}" in crl.upper()
    )
    broker.reload()
    assert connect_rc(broker.device_port, ca, b1_old["client_cert"], b1_old["client_key"]) != "ok"

    # The board keeps publishing (with the new certificate: the old one can no longer connect).
    since = time.monotonic()
    monitor.wait_for("devices/b1/telemetry", since=since, timeout=30)
    # b2 is untouched.
    assert (project.pki / "devices" / "b2.crt").read_text() == b2_cert_before
    assert field_state(project, 1) == b2_field_before
    assert "b2" not in [r["device_id"] for r in project.rows() if r["result"] == "renewed"]

    # Nothing pending: a rerun changes nothing.
    rc, out, recap = project.run_playbook("playbooks/renew.yml", "--limit", "localhost")
    assert rc == 0, out[-3000:]
    assert recap["localhost"]["changed"] == 0, out[-3000:]

    # The station run that follows (the board is still on its USB port) keeps the field credential:
    # no new key on the controller, nothing flashed, the board recorded unchanged.
    flash_before = (project.sim_dir / "ttyUSB0.flash").read_bytes()[0x9000:0xF000]
    rc, out, _ = project.run()
    assert rc == 0, out[-4000:]
    assert project.last()["b1"]["result"] == "unchanged", project.last()["b1"]
    assert not (project.pki / "devices" / "b1.key").exists()
    assert serial_of((project.pki / "devices" / "b1.crt").read_text()) == new_serial
    assert (project.sim_dir / "ttyUSB0.flash").read_bytes()[0x9000:0xF000] == flash_before
    assert serial_of(current_credential(field_state(project, 0), station_state(project, 0))[0]) == new_serial
    assert host_broker_conf() == host_conf, "the test reconfigured this machine's own Mosquitto"


def test_only_the_service_identity_can_answer_a_board(living_fleet):
    project, broker = living_fleet, living_fleet.broker
    ca = str(project.pki / "ca" / "bundle.pem")
    b1 = station_state(project, 0)

    def publish_as(topic, cert=None, key=None, user=None, password=None, port=None):
        """Publish once at QoS 1 and return the PUBACK reason code (MQTT 5: 0x87 = not authorized)."""
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"t-{time.monotonic_ns()}", protocol=mqtt.MQTTv5
        )
        ctx = ssl.create_default_context(cafile=ca)
        if cert:
            with tempfile.TemporaryDirectory() as tmp:
                (Path(tmp) / "c.crt").write_text(cert)
                (Path(tmp) / "c.key").write_text(key)
                ctx.load_cert_chain(str(Path(tmp) / "c.crt"), str(Path(tmp) / "c.key"))
        else:
            client.username_pw_set(user, password)
        client.tls_set_context(ctx)
        acks = {}
        client.on_publish = lambda c, u, mid, reason, props: acks.setdefault(mid, reason)
        client.connect("localhost", port)
        client.loop_start()
        info = client.publish(topic, b"acl probe", qos=1)
        deadline = time.monotonic() + 10
        while info.mid not in acks and time.monotonic() < deadline:
            time.sleep(0.05)
        client.loop_stop()
        client.disconnect()
        return acks.get(info.mid)

    # With MQTT 5 an ACL denial is PUBACK reason 0x87; paho reports it on the message info.
    svc_cert = (project.pki / "services" / "fleet-pki.crt").read_text()
    svc_key = (project.pki / "services" / "fleet-pki.key").read_text()
    denied = 0x87
    # A board cannot answer another board's request; the read-only monitor cannot answer any.
    assert (
        publish_as("devices/b2/pki/cert", b1["client_cert"], b1["client_key"], port=broker.device_port).value
        == denied
    )
    monitor_ack = publish_as(
        "devices/b1/pki/cert", user="fleet-monitor", password=MONITOR_PASSWORD, port=broker.monitor_port
    )
    assert monitor_ack.value == denied
    # The service identity can reach every board's pki topics (a sub-topic no board reads) and nothing else.
    assert not publish_as("devices/b2/pki/acl-probe", svc_cert, svc_key, port=broker.device_port).is_failure
    assert publish_as("devices/b2/telemetry", svc_cert, svc_key, port=broker.device_port).value == denied
