"""CA rotation end to end: introduce → switch → retire through the scenario's converge (= site.yml).

Last in verify (after the revocation test): the fleet it rotates is the one the scenario converged,
with board 01 revoked, so the rotation is proven with a revoked device in the fleet too (it must not
hold the rotation up, and stays revoked). This used to be a scenario of its own that converged the
same site a second time; here it costs only its phases.

One ordered test, because each phase starts from the state the previous one left. After each phase:
a second run changes nothing, both boards boot from their flash and publish over mTLS, and the
broker serves the certificate of the CA the phase says. A client certificate of the OLD CA, made
before the rotation, connects during the overlap and is refused once the old CA is retired.
"""

import os
import re
import socket
import ssl
import subprocess
import sys
from pathlib import Path

from cryptography import x509

PKI = Path(os.environ["PKI_DIR"])
LAB = Path(os.environ["LAB_DIR"])
CONVERGE = Path(os.environ["MOLECULE_SCENARIO_DIRECTORY"]) / "converge.yml"
# The inventory directory (hosts and group_vars of molecule.yml), as the provisioner uses it.
INVENTORY = Path(os.environ["MOLECULE_EPHEMERAL_DIRECTORY"]) / "inventory"
PORT = int(os.environ["MQTT_DEVICE_PORT"])
BIN = Path(sys.executable).parent
# The boards still in service (esp32-mol-01 was revoked by test_fleet_zz_revoke.py).
BOARDS = {"esp32-mol-02": LAB / "ttyUSB1.flash", "esp32-mol-03": LAB / "ttyUSB2.flash"}
# The scenario's throwaway CA passphrase (molecule.yml), to sign a client certificate with the old CA.
PASSPHRASE = os.environ["PKI_CA_PASSPHRASE"]
NET_TIMEOUT = "60"  # x3 of an idle machine's need
RECAP = re.compile(r"^(\S+)\s*:\s*ok=\d+\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", re.M)


def converge(phase):
    proc = subprocess.run(
        [
            BIN / "ansible-playbook",
            "-i",
            INVENTORY,
            CONVERGE,
            "-e",
            f"pki_ca_rotation={phase}",
        ],
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
        # Plain recap lines to parse (molecule's environment forces colour).
        env=dict(os.environ, ANSIBLE_NOCOLOR="1", ANSIBLE_FORCE_COLOR="0"),
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    assert RECAP.search(out), out[-3000:]
    return {m[0]: int(m[1]) for m in RECAP.findall(out)}, out


def boots(board):
    proc = subprocess.run(
        [str(BIN / "esp32sim"), "boot", "--flash", str(BOARDS[board]), "--once", "--timeout", NET_TIMEOUT],
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


def test_ca_rotation_end_to_end(tmp_path):
    old_ca = PKI / "ca" / "ca.crt"
    old_ski = ca_ski(old_ca)
    old_key = (PKI / "ca" / "ca.key").read_bytes()
    trust = tmp_path / "trust.pem"
    trust.write_bytes(old_ca.read_bytes())
    legacy = legacy_client(tmp_path)
    ok, server = handshake(*legacy, trust)
    assert ok and issuer_aki(server) == old_ski

    for phase in ("introduce", "switch", "retire"):
        recap, out = converge(phase)
        assert any(recap.values()), out[-3000:]
        again, out = converge(phase)
        assert again and not any(again.values()), f"{phase}: second run changed {again}\n{out[-5000:]}"
        for board in BOARDS:
            ok, log = boots(board)
            assert ok, f"{phase}: {board} did not publish\n{log}"

        bundle = (PKI / "ca" / "bundle.pem").read_bytes()
        trust.write_bytes(bundle)
        if phase == "introduce":
            new_ski = ca_ski(PKI / "ca-next" / "ca.crt")
            assert bundle.count(b"BEGIN CERTIFICATE") == 2
            # Devices are on the new CA, the broker still on the old one.
            for board in BOARDS:
                crt = x509.load_pem_x509_certificate((PKI / "devices" / f"{board}.crt").read_bytes())
                assert issuer_aki(crt) == new_ski
        ok, server = handshake(*legacy, trust)
        assert server is not None or phase == "retire"
        if phase == "introduce":
            assert ok and issuer_aki(server) == old_ski  # overlap: the old CA's clients still connect
        elif phase == "switch":
            assert ok and issuer_aki(server) == new_ski  # broker moved; old CA still trusted
        else:
            assert not ok  # retired: the old CA's clients are refused
            assert bundle.count(b"BEGIN CERTIFICATE") == 1 and ca_ski(PKI / "ca" / "ca.crt") == new_ski
            assert not (PKI / "ca-next").exists()
            # The old CA's key is gone from the controller.
            assert not any(p.is_file() and p.read_bytes() == old_key for p in PKI.rglob("*"))
            # The board revoked before the rotation stays revoked: on the new CA's list, and never
            # issued a certificate by the new CA.
            assert "esp32-mol-01" in (PKI / "ca" / "revoked.yml").read_text()
            revoked_crt = PKI / "devices" / "esp32-mol-01.crt"
            if revoked_crt.exists():
                assert issuer_aki(x509.load_pem_x509_certificate(revoked_crt.read_bytes())) == old_ski
