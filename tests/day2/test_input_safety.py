"""Bad inputs through the real playbooks: each run fails at an assertion or argument check, names the
variable or what is wrong, reports nothing changed, and leaves the project's PKI, manifests, the
simulated boards' flash and the host's /etc/mosquitto byte-identical.

One prepared project (CA, broker and device certificates, a running two-board lab) serves every case;
each case edits the inventory and restores it afterwards. The broker cases run the mosquitto role
against this machine: its assertions come before any install, file or service task."""

import re
import subprocess

import pytest
import yaml

from .conftest import BIN, MACS, FleetProject, snapshot

PKI = "playbooks/pki.yml"
BROKER = "playbooks/broker.yml"
FLEET = "playbooks/fleet.yml"
TASK = re.compile(r"^TASK \[(.*)\]", re.M)
FAILURE = re.compile(r"^(fatal|failed): ", re.M)

# (id, playbook, group_vars changes (None deletes), per-host changes, extra vars, words in the failure)
CASES = [
    (
        "tls-1.1",
        BROKER,
        {"mosquitto_listeners_custom": {"devices": {"tls_version": "tlsv1.1"}}},
        {},
        ["listener devices", "tls_version tlsv1.2 or tlsv1.3", "TLS below 1.2 is refused"],
    ),
    (
        "anonymous-on-8883",
        BROKER,
        {"mosquitto_listeners_custom": {"devices": {"allow_anonymous": True}}},
        {},
        ["listener devices", "anonymous access on a TLS listener is refused"],
    ),
    ("leaf-validity-800", PKI, {"pki_server_validity_days": 800}, {}, ["pki_server_validity_days", "366"]),
    ("device-id-slash", FLEET, {}, {"b1": {"esp32_device_id": "b1/x"}}, ["esp32_device_id", "'b1/x'", "'/'"]),
    ("device-id-hash", PKI, {}, {"b1": {"esp32_device_id": "b1#"}}, ["esp32_device_id", "b1#"]),
    ("duplicate-device-id", FLEET, {}, {"b2": {"esp32_device_id": "b1"}}, ["Duplicate device ids", "b1"]),
    (
        "duplicate-pinned-mac",
        FLEET,
        {},
        {"b2": {"esp32_mac": MACS[0]}},
        ["esp32_mac pinned on more", MACS[0]],
    ),
    (
        "wifi-password-not-in-vault",
        FLEET,
        {"esp32_provision_wifi_password": "{{ vault_esp32_wifi_password }}"},
        {},
        ["vault_esp32_wifi_password", "undefined"],
    ),
    (
        "ca-passphrase-missing",
        PKI,
        {"pki_ca_passphrase": None},
        {},
        ["missing required arguments: pki_ca_passphrase"],
    ),
    (
        "ca-passphrase-not-in-vault",
        PKI,
        {"pki_ca_passphrase": "{{ vault_pki_ca_passphrase }}"},
        {},
        ["vault_pki_ca_passphrase", "undefined"],
    ),
    (
        "ca-passphrase-wrong",
        PKI,
        {"pki_ca_passphrase": "wrong-passphrase-for-this-ca"},
        {},
        ["pki_ca_passphrase does not decrypt the existing CA key"],
    ),
    (
        "firmware-image-missing",
        FLEET,
        {"esp32_provision_firmware_images": [{"offset": "0x10000", "path": "/nonexistent/esp32/app.bin"}]},
        {},
        ["esp32_provision_firmware_images", "/nonexistent/esp32/app.bin", "does not exist"],
    ),
    (
        "firmware-image-directory",
        FLEET,
        {"esp32_provision_firmware_images": [{"offset": "0x10000", "path": "/etc"}]},
        {},
        ["esp32_provision_firmware_images", "/etc", "is not a regular file"],
    ),
    (
        "serial-port-missing",
        FLEET,
        {},
        {"b2": {"esp32_port": "/dev/ttyUSB-esp32-fleet-missing"}},
        ["b2: esp32_port /dev/ttyUSB-esp32-fleet-missing does not exist"],
    ),
]


class Prepared:
    def __init__(self, base):
        self.project = FleetProject(
            base,
            {"b1": {"esp32_mac": MACS[0]}, "b2": {"esp32_mac": MACS[1]}},
            brokers={"localhost": {"mosquitto_server_names": ["localhost", "127.0.0.1"]}},
        )
        inv = self.project.inventory
        self.hosts_file, self.vars_file = inv / "hosts.yml", inv / "group_vars" / "all.yml"
        self.hosts_text, self.vars_text = self.hosts_file.read_text(), self.vars_file.read_text()

    def edit(self, group_vars, host_vars):
        variables = yaml.safe_load(self.vars_text)
        for key, value in group_vars.items():
            if value is None:
                variables.pop(key)
            else:
                variables[key] = value
        self.vars_file.write_text(yaml.safe_dump(variables))
        hosts = yaml.safe_load(self.hosts_text)
        for host, changes in host_vars.items():
            hosts["all"]["children"]["esp32_devices"]["hosts"][host].update(changes)
        self.hosts_file.write_text(yaml.safe_dump(hosts))

    def restore(self):
        self.hosts_file.write_text(self.hosts_text)
        self.vars_file.write_text(self.vars_text)

    def state(self, broker):
        p = self.project
        # The host's broker configuration only where the mosquitto role runs: other tests on this
        # machine may legitimately change it meanwhile.
        host = ["/etc/mosquitto"] if broker else []
        return snapshot(p.pki, p.base / "manifests", *sorted(p.sim_dir.glob("*.flash")), *host)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    ready = Prepared(tmp_path_factory.mktemp("input-safety"))
    project = ready.project
    rc, out, _ = project.run_playbook(PKI)
    assert rc == 0, out
    # The same boards playbooks/lab.yml starts for this inventory, so the fleet play finds them running.
    started = subprocess.run(
        [str(BIN / "esp32sim"), "fleet", "start", "--count", "2", "--dir", str(project.sim_dir)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert started.returncode == 0, started.stderr
    yield ready
    project.stop_lab()


@pytest.mark.parametrize(
    ("playbook", "group_vars", "host_vars", "words"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_input_fails_early_naming_it_and_changes_nothing(
    prepared, playbook, group_vars, host_vars, words
):
    before = prepared.state(playbook == BROKER)
    prepared.edit(group_vars, host_vars)
    try:
        rc, out, recap = prepared.project.run_playbook(playbook)
    finally:
        prepared.restore()
    assert rc != 0, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    for word in words:
        assert word in out, (word, out[-3000:])
    # Failed at a check, before any task could change something.
    assert any(host["failed"] for host in recap.values()), recap
    assert all(host["changed"] == 0 for host in recap.values()), (recap, out[-3000:])
    first_failure = FAILURE.search(out)
    assert first_failure, out[-3000:]
    failed_task = TASK.findall(out[: first_failure.start()])[-1]
    assert (
        "Assert |" in failed_task
        or "Validating arguments" in failed_task
        or "Read the existing CA key" in failed_task
    ), failed_task
    assert "wrong-passphrase-for-this-ca" not in out and "test-only-passphrase" not in out
    assert prepared.state(playbook == BROKER) == before
