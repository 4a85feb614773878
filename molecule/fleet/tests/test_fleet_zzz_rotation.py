"""CA rotation with a board in the field: introduce → switch → retire driven by playbooks/upkeep.yml
(what the daily timer runs), the broker in its systemd container, one board running its firmware
(`esp32sim run`, never on USB again) and one board still at its station.

Last in verify (after the revocation test): the fleet it rotates is the one the scenario converged,
with board 01 revoked, so the rotation is also proven with a revoked device in the fleet (it must not
hold the rotation up, and stays revoked).

One ordered test, because each phase starts from the state the previous one left:
- introduce (upkeep): the brokers trust both CAs, the field board receives the two-CA bundle over
  MQTT and renews onto the new CA with a key it makes itself; a second upkeep changes nothing.
- switch is refused while the station board is still on the old CA, and names it; the station run
  (the scenario's converge, limited to that board) moves it over on USB; then switch (upkeep): the
  broker serves a certificate of the new CA.
- retire (upkeep): the field board receives the one-CA bundle over MQTT; clients of the old CA are
  refused; the old CA key is gone.
Throughout: the field board keeps publishing (its longest silence is printed and must stay inside
the reconnect backoff), its station-written partition is never rewritten (no esptool write after
the first provisioning), and a client certificate of the OLD CA, made before the rotation, connects
during the overlap and is refused once the old CA is retired.
"""

import datetime
import itertools
import json
import os
import re
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

from cryptography import x509

from esp32sim.nvs import parse_nvs

PKI = Path(os.environ["PKI_DIR"])
LAB = Path(os.environ["LAB_DIR"])
MANIFEST = Path(os.environ["MANIFEST_DIR"]) / "fleet.json"
PROJECT = Path(os.environ["MOLECULE_PROJECT_DIRECTORY"])
CONVERGE = Path(os.environ["MOLECULE_SCENARIO_DIRECTORY"]) / "converge.yml"
# The inventory directory (hosts and group_vars of molecule.yml), as the provisioner uses it.
INVENTORY = Path(os.environ["MOLECULE_EPHEMERAL_DIRECTORY"]) / "inventory"
PORT = int(os.environ["MQTT_DEVICE_PORT"])
BIN = Path(sys.executable).parent
# esp32-mol-01 was revoked by test_fleet_zz_revoke.py.
FIELD, STATION = "esp32-mol-02", "esp32-mol-03"
FLASH = {FIELD: LAB / "ttyUSB1.flash", STATION: LAB / "ttyUSB2.flash"}
# The flash layout of docs/device-protocol.md: the station's nvs, the firmware's own nvs_field.
STATION_NVS, FIELD_NVS, NVS_SIZE = 0x9000, 0x312000, 0x6000
# The scenario's throwaway CA passphrase (molecule.yml), to sign a client certificate with the old CA.
PASSPHRASE = os.environ["PKI_CA_PASSPHRASE"]
NET_TIMEOUT = "60"  # x3 of an idle machine's need
# The firmware's reconnect backoff cap (esp32sim run --backoff-cap, docs/device-protocol.md).
BACKOFF_CAP = 60.0
RECAP = re.compile(r"^(\S+)\s*:\s*ok=\d+\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", re.M)


def playbook(path, *args, ok=True):
    proc = subprocess.run(
        [BIN / "ansible-playbook", "-i", INVENTORY, path, *args],
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
        # Plain recap lines to parse (molecule's environment forces colour).
        env=dict(os.environ, ANSIBLE_NOCOLOR="1", ANSIBLE_FORCE_COLOR="0"),
    )
    out = proc.stdout + proc.stderr
    if ok:
        assert proc.returncode == 0, out[-6000:]
        assert RECAP.search(out), out[-3000:]
    return proc.returncode, {m[0]: int(m[1]) for m in RECAP.findall(out)}, out


def upkeep(phase):
    """One upkeep run, as the timer's wrapper runs it, in the phase the operator set."""
    _, recap, out = playbook(PROJECT / "playbooks" / "upkeep.yml", "-e", f"pki_ca_rotation={phase}")
    return recap, out


class FieldBoard:
    """The board's firmware (esp32sim run): one line per event; `published` = a reading PUBACKed."""

    def __init__(self, flash):
        self.lines = []
        argv = [BIN / "esp32sim", "run", "--flash", str(flash), "--interval", "1"]
        self.proc = subprocess.Popen(
            [*argv, "--backoff-cap", str(BACKOFF_CAP)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line.rstrip())

    def published_at(self):
        """The board's own times of its acknowledged readings."""
        return [
            datetime.datetime.fromisoformat(line.split(" ", 1)[0])
            for line in list(self.lines)
            if " published " in line
        ]

    def publishes(self, timeout=120):
        """True once the board has had a reading acknowledged after now."""
        since = datetime.datetime.now(datetime.UTC)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            if any(t > since for t in self.published_at()):
                return True
            time.sleep(0.5)
        return False

    def longest_silence(self):
        times = self.published_at()
        return max((b - a).total_seconds() for a, b in itertools.pairwise(times))

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def partition(board, offset):
    with open(FLASH[board], "rb") as f:
        f.seek(offset)
        return f.read(NVS_SIZE)


def field_credential(board):
    """The certificate the board connects with (docs/device-protocol.md: cred_slot 0 = the station's)."""
    field = parse_nvs(partition(board, FIELD_NVS)).get("fleet", {})
    slot = int(field.get("cred_slot", 0) or 0)
    if slot == 0:
        pem = parse_nvs(partition(board, STATION_NVS))["mqtt"]["client_cert"]
    else:
        pem = field["ab"[slot - 1] + "_cert"]
    return x509.load_pem_x509_certificate(pem.encode()), field


def boots(board):
    proc = subprocess.run(
        [str(BIN / "esp32sim"), "boot", "--flash", str(FLASH[board]), "--once", "--timeout", NET_TIMEOUT],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    return proc.returncode == 0 and "published seq=" in proc.stdout, proc.stdout + proc.stderr


def openssl(*args):
    return subprocess.run(["openssl", *args], capture_output=True, text=True, check=True)


def handshake(cert, key, cafile):
    """mTLS handshake + MQTT CONNECT with a client certificate; returns (accepted, server cert)."""
    ctx = ssl.create_default_context(cafile=str(cafile))
    ctx.load_cert_chain(str(cert), str(key))
    try:
        with (
            socket.create_connection(("127.0.0.1", PORT), timeout=60) as raw,
            ctx.wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            server = x509.load_der_x509_certificate(tls.getpeercert(binary_form=True))
            # MQTT 3.1.1 CONNECT, client id "legacy"; CONNACK return code 0 = accepted.
            tls.sendall(bytes([0x10, 18, 0, 4]) + b"MQTT" + bytes([4, 2, 0, 60, 0, 6]) + b"legacy")
            connack = tls.recv(4)
            return len(connack) == 4 and connack[3] == 0, server
    except (ssl.SSLError, ConnectionError, OSError):
        return False, None


def legacy_client(tmp):
    """A client certificate from the CA as it is before the rotation (the old CA)."""
    key, csr, crt = tmp / "legacy.key", tmp / "legacy.csr", tmp / "legacy.crt"
    openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(key))
    openssl("req", "-new", "-key", str(key), "-subj", "/O=esp32-mqtt-fleet/CN=legacy", "-out", str(csr))
    ext = tmp / "ext.cnf"
    ext.write_text(
        "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n"
    )
    openssl(
        "x509", "-req", "-in", str(csr), "-CA", str(PKI / "ca" / "ca.crt"),
        "-CAkey", str(PKI / "ca" / "ca.key"),
        "-passin", f"pass:{PASSPHRASE}", "-days", "30", "-extfile", str(ext), "-out", str(crt),
    )  # fmt: skip
    return crt, key


def ca_ski(path):
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest


def issuer_aki(cert):
    return cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier


def device_aki(board):
    return issuer_aki(x509.load_pem_x509_certificate((PKI / "devices" / f"{board}.crt").read_bytes()))


def rows(board):
    return [r for r in json.loads(MANIFEST.read_text())["rows"] if r["device_id"] == board]


def assert_steady(phase):
    recap, out = upkeep(phase)
    assert recap and not any(recap.values()), f"{phase}: second upkeep changed {recap}\n{out[-6000:]}"


def test_ca_rotation_over_the_air_with_a_board_in_the_field(tmp_path):
    old_ca = PKI / "ca" / "ca.crt"
    old_ski = ca_ski(old_ca)
    old_key = (PKI / "ca" / "ca.key").read_bytes()
    trust = tmp_path / "trust.pem"
    trust.write_bytes(old_ca.read_bytes())
    legacy = legacy_client(tmp_path)
    ok, server = handshake(*legacy, trust)
    assert ok and issuer_aki(server) == old_ski

    station_nvs = partition(FIELD, STATION_NVS)
    rows_before = len(rows(FIELD))
    board = FieldBoard(FLASH[FIELD])
    try:
        assert board.publishes(), "\n".join(board.lines)

        # 1. introduce, by the upkeep alone: the field board moves to the new CA over MQTT.
        recap, out = upkeep("introduce")
        assert any(recap.values()), out[-3000:]
        new_ski = ca_ski(PKI / "ca-next" / "ca.crt")
        cert, field = field_credential(FIELD)
        assert issuer_aki(cert) == new_ski, "\n".join(board.lines[-40:]) + out[-4000:]
        assert device_aki(FIELD) == new_ski
        assert field["ca_cert"].count("BEGIN CERTIFICATE") == 2  # the two-CA bundle, over MQTT
        assert rows(FIELD)[-1]["result"] == "renewed", rows(FIELD)[-1]
        assert device_aki(STATION) == old_ski  # at its station, nothing answered the command
        assert board.publishes()
        assert_steady("introduce")
        trust.write_bytes((PKI / "ca" / "bundle.pem").read_bytes())
        ok, server = handshake(*legacy, trust)
        assert ok and issuer_aki(server) == old_ski  # overlap: the old CA's clients still connect

        # 2. switch waits for the station board and names it (not the field board, not the revoked
        # one); the station run moves it over on USB.
        rc, _, out = playbook(PROJECT / "playbooks" / "pki.yml", "-e", "pki_ca_rotation=switch", ok=False)
        assert rc != 0
        lagging = re.search(r"not yet issued by the new CA: ([^.]*)\.", out)
        assert lagging and lagging[1].split(", ") == [STATION], out[-3000:]
        playbook(CONVERGE, "--limit", f"controller,brokers,{STATION}")
        assert device_aki(STATION) == new_ski
        ok, log = boots(STATION)
        assert ok, log
        recap, out = upkeep("switch")
        assert any(recap.values()), out[-3000:]
        assert_steady("switch")
        ok, server = handshake(*legacy, trust)
        assert ok and issuer_aki(server) == new_ski  # broker moved; old CA still trusted
        assert board.publishes()

        # 3. retire: one CA, pushed to the field board over MQTT; the old CA's clients are refused.
        recap, out = upkeep("retire")
        assert any(recap.values()), out[-3000:]
        assert board.publishes()
        assert_steady("retire")
        bundle = (PKI / "ca" / "bundle.pem").read_bytes()
        assert bundle.count(b"BEGIN CERTIFICATE") == 1 and ca_ski(PKI / "ca" / "ca.crt") == new_ski
        _, field = field_credential(FIELD)
        assert field["ca_cert"].encode().strip() == bundle.strip()
        trust.write_bytes(bundle)
        ok, _ = handshake(*legacy, trust)
        assert not ok
        assert not (PKI / "ca-next").exists()
        assert not any(p.is_file() and p.read_bytes() == old_key for p in PKI.rglob("*"))
        ok, log = boots(STATION)  # its NVS bundle (both CAs) holds the new one
        assert ok, log
        assert board.publishes()
    finally:
        board.stop()

    # No USB for the field board: its station partition is the one it was provisioned with, and the
    # only manifest row since is the over-the-air renewal.
    assert partition(FIELD, STATION_NVS) == station_nvs
    assert [r["result"] for r in rows(FIELD)[rows_before:]] == ["renewed"]
    silence = board.longest_silence()
    print(f"field board {FIELD}: longest silence {silence:.1f} s across the rotation")
    assert silence <= BACKOFF_CAP + 5, "\n".join(board.lines)
    # The board revoked before the rotation stays revoked: on the new CA's list, and never issued a
    # certificate by the new CA.
    assert "esp32-mol-01" in (PKI / "ca" / "revoked.yml").read_text()
    revoked_crt = PKI / "devices" / "esp32-mol-01.crt"
    if revoked_crt.exists():
        assert issuer_aki(x509.load_pem_x509_certificate(revoked_crt.read_bytes())) == old_ski
