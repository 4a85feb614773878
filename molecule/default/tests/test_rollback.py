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
import testinfra

# Not the `host` fixture: these tests run once, against the Debian 12 container only (each case is
# a full converge; the Debian 13 container runs the same role code).
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
    result = subprocess.run(
        [str(Path(sys.executable).parent / "ansible-playbook"), "-i", str(INVENTORY), "--limit", NAME,
         str(SCENARIO / "converge.yml"), *extra],
        capture_output=True, text=True, env=env, timeout=900,
    )  # fmt: skip
    raw = result.stdout + result.stderr  # the failure message goes to stderr
    # Callbacks may wrap long messages: compare with whitespace folded.
    return result.returncode, " ".join(raw.split()), raw


@pytest.fixture
def host():
    return testinfra.get_host(f"podman://{NAME}")


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
    rc, out, raw = converge("-e", f"mosquitto_pki_dir={broken}")
    assert rc != 0
    assert "did not come up with the new configuration (reloaded)" in out, raw[-3000:]
    assert "is not the key of /etc/mosquitto/certs/server.crt" in out
    assert "last working configuration was restored" in out
    assert "PRIVATE KEY" not in raw  # no key material in the output


def test_listener_that_cannot_start_is_rolled_back(host, original):
    # 192.0.2.1 (TEST-NET-1) is on no interface: mosquitto exits at start.
    rc, out, raw = converge("-e", '{"mosquitto_listeners_custom": {"devices": {"address": "192.0.2.1"}}}')
    assert rc != 0
    assert "did not come up with the new configuration (restarted)" in out, raw[-3000:]
    assert "Cannot assign requested address" in out  # the broker's own reason, from its log
    assert "last working configuration was restored" in out
