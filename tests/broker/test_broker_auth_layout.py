"""The broker's authentication layout, on a real mosquitto running the configuration the role renders
(its templates, ACL and password task files, through ansible-playbook: bench/broker_load.py's
render_role). This host's mosquitto is Debian 12's 2.0.11; molecule/default runs the same rules on
Debian 13's 2.0.21.

Security settings are global (per_listener_settings false, so that messages queued for an offline
client are kept: eclipse-mosquitto/mosquitto#2618), and these tests prove that devices and users stay
apart anyway: devices by certificate only (identity = CN, client id forced), users by password only,
nobody anonymously, the ACLs as before, and sessions, queued and retained messages survive restarts.
"""

from __future__ import annotations

import importlib.util
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 20
DEV_A, DEV_B = "esp32-dev-a", "esp32-dev-b"
USER, PASSWORD = "fleet-monitor", "monitor-test-password"  # test-only secret


def _bench():
    spec = importlib.util.spec_from_file_location("broker_load", ROOT / "bench" / "broker_load.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _bench()


def _listeners(ports):
    """The role's three listener kinds, as molecule/default enables them (all on loopback here)."""
    devices, apps, plain = ports
    return {
        "devices": {"port": devices, "address": "127.0.0.1", "tls": True, "auth": "certificate"},
        "applications": {"port": apps, "address": "127.0.0.1", "tls": True, "auth": "password"},
        "plaintext": {"port": plain, "address": "127.0.0.1", "tls": False, "auth": "password"},
    }


# The monitor reads every device and may send commands to B only.
USERS = [
    {
        "name": USER,
        "password": PASSWORD,
        "acl": [
            {"access": "read", "topic": "devices/#"},
            {"access": "write", "topic": f"devices/{DEV_B}/cmd"},
        ],
    }
]


class Site:
    """A temp dir with a PKI, the role's rendered configuration and a broker that can be restarted."""

    def __init__(self, tmp):
        self.tmp = tmp
        self.pki = tmp / "pki" / "ecdsa"
        bench.make_pki(self.pki, "ecdsa-p256", [DEV_A, DEV_B])
        certs = tmp / "certs"
        certs.mkdir()
        for name in ("ca.crt", "crl.pem", "server.crt", "server.key"):
            shutil.copyfile(self.pki / name, certs / name)
        self.ports = bench.free_ports(3)
        self.listeners = _listeners(self.ports)
        proc = bench.render_role(tmp, self.listeners, [DEV_A, DEV_B], USERS, [])
        assert proc.returncode == 0, proc.stdout[-3000:]
        self.conf = (tmp / "etc" / "mosquitto.conf").read_text()
        self.broker = bench.Broker(tmp, self.ports)

    @property
    def devices(self):
        return self.ports[0]

    @property
    def apps(self):
        return self.ports[1]

    @property
    def plain(self):
        return self.ports[2]

    def cert(self, name):
        return str(self.pki / f"{name}.crt"), str(self.pki / f"{name}.key")

    def context(self, cert=None, version=None):
        ctx = ssl.create_default_context(cafile=str(self.pki / "ca.crt"))
        if version:
            ctx.minimum_version = ctx.maximum_version = version
        if cert:
            ctx.load_cert_chain(*self.cert(cert))
        return ctx

    def restart(self):
        self.broker.__exit__()  # SIGTERM: a clean stop, which saves the database
        self.broker.__enter__()


@pytest.fixture(scope="module")
def site():
    # Not pytest's tmp_path: its parent is private to root, and the broker runs as user mosquitto.
    with tempfile.TemporaryDirectory(prefix="broker-auth-") as d:
        s = Site(Path(d))
        with s.broker:
            yield s


class Client:
    """A synchronous MQTT v5 client: CONNACK reason code, SUBACK/PUBACK codes, messages, disconnects."""

    def __init__(self, site, port, cert=None, username=None, password=None, tls=True, client_id=None,
                 persistent=False):  # fmt: skip
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=client_id or f"t-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv5,
        )  # fmt: skip
        if tls:
            self.client.tls_set_context(site.context(cert))
        if username is not None:
            self.client.username_pw_set(username, password)
        self.port, self.persistent = port, persistent
        self.connack = None
        self.session_present = None
        self.acked, self.messages, self.retained, self.disconnects = {}, [], [], []
        self.connected = threading.Event()
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda c, u, mid, codes, p: self.acked.__setitem__(mid, codes[0])
        self.client.on_publish = lambda c, u, mid, code, p: self.acked.__setitem__(mid, code)
        self.client.on_message = self._on_message
        self.client.on_disconnect = lambda c, u, flags, rc, p: self.disconnects.append(rc)

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        self.connack, self.session_present = reason_code, flags.session_present
        self.connected.set()

    def _on_message(self, client, userdata, msg):
        self.messages.append((msg.topic, msg.payload))
        if msg.retain:
            self.retained.append((msg.topic, msg.payload))

    def __enter__(self):
        props = None
        if self.persistent:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 3600
        self.client.connect("127.0.0.1", self.port, clean_start=not self.persistent, properties=props)
        self.client.loop_start()
        assert self.connected.wait(TIMEOUT), "no CONNACK"
        return self

    def __exit__(self, *exc):
        self.client.disconnect()
        self.client.loop_stop()

    def _wait(self, mid):
        assert wait_for(lambda: mid in self.acked), f"no acknowledgement for message id {mid}"
        return self.acked[mid]

    def subscribe(self, topic):
        return self._wait(self.client.subscribe(topic, qos=1)[1])

    def publish(self, topic, payload, retain=False):
        return self._wait(self.client.publish(topic, payload, qos=1, retain=retain).mid)


def wait_for(predicate, timeout=TIMEOUT):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def server_alert(site, port, ctx):
    """The TLS alert the SERVER sent when it refused the handshake (or the first read after it: TLS
    1.3 servers judge the client certificate after the client's Finished)."""
    with (
        pytest.raises(ssl.SSLError) as refused,
        socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        tls.settimeout(3)
        tls.recv(1)
    # The client verified the server: a client-side verification failure is not a refusal.
    assert refused.value.reason != "CERTIFICATE_VERIFY_FAILED", refused.value
    assert "ALERT" in (refused.value.reason or ""), refused.value
    return refused.value.reason


def certificate_requested(site, port, cert):
    """Whether the server sent a CertificateRequest (openssl s_client -msg shows each handshake
    message, TLS 1.3's decrypted ones too)."""
    crt, key = site.cert(cert)
    out = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-CAfile", str(site.pki / "ca.crt"),
         "-cert", crt, "-key", key, "-msg", "-verify_return_error"],
        input="", capture_output=True, text=True, timeout=TIMEOUT, check=False,
    )  # fmt: skip
    assert "ServerHello" in out.stdout, out.stdout[-2000:] + out.stderr[-1000:]
    return "CertificateRequest" in out.stdout


# --- the rendered configuration ------------------------------------------------------------------


def test_security_settings_are_global_and_refuse_anonymous(site):
    lines = site.conf.splitlines()
    assert "per_listener_settings false" in lines
    first_listener = next(i for i, line in enumerate(lines) if line.startswith("listener "))
    head = lines[:first_listener]
    for line in ("allow_anonymous false", "password_file", "acl_file"):
        assert any(h.startswith(line) for h in head), line
    assert not any(
        line.startswith(("allow_anonymous", "password_file", "acl_file")) for line in lines[first_listener:]
    )


# --- devices: certificate only ---------------------------------------------------------------------


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_device_listener_refuses_a_client_without_certificate(site, version):
    # A password user with the right password, but no certificate: the server ends the handshake.
    reason = server_alert(site, site.devices, site.context(version=version))
    assert reason in ("SSLV3_ALERT_HANDSHAKE_FAILURE", "TLSV13_ALERT_CERTIFICATE_REQUIRED"), reason


def test_device_identity_is_the_certificate_cn_whatever_it_claims(site):
    with Client(site, site.devices, cert=DEV_B) as dev_b:
        assert dev_b.connack == 0
        # Device A claims B's client id and B's user name with the monitor's password: the broker
        # ignores both (identity = CN, client id forced to it), so B keeps its connection and A gets
        # A's ACL only.
        with Client(
            site, site.devices, cert=DEV_A, username=USER, password=PASSWORD, client_id=DEV_B
        ) as dev_a:
            assert dev_a.connack == 0
            assert not dev_a.publish(f"devices/{DEV_A}/t", b"1").is_failure
            assert dev_a.publish(f"devices/{DEV_B}/t", b"spoofed") == 135
            time.sleep(0.5)
            assert dev_b.disconnects == []
            assert not dev_b.publish(f"devices/{DEV_B}/t", b"2").is_failure


# --- users: password only ----------------------------------------------------------------------------


@pytest.mark.parametrize("listener", ["apps", "plain"])
def test_password_listeners_take_the_right_password_only(site, listener):
    port, tls = getattr(site, listener), listener == "apps"
    with Client(site, port, username=USER, password=PASSWORD, tls=tls) as ok:
        assert ok.connack == 0
    for username, password in ((USER, "wrong"), (None, None), (DEV_A, None), (DEV_A, "")):
        with Client(site, port, username=username, password=password, tls=tls) as refused:
            assert refused.connack.is_failure, (username, refused.connack)


@pytest.mark.parametrize("username", [None, DEV_A])
def test_device_certificate_is_no_login_on_the_password_listener(site, username):
    # The password listener never asks for a certificate, so a device's is never sent: without the
    # password of a password user, it is refused (and a device id is no password user).
    assert certificate_requested(site, site.devices, DEV_A)
    assert not certificate_requested(site, site.apps, DEV_A)
    with Client(site, site.apps, cert=DEV_A, username=username) as c:
        assert c.connack.is_failure, c.connack


def test_user_named_like_a_device_is_refused_by_the_role(tmp_path):
    """A password user may not be called like a device: with global settings its password would
    otherwise log in as that device (and get its ACL) on every password listener."""
    (tmp_path / "certs").mkdir()
    users = [{"name": DEV_A, "password": "x" * 12}]
    proc = bench.render_role(tmp_path, _listeners(bench.free_ports(3)), [DEV_A], users, [])
    assert proc.returncode != 0
    out = " ".join(proc.stdout.split())
    assert "User names are unique, valid and no device identity" in out
    assert "is not a device id" in out
    assert not (tmp_path / "etc" / "passwd").exists()


# --- ACLs ---------------------------------------------------------------------------------------------


def test_acls_hold(site):
    with (
        Client(site, site.apps, username=USER, password=PASSWORD) as monitor,
        Client(site, site.devices, cert=DEV_A) as dev_a,
    ):
        assert monitor.subscribe("devices/#") == 1 and dev_a.subscribe("devices/#") == 1
        with Client(site, site.devices, cert=DEV_B) as dev_b:
            assert dev_b.publish(f"devices/{DEV_B}/h", b"40") == 0
        assert wait_for(lambda: (f"devices/{DEV_B}/h", b"40") in monitor.messages)
        time.sleep(0.3)
        assert (f"devices/{DEV_B}/h", b"40") not in dev_a.messages  # A may not read B
        assert monitor.publish(f"devices/{DEV_A}/cmd", b"x") == 135  # the monitor only reads


# --- persistence ----------------------------------------------------------------------------------------


def test_sessions_queued_and_retained_messages_survive_restarts(site):
    """QoS 1 messages queued for offline persistent subscribers (a user, and a device that gets
    commands), published before a restart and after it, and a retained message: all delivered after
    the restarts. (With per_listener_settings true, 2.0.12 and later drop both kinds: a disconnected
    client has no listener to take its ACL from. 2.0.11 keeps them: it still knows the listener, and
    restores it from the database by port. molecule/default proves this on Debian 13's 2.0.21.)"""
    topic, cmd, retained = f"devices/{DEV_A}/q", f"devices/{DEV_B}/cmd", f"devices/{DEV_A}/status"
    mon_id = f"mon-{uuid.uuid4().hex[:6]}"
    sent = {"before": uuid.uuid4().hex.encode(), "after": uuid.uuid4().hex.encode()}

    def monitor(**kw):
        return Client(site, site.apps, username=USER, password=PASSWORD, **kw)

    def device_b():
        return Client(site, site.devices, cert=DEV_B, persistent=True)

    with monitor(client_id=mon_id, persistent=True) as sub:
        assert sub.subscribe(topic) == 1
    with device_b() as sub:
        assert sub.subscribe(cmd) == 1

    def publish(payload):
        with Client(site, site.devices, cert=DEV_A) as dev_a:
            assert dev_a.publish(topic, payload) == 0
        with monitor() as commander:
            assert not commander.publish(cmd, payload).is_failure

    publish(sent["before"])
    with Client(site, site.devices, cert=DEV_A) as dev_a:
        assert not dev_a.publish(retained, b"online", retain=True).is_failure
    site.restart()
    publish(sent["after"])
    site.restart()
    try:
        with monitor(client_id=mon_id, persistent=True) as sub:
            assert sub.session_present
            assert wait_for(lambda: all((topic, p) in sub.messages for p in sent.values())), sub.messages
        with device_b() as sub:
            assert sub.session_present
            assert wait_for(lambda: all((cmd, p) in sub.messages for p in sent.values())), sub.messages
        with monitor() as fresh:
            assert fresh.subscribe(retained) == 1
            assert wait_for(lambda: (retained, b"online") in fresh.retained)
    finally:
        with Client(site, site.devices, cert=DEV_A) as dev_a:
            dev_a.publish(retained, b"", retain=True)
