"""playbooks/smoke.yml against a throwaway Mosquitto (ephemeral loopback ports) configured like the
mosquitto role's: a certificate listener where CN = user name and each device may use only its own
topic root, and a password listener for the application user. The boards' credentials are read back
from their flash by esp32sim's boot."""

import signal
import socket
import subprocess
import time

import pytest

MONITOR_PASSWORD = "test-only-monitor"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def broker(tmp_path):
    """Start mosquitto once the PKI exists; yields a starter taking the project."""
    procs = []

    def start(project, device_port, monitor_port, acl=None):
        conf_dir = tmp_path / "broker"
        conf_dir.mkdir()
        pki = project.pki
        (conf_dir / "acl").write_text(
            acl or "user fleet-monitor\ntopic read devices/#\n\npattern readwrite devices/%u/#\n"
        )
        subprocess.run(
            ["mosquitto_passwd", "-c", "-b", str(conf_dir / "passwd"), "fleet-monitor", MONITOR_PASSWORD],
            check=True,
            capture_output=True,
        )
        tls = (
            f"cafile {pki}/ca/ca.crt\ncertfile {pki}/brokers/testbroker.chain.pem\n"
            f"keyfile {pki}/brokers/testbroker.key\ntls_version tlsv1.2\n"
        )
        (conf_dir / "mosquitto.conf").write_text(
            "user root\nper_listener_settings true\npersistence false\n"
            f"listener {device_port} 127.0.0.1\n{tls}"
            "require_certificate true\nuse_identity_as_username true\n"
            f"use_username_as_clientid true\ncrlfile {pki}/ca/crl.pem\nacl_file {conf_dir}/acl\n"
            "allow_anonymous false\n"
            f"listener {monitor_port} 127.0.0.1\n{tls}password_file {conf_dir}/passwd\n"
            f"acl_file {conf_dir}/acl\nallow_anonymous false\n"
        )
        proc = subprocess.Popen(
            ["mosquitto", "-c", str(conf_dir / "mosquitto.conf")],
            stdout=subprocess.DEVNULL,
            stderr=open(conf_dir / "log", "w"),  # noqa: SIM115
        )
        procs.append(proc)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", monitor_port), 0.2).close()
                return proc
            except OSError:
                time.sleep(0.1)
        raise AssertionError("mosquitto did not start: " + (conf_dir / "log").read_text())

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(10)


def test_smoke_sees_each_board_on_its_topic_and_refuses_the_other(fleet_project, broker):
    device_port, monitor_port = free_port(), free_port()
    project = fleet_project(
        {
            "b1": {"esp32_mac": "24:0a:c4:00:00:01", "esp32_sim_flash": "{{ esp32_port }}.flash"},
            "b2": {"esp32_mac": "24:0a:c4:00:00:02", "esp32_sim_flash": "{{ esp32_port }}.flash"},
        },
        brokers={"testbroker": {"mosquitto_server_names": ["localhost", "127.0.0.1"]}},
    )
    uri = f"esp32_provision_broker_uri=mqtts://localhost:{device_port}"
    rc, out, _ = project.run("-e", uri)
    assert rc == 0, out
    mosquitto = broker(project, device_port, monitor_port)

    rc, out, recap = project.run_playbook(
        "playbooks/smoke.yml",
        "-e",
        uri,
        "-e",
        f"smoke_mqtt_port={monitor_port}",
        "-e",
        f"smoke_mqtt_password={MONITOR_PASSWORD}",
    )
    assert rc == 0, out
    assert "b1: reading on devices/b1/telemetry" in out
    assert "b2: reading on devices/b2/telemetry" in out
    assert "refused on devices/b2/telemetry" in out
    assert "refused on devices/b1/telemetry" in out
    assert all(host["changed"] == 0 for host in recap.values()), recap

    # The check can fail: with b1's topic opened to every device, the cross-topic publish goes through.
    acl = project.base / "broker" / "acl"
    acl.write_text(acl.read_text() + "pattern readwrite devices/#\n")
    mosquitto.send_signal(signal.SIGHUP)
    time.sleep(1)
    rc, out, _ = project.run_playbook(
        "playbooks/smoke.yml",
        "-e",
        uri,
        "-e",
        f"smoke_mqtt_port={monitor_port}",
        "-e",
        f"smoke_mqtt_password={MONITOR_PASSWORD}",
    )
    assert rc != 0
    assert "other topic: rc=0" in out


def test_a_topic_prefix_reaches_the_nvs_the_broker_acl_and_the_smoke_test_alike(fleet_project, broker):
    """esp32_provision_topic_prefix set in the BOARDS' inventory only (the broker host does not have
    it): the NVS topic root, the ACL the mosquitto role renders and the smoke test all use fleet/<id>."""
    device_port, monitor_port = free_port(), free_port()
    board = {"esp32_sim_flash": "{{ esp32_port }}.flash", "esp32_provision_topic_prefix": "fleet"}
    project = fleet_project(
        {
            "b1": {"esp32_mac": "24:0a:c4:00:00:01", **board},
            "b2": {"esp32_mac": "24:0a:c4:00:00:02", **board},
        },
        brokers={
            "testbroker": {
                "mosquitto_server_names": ["localhost", "127.0.0.1"],
                "mosquitto_users": [
                    {
                        "name": "fleet-monitor",
                        "password": MONITOR_PASSWORD,
                        "acl": [{"access": "read", "topic": "fleet/#"}],
                    }
                ],
            }
        },
    )
    uri = f"esp32_provision_broker_uri=mqtts://localhost:{device_port}"
    rc, out, _ = project.run("-e", uri)
    assert rc == 0, out

    acl = project.base / "acl.rendered"
    rc, out, _ = project.run_playbook("tests/fleet/render_acl.yml", "-e", f"render_acl_dest={acl}")
    assert rc == 0, out
    text = acl.read_text()
    assert "user b1\ntopic readwrite fleet/b1/#\n" in text, text
    assert "user b2\ntopic readwrite fleet/b2/#\n" in text, text
    assert "user fleet-monitor\ntopic read fleet/#\n" in text, text
    broker(project, device_port, monitor_port, acl=text)

    rc, out, _ = project.run_playbook(
        "playbooks/smoke.yml",
        "-e",
        uri,
        "-e",
        f"smoke_mqtt_port={monitor_port}",
        "-e",
        f"smoke_mqtt_password={MONITOR_PASSWORD}",
    )
    # The smoke test boots each board from its flash: the NVS topic root is the one published on.
    assert rc == 0, out
    assert "b1: reading on fleet/b1/telemetry" in out
    assert "b2: reading on fleet/b2/telemetry" in out
    assert "refused on fleet/b2/telemetry" in out
    assert "refused on fleet/b1/telemetry" in out
