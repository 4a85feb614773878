"""A change that breaks the broker is rolled back and the play fails saying so: the broker never stays
down. Runs after test_default.py (file order) against the Debian 12 container only, through the same
converge playbook and inventory Molecule uses; each case ends with the broker in its original state.
"""

import os
import shutil
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import pytest

testinfra_hosts = ["podman://esp32-fleet-broker-default"]

NAME = "esp32-fleet-broker-default"
PKI = Path(os.environ["PKI_DIR"])
SCENARIO = Path(os.environ["MOLECULE_SCENARIO_DIRECTORY"])
INVENTORY = Path(os.environ["MOLECULE_INVENTORY_FILE"]).parent
PORT = 18883  # molecule.yml publishes the container's 8883 here


def presented_certificate():
    ctx = ssl.create_default_context(cafile=str(PKI / "ca" / "ca.crt"))
    ctx.load_cert_chain(PKI / "devices" / "esp32-dev-a.crt", PKI / "devices" / "esp32-dev-a.key")
    with (
        socket.create_connection(("localhost", PORT), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        return tls.getpeercert(binary_form=True)


def converge(*extra):
    env = dict(os.environ, ANSIBLE_ROLES_PATH=str(SCENARIO.parents[1] / "roles"), ANSIBLE_FORCE_COLOR="0")
    return subprocess.run(
        [str(Path(sys.executable).parent / "ansible-playbook"), "-i", str(INVENTORY), "--limit", NAME,
         str(SCENARIO / "converge.yml"), *extra],
        capture_output=True, text=True, env=env, timeout=900,
    )  # fmt: skip


@pytest.fixture
def original(host):
    before = {
        "cert": presented_certificate(),
        "conf": host.file("/etc/mosquitto/mosquitto.conf").content_string,
        "key": host.file("/etc/mosquitto/certs/server.key").content_string,
    }
    yield before
    # Whatever happened, the broker must serve the original configuration again.
    assert host.service("mosquitto").is_running
    assert presented_certificate() == before["cert"]
    assert host.file("/etc/mosquitto/mosquitto.conf").content_string == before["conf"]
    assert host.file("/etc/mosquitto/certs/server.key").content_string == before["key"]


def test_key_that_does_not_match_the_certificate_is_rolled_back(host, original, tmp_path):
    broken = tmp_path / "pki"
    shutil.copytree(PKI, broken)
    shutil.copy(PKI / "devices" / "esp32-dev-b.key", broken / "brokers" / f"{NAME}.key")
    result = converge("-e", f"mosquitto_pki_dir={broken}")
    assert result.returncode != 0
    assert "did not come up with the new configuration (reloaded)" in result.stdout
    assert "is not the key of /etc/mosquitto/certs/server.crt" in result.stdout
    assert "last working configuration was restored" in result.stdout
    assert "PRIVATE KEY" not in result.stdout + result.stderr  # no key material in the output


def test_listener_that_cannot_start_is_rolled_back(host, original):
    # 192.0.2.1 (TEST-NET-1) is on no interface: mosquitto exits at start.
    result = converge("-e", '{"mosquitto_listeners_custom": {"devices": {"address": "192.0.2.1"}}}')
    assert result.returncode != 0
    assert "did not come up with the new configuration (restarted)" in result.stdout
    assert "last working configuration was restored" in result.stdout
