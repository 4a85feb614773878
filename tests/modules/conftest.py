"""Fixtures for the esp32_* module tests.

Unit tests run a module's main() in-process with ONE thing replaced: `open_session`, the choke point
where the modules reach a board (plugins/module_utils/esp32_esptool.py). The fake board behind it
keeps a real flash bytearray and raises the same exception types esptool raises, so the error
translation and the idempotence logic under test are the real ones.

Integration tests start the real simulator (`esp32sim serve`) and drive the modules through
ansible-playbook.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ansible.module_utils.testing import patch_module_args

ROOT = Path(__file__).resolve().parents[2]
MODULES = ROOT / "plugins" / "modules"
# tests/conftest.py puts the checkout's collections/ on sys.path: the same import the modules use.
from ansible_collections.esp32_fleet.mqtt_fleet.plugins.module_utils import esp32_esptool  # noqa: E402

FLASH_SIZE = 4 * 1024 * 1024
SIM_BIN = Path(sys.executable).parent / "esp32sim"


def load_module(name):
    spec = importlib.util.spec_from_file_location(f"esp32_test_{name}", MODULES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class FakeBoard:
    """A board behind the fake choke point: a real flash array and scripted failures.

    `fail` maps a method name (connect, info, md5, write, erase_all) to an exception to raise on its
    `fail_on`-th call (1-based); `corrupt_writes` flips a bit in what write() stores, as a bad flash
    chip would.
    """

    def __init__(self, mac="24:0a:c4:00:00:01", chip="ESP32", flash_size=FLASH_SIZE):
        self.mac = mac
        self.chip = chip
        self.flash_size = flash_size
        self.flash = bytearray(b"\xff" * flash_size)
        self.fail = {}
        self.fail_on = {}
        self.calls = {}
        self.corrupt_writes = False
        self.write_delay = 0.0
        self.opened = 0
        self.closed = 0
        self.session_args = None
        self.log_noise = True
        self.stub_running = False  # a session starts in the ROM bootloader

    def _call(self, name):
        self.calls[name] = self.calls.get(name, 0) + 1
        if name in self.fail and self.calls[name] >= self.fail_on.get(name, 1):
            raise self.fail[name]

    # The Esp32Session interface -------------------------------------------------------------
    def prepare_transfer(self):
        self._call("prepare_transfer")
        self.stub_running = self.session_args["stub"]

    def info(self):
        self._call("info")
        if self.log_noise:  # esptool prints through its logger: it must never reach stdout
            from esptool.logger import log

            log.print("Connected to ESP32 on fake port")
        return dict(
            chip=self.chip,
            description=f"{self.chip}-D0WD-V3 (revision v3.0)",
            revision="v3.0",
            crystal_mhz=40,
            features=["Wi-Fi", "BT"],
            mac=self.mac,
            flash_id="0x1640ef",
            flash_size=self.flash_size,
            stub=self.stub_running,
        )

    def md5(self, offset, size):
        self._call("md5")
        return hashlib.md5(self.flash[offset : offset + size]).hexdigest()

    def write(self, offset, data, compress):
        assert self.calls.get("prepare_transfer"), "data moved before the stub/baud were set up"
        self._call("write")
        if self.write_delay:
            time.sleep(self.write_delay)
        start = offset - offset % 4096
        end = -(-(offset + len(data)) // 4096) * 4096
        self.flash[start:end] = b"\xff" * (end - start)  # the sectors are erased, then programmed
        stored = bytearray(data)
        if self.corrupt_writes:
            stored[0] ^= 0x01
        self.flash[offset : offset + len(data)] = stored
        return dict(wire_bytes=len(data), seconds=0.001)

    def erase_all(self):
        assert self.calls.get("prepare_transfer"), "erase_all needs the stub"
        self._call("erase_all")
        self.flash[:] = b"\xff" * self.flash_size


@pytest.fixture
def board(monkeypatch):
    """A FakeBoard installed behind esp32_esptool.open_session (the single choke point)."""
    fake = FakeBoard()

    @contextlib.contextmanager
    def fake_open_session(port, baud, before, after, chip, connect_attempts, stub):
        fake.session_args = dict(
            port=port,
            baud=baud,
            before=before,
            after=after,
            chip=chip,
            connect_attempts=connect_attempts,
            stub=stub,
        )
        fake._call("connect")
        fake.opened += 1
        try:
            yield fake
        finally:
            fake.closed += 1

    monkeypatch.setattr(esp32_esptool, "open_session", fake_open_session)
    return fake


@pytest.fixture
def module_loader():
    return load_module


@pytest.fixture
def run_module(capsys):
    """Run a module's main() with args; return its parsed JSON result (stdout must hold only that)."""

    def run(name, args, check_mode=False, diff=False):
        module = load_module(name)
        full = dict(args, _ansible_check_mode=check_mode, _ansible_diff=diff)
        with patch_module_args(full), pytest.raises(SystemExit):
            module.main()
        out = capsys.readouterr().out
        return json.loads(out)  # fails the test if anything but the JSON result was printed

    return run


# ---- integration: the real simulator -----------------------------------------------------------


class Sim:
    """One `esp32sim serve` process (pty or TCP) on a flash file; stopped by its own PID."""

    def __init__(
        self, tmp_path, transport="tcp", mac="24:0a:c4:00:00:01", faults=(), pacing=False, flash=None
    ):
        self.flash = flash or tmp_path / f"flash-{mac.replace(':', '')}.bin"
        cmd = [str(SIM_BIN), "serve", "--flash", str(self.flash), "--mac", mac, "--quiet"]
        if transport == "tcp":
            cmd += ["--tcp", "127.0.0.1:0"]
        else:
            cmd += ["--pty", str(tmp_path / f"ttyUSB-{mac[-2:]}")]
        if pacing:
            cmd.append("--baud-pacing")
        for fault in faults:
            cmd += ["--fault", fault]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if " on " not in line:
            self.stop()
            raise RuntimeError(f"esp32sim did not start: {line!r} {self.proc.stderr.read()}")
        where = line.split(" on ", 1)[1].split(" -> ")[0].strip()
        self.port = where
        self.mac = mac

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def sim(tmp_path):
    """Factory: sim(transport="tcp"|"pty", mac=..., faults=[...], pacing=False, flash=PATH) -> Sim."""
    if not SIM_BIN.exists():
        pytest.fail(f"{SIM_BIN} is missing: install the project (pip install -e .)")
    started = []

    def start(**kwargs):
        s = Sim(tmp_path, **kwargs)
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()


def run_playbook(tmp_path, tasks, check=False, diff=False, extra_vars=None):
    """Run tasks on localhost through ansible-playbook with the json callback; return (rc, results, stats).

    `results` is the list of task results of the single host, in order.
    """
    playbook = tmp_path / "play.yml"
    # The tasks name the modules briefly; the play's collection search list resolves them.
    play = [
        dict(
            name="Exercise esp32 modules",
            hosts="localhost",
            gather_facts=False,
            collections=["esp32_fleet.mqtt_fleet"],
            tasks=tasks,
        )
    ]
    playbook.write_text(json.dumps(play))
    env = dict(
        os.environ,
        ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"),
        ANSIBLE_STDOUT_CALLBACK="ansible.posix.json",
        ANSIBLE_CALLBACKS_ENABLED="ansible.posix.json",  # not profile_tasks: it would print into the JSON
        ANSIBLE_LOCALHOST_WARNING="false",
        ANSIBLE_NOCOLOR="1",
    )
    cmd = [
        str(Path(sys.executable).parent / "ansible-playbook"),
        "-i",
        "localhost,",
        "-c",
        "local",
        "-e",
        f"ansible_python_interpreter={sys.executable}",
        str(playbook),
    ]
    if check:
        cmd.append("--check")
    if diff:
        cmd.append("--diff")
    if extra_vars:
        cmd += ["-e", json.dumps(extra_vars)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    try:
        data = json.loads(proc.stdout)
    except json.JSONDecodeError:
        raise AssertionError(f"ansible-playbook output is not JSON:\n{proc.stdout}\n{proc.stderr}") from None
    results = [
        task["hosts"]["localhost"] for task in data["plays"][0]["tasks"] if "localhost" in task["hosts"]
    ]
    return proc.returncode, results, data["stats"]["localhost"]


@pytest.fixture
def playbook(tmp_path):
    def run(tasks, **kwargs):
        return run_playbook(tmp_path, tasks, **kwargs)

    return run


@pytest.fixture
def firmware(tmp_path):
    """A ~1 MiB firmware-like image: compressible code-ish bytes, deterministic."""
    import random

    rng = random.Random(5)
    chunks = [bytes(rng.getrandbits(8) for _ in range(256)) for _ in range(64)]
    data = b"".join(rng.choice(chunks) for _ in range(4096))  # 1 MiB, compresses like code
    path = tmp_path / "app.bin"
    path.write_bytes(data)
    return path


def which(name):
    return shutil.which(name, path=str(Path(sys.executable).parent))
