"""The OTA image server role, run on THIS host against a throwaway PKI, proved with real clients.

The pki role issues the certificates (tests/pki's Pki project, loaded from its conftest): the image
server `localhost` is only in `ota_servers` (its certificate comes from the pki extension), and
`both` is a broker and an image server (one certificate, both names). playbooks/ota_server.yml then
configures the host's Debian nginx (init script: no systemd here) on a free port with test-only
directories; python's ssl and openssl s_client then talk to it. The host's nginx is taken over for the
module and left as found afterwards: /etc/nginx restored, test files removed, stopped unless it ran
before (a lock keeps two such tests from sharing it).
"""

from __future__ import annotations

import datetime
import http.client
import importlib.util
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import uuid
import warnings
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("pki_conftest_for_ota", ROOT / "tests" / "pki" / "conftest.py")
_pki = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = _pki  # its dataclasses look their module up while being defined
_spec.loader.exec_module(_pki)
# The host's one nginx, taken over and left as found (shared with tests/fleet/test_fleet_ota.py).
_nspec = importlib.util.spec_from_file_location("host_nginx", ROOT / "tests" / "fleet" / "host_nginx.py")
_nginx = importlib.util.module_from_spec(_nspec)
_nspec.loader.exec_module(_nginx)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        os.geteuid() != 0 or not Path("/usr/sbin/nginx").exists(), reason="needs root and nginx"
    ),
]

NGINX_ETC = Path("/etc/nginx")
TAG = uuid.uuid4().hex[:8]
CERT_DIR = Path(f"/etc/nginx/esp32-fleet-ota-test-{TAG}")
ROOT_DIR = Path(f"/var/lib/esp32-fleet-test-{TAG}/ota")
NGINX_LOG = Path("/var/log/nginx")
ACCESS_LOG = NGINX_LOG / f"esp32-fleet-ota-test-{TAG}.access.log"
TIMEOUT = 10


class OtaProject(_pki.Pki):
    """tests/pki's throwaway project with an ota_servers group."""

    ota_servers: dict

    def write_inventory(self, passphrase: str = _pki.PASSPHRASE) -> Path:
        inv = super().write_inventory(passphrase)
        hosts = yaml.safe_load((inv / "hosts.yml").read_text())
        hosts["all"]["children"]["ota_servers"] = {"hosts": self.ota_servers}
        (inv / "hosts.yml").write_text(yaml.safe_dump(hosts, sort_keys=False))
        return inv

    def play(self, tasks: list, name: str, *args: str, hosts: str = "localhost", extra=None) -> _pki.Run:
        """Run a one-play playbook written into the project (tasks_from entry points)."""
        book = self.base / f"{name}.yml"
        book.write_text(
            yaml.safe_dump([{"name": name, "hosts": hosts, "gather_facts": True, "tasks": tasks}])
        )
        return self.run(*args, extra=extra, playbook=book)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _nginx_running() -> bool:
    return _nginx.running()


def _listening(port: int) -> bool:
    out = subprocess.run(["ss", "-Hltn"], capture_output=True, text=True, check=True).stdout
    return any(line.split()[3].rsplit(":", 1)[-1] == str(port) for line in out.splitlines())


def _state() -> dict:
    """What a check-mode run must not change: nginx's files, the role's directories, the process."""
    state = {}
    for top in (NGINX_ETC, CERT_DIR, ROOT_DIR.parent):
        for p in sorted(top.rglob("*")) if top.exists() else []:
            if p.is_symlink():
                state[str(p)] = ("link", os.readlink(p))
            elif p.is_file():
                st = p.stat()
                state[str(p)] = (oct(st.st_mode), st.st_uid, p.read_bytes())
            else:
                state[str(p)] = ("dir", oct(p.stat().st_mode))
        state[str(top)] = top.exists()
    state["running"] = _nginx_running()
    return state


def _other_ca(base: Path) -> tuple[Path, Path]:
    """A client certificate (CN dev-a, clientAuth) from a CA the fleet does not trust."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "esp32-mqtt-fleet CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dev-a")]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    crt_path, key_path = base / "other.crt", base / "other.key"
    crt_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    key_path.chmod(0o600)
    return crt_path, key_path


class Server:
    def __init__(self, project: OtaProject, port: int, runs: list):
        self.project = project
        self.port = port
        self.runs = runs
        self.pki = project.pki

    def device(self, device_id: str) -> tuple[Path, Path]:
        return self.pki / "devices" / f"{device_id}.crt", self.pki / "devices" / f"{device_id}.key"

    def context(self, cert=None, **kwargs) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.pki / "ca" / "bundle.pem"))
        if cert:
            ctx.load_cert_chain(str(cert[0]), str(cert[1]))
        for k, v in kwargs.items():
            setattr(ctx, k, v)
        return ctx

    def get(self, path: str, cert=None, method: str = "GET") -> tuple[int, bytes, dict]:
        conn = http.client.HTTPSConnection(
            "localhost", self.port, context=self.context(cert), timeout=TIMEOUT
        )
        try:
            conn.request(method, path)
            resp = conn.getresponse()
            return resp.status, resp.read(), dict(resp.getheaders())
        finally:
            conn.close()

    def publish(self, image: Path, name: str, *args: str) -> _pki.Run:
        task = {
            "name": "Publish the image",
            "ansible.builtin.include_role": {
                "name": "esp32_fleet.mqtt_fleet.ota_server",
                "tasks_from": "publish",
            },
            "vars": {
                "ota_server_image": str(image),
                "ota_server_image_name": name,
                "ota_server_root": str(ROOT_DIR),
            },
        }
        return self.project.play([task], "publish", *args)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The role applied four times (check on a fresh host, real, real, check); yields a Server."""
    base = tmp_path_factory.mktemp("ota")
    project = OtaProject(
        base,
        {"both": {"ansible_host": "192.0.2.20", "mosquitto_server_names": ["mqtt.example.net"]}},
        {"dev-a": {}, "dev-b": {}},
    )
    project.ota_servers = {
        "localhost": {},
        "both": {"ota_server_names": ["ota.example.net", "mqtt.example.net"]},
    }
    project.write_inventory()
    port = _free_port()
    extra = {
        "ota_server_port": port,
        "ota_server_cert_dir": str(CERT_DIR),
        "ota_server_root": str(ROOT_DIR),
        "ota_server_access_log": str(ACCESS_LOG),
    }
    (base / "ota-vars.json").write_text(json.dumps(extra))
    book = ROOT / "playbooks" / "ota_server.yml"
    args = ("--limit", "localhost", "-e", f"@{base / 'ota-vars.json'}")
    with _nginx.taken_over(base, extra):
        pki_run = project.run()
        assert pki_run.rc == 0, pki_run.output[-4000:]
        before = _state()
        runs = [project.run("--check", "--diff", *args, playbook=book)]
        assert runs[0].rc == 0, runs[0].output[-4000:]
        assert _state() == before, "check mode on a fresh host changed something"
        for extra_args in ((), (), ("--check", "--diff")):
            runs.append(project.run(*extra_args, *args, playbook=book))
            assert runs[-1].rc == 0, runs[-1].output[-4000:]
        yield Server(project, port, runs)


def check_the_pki_issues_one_server_certificate_per_host_of_brokers_and_ota_servers(server):
    brokers = server.pki / "brokers"
    assert sorted(p.name for p in brokers.glob("*.crt")) == ["both.crt", "localhost.crt"]
    both = x509.load_pem_x509_certificate((brokers / "both.crt").read_bytes())
    names = both.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    # The broker's names first, then the image server's that are new; no duplicate.
    assert names.get_values_for_type(x509.DNSName) == ["mqtt.example.net", "ota.example.net"]
    local = x509.load_pem_x509_certificate((brokers / "localhost.crt").read_bytes())
    eku = local.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]
    san = local.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in san.get_values_for_type(x509.DNSName)


def check_runs_change_then_settle(server):
    check_fresh, first, second, check_after = server.runs
    assert first.changed > 0
    assert second.changed == 0, second.output[-3000:]
    assert check_after.changed == 0, check_after.output[-3000:]
    assert check_fresh.changed > 0  # it reported what the first run then did


def check_only_the_configured_port_listens_and_the_files_are_locked_down(server):
    assert _listening(server.port)
    assert not _listening(80), "the package's default site must not serve port 80"
    assert not (NGINX_ETC / "sites-enabled" / "default").exists()
    key = CERT_DIR / "server.key"
    assert oct(key.stat().st_mode & 0o777) == "0o600" and key.stat().st_uid == 0
    assert (CERT_DIR / "ca.pem").read_bytes() == (server.pki / "ca" / "bundle.pem").read_bytes()


def check_a_fleet_certificate_downloads_the_published_image_exactly(server, tmp_path):
    image = tmp_path / "fw.bin"
    image.write_bytes(os.urandom(70_000))
    run = server.publish(image, "fw-1.0.0.bin")
    assert run.rc == 0 and run.changed > 0, run.output[-3000:]
    status, body, headers = server.get("/ota/fw-1.0.0.bin", cert=server.device("dev-a"))
    assert status == 200
    assert body == image.read_bytes()
    assert headers["Server"] == "nginx"  # server_tokens off: no version
    status, body, _ = server.get("/ota/fw-1.0.0.bin", cert=server.device("dev-a"), method="HEAD")
    assert status == 200 and body == b""
    # The access log names the board.
    assert "CN=dev-a" in ACCESS_LOG.read_text()


def check_publishing_the_next_image_removes_the_old_one_and_settles(server, tmp_path):
    old, new = tmp_path / "old.bin", tmp_path / "new.bin"
    old.write_bytes(b"\xe9old image" * 100)
    new.write_bytes(b"\xe9new image" * 100)
    assert server.publish(old, "fw-old.bin").rc == 0
    (ROOT_DIR / ".leftover").write_text("not from a rollout")
    run = server.publish(new, "fw-new.bin")
    assert run.rc == 0 and run.changed > 0, run.output[-3000:]
    assert sorted(p.name for p in ROOT_DIR.iterdir()) == ["fw-new.bin"]
    dev = server.device("dev-a")
    assert server.get("/ota/fw-old.bin", cert=dev)[0] == 404
    assert server.get("/ota/fw-new.bin", cert=dev)[:2] == (200, new.read_bytes())
    again = server.publish(new, "fw-new.bin")
    assert again.rc == 0 and again.changed == 0, again.output[-3000:]
    # Check mode names a change and makes none.
    checked = server.publish(old, "fw-old.bin", "--check", "--diff")
    assert checked.rc == 0 and checked.changed > 0
    assert sorted(p.name for p in ROOT_DIR.iterdir()) == ["fw-new.bin"]
    assert (ROOT_DIR / "fw-new.bin").stat().st_mode & 0o777 == 0o644


def check_only_files_of_the_image_directory_are_served(server):
    (ROOT_DIR / "x.bin").write_bytes(b"\xe9" * 64)  # as publish would, without a run
    dev = server.device("dev-a")
    assert server.get("/ota/", cert=dev)[0] == 404  # no listing
    assert server.get("/ota", cert=dev)[0] == 404
    assert server.get("/", cert=dev)[0] == 404
    assert server.get("/x.bin", cert=dev)[0] == 404
    # Paths that climb out: nginx refuses those that climb above / (400), the rest match no location.
    for path in ("/ota/../../../../etc/passwd", "/ota/%2e%2e%2f%2e%2e%2fetc%2fpasswd", "/ota/..%2fx.bin"):
        status, body, _ = server.get(path, cert=dev)
        assert status in (400, 404) and b"root:" not in body, path
    assert server.get("/etc/passwd", cert=dev)[0] == 404
    assert server.get("/ota/missing.bin", cert=dev)[0] == 404
    assert server.get("/ota/x.bin", cert=dev, method="POST")[0] == 405
    assert server.get("/ota/x.bin", cert=dev, method="DELETE")[0] == 405


def check_without_a_client_certificate_nothing_is_served(server):
    status, body, _ = server.get("/ota/x.bin")
    assert status == 400 and b"\xe9" not in body


def check_a_certificate_of_another_ca_is_refused(server, tmp_path):
    status, body, _ = server.get("/ota/x.bin", cert=_other_ca(tmp_path))
    assert status == 400 and b"\xe9" not in body


def check_a_revoked_certificate_is_refused_once_the_crl_is_deployed(server, tmp_path):
    image = tmp_path / "r.bin"
    image.write_bytes(b"\xe9revoke" * 10)
    shutil.copy(image, ROOT_DIR / "r.bin")
    assert server.get("/ota/r.bin", cert=server.device("dev-b"))[0] == 200
    revoke = {
        "name": "Revoke dev-b",
        "ansible.builtin.include_role": {"name": "esp32_fleet.mqtt_fleet.pki", "tasks_from": "revoke"},
        "vars": {"pki_revoke_device_ids": ["dev-b"]},
    }
    run = server.project.play([revoke], "revoke")
    assert run.rc == 0, run.output[-3000:]
    crl = {
        "name": "Deploy the CRL",
        "ansible.builtin.include_role": {"name": "esp32_fleet.mqtt_fleet.ota_server", "tasks_from": "crl"},
    }
    extra = {"ota_server_port": server.port, "ota_server_cert_dir": str(CERT_DIR)}
    refreshed = server.project.play([crl], "crl", extra=extra)
    assert refreshed.rc == 0 and refreshed.changed > 0, refreshed.output[-3000:]
    assert "Reload nginx and prove it" in refreshed.output
    status, body, _ = server.get("/ota/r.bin", cert=server.device("dev-b"))
    assert status == 400 and body != image.read_bytes()
    assert server.get("/ota/r.bin", cert=server.device("dev-a"))[:2] == (200, image.read_bytes())
    again = server.project.play([crl], "crl", extra=extra)
    assert again.rc == 0 and again.changed == 0, again.output[-3000:]


def _s_client(server, *args: str) -> subprocess.CompletedProcess:
    crt, key = server.device("dev-a")
    cmd = [
        "openssl",
        "s_client",
        "-connect",
        f"127.0.0.1:{server.port}",
        "-CAfile",
        str(server.pki / "ca" / "bundle.pem"),
    ]
    cmd += ["-cert", str(crt), "-key", str(key), "-verify_return_error", *args]
    return subprocess.run(cmd, input="", capture_output=True, text=True, timeout=TIMEOUT)


def check_tls_below_1_2_and_cbc_suites_are_refused(server):
    # SECLEVEL=0 lets this client offer TLS 1.1 and CBC suites: a refusal is then the server's.
    old = _s_client(server, "-tls1_1", "-cipher", "DEFAULT:@SECLEVEL=0")
    assert old.returncode != 0 and "Cipher is (NONE)" in old.stdout
    assert "alert protocol version" in old.stderr, old.stderr
    cbc = _s_client(server, "-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-SHA:@SECLEVEL=0")
    assert cbc.returncode != 0 and "handshake failure" in cbc.stderr, cbc.stderr
    # The same client with what the server allows: the refusals above are about the protocol.
    for version in ("-tls1_2", "-tls1_3"):
        ok = _s_client(server, version, "-cipher", "DEFAULT:@SECLEVEL=0")
        assert ok.returncode == 0 and "Verify return code: 0 (ok)" in ok.stdout, ok.stderr
    # Python's client pinned to TLS 1.1 (no certificate needed to be refused).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # that is the point
        ctx = server.context(maximum_version=ssl.TLSVersion.TLSv1_1, minimum_version=ssl.TLSVersion.TLSv1)
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    with (
        socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as raw,
        pytest.raises(ssl.SSLError, match=r"PROTOCOL_VERSION|UNSUPPORTED_PROTOCOL"),
    ):
        ctx.wrap_socket(raw, server_hostname="localhost")


def check_a_config_nginx_refuses_is_never_written(server, tmp_path):
    """A configuration nginx refuses (here: an unknown key-exchange group) fails the template's
    validate: the file on disk and the running server stay as they were."""
    conf = (NGINX_ETC / "nginx.conf").read_bytes()
    run = server.project.run(
        "--limit",
        "localhost",
        "-e",
        f"@{server.project.base / 'ota-vars.json'}",
        "-e",
        '{"ota_server_tls_groups": ["nosuchgroup"]}',
        playbook=ROOT / "playbooks" / "ota_server.yml",
    )
    assert run.rc != 0, run.output[-3000:]
    assert "failed to validate" in run.output and "nosuchgroup" in run.output, run.output[-3000:]
    assert (NGINX_ETC / "nginx.conf").read_bytes() == conf
    assert server.get("/ota/missing.bin", cert=server.device("dev-a"))[0] == 404


# One test function over one nginx: pytest-xdist spreads the functions of a module over its workers,
# and each worker would take the host's nginx over for its own copy of a module fixture. The checks
# run in this order (publishing, then revoking, build on each other) and each failure names its check.
CHECKS = [
    check_the_pki_issues_one_server_certificate_per_host_of_brokers_and_ota_servers,
    check_runs_change_then_settle,
    check_only_the_configured_port_listens_and_the_files_are_locked_down,
    check_a_fleet_certificate_downloads_the_published_image_exactly,
    check_publishing_the_next_image_removes_the_old_one_and_settles,
    check_only_files_of_the_image_directory_are_served,
    check_without_a_client_certificate_nothing_is_served,
    check_a_certificate_of_another_ca_is_refused,
    check_a_revoked_certificate_is_refused_once_the_crl_is_deployed,
    check_tls_below_1_2_and_cbc_suites_are_refused,
    check_a_config_nginx_refuses_is_never_written,
]


def test_the_image_server_on_this_host(server, tmp_path):
    for check in CHECKS:
        params = check.__code__.co_varnames[: check.__code__.co_argcount]
        sub = tmp_path / check.__name__
        sub.mkdir()
        check(*[server if p == "server" else sub for p in params])
