"""A throwaway controller for the upkeep tests: a temp inventory whose CA passphrase is in an
ansible-vault file (decrypted by a 0600 vault password file, as the timer's runs do it), a PKI made by
playbooks/pki.yml, and the upkeep wrapper installed into the temp dir by tests/upkeep/install.yml.

The brokers group holds one unreachable host (TEST-NET-1 over ssh): its certificate is issued and
watched, and every run is limited to the controller, so no test touches this machine's broker.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
PASSPHRASE = "pytest-upkeep-passphrase-0001"
RECAP = re.compile(
    r"^localhost\s*:\s*ok=(?P<ok>\d+)\s+changed=(?P<changed>\d+)\s+.*failed=(?P<failed>\d+)", re.M
)


@dataclass
class Run:
    rc: int
    output: str
    log: str = ""

    @property
    def changed(self) -> int:
        match = RECAP.search(self.log or self.output)
        assert match, (self.output + self.log)[-3000:]
        return int(match["changed"])


class Controller:
    def __init__(self, base: Path):
        self.base = base
        self.pki = base / "pki"
        self.inventory = base / "inventory"
        self.vault_file = base / "vault-pass"
        self.script = base / "sbin" / "esp32-fleet-upkeep"
        self.state_file = base / "state" / "last-run.json"
        self.log_file = base / "upkeep.log"
        self.status_file = base / "manifests" / "status.json"
        self.cron_file = base / "cron.d" / "esp32-fleet-upkeep"
        self.systemd_dir = base / "systemd"

    def env(self) -> dict:
        return dict(
            os.environ,
            ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"),
            ANSIBLE_NOCOLOR="1",
            ANSIBLE_FORCE_COLOR="0",
            ANSIBLE_DEPRECATION_WARNINGS="0",
            ANSIBLE_LOCAL_TEMP=str(self.base / ".ansible-tmp"),
            PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        )

    def write(self) -> None:
        self.inventory.mkdir()
        hosts = {
            "all": {
                "vars": {
                    "ansible_python_interpreter": "{{ ansible_playbook_python }}",
                    "pki_dir": str(self.pki),
                    "upkeep_project_dir": str(ROOT),
                    "upkeep_inventory": str(self.inventory),
                    "upkeep_vault_password_file": str(self.vault_file),
                    "upkeep_script_path": str(self.script),
                    "upkeep_state_file": str(self.state_file),
                    "upkeep_log_file": str(self.log_file),
                    "upkeep_manifest_dir": str(self.base / "manifests"),
                    "upkeep_cron_file": str(self.cron_file),
                    "upkeep_systemd_dir": str(self.systemd_dir),
                    # No broker is reachable here: the over-the-air renewal play is tested against a
                    # living fleet (tests/fleet/test_fleet_renewal.py).
                    "renewal_enabled": False,
                },
                "children": {
                    "controller": {"hosts": {"localhost": {"ansible_connection": "local"}}},
                    "brokers": {
                        "hosts": {"broker2": {"ansible_host": "192.0.2.10", "ansible_connection": "ssh"}}
                    },
                    "esp32_devices": {"hosts": {"dev-a": {"ansible_connection": "local"}}},
                },
            }
        }
        (self.inventory / "hosts.yml").write_text(yaml.safe_dump(hosts, sort_keys=False))
        # The CA passphrase only in an ansible-vault file, as inventories/example keeps it.
        fd = os.open(self.vault_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write("pytest-vault-password-0001\n")
        (self.inventory / "group_vars").mkdir()
        vault = self.inventory / "group_vars" / "all.yml"
        vault.write_text(f"pki_ca_passphrase: {PASSPHRASE}\n")
        encrypt = [str(BIN / "ansible-vault"), "encrypt", "--vault-password-file", str(self.vault_file)]
        subprocess.run([*encrypt, str(vault)], check=True, capture_output=True, env=self.env())
        self.systemd_dir.mkdir()
        self.script.parent.mkdir()
        self.cron_file.parent.mkdir()

    def playbook(self, playbook: str, *args: str, faketime: str | None = None) -> Run:
        cmd = [str(BIN / "ansible-playbook"), "-i", str(self.inventory), str(ROOT / playbook),
               "--vault-password-file", str(self.vault_file), "--limit", "controller", *args]  # fmt: skip
        return self._run(cmd, faketime)

    def upkeep(self, *args: str, faketime: str | None = None) -> Run:
        """The installed wrapper, as the timer runs it (plus --limit controller)."""
        run = self._run([str(self.script), "--limit", "controller", *args], faketime)
        run.log = self.log_file.read_text() if self.log_file.exists() else ""
        return run

    def _run(self, cmd, faketime):
        if faketime:
            cmd = ["faketime", faketime, *cmd]
        proc = subprocess.run(cmd, cwd=ROOT, env=self.env(), capture_output=True, text=True, timeout=600)
        return Run(proc.returncode, proc.stdout + proc.stderr)

    def state(self) -> dict:
        return json.loads(self.state_file.read_text())

    def clone(self, dest: Path) -> Controller:
        """A copy (PKI, inventory, vault file, wrapper re-pointed at dest) without any run's state."""
        other = Controller(dest)
        for name in ("pki", "inventory", "sbin", "cron.d", "systemd"):
            shutil.copytree(self.base / name, dest / name, symlinks=True)
        shutil.copy2(self.vault_file, other.vault_file)
        hosts = other.inventory / "hosts.yml"
        hosts.write_text(hosts.read_text().replace(str(self.base), str(dest)))
        script = other.script
        script.write_text(script.read_text().replace(str(self.base), str(dest)))
        return other


@pytest.fixture(scope="session")
def installed(tmp_path_factory):
    """A controller with its PKI issued and the upkeep pieces installed (once per worker)."""
    ctl = Controller(tmp_path_factory.mktemp("upkeep"))
    ctl.write()
    for playbook in ("playbooks/pki.yml", "tests/upkeep/install.yml"):
        run = ctl.playbook(playbook)
        assert run.rc == 0, run.output[-4000:]
    return ctl


@pytest.fixture
def controller(installed, tmp_path) -> Controller:
    return installed.clone(tmp_path)
