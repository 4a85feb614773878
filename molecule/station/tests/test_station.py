"""The fleet provisioned through a remote station over SSH, checked after converge and idempotence:
esptool lives in the station's venv, the boards plugged into the STATION hold verified credentials
recorded in the manifest with that station, and no copy of a device key is left on the station, on
the controller or in the Ansible log (the board's own flash excepted). Ansible logs in as an
unprivileged user and becomes root with sudo, as inventories/example does: what that user can reach
(its home, Ansible's temp files there, /tmp) holds no key and no leftover."""

import base64
import hashlib
import json
import os
from pathlib import Path

import pytest

from esp32sim.nvs import parse_nvs

STATION = "esp32-fleet-station"
PKI = Path(os.environ["PKI_DIR"])
MANIFEST = Path(os.environ["MANIFEST_DIR"]) / "fleet.json"
ANSIBLE_LOG = Path(os.environ["ANSIBLE_LOG"])
INVENTORY = os.environ["INVENTORY_DIR"]
SIM_DIR = "/srv/esp32sim"
VENV = "/opt/esp32-fleet/venv"
# Where releases before 0.5.0 staged NVS images; nothing is staged now (the images travel in the
# esp32_flash module's arguments over the SSH pipe).
STAGING = "/var/tmp/esp32-provision"
# The scenario's ansible_user (molecule.yml host_vars), created by prepare.yml.
LOGIN = "admin"
NVS_OFFSET, NVS_SIZE = 0x9000, 0x6000
BOARDS = {
    "esp32-stn-01": (f"{SIM_DIR}/ttyUSB0", "24:0a:c4:00:01:01"),
    "esp32-stn-02": (f"{SIM_DIR}/ttyUSB1", "24:0a:c4:00:01:02"),
}


def rows(device_id):
    data = json.loads(MANIFEST.read_text())
    return [r for r in data.get("rows", data) if r["device_id"] == device_id]


def nvs_of(host, port):
    """The NVS partition read from the board's flash file on the station."""
    cmd = host.run(
        f"dd if={port}.flash bs=4096 skip={NVS_OFFSET // 4096} count={NVS_SIZE // 4096} | base64 -w0"
    )
    assert cmd.rc == 0, cmd.stderr
    image = base64.b64decode(cmd.stdout)
    assert len(image) == NVS_SIZE
    return image


def key_probe(host, port):
    """One full base64 line of the device's private key, as flashed: found anywhere, it is a copy."""
    key = parse_nvs(nvs_of(host, port))["mqtt"]["client_key"]
    key = key.decode() if isinstance(key, bytes) else key
    assert "PRIVATE KEY" in key
    return next(line for line in key.splitlines() if len(line) == 64)


def test_ssh_login_is_an_unprivileged_user_that_becomes_root(host):
    """The converge could only have reached root through become: root cannot log in, passwords are
    refused, the login user cannot open the serial ports, and what needed root is owned by root."""
    sshd = dict(line.split(" ", 1) for line in host.check_output("sshd -T").splitlines() if " " in line)
    assert sshd["permitrootlogin"] == "no"
    assert sshd["passwordauthentication"] == "no"
    user = host.user(LOGIN)
    assert user.uid >= 1000
    assert not {"root", "sudo", "dialout"} & set(user.groups)
    for port, _ in BOARDS.values():
        assert host.run(f"test -c $(readlink -f {port})").rc == 0
        assert host.run(f"runuser -u {LOGIN} -- test -r {port} -o -w {port}").rc != 0
    # What needed root was made by root, through sudo.
    assert host.file(VENV).user == "root"
    assert "sudo:session): session opened for user root" in host.check_output("journalctl --no-pager -o cat")


def test_ssh_user_keeps_no_ansible_temp_files(host):
    """Ansible puts a module it cannot pipe in the login user's ~/.ansible/tmp before sudo runs it:
    that directory, if it was made, must be private, and empty after the run."""
    tmp = host.file(f"/home/{LOGIN}/.ansible/tmp")
    if tmp.exists:
        assert tmp.is_directory and tmp.user == LOGIN and tmp.mode == 0o700
        assert tmp.listdir() == []
    leftovers = host.run("find /tmp /var/tmp -name 'ansible*' -print")
    assert leftovers.stdout.strip() == ""


def test_esptool_is_installed_in_the_station_venv(host):
    out = host.run(
        f"{VENV}/bin/python -c 'import esptool, esp_idf_nvs_partition_gen; print(esptool.__version__)'"
    )
    assert out.rc == 0, out.stderr
    assert out.stdout.strip() == "5.6.0"
    # The boards' simulator lives in its own venv: the role's venv got esptool from the role alone.
    assert host.run(f"{VENV}/bin/python -c 'import esp32sim'").rc != 0


@pytest.mark.parametrize("name", sorted(BOARDS))
def test_manifest_records_the_board_on_the_station(host, name):
    port, mac = BOARDS[name]
    history = rows(name)
    assert history, f"no manifest row for {name}"
    first, last = history[0], history[-1]
    assert first["result"] == "provisioned"
    # Converge then idempotence: the last run found the board holding its recorded credentials.
    assert len(history) >= 2
    assert last["result"] == "unchanged"
    for row in (first, last):
        assert row["station"] == STATION
        assert row["port"] == port
        assert row["mac"] == mac
        assert row["esptool_version"] == "5.6.0"
    assert last["nvs_md5"] == first["nvs_md5"] == hashlib.md5(nvs_of(host, port)).hexdigest()  # noqa: S324


@pytest.mark.parametrize("name", sorted(BOARDS))
def test_board_flash_holds_the_certificate_issued_by_the_controller(host, name):
    port, _ = BOARDS[name]
    mqtt = parse_nvs(nvs_of(host, port))["mqtt"]
    as_text = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in mqtt.items()}
    assert as_text["device_id"].rstrip("\0") == name
    issued = (PKI / "devices" / f"{name}.crt").read_text()
    assert as_text["client_cert"].rstrip("\0").strip() == issued.strip()


@pytest.mark.parametrize("name", sorted(BOARDS))
def test_device_key_is_nowhere_but_on_the_board(host, name):
    port, _ = BOARDS[name]
    probe = key_probe(host, port)
    # The whole filesystem, so the login user's home and /tmp too.
    search = (
        "find / \\( -path /proc -o -path /sys -o -path /dev -o -path {skip} \\) -prune -o -type f -print0"
        " | xargs -0 grep -lF -e {probe} --"
    )
    # Positive control: the same search does find the key in the board's own flash file.
    found = host.run(f"grep -rlF -e {probe} -- {SIM_DIR}")
    assert f"{port}.flash" in found.stdout.split()
    leftovers = host.run(search.format(skip=SIM_DIR, probe=probe))
    assert leftovers.stdout.strip() == "", f"copies of {name}'s key on the station: {leftovers.stdout}"
    journal = host.run("journalctl --no-pager -o cat")
    assert probe not in journal.stdout
    # On the controller the key was deleted after the verified flash, and Ansible never printed it.
    assert not (PKI / "devices" / f"{name}.key").exists()
    log = ANSIBLE_LOG.read_text(errors="replace")
    assert name in log
    assert probe not in log
    assert "PRIVATE KEY-----" not in log


def test_nothing_is_staged_on_the_station(host):
    """The NVS image (it holds the key) and the firmware reach the station inside the esp32_flash
    module's arguments, over the SSH pipe: no staging directory is made (the whole-filesystem key
    search above proves no copy of the key exists anywhere)."""
    assert not host.file(STAGING).exists
