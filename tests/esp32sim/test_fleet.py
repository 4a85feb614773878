"""Fleet mode: N boards with their own pty, MAC and flash; idempotent start; clean stop."""

import json
import os
import random
import stat
import subprocess

import pytest

from esp32sim.device import Flash

from .conftest import ESP32SIM, run_esptool


def _sim(*args, **kw):
    return subprocess.run([ESP32SIM, *args], capture_output=True, text=True, timeout=60, **kw)


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def _running(pid):
    """Alive and not a zombie (this machine's PID 1 may reap orphans late)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture
def fleet_dir(tmp_path):
    d = tmp_path / "lab"
    yield d
    _sim("fleet", "stop", "--dir", str(d))


def test_fleet_lifecycle(fleet_dir, tmp_path):
    args = ["fleet", "start", "--count", "3", "--dir", str(fleet_dir), "--mac-base", "24:0a:c4:00:00:fe"]
    first = _sim(*args, "--fault-board", "1:hang-after-write-blocks=1")
    assert first.returncode == 0, first.stderr
    assert "started" in first.stdout
    again = _sim(*args, "--fault-board", "1:hang-after-write-blocks=1")
    assert again.returncode == 0 and "already running" in again.stdout
    other = _sim(*args)  # a different fleet (no fault) cannot silently replace the running one
    assert other.returncode != 0 and "different fleet" in other.stderr

    status = json.loads(_sim("fleet", "status", "--dir", str(fleet_dir)).stdout)
    assert status["alive"] and len(status["pids"]) == 1
    assert status["macs"] == ["24:0a:c4:00:00:fe", "24:0a:c4:00:00:ff", "24:0a:c4:00:01:00"]
    assert status["ports"] == [str(fleet_dir / f"ttyUSB{i}") for i in range(3)]
    assert all(b["alive"] and b["pty"].startswith("/dev/pts/") for b in status["boards"])

    for i, mac in enumerate(status["macs"]):
        out = run_esptool(str(fleet_dir / f"ttyUSB{i}"), "read-mac").output
        assert f"MAC:                {mac}" in out

    (tmp_path / "d.bin").write_bytes(bytes(range(256)) * 64)
    run_esptool(str(fleet_dir / "ttyUSB2"), "write-flash", "0x9000", str(tmp_path / "d.bin"))
    flash2 = (fleet_dir / "ttyUSB2.flash").read_bytes()
    assert flash2[0x9000 : 0x9000 + 16384] == bytes(range(256)) * 64
    assert (fleet_dir / "ttyUSB0.flash").read_bytes() == b"\xff" * (4 << 20)
    # Board 1 carries its fault.
    (tmp_path / "r.bin").write_bytes(random.Random(9).randbytes(48 * 1024))  # 3 stub blocks
    hung = run_esptool(
        str(fleet_dir / "ttyUSB1"),
        "write-flash",
        "0x9000",
        str(tmp_path / "r.bin"),
        check=False,
        config={"timeout": 1},
    )
    assert hung.returncode != 0
    assert "board 1: fault: hanging after 1 write blocks" in (fleet_dir / "fleet.log").read_text()

    pid = status["pid"]
    stop = _sim("fleet", "stop", "--dir", str(fleet_dir))
    assert stop.returncode == 0 and f"stopped pid {pid}" in stop.stdout
    assert not _running(pid)
    assert not any((fleet_dir / f"ttyUSB{i}").exists() for i in range(3))
    assert not (fleet_dir / "fleet.pid").exists()
    # Flash files stay for the next start; stopping twice is harmless.
    assert (fleet_dir / "ttyUSB2.flash").read_bytes()[0x9000:0x9010] == bytes(range(16))
    assert "not running" in _sim("fleet", "stop", "--dir", str(fleet_dir)).stdout
    status = json.loads(_sim("fleet", "status", "--dir", str(fleet_dir)).stdout)
    assert not status["alive"] and status["pids"] == []


def test_fleet_rejects_bad_arguments(tmp_path):
    bad = _sim("fleet", "start", "--count", "2", "--dir", str(tmp_path), "--fault-board", "5:corrupt-block=1")
    assert bad.returncode == 2 and "0 <= I < 2" in bad.stderr
    bad = _sim("serve", "--tcp", "127.0.0.1:0", "--flash", str(tmp_path / "f"), "--fault", "explode")
    assert bad.returncode == 2 and "unknown fault" in bad.stderr


def test_lab_flash_files_are_private(fleet_dir, tmp_path):
    """Issue item 8: a board's flash holds its key: the lab directory 0700, each flash file 0600,
    even under umask 0 (so the mode is the one they are created with, not a later chmod)."""
    started = _sim("fleet", "start", "--count", "2", "--dir", str(fleet_dir), umask=0)
    assert started.returncode == 0, started.stderr
    assert _mode(fleet_dir) == 0o700
    assert [_mode(fleet_dir / f"ttyUSB{i}.flash") for i in range(2)] == [0o600, 0o600]

    old = os.umask(0)
    try:
        Flash(str(tmp_path / "new.flash")).close()
        (tmp_path / "old.flash").write_bytes(b"\xff" * 4096)  # an image from before, 0666 here
        assert _mode(tmp_path / "old.flash") == 0o666
        Flash(str(tmp_path / "old.flash")).close()
    finally:
        os.umask(old)
    assert _mode(tmp_path / "new.flash") == 0o600
    assert _mode(tmp_path / "old.flash") == 0o600
