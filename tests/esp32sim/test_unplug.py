"""The unplug fault: a board pulled mid-write loses its port (symlink and pty), keeps a half-written
flash, and `esp32sim fleet start` plugs it back in, after which it stays plugged in."""

import json
import random
import subprocess

import pytest

from .conftest import ESP32SIM, run_esptool

BLOCK = 0x4000  # esptool's stub write block


def _sim(*args):
    return subprocess.run([ESP32SIM, *args], capture_output=True, text=True, timeout=60)


@pytest.fixture
def fleet_dir(tmp_path):
    d = tmp_path / "lab"
    yield d
    _sim("fleet", "stop", "--dir", str(d))


def test_unplugged_board_vanishes_mid_write_and_a_fleet_start_replugs_it(fleet_dir, tmp_path):
    args = [
        "fleet",
        "start",
        "--count",
        "2",
        "--dir",
        str(fleet_dir),
        "--fault-board",
        "1:unplug-after-write-blocks=1",
    ]
    assert _sim(*args).returncode == 0
    port = fleet_dir / "ttyUSB1"
    image = tmp_path / "r.bin"
    image.write_bytes(random.Random(7).randbytes(3 * BLOCK))  # incompressible: 3 stub blocks
    before = (fleet_dir / "ttyUSB1.flash").read_bytes()

    pulled = run_esptool(str(port), "write-flash", "0x10000", str(image), check=False, config={"timeout": 3})
    assert pulled.returncode != 0
    # esptool sees what it sees when a USB adapter is pulled: the line drops and the port is gone.
    assert "Lost connection" in pulled.output, pulled.output
    assert "could not open port" in pulled.output and "No such file" in pulled.output, pulled.output
    assert not port.exists() and not port.is_symlink()
    log = (fleet_dir / "fleet.log").read_text()
    assert "board 1: fault: unplugged while writing block 2" in log
    # One block landed whole, 1 KiB of the next one; nothing after it.
    flash = (fleet_dir / "ttyUSB1.flash").read_bytes()
    data = image.read_bytes()
    assert flash[0x10000 : 0x10000 + BLOCK + 1024] == data[: BLOCK + 1024]
    assert flash[0x10000 + BLOCK + 1024 : 0x10000 + 3 * BLOCK] != data[BLOCK + 1024 :]
    assert flash[:0x10000] == before[:0x10000]

    # The other board is unaffected, and the fleet daemon keeps running without board 1.
    status = json.loads(_sim("fleet", "status", "--dir", str(fleet_dir)).stdout)
    assert status["alive"] and [b["alive"] for b in status["boards"]] == [True, False]
    assert "MAC:" in run_esptool(str(fleet_dir / "ttyUSB0"), "read-mac").output
    missing = run_esptool(str(port), "read-mac", check=False)
    assert missing.returncode != 0 and "No such file" in missing.output

    # Replug with the same fleet: the port comes back and the board now takes the whole image.
    replug = _sim(*args)
    assert replug.returncode == 0 and "replugged board(s) 1" in replug.stdout, replug.stdout + replug.stderr
    assert "already running" in _sim(*args).stdout
    run_esptool(str(port), "write-flash", "0x10000", str(image))
    assert (fleet_dir / "ttyUSB1.flash").read_bytes()[0x10000 : 0x10000 + 3 * BLOCK] == data


def test_unplug_fault_is_validated():
    bad = _sim(
        "serve", "--tcp", "127.0.0.1:0", "--flash", "/nonexistent", "--fault", "unplug-after-write-blocks=x"
    )
    assert bad.returncode == 2 and "unplug-after-write-blocks needs an integer" in bad.stderr
