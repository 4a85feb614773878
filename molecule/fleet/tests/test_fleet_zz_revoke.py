"""Revocation end to end, LAST in verify because it is destructive (pytest collects this file after
the others): board 02 stays connected and publishing across `playbooks/revoke.yml -e
device=esp32-mol-01`; board 01's connection that was open before the revoke can no longer publish (its
ACL entry is gone after the broker's SIGHUP reload: mosquitto 2.0 answers the next PUBLISH with
PUBACK 0x87 and keeps the TLS session, it does not re-check connected clients against the new CRL);
a new connection of board 01 fails the TLS handshake on the CRL; the manifest records it as revoked;
and the next run of the scenario's converge playbook leaves it revoked (no certificate, no flash, no
ACL entry)."""

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

PKI = Path(os.environ["PKI_DIR"])
LAB = Path(os.environ["LAB_DIR"])
MANIFEST = Path(os.environ["MANIFEST_DIR"]) / "fleet.json"
PROJECT = Path(os.environ["MOLECULE_PROJECT_DIRECTORY"])
CONVERGE = Path(os.environ["MOLECULE_SCENARIO_DIRECTORY"]) / "converge.yml"
# The inventory directory (hosts and group_vars of molecule.yml), as the provisioner uses it.
INVENTORY = str(Path(os.environ["MOLECULE_EPHEMERAL_DIRECTORY"]) / "inventory")
BIN = Path(sys.executable).parent
ESP32SIM = str(BIN / "esp32sim")
REVOKED, KEPT = "esp32-mol-01", "esp32-mol-02"
FLASH = {REVOKED: LAB / "ttyUSB0.flash", KEPT: LAB / "ttyUSB1.flash"}
# Generous: the machine running CI is shared and loaded (x3 of what an idle machine needs).
NET_TIMEOUT = "60"


class Board:
    """A long-lived simulated board: publishes a reading every second until it fails or is stopped."""

    def __init__(self, name):
        self.lines, self.proc = (
            [],
            subprocess.Popen(
                [ESP32SIM, "boot", "--flash", str(FLASH[name]), "--interval", "1", "--timeout", NET_TIMEOUT],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            ),
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line.rstrip())

    def published(self):
        return sum(1 for line in self.lines if line.startswith("published seq="))

    def wait_published(self, at_least, timeout=90):
        deadline = time.monotonic() + timeout
        while self.published() < at_least and self.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        return self.published() >= at_least

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def playbook(*args, timeout=1800):
    proc = subprocess.run(
        [str(BIN / "ansible-playbook"), "-i", INVENTORY, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return proc.returncode, proc.stdout + proc.stderr


def boot_once(name):
    return subprocess.run(
        [ESP32SIM, "boot", "--flash", str(FLASH[name]), "--once", "--timeout", NET_TIMEOUT],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def manifest_rows(device):
    return [r for r in json.loads(MANIFEST.read_text())["rows"] if r["device_id"] == device]


@pytest.fixture(scope="module")
def revoked_run(host):
    """Both boards connected and publishing, then the revoke; yields what happened."""
    kept, gone = Board(KEPT), Board(REVOKED)
    try:
        assert kept.wait_published(2), kept.lines
        assert gone.wait_published(2), gone.lines
        serial = int(
            subprocess.run(
                ["openssl", "x509", "-in", str(PKI / "devices" / f"{REVOKED}.crt"), "-noout", "-serial"],
                capture_output=True, text=True, check=True,
            ).stdout.strip().split("=", 1)[1],
            16,
        )  # fmt: skip
        broker_pid = host.check_output("pidof mosquitto")
        rc, out = playbook(str(PROJECT / "playbooks" / "revoke.yml"), "-e", f"device={REVOKED}")
        published_at_revoke = kept.published()
        # Board 02 must go on publishing on the connection it opened before the revoke.
        kept_goes_on = kept.wait_published(published_at_revoke + 3)
        try:
            gone_rc = gone.proc.wait(int(NET_TIMEOUT) + 30)
        except subprocess.TimeoutExpired:
            gone_rc = None
        yield {
            "rc": rc,
            "out": out,
            "serial": serial,
            "broker_pid_before": broker_pid,
            "broker_pid_after": host.check_output("pidof mosquitto"),
            "kept_goes_on": kept_goes_on,
            "kept_alive": kept.proc.poll() is None,
            "kept_lines": kept.lines,
            "gone_rc": gone_rc,
            "gone_lines": gone.lines,
        }
    finally:
        kept.stop()
        gone.stop()


def test_revoke_playbook_succeeds(revoked_run):
    assert revoked_run["rc"] == 0, revoked_run["out"][-4000:]


def test_broker_was_reloaded_not_restarted(revoked_run, host):
    assert revoked_run["broker_pid_after"] == revoked_run["broker_pid_before"]
    assert "Reloading config" in host.file("/var/log/mosquitto/mosquitto.log").content_string


def test_other_board_stays_connected_and_publishing(revoked_run):
    assert revoked_run["kept_goes_on"], revoked_run["kept_lines"][-5:]
    assert revoked_run["kept_alive"], revoked_run["kept_lines"][-5:]


def test_connected_revoked_board_can_no_longer_publish(revoked_run):
    # Exit 3: PUBACK 0x87 (not authorized) — the ACL entry is gone after the reload.
    assert revoked_run["gone_rc"] == 3, revoked_run["gone_lines"][-5:]
    assert "0x87" in revoked_run["gone_lines"][-1]


def test_new_connection_of_the_revoked_board_is_refused(revoked_run):
    proc = boot_once(REVOKED)
    assert proc.returncode == 4, proc.stderr  # TLS handshake refused (certificate revoked)
    assert boot_once(KEPT).returncode == 0


def test_revocation_is_recorded(revoked_run, host):
    revoked = yaml.safe_load((PKI / "ca" / "revoked.yml").read_text())["pki_revoked_certificates"]
    assert [int(r["serial_number"]) for r in revoked if r["device_id"] == REVOKED] == [revoked_run["serial"]]
    assert manifest_rows(REVOKED)[-1]["result"] == "revoked"
    acl = host.file("/etc/mosquitto/acl").content_string
    assert f"user {REVOKED}\n" not in acl
    assert f"user {KEPT}\n" in acl
    crl = host.file("/etc/mosquitto/certs/crl.pem").content_string
    assert crl == (PKI / "ca" / "crl.pem").read_text()


def test_a_normal_run_keeps_the_board_revoked(revoked_run, host):
    cert = PKI / "devices" / f"{REVOKED}.crt"
    before = {
        "cert": digest(cert),
        "flash": digest(FLASH[REVOKED]),
        "revoked": digest(PKI / "ca" / "revoked.yml"),
    }
    rc, out = playbook(str(CONVERGE))
    assert rc == 0, out[-4000:]
    after = {
        "cert": digest(cert),
        "flash": digest(FLASH[REVOKED]),
        "revoked": digest(PKI / "ca" / "revoked.yml"),
    }
    assert after == before
    assert f"user {REVOKED}\n" not in host.file("/etc/mosquitto/acl").content_string
    rows = manifest_rows(REVOKED)
    assert rows[-1]["result"] == "revoked", rows[-1]
    assert manifest_rows(KEPT)[-1]["result"] == "unchanged"
    assert boot_once(REVOKED).returncode == 4
