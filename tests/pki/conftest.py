"""Fixtures for the pki role tests: a temp inventory, ansible-playbook runs, openssl and tree hashes.

Every test works in its own temp dir (safe with pytest -n). The expensive part, real runs of
playbooks/pki.yml, is done once per session (per xdist worker) by the `issued` fixture: the four-run
pattern, whose result the read-only tests inspect; tests that change things copy that tree first.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from filelock import FileLock

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
ANSIBLE_PLAYBOOK = BIN / "ansible-playbook"
PASSPHRASE = "pytest-ca-passphrase-0001"
RECAP = re.compile(
    r"^localhost\s*:\s*ok=(?P<ok>\d+)\s+changed=(?P<changed>\d+)\s+unreachable=(?P<unreachable>\d+)"
    r"\s+failed=(?P<failed>\d+)",
    re.M,
)

BROKERS = {
    "localhost": {},
    "broker2": {
        "ansible_host": "192.0.2.10",
        "mosquitto_server_names": ["broker2.example.net", "192.0.2.10", "2001:db8::10"],
    },
}
DEVICES = {"dev-a": {}, "dev-b": {"esp32_device_id": "esp32-0042"}, "dev-c": {}}
DEVICE_IDS = ["dev-a", "esp32-0042", "dev-c"]


@dataclass
class Run:
    rc: int
    output: str
    recap: dict = field(default_factory=dict)

    @property
    def changed(self) -> int:
        return self.recap["changed"]


@dataclass
class Pki:
    """A temp project: inventory + pki dir, and a way to run a playbook against it."""

    base: Path
    brokers: dict
    devices: dict

    @property
    def pki(self) -> Path:
        return self.base / "pki"

    def write_inventory(self, passphrase: str = PASSPHRASE) -> Path:
        hosts = {
            "all": {
                "vars": {
                    "ansible_connection": "local",
                    "ansible_python_interpreter": "{{ ansible_playbook_python }}",
                    "pki_dir": str(self.pki),
                    # In the inventory file, never on a command line.
                    "pki_ca_passphrase": passphrase,
                },
                "children": {
                    "controller": {"hosts": {"localhost": {}}},
                    "brokers": {"hosts": self.brokers},
                    "esp32_devices": {"hosts": self.devices},
                },
            }
        }
        inv = self.base / "inventory"
        inv.mkdir(exist_ok=True)
        (inv / "hosts.yml").write_text(yaml.safe_dump(hosts, sort_keys=False))
        return inv

    def start(
        self, *args: str, extra: dict | None = None, playbook: Path | None = None, name: str = "run"
    ) -> subprocess.Popen:
        """Start ansible-playbook without waiting (two at once need different names)."""
        inv = self.base / "inventory"
        if not inv.exists():
            self.write_inventory()
        cmd = [str(ANSIBLE_PLAYBOOK), "-i", str(inv), str(playbook or ROOT / "playbooks" / "pki.yml")]
        if extra:
            varfile = self.base / f"extra-vars-{name}.json"
            varfile.write_text(json.dumps(extra))
            cmd += ["-e", f"@{varfile}"]
        cmd += list(args)
        env = dict(
            os.environ,
            ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"),
            ANSIBLE_NOCOLOR="1",
            ANSIBLE_FORCE_COLOR="0",
            ANSIBLE_DEPRECATION_WARNINGS="0",
            ANSIBLE_LOCAL_TEMP=str(self.base / f".ansible-tmp-{name}"),
            PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        )
        return subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )

    @staticmethod
    def wait(proc: subprocess.Popen) -> Run:
        output, _ = proc.communicate(timeout=600)
        match = RECAP.search(output)
        recap = {k: int(v) for k, v in match.groupdict().items()} if match else {}
        return Run(proc.returncode, output, recap)

    def run(self, *args: str, extra: dict | None = None, playbook: Path | None = None) -> Run:
        return self.wait(self.start(*args, extra=extra, playbook=playbook))

    def clone(self, dest: Path) -> Pki:
        """A copy of this project (inventory and pki tree with modes) in dest."""
        shutil.copytree(self.base / "inventory", dest / "inventory")
        if self.pki.exists():
            shutil.copytree(self.pki, dest / "pki")
        other = Pki(dest, json.loads(json.dumps(self.brokers)), json.loads(json.dumps(self.devices)))
        other.write_inventory()
        return other


def tree_hash(path: Path) -> str:
    """Hash of every path, mode and content under path ('absent' when it does not exist)."""
    if not path.exists():
        return "absent"
    digest = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        digest.update(str(p.relative_to(path)).encode())
        digest.update(oct(p.stat().st_mode).encode())
        if p.is_file():
            digest.update(p.read_bytes())
    return digest.hexdigest()


def openssl(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["openssl", *args], capture_output=True, text=True, check=check)


def verifies(ca: Path, cert: Path, purpose: str, *extra: str) -> bool:
    """openssl verify -purpose PURPOSE: True when it prints OK (and exits 0)."""
    proc = openssl("verify", *extra, "-purpose", purpose, "-CAfile", str(ca), str(cert), check=False)
    return proc.returncode == 0 and proc.stdout.strip().endswith(": OK")


def x509_text(cert: Path) -> str:
    return openssl("x509", "-in", str(cert), "-noout", "-text").stdout


def serial(cert: Path) -> str:
    return openssl("x509", "-in", str(cert), "-noout", "-serial").stdout.strip()


@pytest.fixture
def new_pki(tmp_path) -> Pki:
    pki = Pki(tmp_path, json.loads(json.dumps(BROKERS)), json.loads(json.dumps(DEVICES)))
    pki.write_inventory()
    return pki


def _four_runs(pki: Pki) -> list[Run]:
    pki.write_inventory()
    runs = []
    for args in (["--check", "--diff"], [], ["--check", "--diff"], []):
        runs.append(pki.run(*args))
        assert runs[-1].rc == 0, runs[-1].output[-4000:]
        if len(runs) == 1:  # check mode on a fresh tree must not write anything
            assert not pki.pki.exists()
    return runs


@pytest.fixture(scope="session")
def issued(tmp_path_factory):
    """A PKI made by the four-run pattern; yields (pki, [check, real, check, real] runs).

    Made once per test session, not once per xdist worker: the first worker to get here makes it
    under a file lock in the directory the workers share, and the others read what it recorded.
    Tests only read it (copy_of_issued gives a test its own copy).
    """
    own = tmp_path_factory.getbasetemp()
    # Under xdist (PYTEST_XDIST_WORKER set) each worker's base temp dir sits in one they share.
    shared = own.parent if os.environ.get("PYTEST_XDIST_WORKER") else own
    pki = Pki(shared / "issued", json.loads(json.dumps(BROKERS)), json.loads(json.dumps(DEVICES)))
    record = shared / "issued.json"
    with FileLock(str(shared / "issued.lock")):
        if not record.exists():
            if pki.base.exists():
                pytest.fail(f"making the shared PKI in {pki.base} failed in another worker: see its error")
            pki.base.mkdir()
            runs = _four_runs(pki)
            record.write_text(json.dumps([[r.rc, r.output, r.recap] for r in runs]))
    runs = [Run(rc, output, recap) for rc, output, recap in json.loads(record.read_text())]
    return pki, runs


@pytest.fixture
def copy_of_issued(issued, tmp_path) -> Pki:
    return issued[0].clone(tmp_path)


@pytest.fixture(scope="session")
def tools():
    """The helpers above, for test modules (importlib import mode cannot import conftest)."""
    return SimpleNamespace(
        openssl=openssl,
        verifies=verifies,
        x509_text=x509_text,
        serial=serial,
        tree_hash=tree_hash,
        PASSPHRASE=PASSPHRASE,
        DEVICE_IDS=DEVICE_IDS,
        ROOT=ROOT,
    )
