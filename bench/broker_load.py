#!/usr/bin/env python3
"""Mosquitto under the mosquitto role's shipped TLS configuration: connects/s and messages/s.

What it does, all on loopback and in a temporary directory (the project's pki/ is never touched):

1. Makes two throwaway PKIs with the `cryptography` library, shaped like the pki role's output: an
   ECDSA P-256 chain (the role's default) and an RSA chain (CA RSA-3072, leaves RSA-2048: the role's
   key sizes when pki_*_key_type is RSA), each with a server certificate for localhost/127.0.0.1,
   device client certificates and an empty CRL.
2. Renders the role's own templates (mosquitto.conf.j2, openssl.cnf.j2) and runs its tasks/acl.yml and
   tasks/passwords.yml (the mosquitto_password_file module, at the iterations the role uses) through
   ansible-playbook, with the role's defaults and vars files, after the role's tasks/assert.yml has
   accepted the benchmark's listeners. Only paths, listeners and users are overridden.
3. Starts /usr/sbin/mosquitto -c on that configuration as the unprivileged `mosquitto` user (when run
   as root) with OPENSSL_CONF pointing at the rendered openssl.cnf, once with each PKI, and measures:
   - connects/s: raw TCP (+ TLS) sockets and a minimal MQTT 3.1.1 CONNECT; one connect = TCP connect
     + full TLS handshake (a new session every time, no resumption: checked per connect) + CONNECT/
     CONNACK + DISCONNECT. Sequential, and N concurrent client threads. TLS 1.3 (what a client
     negotiates by default) and TLS 1.2 (what many embedded stacks use).
   - messages/s: paho-mqtt publisher -> broker -> paho-mqtt subscriber, QoS 0 and QoS 1, for a bounded
     count of 64-byte messages.
   - password check cost: connects/s and broker CPU per connect on the loopback plaintext listener
     with a password, against anonymous connects to the same listener (a second broker whose only
     change is `allow_anonymous true`, since the role refuses anonymous clients), at the role's PBKDF2
     iterations, at mosquitto_passwd's 101 and at 10000 (re-hashed with the role module's own hash
     function and loaded by SIGHUP). `--only-password` runs just this part.

Every measurement stops at a count or a time limit, whichever comes first. Writes
bench/results/broker.json, broker.md and broker.png (matplotlib) and prints the total run time.

Usage: .venv/bin/python bench/broker_load.py [--quick] [--only-password] [--clients 8] [--seconds 3]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import grp
import hashlib
import importlib.util
import ipaddress
import json
import os
import platform
import pwd
import secrets
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ROOT = Path(__file__).resolve().parents[1]
ROLE = ROOT / "roles" / "mosquitto"
BIN = Path(sys.executable).parent
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
RESULTS = ROOT / "bench" / "results"

# Listeners of the benchmark broker. Each is a listener the role accepts (its assert.yml checks them):
# the role refuses anonymous access everywhere, so "TLS without client certificates" is the password
# listener (the role's `applications` listener); TLS alone is tls_password against plain_password.
# The anonymous baseline ("plain_anon") is a second broker on the same rendered configuration with
# the one global line `allow_anonymous true`, reached on the plaintext listener without a username.
LISTENERS = {
    "plain_password": {"tls": False, "auth": "password"},
    "tls_password": {"tls": True, "auth": "password"},
    "tls_mtls": {"tls": True, "auth": "certificate"},
}
PKI_KINDS = ("ecdsa-p256", "rsa-2048")
APP_USER = "bench-app"
DEVICE_PUB, DEVICE_SUB = "bench-pub", "bench-sub"
PAYLOAD = bytes(64)
# Iterations next to the role's: mosquitto_passwd's default (what the role used before) and one between.
EXTRA_ITERATIONS = (101, 10000)
ANON_CONF = "mosquitto-anon.conf"


# --------------------------------------------------------------------------------------------- machine


def machine_info():
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mosq = subprocess.run([MOSQUITTO, "-h"], capture_output=True, text=True, check=False).stdout
    openssl_cli = subprocess.run(["openssl", "version"], capture_output=True, text=True, check=False)
    return {
        "hostname": platform.node(),
        "cores": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "mosquitto": mosq.splitlines()[0].strip() if mosq else "unknown",
        "openssl": openssl_cli.stdout.strip(),
        "python_ssl": ssl.OPENSSL_VERSION,
        "paho_mqtt": getattr(mqtt, "__version__", None) or _dist_version("paho-mqtt"),
        "loadavg_start": list(os.getloadavg()),
    }


def _dist_version(name):
    from importlib.metadata import version

    return version(name)


# ------------------------------------------------------------------------------------------------- PKI


def _key(kind, ca=False):
    if kind == "ecdsa-p256":
        return ec.generate_private_key(ec.SECP256R1())
    return rsa.generate_private_key(public_exponent=65537, key_size=3072 if ca else 2048)


def _name(cn):
    return x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "bench"), x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    )


def _pem_key(key):
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def make_pki(out, kind, device_names):
    """A CA, a server certificate for localhost, one client certificate per device and an empty CRL,
    with the extensions the pki role writes (strict chain validation needs them)."""
    out.mkdir(parents=True)
    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    ca_key = _key(kind, ca=True)
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("bench CA"))
        .issuer_name(_name("bench CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski)

    def leaf(cn, usage, san=None):
        key = _key(kind)
        # RSA key exchange is not among the role's suites; digitalSignature is all ECDHE needs.
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(cn))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True
            )
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(aki, critical=False)
        )
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        (out / f"{cn}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (out / f"{cn}.key").write_bytes(_pem_key(key))

    (out / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    leaf(
        "server",
        ExtendedKeyUsageOID.SERVER_AUTH,
        [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
    )
    for name in device_names:
        leaf(name, ExtendedKeyUsageOID.CLIENT_AUTH)
    crl = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.subject)
        .last_update(now)
        .next_update(now + dt.timedelta(days=2))
        .add_extension(aki, critical=False)
        .add_extension(x509.CRLNumber(1), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    (out / "crl.pem").write_bytes(crl.public_bytes(serialization.Encoding.PEM))


# -------------------------------------------------------------------------------- broker configuration


def free_ports(n):
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def render_config(tmp, ports, device_names, app_password):
    """The benchmark's listeners, user and ACL rendered by the role into tmp/etc (render_role)."""
    listeners = {
        name: {"port": port, "address": "127.0.0.1", "tls_version": "tlsv1.2", "state": "present", **settings}
        for (name, settings), port in zip(LISTENERS.items(), ports, strict=True)
    }
    users = [
        {"name": APP_USER, "password": app_password, "acl": [{"access": "readwrite", "topic": "bench/#"}]}
    ]
    acl_extra = [{"user": DEVICE_SUB, "access": "read", "topic": f"devices/{DEVICE_PUB}/#"}]
    proc = render_role(tmp, listeners, device_names, users, acl_extra)
    if proc.returncode != 0:
        raise SystemExit(
            f"rendering the role's configuration failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-2000:]}"
        )
    conf = (tmp / "etc" / "mosquitto.conf").read_text()
    if conf.count("\nallow_anonymous false\n") != 1:
        raise SystemExit("the role's mosquitto.conf no longer has one global allow_anonymous false line")
    (tmp / "etc" / ANON_CONF).write_text(
        conf.replace("\nallow_anonymous false\n", "\nallow_anonymous true\n")
    )
    return listeners


def render_role(tmp, listeners, device_names, users, acl_extra, extra_vars=None):
    """The role's templates and its acl/passwords task files through ansible-playbook into tmp/etc
    (certificates are expected in tmp/certs, the database goes to tmp/data), after the role's
    assert.yml accepted the inputs. Returns the finished ansible-playbook process. Also used by
    tests/broker/ to run real brokers on the role's configuration."""
    etc, certs, data = tmp / "etc", tmp / "certs", tmp / "data"
    for d in (etc, certs, data):
        d.mkdir(exist_ok=True)
    overrides = {
        "ansible_python_interpreter": sys.executable,
        # The role's own listeners are replaced, not combined: only the caller's listeners.
        "mosquitto_listeners": listeners,
        "mosquitto_listeners_custom": {},
        "mosquitto_users": users,
        "mosquitto_acl_extra": acl_extra,
        **(extra_vars or {}),
        "mosquitto_cert_dir": str(certs),
        # No revocation list: acl.yml reads <pki>/ca/revoked.yml, which this empty directory lacks.
        "mosquitto_pki_dir": str(tmp / "pki"),
        "__mosquitto_conf_dir": str(etc),
        "__mosquitto_persistence_dir": f"{data}/",
        "__mosquitto_log_file": str(tmp / "mosquitto.log"),
    }
    if os.geteuid() != 0:  # the role chowns to the broker's user, which only root may do
        overrides["__mosquitto_user"] = pwd.getpwuid(os.getuid()).pw_name
        overrides["__mosquitto_group"] = grp.getgrgid(os.getgid()).gr_name
    extra = tmp / "overrides.json"
    extra.touch(mode=0o600)
    extra.write_text(json.dumps(overrides))
    inventory = {
        "all": {
            "hosts": {"localhost": {"ansible_connection": "local"}},
            "children": {"esp32_devices": {"hosts": {n: {} for n in device_names}}},
        }
    }
    (tmp / "inventory.json").write_text(json.dumps(inventory))
    template = "ansible.builtin.template"
    tasks = [
        {
            "name": "Complete the listener settings with the role's own tasks",
            "ansible.builtin.include_tasks": str(ROLE / "tasks" / "listeners.yml"),
        },
        {
            "name": "Check the listeners with the role's rules",
            "ansible.builtin.include_tasks": str(ROLE / "tasks" / "assert.yml"),
        },
        {
            "name": "Write the broker configuration",
            template: {
                "src": "mosquitto.conf.j2",
                "dest": "{{ __mosquitto_conf_file }}",
                "mode": "0644",
            },
        },
        {
            "name": "Write the OpenSSL configuration",
            template: {
                "src": "openssl.cnf.j2",
                "dest": "{{ __mosquitto_openssl_conf }}",
                "mode": "0644",
            },
        },
        # The ACL and password files come from the role's own task files (they only write files under
        # the overridden paths; their notifications reach the no-op handlers below). config.yml is not
        # included because it also edits the service's unit or init script.
        {"name": "Write the ACL file", "ansible.builtin.include_tasks": str(ROLE / "tasks" / "acl.yml")},
        {
            "name": "Write the password file",
            "ansible.builtin.include_tasks": str(ROLE / "tasks" / "passwords.yml"),
        },
    ]
    play = {
        "name": "Render the mosquitto role's configuration for the broker benchmark",
        "hosts": "localhost",
        "gather_facts": False,
        "vars_files": [
            str(ROLE / "defaults" / "main.yml"),
            str(ROLE / "vars" / "main.yml"),
            str(ROLE / "vars" / "Debian.yml"),
        ],
        "tasks": tasks,
        "handlers": [
            {"name": name, "ansible.builtin.debug": {"msg": "the benchmark starts its own broker later"}}
            for name in ("Reload mosquitto", "Restart mosquitto")
        ],
    }
    (tmp / "render.yml").write_text(json.dumps([play]))
    # The role's task files name their templates relatively; outside a role, ansible looks for them
    # next to the playbook.
    if not (tmp / "templates").exists():
        (tmp / "templates").symlink_to(ROLE / "templates")
    env = dict(
        os.environ,
        ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"),
        ANSIBLE_LOCALHOST_WARNING="false",
    )
    cmd = [
        str(BIN / "ansible-playbook"),
        "-i",
        str(tmp / "inventory.json"),
        "-e",
        f"@{extra}",
        str(tmp / "render.yml"),
    ]
    proc = subprocess.run(cmd, env=env, cwd=tmp, capture_output=True, text=True, timeout=600, check=False)
    extra.unlink()
    return proc


def role_iterations():
    """The PBKDF2 iterations the role hashes with: mosquitto_password_iterations' default."""
    task = (ROLE / "tasks" / "passwords.yml").read_text()
    if 'iterations: "{{ mosquitto_password_iterations }}"' not in task:
        raise SystemExit(
            "roles/mosquitto/tasks/passwords.yml changed how it sets iterations: update the benchmark"
        )
    import yaml

    return int(yaml.safe_load((ROLE / "defaults" / "main.yml").read_text())["mosquitto_password_iterations"])


def _password_module():
    spec = importlib.util.spec_from_file_location(
        "mosquitto_password_file", ROOT / "plugins" / "modules" / "mosquitto_password_file.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Broker:
    """One throwaway mosquitto process on the rendered configuration; only this PID is ever signalled."""

    def __init__(self, tmp, ports, conf="mosquitto.conf"):
        self.tmp, self.ports, self.conf = tmp, ports, conf
        self.proc = None

    def __enter__(self):
        cmd = [MOSQUITTO, "-c", str(self.tmp / "etc" / self.conf)]
        if os.geteuid() == 0:
            # Run as the broker's own unprivileged user, as the service would after dropping root.
            user = pwd.getpwnam("mosquitto")
            cmd = ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups", *cmd]
            for path in [self.tmp, *self.tmp.rglob("*")]:
                os.chown(path, user.pw_uid, user.pw_gid)
        env = dict(os.environ, OPENSSL_CONF=str(self.tmp / "etc" / "openssl.cnf"))
        self.proc = subprocess.Popen(
            cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        deadline = time.monotonic() + 30
        pending = set(self.ports)
        while pending:
            if self.proc.poll() is not None:
                raise SystemExit(
                    f"mosquitto exited ({self.proc.returncode}): {self.proc.stderr.read()}{self.log()}"
                )
            if time.monotonic() > deadline:
                self.__exit__()
                raise SystemExit(f"mosquitto did not listen on {sorted(pending)} within 30 s{self.log()}")
            for port in list(pending):
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                    pending.discard(port)
            time.sleep(0.05)
        return self

    def reload(self):
        self.proc.send_signal(signal.SIGHUP)
        time.sleep(1)  # the broker re-reads the password file between two network loop passes

    def log(self):
        path = self.tmp / "mosquitto.log"
        return "\n" + path.read_text()[-3000:] if path.exists() else ""

    def __exit__(self, *exc):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# --------------------------------------------------------------------------------------- connect rate


def proc_cpu(pid):
    """CPU seconds (user + system) a process has used so far, from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU time of the broker and of this process (all client threads) over a measurement: unlike
    rates, it barely moves when other work shares the machine."""

    def __init__(self, broker_pid):
        self.pid = broker_pid

    def __enter__(self):
        self.b0, self.c0 = proc_cpu(self.pid), time.process_time()
        return self

    def __exit__(self, *exc):
        self.broker = proc_cpu(self.pid) - self.b0
        self.client = time.process_time() - self.c0

    def per(self, n):
        return {
            "broker_cpu_ms_per_op": round(self.broker * 1e3 / n, 3) if n else None,
            "client_cpu_ms_per_op": round(self.client * 1e3 / n, 3) if n else None,
        }


def _utf8(s):
    b = s.encode()
    return struct.pack("!H", len(b)) + b


def connect_packet(username=None, password=None):
    """MQTT 3.1.1 CONNECT, clean session, empty client id (the broker assigns one, or the CN on mTLS)."""
    flags = 0x02 | (0x80 if username else 0) | (0x40 if password else 0)
    body = _utf8("MQTT") + bytes([4, flags]) + struct.pack("!H", 30) + _utf8("")
    if username:
        body += _utf8(username)
    if password:
        body += _utf8(password)
    assert len(body) < 128  # one-byte remaining length
    return bytes([0x10, len(body)]) + body


DISCONNECT = b"\xe0\x00"


def _recv_exact(sock, n):
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("connection closed before CONNACK")
        data += chunk
    return data


class Target:
    """How to reach one listener: port, TLS context (None = plaintext) and the CONNECT to send."""

    def __init__(self, port, ctx=None, packet=None):
        self.port, self.ctx, self.packet = port, ctx, packet or connect_packet()

    def connect_once(self):
        raw = socket.create_connection(("127.0.0.1", self.port), timeout=30)
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock = self.ctx.wrap_socket(raw, server_hostname="localhost") if self.ctx else raw
            if self.ctx and sock.session_reused:
                raise RuntimeError("TLS session was resumed: the benchmark measures full handshakes only")
            sock.sendall(self.packet)
            ack = _recv_exact(sock, 4)
            if ack[0] != 0x20 or ack[3] != 0:
                raise RuntimeError(f"CONNACK refused: {ack.hex()}")
            sock.sendall(DISCONNECT)
        finally:
            raw.close()


def tls_context(pki, version, client=None):
    ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    ctx.minimum_version = ctx.maximum_version = version
    if client:
        ctx.load_cert_chain(str(pki / f"{client}.crt"), str(pki / f"{client}.key"))
    return ctx


def connect_rate(broker_pid, targets, seconds, max_count):
    """Connects/s with one thread per target (sequential when one), stopping at seconds or max_count."""
    for t in targets:  # warm-up: page in code paths, fail early on a misconfiguration
        for _ in range(3):
            t.connect_once()
    lock = threading.Lock()
    state = {"done": 0, "errors": 0, "first_error": None}
    barrier = threading.Barrier(len(targets) + 1)
    stop_at = [0.0]

    def worker(target):
        barrier.wait()
        while time.perf_counter() < stop_at[0]:
            with lock:
                if state["done"] + state["errors"] >= max_count:
                    return
            try:
                target.connect_once()
                ok = True
            except (OSError, RuntimeError, ConnectionError) as exc:
                ok = False
                err = f"{type(exc).__name__}: {exc}"
            with lock:
                if ok:
                    state["done"] += 1
                else:
                    state["errors"] += 1
                    state["first_error"] = state["first_error"] or err

    threads = [threading.Thread(target=worker, args=(t,), daemon=True) for t in targets]
    for th in threads:
        th.start()
    with CpuMeter(broker_pid) as cpu:
        start = time.perf_counter()
        stop_at[0] = start + seconds
        barrier.wait()
        for th in threads:
            th.join(timeout=seconds + 120)
        elapsed = time.perf_counter() - start
    return {
        **cpu.per(state["done"]),
        "connects": state["done"],
        "errors": state["errors"],
        "first_error": state["first_error"],
        "seconds": round(elapsed, 3),
        "per_s": round(state["done"] / elapsed, 1),
    }


# --------------------------------------------------------------------------------------- message rate


def _client(name, port, ctx, username=None, password=None):
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=name, protocol=mqtt.MQTTv311)
    if ctx:
        c.tls_set_context(ctx)
    if username:
        c.username_pw_set(username, password)
    connected = threading.Event()
    c.on_connect = lambda client, userdata, flags, rc, props: rc == 0 and connected.set()
    c.connect("127.0.0.1", port, keepalive=60)
    c.loop_start()
    if not connected.wait(30):
        c.loop_stop()
        raise SystemExit(f"{name}: no CONNACK from port {port}")
    return c


def message_rate(broker_pid, port, topic, qos, count, seconds, pub_kw, sub_kw):
    """Publish `count` messages and time them until the subscriber has them all (or time is up)."""
    state = {"n": 0, "last": 0.0}
    done = threading.Event()
    subscribed = threading.Event()
    sub = _client("bench-sub", port, **sub_kw)
    pub = _client("bench-pub", port, **pub_kw)
    try:

        def on_message(client, userdata, msg):
            state["n"] += 1
            state["last"] = time.perf_counter()
            if state["n"] >= count:
                done.set()

        sub.on_message = on_message
        sub.on_subscribe = lambda *a: subscribed.set()
        sub.subscribe(topic, qos=qos)
        if not subscribed.wait(30):
            raise SystemExit(f"no SUBACK for {topic}")
        time.sleep(0.2)
        with CpuMeter(broker_pid) as cpu:
            start = time.perf_counter()
            deadline = start + seconds
            sent = 0
            for _ in range(count):
                if time.perf_counter() > deadline:
                    break
                info = pub.publish(topic, PAYLOAD, qos=qos)
                if info.rc != mqtt.MQTT_ERR_SUCCESS:
                    raise SystemExit(f"publish failed: {mqtt.error_string(info.rc)}")
                sent += 1
            done.wait(max(deadline - time.perf_counter(), 0) + 5)
        received, last = state["n"], state["last"]
        elapsed = (last - start) if received else float("nan")
        return {
            **cpu.per(received),
            "sent": sent,
            "received": received,
            "seconds": round(elapsed, 3),
            "per_s": round(received / elapsed, 1) if received else 0.0,
        }
    finally:
        for c in (pub, sub):
            c.disconnect()
            c.loop_stop()


def config_checks(kind, pki, port, pw_packet):
    """Proof that the broker under test runs the shipped settings: the groups from openssl.cnf
    (X448 refused), client certificates required on the mTLS listener, passwords enforced."""
    out = {}
    x448 = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{port['tls_password']}", "-groups", "X448", "-brief"],
        input="",
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    out[f"{kind}: X448-only client refused (openssl.cnf groups in effect)"] = x448.returncode != 0
    try:
        Target(port["tls_mtls"], tls_context(pki, ssl.TLSVersion.TLSv1_3)).connect_once()
        out[f"{kind}: mTLS listener refuses a client without certificate"] = False
    except (OSError, RuntimeError, ConnectionError):
        out[f"{kind}: mTLS listener refuses a client without certificate"] = True
    try:
        Target(port["plain_password"], packet=connect_packet(APP_USER, "wrong-password")).connect_once()
        out[f"{kind}: password listener refuses a wrong password"] = False
    except (OSError, RuntimeError, ConnectionError):
        out[f"{kind}: password listener refuses a wrong password"] = True
    try:
        Target(port["plain_password"]).connect_once()
        out[f"{kind}: password listener refuses an anonymous client"] = False
    except (OSError, RuntimeError, ConnectionError):
        out[f"{kind}: password listener refuses an anonymous client"] = True
    Target(port["plain_password"], packet=pw_packet).connect_once()
    failed = [name for name, ok in out.items() if not ok]
    if failed:
        raise SystemExit(f"the benchmark broker does not behave as configured: {failed}")
    return out


# ----------------------------------------------------------------------------------------------- main


def _connect_row(kind, listener, version, mode, n, r):
    row = {"pki": kind, "listener": listener, "tls": version or "none", "mode": mode, "clients": n, **r}
    print(
        f"  connect {kind:10} {listener:15} {row['tls']:8} {mode:10} x{n}: {r['per_s']:8.1f}/s "
        f"({r['connects']} in {r['seconds']} s, {r['errors']} errors; CPU ms/connect broker "
        f"{r['broker_cpu_ms_per_op']}, clients {r['client_cpu_ms_per_op']})",
        flush=True,
    )
    return row


def run_kind(kind, tmp, listeners, device_names, app_password, args, iterations):
    pki = tmp / "pki" / kind
    for name in ("ca.crt", "crl.pem"):
        shutil.copyfile(pki / name, tmp / "certs" / name)
    shutil.copyfile(pki / "server.crt", tmp / "certs" / "server.crt")
    shutil.copyfile(pki / "server.key", tmp / "certs" / "server.key")
    port = {name: spec["port"] for name, spec in listeners.items()}
    pw_packet = connect_packet(APP_USER, app_password)
    versions = {"TLSv1.3": ssl.TLSVersion.TLSv1_3, "TLSv1.2": ssl.TLSVersion.TLSv1_2}
    connects, messages, password, checks = [], [], [], {}
    modes = (("sequential", 1), ("concurrent", args.clients))
    # The anonymous baseline first, on its own broker (the role's configuration refuses anonymous
    # clients): the plaintext listener, a CONNECT without username.
    with Broker(tmp, list(port.values()), conf=ANON_CONF) as anon:
        for mode, n in modes:
            r = connect_rate(
                anon.proc.pid,
                [Target(port["plain_password"]) for _ in range(n)],
                args.seconds,
                args.max_connects,
            )
            connects.append(_connect_row(kind, "plain_anon", None, mode, n, r))
    with Broker(tmp, list(port.values())) as broker:

        def targets(listener, version, n):
            if listener == "plain_password":
                return [Target(port[listener], packet=pw_packet) for _ in range(n)]
            if listener == "tls_password":
                return [
                    Target(port[listener], tls_context(pki, versions[version]), pw_packet) for _ in range(n)
                ]
            # Distinct devices: the CN is the client id, and one id connecting twice evicts the other.
            return [
                Target(port[listener], tls_context(pki, versions[version], device_names[i])) for i in range(n)
            ]

        checks.update(config_checks(kind, pki, port, pw_packet))
        cells = [] if args.only_password else [("plain_password", None)]
        cells += (
            [] if args.only_password else [(lst, v) for lst in ("tls_password", "tls_mtls") for v in versions]
        )
        for listener, version in cells:
            for mode, n in modes:
                r = connect_rate(
                    broker.proc.pid, targets(listener, version, n), args.seconds, args.max_connects
                )
                connects.append(_connect_row(kind, listener, version, mode, n, r))

        app = {"username": APP_USER, "password": app_password}
        msg_cells = [
            ("plain_password", "bench/load", {"ctx": None, **app}, {"ctx": None, **app}),
            (
                "tls_password",
                "bench/load",
                {"ctx": tls_context(pki, versions["TLSv1.3"]), **app},
                {"ctx": tls_context(pki, versions["TLSv1.3"]), **app},
            ),
            (
                "tls_mtls",
                f"devices/{DEVICE_PUB}/load",
                {"ctx": tls_context(pki, versions["TLSv1.3"], DEVICE_PUB)},
                {"ctx": tls_context(pki, versions["TLSv1.3"], DEVICE_SUB)},
            ),
        ]
        for listener, topic, pub_kw, sub_kw in [] if args.only_password else msg_cells:
            for qos in (0, 1):
                count = args.messages if qos == 0 else args.messages // 4
                r = message_rate(
                    broker.proc.pid, port[listener], topic, qos, count, args.message_seconds, pub_kw, sub_kw
                )
                row = {"pki": kind, "listener": listener, "qos": qos, "payload_bytes": len(PAYLOAD), **r}
                messages.append(row)
                print(
                    f"  message {kind:10} {listener:15} QoS {qos}: {r['per_s']:9.1f}/s "
                    f"({r['received']}/{r['sent']} in {r['seconds']} s; CPU ms/message broker "
                    f"{r['broker_cpu_ms_per_op']}, clients {r['client_cpu_ms_per_op']})",
                    flush=True,
                )

        if kind == PKI_KINDS[0]:
            # Password cost does not depend on the server certificate: measured once, on plaintext so
            # that TLS does not hide it. The role's iterations first, from the file the role wrote.
            mpf = _password_module()
            pwfile = tmp / "etc" / "passwd"
            role_file = pwfile.read_text()
            for its in (iterations, *(EXTRA_ITERATIONS[:1] if args.quick else EXTRA_ITERATIONS)):
                if its != iterations:
                    pwfile.write_text(mpf.render([(APP_USER, mpf.hash_password(app_password, its))]))
                    broker.reload()
                [(_, encoded)] = mpf.parse(pwfile.read_text())
                assert encoded.split("$")[2] == str(its), encoded
                # CPU time, not wall time: one hash costs the same however busy the machine is.
                t0 = time.process_time()
                reps = max(5, 20000 // its)
                for _ in range(reps):
                    hashlib.pbkdf2_hmac("sha512", app_password.encode(), b"0123456789ab", its)
                hash_us = (time.process_time() - t0) / reps * 1e6
                for mode, n in (("sequential", 1), ("concurrent", args.clients)):
                    r = connect_rate(
                        broker.proc.pid,
                        [Target(port["plain_password"], packet=pw_packet) for _ in range(n)],
                        args.seconds,
                        args.max_connects,
                    )
                    row = {
                        "iterations": its,
                        "role_default": its == iterations,
                        "mode": mode,
                        "clients": n,
                        "pbkdf2_sha512_us_python": round(hash_us, 1),
                        **r,
                    }
                    password.append(row)
                    # What one password login costs the broker on top of an anonymous connect.
                    base = next(c for c in connects if c["listener"] == "plain_anon" and c["mode"] == mode)
                    extra = r["broker_cpu_ms_per_op"] - base["broker_cpu_ms_per_op"]
                    print(
                        f"  password iterations {its:6} {mode:10} x{n}: {r['per_s']:8.1f} connects/s "
                        f"(anonymous {base['per_s']:.1f}/s); broker CPU {r['broker_cpu_ms_per_op']:.2f} "
                        f"ms/connect, {extra:.2f} ms more than anonymous; PBKDF2 {hash_us:.0f} us in Python",
                        flush=True,
                    )
            # The next broker (a new process, so no reload needed) reads the role's own file again.
            pwfile.write_text(role_file)
    return connects, messages, password, checks


def _ratio(a, b):
    return round(a / b, 2) if a is not None and b else None


def add_ratios(results):
    for row in results["connects"]:
        base = next(
            r
            for r in results["connects"]
            if r["pki"] == row["pki"] and r["listener"] == "plain_anon" and r["mode"] == row["mode"]
        )
        row["ratio_to_plain"] = round(row["per_s"] / base["per_s"], 3) if base["per_s"] else None
        row["broker_cpu_ratio_to_plain"] = _ratio(row["broker_cpu_ms_per_op"], base["broker_cpu_ms_per_op"])
    for row in results["messages"]:
        base = next(
            r
            for r in results["messages"]
            if r["pki"] == row["pki"] and r["listener"] == "plain_password" and r["qos"] == row["qos"]
        )
        row["ratio_to_plain"] = round(row["per_s"] / base["per_s"], 3) if base["per_s"] else None
    for row in results["password"]:
        base = next(
            r
            for r in results["connects"]
            if r["pki"] == PKI_KINDS[0] and r["listener"] == "plain_anon" and r["mode"] == row["mode"]
        )
        row["ratio_to_anonymous"] = round(row["per_s"] / base["per_s"], 3) if base["per_s"] else None
        row["broker_cpu_ratio_to_anonymous"] = _ratio(
            row["broker_cpu_ms_per_op"], base["broker_cpu_ms_per_op"]
        )


def _ms(v):
    return "n/a" if v is None else f"{v:.2f}"


def _us(v):
    return "n/a" if v is None else f"{v * 1e3:.0f}"


def write_markdown(results, path):
    m = results["machine"]
    s = results["settings"]
    lines = [
        "## Broker benchmark results",
        "",
        f"Machine: {m['cores']} cores, {m['cpu_model']}, {m['mosquitto']}, {m['openssl']}; load average "
        f"{' / '.join(f'{x:.2f}' for x in m['loadavg_start'])} at start, "
        f"{' / '.join(f'{x:.2f}' for x in m['loadavg_end'])} at end. Run {results['started']}, "
        f"{results['runtime_s']} s{' (--quick)' if s['quick'] else ''}.",
        "",
        f"Connects: {s['seconds']} s or {s['max_connects']} connects per cell; concurrent = {s['clients']} "
        "client threads. One connect = TCP + full TLS handshake (no resumption) + MQTT CONNECT/CONNACK + "
        "DISCONNECT. Ratios = to the plaintext anonymous listener of the same broker run. Rates depend on "
        "what else runs on the machine; broker CPU per connect much less so (see the load average above).",
        "",
        "| server cert | listener | TLS | mode | connects/s | ratio to plain | broker CPU ms/connect "
        "| broker CPU vs plain | client CPU ms/connect | errors |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["connects"]:
        lines.append(
            f"| {r['pki']} | {r['listener']} | {r['tls']} | {r['mode']} (x{r['clients']}) | "
            f"{r['per_s']:.0f} | {r['ratio_to_plain']:.3f} | {_ms(r['broker_cpu_ms_per_op'])} | "
            f"{_ms(r['broker_cpu_ratio_to_plain'])} | {_ms(r['client_cpu_ms_per_op'])} | {r['errors']} |"
        )
    lines += [
        "",
        f"Messages: {len(PAYLOAD)}-byte payloads, paho-mqtt publisher → broker → paho-mqtt subscriber "
        f"(TLS 1.3), QoS 0 up to {s['messages']}, QoS 1 up to {s['messages'] // 4} messages "
        f"or {s['message_seconds']} s. "
        "Ratio = to plaintext with a password.",
        "",
        "| server cert | listener | QoS | received/sent | messages/s | ratio to plain "
        "| broker CPU µs/message | client CPU µs/message |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["messages"]:
        lines.append(
            f"| {r['pki']} | {r['listener']} | {r['qos']} | {r['received']}/{r['sent']} | "
            f"{r['per_s']:.0f} | {r['ratio_to_plain']:.3f} | {_us(r['broker_cpu_ms_per_op'])} | "
            f"{_us(r['client_cpu_ms_per_op'])} |"
        )
    lines += [
        "",
        "Password check cost (plaintext loopback listener, so that TLS does not hide it; ratio = to "
        "anonymous connects on the same kind of listener):",
        "",
        "| PBKDF2-SHA512 iterations | mode | connects/s | ratio to anonymous | broker CPU ms/connect "
        "| broker CPU vs anonymous | one hash in Python (µs) |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in results["password"]:
        tag = " (role)" if r["role_default"] else ""
        lines.append(
            f"| {r['iterations']}{tag} | {r['mode']} (x{r['clients']}) | {r['per_s']:.0f} | "
            f"{r['ratio_to_anonymous']:.3f} | {_ms(r['broker_cpu_ms_per_op'])} | "
            f"{_ms(r['broker_cpu_ratio_to_anonymous'])} | "
            f"{r['pbkdf2_sha512_us_python']:.0f} |"
        )
    lines += ["", "Checks on the broker under test (the benchmark stops if one fails):", ""]
    lines += [f"- {name}: {'yes' if ok else 'NO'}" for name, ok in results["checks"].items()]
    path.write_text("\n".join(lines) + "\n")


def _grouped_bars(ax, rows, label_of, series_of, value, title, ylabel, log=False):
    labels, series = [], {}
    for r in rows:
        if r.get(value) is None:
            continue
        label = label_of(r)
        if label not in labels:
            labels.append(label)
        series.setdefault(series_of(r), {})[label] = r[value]
    width = 0.8 / max(len(series), 1)
    for i, (key, vals) in enumerate(series.items()):
        xs = [j + i * width for j in range(len(labels))]
        ax.bar(xs, [vals.get(lbl, 0) for lbl in labels], width, label=key)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(labels))], labels, fontsize=7)
    if log:
        ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)


def write_chart(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(15, 9), gridspec_kw={"width_ratios": [3, 2]})

    def conn_label(r):
        return r["listener"] + ("" if r["tls"] == "none" else f"\n{r['tls']}")

    def conn_series(r):
        return f"{r['pki']} {r['mode']}"

    def msg_label(r):
        return f"{r['listener']}\nQoS {r['qos']}"

    _grouped_bars(
        axes[0][0],
        results["connects"],
        conn_label,
        conn_series,
        "per_s",
        "MQTT connects/s (TCP + full TLS handshake + CONNECT/CONNACK + DISCONNECT)",
        "connects/s (log)",
        log=True,
    )
    _grouped_bars(
        axes[1][0],
        results["connects"],
        conn_label,
        conn_series,
        "broker_cpu_ms_per_op",
        "Broker CPU per connect (steadier than rates on a shared machine)",
        "ms",
        log=True,
    )
    _grouped_bars(
        axes[0][1],
        results["messages"],
        msg_label,
        lambda r: r["pki"],
        "per_s",
        f"{len(PAYLOAD)}-byte messages/s, publisher → subscriber",
        "messages/s",
    )
    _grouped_bars(
        axes[1][1],
        results["messages"],
        msg_label,
        lambda r: r["pki"],
        "broker_cpu_ms_per_op",
        "Broker CPU per message",
        "ms",
    )
    m = results["machine"]
    load = " / ".join(f"{x:.1f}" for x in m["loadavg_start"])
    fig.suptitle(
        f"mosquitto role's TLS config: {m['mosquitto']}, {m['cores']} cores {m['cpu_model']}, "
        f"load average {load} at start",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_outputs(results, out):
    out.mkdir(parents=True, exist_ok=True)
    (out / "broker.json").write_text(json.dumps(results, indent=2) + "\n")
    write_markdown(results, out / "broker.md")
    write_chart(results, out / "broker.png")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a ~30 s smoke run with short cells")
    ap.add_argument("--clients", type=int, default=8, help="concurrent client threads (default 8)")
    ap.add_argument("--seconds", type=float, help="time limit per connect cell (default 3, quick 0.3)")
    ap.add_argument("--max-connects", type=int, help="count limit per connect cell (default 6000)")
    ap.add_argument(
        "--messages", type=int, help="QoS 0 messages per cell; QoS 1 gets a quarter (default 10000)"
    )
    ap.add_argument(
        "--only-password",
        action="store_true",
        help="only the password check cost and its anonymous baseline; writes broker_password.json",
    )
    ap.add_argument("--out", type=Path, default=RESULTS, help="results directory (default bench/results)")
    ap.add_argument(
        "--replot", action="store_true", help="only rewrite broker.md and broker.png from broker.json"
    )
    args = ap.parse_args()
    if args.replot:
        results = json.loads((args.out / "broker.json").read_text())
        add_ratios(results)
        write_outputs(results, args.out)
        print(f"rewrote {args.out}/broker.md and broker.png from broker.json")
        return
    args.seconds = args.seconds or (0.3 if args.quick else 3.0)
    args.max_connects = args.max_connects or (1000 if args.quick else 6000)
    args.messages = args.messages or (1000 if args.quick else 10000)
    args.message_seconds = 3.0 if args.quick else 6.0
    if not os.path.exists(MOSQUITTO):
        raise SystemExit(f"{MOSQUITTO} not found: install the Debian package mosquitto")
    # A TERM (timeout, CI cancel) unwinds like Ctrl-C, so the broker is stopped and the temp dir removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.perf_counter()
    results = {
        "started": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": machine_info(),
        "settings": {
            k: getattr(args, k)
            for k in ("quick", "clients", "seconds", "max_connects", "messages", "message_seconds")
        },
        "method": {
            "connect": "raw socket + ssl module, minimal MQTT 3.1.1 CONNECT, clean session, "
            "no TLS session resumption",
            "messages": "paho-mqtt 2 publisher and subscriber threads in this process, MQTT 3.1.1, "
            "TLS 1.3 on TLS listeners",
            "config": "the role's templates, acl/passwords task files and assert.yml run by ansible-playbook "
            "with the role's defaults and vars files",
        },
        "connects": [],
        "messages": [],
        "password": [],
        "checks": {},
    }
    m = results["machine"]
    print(
        f"machine: {m['cores']} cores, {m['cpu_model']}, {m['mosquitto']}, {m['openssl']}, "
        f"load {m['loadavg_start']}"
    )
    device_names = [DEVICE_PUB, DEVICE_SUB] + [f"bench-dev-{i:02d}" for i in range(args.clients)]
    iterations = role_iterations()
    results["settings"]["role_password_iterations"] = iterations
    with tempfile.TemporaryDirectory(prefix="broker-bench-") as d:
        tmp = Path(d)
        for kind in PKI_KINDS:
            make_pki(tmp / "pki" / kind, kind, device_names)
        app_password = secrets.token_urlsafe(18)
        listeners = render_config(tmp, free_ports(len(LISTENERS)), device_names, app_password)
        results["settings"]["listeners"] = {
            n: {k: v for k, v in s.items() if k != "state"} for n, s in listeners.items()
        }
        results["rendered_config"] = (tmp / "etc" / "mosquitto.conf").read_text()
        print(
            f"config rendered from roles/mosquitto in {time.perf_counter() - started:.1f} s; "
            f"password iterations (role): {iterations}"
        )
        for kind in PKI_KINDS[:1] if args.only_password else PKI_KINDS:
            c, msgs, pw, checks = run_kind(kind, tmp, listeners, device_names, app_password, args, iterations)
            results["connects"] += c
            results["messages"] += msgs
            results["password"] += pw
            results["checks"].update(checks)
    add_ratios(results)
    results["machine"]["loadavg_end"] = list(os.getloadavg())
    results["runtime_s"] = round(time.perf_counter() - started, 1)
    if args.only_password:  # a part of the run: the full results files stay as they are
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "broker_password.json").write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.out}/broker_password.json; total run time {results['runtime_s']} s")
        return
    write_outputs(results, args.out)
    print(f"wrote {args.out}/broker.json, broker.md, broker.png; total run time {results['runtime_s']} s")


if __name__ == "__main__":
    main()
