"""A throwaway fleet project: its own inventory, PKI, simulated boards (started by playbooks/lab.yml)
and manifest under a temporary directory. Runs the real playbooks with ansible-playbook."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
DRIVER = ROOT / "tests" / "fleet" / "provision.yml"
RECAP = re.compile(r"^(\S+)\s+:\s+ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", re.M)


class FleetProject:
    def __init__(self, base, boards, brokers=None):
        self.base = base
        self.sim_dir = base / "sim"
        self.pki = base / "pki"
        self.manifest = base / "manifests" / "fleet.json"
        self.boards = boards
        inv = base / "inventory"
        (inv / "group_vars").mkdir(parents=True)
        hosts = {}
        for i, (name, settings) in enumerate(boards.items()):
            hosts[name] = {"esp32_port": f"{self.sim_dir}/ttyUSB{i}", **settings}
        (inv / "hosts.yml").write_text(
            yaml.safe_dump(
                {
                    "all": {
                        "children": {
                            "controller": {"hosts": {"localhost": None}},
                            # No broker here: provisioning needs none, and localhost must not be one.
                            "brokers": {"hosts": brokers or {}},
                            "esp32_devices": {"hosts": hosts},
                        }
                    }
                }
            )
        )
        (inv / "group_vars" / "all.yml").write_text(
            yaml.safe_dump(
                {
                    "ansible_connection": "local",
                    "ansible_python_interpreter": "{{ ansible_playbook_python }}",
                    "fleet_root": str(base),
                    "pki_dir": str(self.pki),
                    "pki_ca_passphrase": "test-only-passphrase",
                    "lab_enabled": True,
                    "lab_esp32sim_dir": str(self.sim_dir),
                    # Unpaced: these tests are about behaviour, not timing.
                    "lab_esp32sim_baud_pacing": False,
                }
            )
        )
        self.inventory = inv

    def run(self, *extra, faults=None):
        """Run the test driver (PKI without its device loop, lab, fleet)."""
        if faults:
            extra = ("-e", json.dumps({"lab_esp32sim_faults": faults}), *extra)
        return self.run_playbook(DRIVER, *extra)

    def run_playbook(self, playbook, *extra, env=None):
        """env: the environment to run it in (default: this one), e.g. a moved clock."""
        cmd = [str(BIN / "ansible-playbook"), "-i", str(self.inventory), str(ROOT / playbook), *extra]
        env = dict(env or os.environ, ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"), ANSIBLE_NOCOLOR="1")
        env["PATH"] = f"{BIN}:{env.get('PATH', '')}"
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        recap = {m[0]: {"changed": int(m[2]), "failed": int(m[4])} for m in RECAP.findall(done.stdout)}
        return done.returncode, done.stdout + done.stderr, recap

    def stop_lab(self):
        subprocess.run(
            [str(BIN / "esp32sim"), "fleet", "stop", "--dir", str(self.sim_dir)],
            capture_output=True,
            timeout=60,
            check=False,
        )

    def rows(self):
        return json.loads(self.manifest.read_text())["rows"]

    def last(self):
        return {r["device_id"]: r for r in self.rows()}

    def nvs_region(self, index, offset=0x9000, size=0x6000):
        with open(self.sim_dir / f"ttyUSB{index}.flash", "rb") as handle:
            handle.seek(offset)
            return handle.read(size)


@pytest.fixture
def fleet_project(tmp_path):
    projects = []

    def make(boards, brokers=None):
        project = FleetProject(tmp_path, boards, brokers)
        projects.append(project)
        return project

    yield make
    for project in projects:
        project.stop_lab()


# The living fleet of the over-the-air renewal tests (firmware twins, a real broker):
# tests/fleet/living.py. tests/day2 loads this file by path, outside the package, and needs no such fleet.
if __package__:
    from .living import living_fleet  # noqa: F401
