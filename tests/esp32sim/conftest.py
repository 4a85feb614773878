"""Fixtures: simulated boards (pty/TCP) driven by the real esptool, and a throwaway TLS Mosquitto."""

import contextlib
import datetime
import ipaddress
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
ESPTOOL = str(BIN / "esptool")
ESP32SIM = str(BIN / "esp32sim")
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def run_esptool(port, *args, check=True, timeout=120, config=None):
    """Run the real esptool CLI against a port; returns the CompletedProcess (stdout+stderr).

    config: esptool.cfg options (e.g. a short `timeout` where a test waits for a hang).
    """
    cmd = [ESPTOOL, "--port", port, *args]
    env = dict(os.environ)
    if config:
        import tempfile

        with tempfile.NamedTemporaryFile("w", suffix=".cfg", delete=False) as f:
            f.write("[esptool]\n" + "".join(f"{k} = {v}\n" for k, v in config.items()))
        env["ESPTOOL_CFGFILE"] = f.name
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    finally:
        if config:
            os.unlink(env["ESPTOOL_CFGFILE"])
    proc.output = proc.stdout + proc.stderr
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.output}")
    return proc


class Sim:
    """One `esp32sim serve` process."""

    def __init__(self, tmp_path, transport, flash=None, mac=None, faults=(), pacing=False, name="board"):
        self.flash = str(flash or tmp_path / f"{name}.flash")
        cmd = [ESP32SIM, "serve", "--flash", self.flash]
        if transport == "pty":
            self.link = str(tmp_path / f"{name}-ttyUSB0")
            cmd += ["--pty", self.link]
        else:
            cmd += ["--tcp", "127.0.0.1:0"]
        if mac:
            cmd += ["--mac", mac]
        for f in faults:
            cmd += ["--fault", f]
        if pacing:
            cmd.append("--baud-pacing")
        self.log_path = tmp_path / f"{name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._log)
        line = self._first_line(10)
        m = re.search(r" on (\S+)", line)
        assert m, f"unexpected first line from esp32sim: {line!r}"
        self.port = m.group(1)
        self.transport = transport

    def _first_line(self, timeout):
        fd = self.proc.stdout.fileno()
        buf = b""
        deadline = time.monotonic() + timeout
        while b"\n" not in buf and time.monotonic() < deadline:
            r, _, _ = select.select([fd], [], [], 0.1)
            if r:
                chunk = os.read(fd, 4096)
                if not chunk:
                    break
                buf += chunk
        return buf.decode(errors="replace")

    def log_text(self):
        return self.log_path.read_text(errors="replace")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()
        self._log.close()


@pytest.fixture
def sim_factory(tmp_path):
    sims = []

    def make(transport="pty", **kw):
        kw.setdefault("name", f"board{len(sims)}")
        s = Sim(tmp_path, transport, **kw)
        sims.append(s)
        return s

    yield make
    for s in sims:
        s.stop()


@pytest.fixture(params=["pty", "tcp"])
def transport(request):
    return request.param


# -- PKI and broker for the boot tests ------------------------------------------------------


def _pki(directory: Path, devices):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)

    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def key():
        return ec.generate_private_key(ec.SECP256R1())

    def pem_key(k):
        return k.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode()

    def pem(c):
        return c.public_bytes(serialization.Encoding.PEM).decode()

    def make_ca(cn):
        k = key()
        c = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(name(cn))
            .public_key(k.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
            )
            .sign(k, hashes.SHA256())
        )
        return k, c

    def leaf(ca_key, ca_cert, cn, server=False):
        k = key()
        b = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(ca_cert.subject)
            .public_key(k.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        )
        if server:
            b = b.add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        else:
            b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        return pem_key(k), pem(b.sign(ca_key, hashes.SHA256()))

    ca_key, ca_cert = make_ca("esp32sim test CA")
    rogue_key, rogue_cert = make_ca("rogue CA")
    out = {"ca": pem(ca_cert), "clients": {}}
    server_key, server_cert = leaf(ca_key, ca_cert, "localhost", server=True)
    for cn in devices:
        out["clients"][cn] = leaf(ca_key, ca_cert, cn)
    out["rogue"] = leaf(rogue_key, rogue_cert, devices[0])
    out["rogue_ca"] = pem(rogue_cert)
    (directory / "ca.crt").write_text(out["ca"])
    (directory / "server.crt").write_text(server_cert)
    (directory / "server.key").write_text(server_key)
    os.chmod(directory / "server.key", 0o600)
    for cn, (k, c) in out["clients"].items():
        (directory / f"{cn}.crt").write_text(c)
        (directory / f"{cn}.key").write_text(k)
    return out


def _free_port():
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def broker(tmp_path_factory):
    """Mosquitto 2 with mTLS on an ephemeral port: CN = username, ACL devices/%u/#."""
    if not os.path.exists(MOSQUITTO):
        pytest.fail(f"mosquitto is required for the boot tests ({MOSQUITTO} not found)")
    d = tmp_path_factory.mktemp("broker")
    devices = ["esp32-sim-01", "esp32-sim-02", "monitor"]
    pki = _pki(d, devices)
    (d / "acl").write_text("user monitor\ntopic read devices/#\n\npattern readwrite devices/%u/#\n")
    for attempt in range(5):
        port = _free_port()
        open_port = _free_port()
        (d / "mosquitto.conf").write_text(
            "\n".join(
                [
                    "user root",
                    "per_listener_settings false",
                    "persistence false",
                    "log_dest stderr",
                    "log_type error",
                    "log_type warning",
                    "log_type notice",
                    "log_type information",
                    "allow_anonymous false",
                    f"acl_file {d / 'acl'}",
                    f"listener {port} 127.0.0.1",
                    f"cafile {d / 'ca.crt'}",
                    f"certfile {d / 'server.crt'}",
                    f"keyfile {d / 'server.key'}",
                    "tls_version tlsv1.2",
                    "require_certificate true",
                    "use_identity_as_username true",
                    # A TLS listener that does not ask for a client certificate: with
                    # anonymous access off, its CONNECTs are refused (no identity).
                    f"listener {open_port} 127.0.0.1",
                    f"cafile {d / 'ca.crt'}",
                    f"certfile {d / 'server.crt'}",
                    f"keyfile {d / 'server.key'}",
                    "tls_version tlsv1.2",
                    "",
                ]
            )
        )
        log = open(d / f"mosquitto{attempt}.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen([MOSQUITTO, "-c", str(d / "mosquitto.conf")], stdout=log, stderr=log)
        deadline = time.monotonic() + 5
        up = False
        while time.monotonic() < deadline and proc.poll() is None:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                up = True
                break
            time.sleep(0.05)
        if up:
            break
        proc.kill()
        proc.wait()
        log.close()
    else:
        pytest.fail(f"mosquitto did not start: {(d / 'mosquitto0.log').read_text()}")
    info = {"host": "127.0.0.1", "port": port, "open_port": open_port, "dir": d, "pki": pki}
    yield info
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    log.close()
