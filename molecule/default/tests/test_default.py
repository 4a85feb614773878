"""The running broker, probed from outside (TLS and MQTT through the published ports) and inside.

Certificates come from the scenario's PKI (made by the project's pki role in prepare) and a rogue CA.
Every check is against the live broker: handshakes, MQTT CONNACK/SUBACK/PUBACK reason codes, files.
"""

import contextlib
import os
import re
import socket
import ssl
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

PKI = Path(os.environ["PKI_DIR"])
ROGUE = Path(os.environ["ROGUE_DIR"])
CA = PKI / "ca" / "ca.crt"
SCENARIO = Path(os.environ["MOLECULE_SCENARIO_DIRECTORY"])
TIMEOUT = 10
# The scenario's test-only password (molecule.yml group_vars).
MONITOR_PASSWORD = "molecule-monitor-password"  # noqa: S105


def _published(name):
    """{container port: host port} for one platform, read from molecule.yml."""
    config = yaml.safe_load((SCENARIO / "molecule.yml").read_text())
    platform = next(p for p in config["platforms"] if p["name"] == name)
    ports = {}
    for spec in platform["published_ports"]:
        _, host_port, container_port = spec.split(":")
        ports[int(container_port)] = int(host_port)
    return ports


@pytest.fixture
def ports(host):
    return _published(host.backend.name)


def device(name):
    return PKI / "devices" / f"{name}.crt", PKI / "devices" / f"{name}.key"


def tls_context(version=None, cert=None, verify=True):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if verify:
        ctx.load_verify_locations(CA)
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if version is not None:
        if version < ssl.TLSVersion.TLSv1_2:
            # Let the client offer old versions at all, so that a refusal is the server's.
            ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
        ctx.minimum_version = version
        ctx.maximum_version = version
    if cert is not None:
        ctx.load_cert_chain(*cert)
    return ctx


def handshake(port, ctx, read=False):
    """TLS handshake with localhost:port; with read=True also wait for the server's first verdict."""
    with (
        socket.create_connection(("localhost", port), timeout=TIMEOUT) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        info = (tls.version(), tls.getpeercert())
        if read:
            # TLS 1.3 servers judge the client certificate after the client's handshake finished:
            # the refusal arrives as an alert on the first read. The full TIMEOUT: on a loaded
            # machine the alert can take seconds, and only an accepted handshake waits it out.
            tls.settimeout(TIMEOUT)
            with contextlib.suppress(TimeoutError):
                tls.recv(1)
        return info


# --- service and sockets -------------------------------------------------------------------------


def test_service_running_and_enabled(host):
    service = host.service("mosquitto")
    assert service.is_running
    assert service.is_enabled


def test_tls_listeners_listen_and_plaintext_is_loopback_only(host):
    listening = host.socket.get_listening_sockets()
    assert any(s.endswith(":8883") for s in listening)
    assert any(s.endswith(":8884") for s in listening)
    plain = [s for s in listening if s.endswith(":1883")]
    # The scenario enables the plaintext listener: it must exist, and only on loopback.
    assert plain == ["tcp://127.0.0.1:1883"]


def test_broker_unit_gets_its_openssl_config(host):
    # The environment of the unit (the broker's own /proc/PID/environ is unreadable without
    # CAP_SYS_PTRACE); the groups test below proves the effect.
    environment = host.check_output("systemctl show -p Environment --value mosquitto").split()
    assert "OPENSSL_CONF=/etc/mosquitto/openssl.cnf" in environment


# --- TLS -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_tls_handshake_verifies_chain_and_hostname(ports, version):
    negotiated, peer = handshake(ports[8883], tls_context(version, device("esp32-dev-a")))
    assert negotiated == {ssl.TLSVersion.TLSv1_2: "TLSv1.2", ssl.TLSVersion.TLSv1_3: "TLSv1.3"}[version]
    assert ("DNS", "localhost") in peer["subjectAltName"]


def test_openssl_s_client_verifies_chain_and_hostname(ports):
    cert, key = device("esp32-dev-a")
    result = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{ports[8883]}", "-CAfile", str(CA),
         "-verify_return_error", "-verify_hostname", "localhost", "-cert", str(cert), "-key", str(key)],
        input="", capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip
    # "Verify return code" alone is printed even when no certificate arrived: require the handshake.
    assert "Server certificate" in result.stdout and "Verification: OK" in result.stdout, result.stdout
    assert "Verify return code: 0 (ok)" in result.stdout


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1])
def test_old_tls_versions_are_refused_by_the_server(ports, version):
    with pytest.raises(ssl.SSLError) as refused:
        handshake(ports[8883], tls_context(version, device("esp32-dev-a")))
    # An alert from the server, not a client that would not even try.
    assert refused.value.reason == "TLSV1_ALERT_PROTOCOL_VERSION", refused.value


def server_refusal(port, ctx):
    """The alert the SERVER sent to end the handshake (TLS 1.3: on the first read, since the server
    judges the client certificate after the client's Finished). Anything else fails the test: no
    refusal, a reset without an alert, or the client refusing the server (CERTIFICATE_VERIFY_FAILED
    is an SSLError too, and would otherwise pass as "refused")."""
    with pytest.raises(ssl.SSLError) as refused:
        handshake(port, ctx, read=True)
    return refused.value.reason


# TLS 1.2 has no alert for a missing client certificate (OpenSSL sends handshake_failure); 1.3 has.
NO_CERT_ALERT = {
    ssl.TLSVersion.TLSv1_2: "SSLV3_ALERT_HANDSHAKE_FAILURE",
    ssl.TLSVersion.TLSv1_3: "TLSV13_ALERT_CERTIFICATE_REQUIRED",
}


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_client_without_certificate_is_refused(ports, version):
    assert server_refusal(ports[8883], tls_context(version)) == NO_CERT_ALERT[version]


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_client_certificate_from_another_ca_is_refused(ports, version):
    rogue = (ROGUE / "client.crt", ROGUE / "client.key")
    assert server_refusal(ports[8883], tls_context(version, rogue)) == "TLSV1_ALERT_UNKNOWN_CA"


def certificate_requested(port):
    """Whether the server asks for a client certificate (a CertificateRequest in `openssl s_client
    -msg`, which prints TLS 1.3's encrypted handshake messages too), offering a device's."""
    cert, key = device("esp32-dev-a")
    result = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-CAfile", str(CA), "-verify_return_error",
         "-cert", str(cert), "-key", str(key), "-msg"],
        input="", capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip
    assert "ServerHello" in result.stdout, result.stdout[-2000:]
    return "CertificateRequest" in result.stdout


def test_only_the_device_listener_asks_for_a_certificate(ports):
    # On the password listener a device certificate is never sent, so it cannot stand in for a
    # password (the login itself is refused in the MQTT tests below).
    assert certificate_requested(ports[8883])
    assert not certificate_requested(ports[8884])


def test_key_exchange_groups_outside_mozilla_intermediate_are_refused(ports):
    cert, key = device("esp32-dev-a")
    negotiated = {}
    for group in ("X448", "secp521r1", "X25519", "P-256", "P-384"):
        result = subprocess.run(
            ["openssl", "s_client", "-connect", f"127.0.0.1:{ports[8883]}", "-CAfile", str(CA),
             "-groups", group, "-cert", str(cert), "-key", str(key)],
            input="", capture_output=True, text=True, timeout=TIMEOUT,
        )  # fmt: skip
        # Printed only after a completed handshake: "X25519, 253 bits" or "ECDH, prime256v1, 256 bits".
        temp_key = re.search(r"Server Temp Key: ([^\n]+)", result.stdout)
        negotiated[group] = temp_key.group(1).split(", ")[-2] if temp_key else None
    assert negotiated == {
        "X448": None,
        "secp521r1": None,
        "X25519": "X25519",
        "P-256": "prime256v1",
        "P-384": "secp384r1",
    }


def test_sslyze_reports_mozilla_intermediate_compliance(ports):
    cert, key = device("esp32-dev-a")
    result = subprocess.run(
        [sys.executable, "-m", "sslyze", "--certinfo_ca_file", str(CA), "--mozilla_config", "intermediate",
         "--cert", str(cert), "--key", str(key), f"localhost:{ports[8883]}"],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:]
    assert f"localhost:{ports[8883]}: OK - Compliant" in result.stdout


# --- MQTT ----------------------------------------------------------------------------------------


def test_device_uses_its_own_topic_root_only(ports, kit):
    with kit.Mqtt(ports[8883], cert=device("esp32-dev-a")) as dev_a:
        assert dev_a.connack == 0
        assert dev_a.subscribe("devices/esp32-dev-a/#") == 1  # granted QoS 1
        assert dev_a.publish("devices/esp32-dev-a/temperature", b"21.5") == 0
        assert kit.wait_for(lambda: ("devices/esp32-dev-a/temperature", b"21.5") in dev_a.messages)
        # Another device's topic root: PUBACK 0x87 "not authorized".
        assert dev_a.publish("plant/line-2/esp32-dev-b/temperature", b"spoofed") == 135
        assert dev_a.publish("devices/esp32-dev-b/temperature", b"spoofed") == 135


def test_device_cannot_read_other_devices_but_the_monitor_can(ports, kit):
    # mosquitto 2.0 grants a SUBACK for any filter and applies the ACL to every delivered message,
    # so the proof is which messages arrive.
    with (
        kit.Mqtt(ports[8884], username="fleet-monitor", password=MONITOR_PASSWORD) as monitor,
        kit.Mqtt(ports[8883], cert=device("esp32-dev-a")) as dev_a,
        kit.Mqtt(ports[8883], cert=device("esp32-dev-b")) as dev_b,
    ):
        assert monitor.connack == 0
        for topic in ("plant/#", "devices/#"):
            assert monitor.subscribe(topic) == 1
            assert dev_a.subscribe(topic) == 1
        assert dev_b.publish("plant/line-2/esp32-dev-b/humidity", b"40") == 0
        assert dev_a.publish("devices/esp32-dev-a/humidity", b"41") == 0
        assert kit.wait_for(lambda: ("plant/line-2/esp32-dev-b/humidity", b"40") in monitor.messages)
        assert kit.wait_for(lambda: ("devices/esp32-dev-a/humidity", b"41") in monitor.messages)
        assert kit.wait_for(lambda: ("devices/esp32-dev-a/humidity", b"41") in dev_a.messages)
        assert ("plant/line-2/esp32-dev-b/humidity", b"40") not in dev_a.messages
        # The monitor may read only.
        assert monitor.publish("devices/esp32-dev-a/cmd", b"x") == 135


@pytest.mark.parametrize(
    "username,password,cert",
    [
        (None, None, None),
        ("fleet-monitor", "wrong", None),
        ("retired-dashboard", "x", None),
        # A device's certificate and identity are no password login (settings are global).
        (None, None, "esp32-dev-a"),
        ("esp32-dev-a", None, "esp32-dev-a"),
    ],
)
def test_password_listener_refuses_anonymous_and_bad_credentials(ports, kit, username, password, cert):
    client = kit.Mqtt(ports[8884], username=username, password=password, cert=cert and device(cert))
    with client:
        assert client.connack != 0
        assert client.connack.is_failure


def test_device_identity_is_the_certificate_whatever_the_client_claims(ports, kit):
    # Device A presents the monitor's user name and password and device B's client id: the broker
    # uses A's CN for both, so B stays connected and A keeps A's ACL.
    spoof = {"username": "fleet-monitor", "password": MONITOR_PASSWORD, "client_id": "esp32-dev-b"}
    with (
        kit.Mqtt(ports[8883], cert=device("esp32-dev-b")) as dev_b,
        kit.Mqtt(ports[8883], cert=device("esp32-dev-a"), **spoof) as dev_a,
    ):
        assert dev_a.connack == 0
        assert dev_a.publish("plant/line-2/esp32-dev-b/x", b"spoofed") == 135
        assert not dev_a.publish("devices/esp32-dev-a/x", b"1").is_failure
        assert not dev_b.publish("plant/line-2/esp32-dev-b/x", b"2").is_failure
        assert dev_b.disconnects == []


def test_plaintext_loopback_listener_refuses_anonymous_connect(host):
    # Inside the container (the listener is loopback-only); mosquitto_sub exits non-zero on refusal.
    result = host.run("timeout 5 mosquitto_sub -h 127.0.0.1 -p 1883 -t devices/# -C 1 -W 2")
    assert result.rc != 0
    assert "not authorised" in (result.stderr + result.stdout).lower()


# --- persistence ---------------------------------------------------------------------------------


def persistent_subscriber(kit, ports, client_id):
    """fleet-monitor with a session that outlives its connection, as device firmware keeps one: MQTT v5
    clean_start false and a session expiry of 1 h (mosquitto 2.0 persists only such sessions)."""
    return kit.Mqtt(
        ports[8884], username="fleet-monitor", password=MONITOR_PASSWORD,
        client_id=client_id, clean_start=False, session_expiry=3600,
    )  # fmt: skip


def test_broker_saves_its_database(host):
    conf = host.file("/etc/mosquitto/mosquitto.conf").content_string.splitlines()
    assert "persistence true" in conf
    assert "persistence_location /var/lib/mosquitto/" in conf
    assert "autosave_interval 60" in conf


def test_retained_and_queued_messages_survive_a_broker_restart(host, ports, kit):
    # With per_listener_settings true, 2.0.12+ (Debian 13) dropped the queued message
    # (eclipse-mosquitto/mosquitto#2618): the role's settings are global so that it is kept.
    client_id = f"persist-{uuid.uuid4().hex[:8]}"
    topic, retained_topic = "devices/esp32-dev-a/queued", "devices/esp32-dev-a/status"
    payload = uuid.uuid4().hex.encode()
    with persistent_subscriber(kit, ports, client_id) as sub:
        assert sub.subscribe(topic) == 1
    # The subscriber is offline: its QoS 1 message is queued in its session.
    with kit.Mqtt(ports[8883], cert=device("esp32-dev-a")) as dev_a:
        assert dev_a.publish(topic, payload) == 0
        # 16 "no matching subscribers" is a success too
        assert not dev_a.publish(retained_topic, b"online", retain=True).is_failure
    pid_before = host.check_output("systemctl show -p MainPID --value mosquitto")
    host.run_expect([0], "systemctl restart mosquitto")
    assert host.check_output("systemctl show -p MainPID --value mosquitto") != pid_before
    db = host.file("/var/lib/mosquitto/mosquitto.db")
    assert db.exists and db.user == "mosquitto"  # written at the clean stop, by the broker's user
    assert kit.wait_for(lambda: host.socket("tcp://8884").is_listening)
    try:
        with persistent_subscriber(kit, ports, client_id) as sub:
            assert sub.session_present  # the session (and its subscription) came back
            delivered = kit.wait_for(lambda: (topic, payload) in sub.messages)
        with kit.Mqtt(ports[8884], username="fleet-monitor", password=MONITOR_PASSWORD) as fresh:
            assert fresh.subscribe(retained_topic) == 1
            assert kit.wait_for(lambda: (retained_topic, b"online") in fresh.retained)
    finally:
        with kit.Mqtt(ports[8883], cert=device("esp32-dev-a")) as dev_a:
            dev_a.publish(retained_topic, b"", retain=True)  # clears the retained message
    assert delivered, "the queued QoS 1 message was not delivered after the restart"


# --- files ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path,owner,group,mode",
    [
        ("/etc/mosquitto/certs", "root", "mosquitto", 0o750),
        ("/etc/mosquitto/certs/ca.crt", "root", "mosquitto", 0o644),
        ("/etc/mosquitto/certs/server.crt", "root", "mosquitto", 0o644),
        ("/etc/mosquitto/certs/server.key", "root", "mosquitto", 0o640),
        ("/etc/mosquitto/certs/crl.pem", "root", "mosquitto", 0o644),
        ("/etc/mosquitto/passwd", "mosquitto", "mosquitto", 0o600),
        ("/etc/mosquitto/acl", "mosquitto", "mosquitto", 0o600),
        ("/var/lib/mosquitto-fleet/last-good", "root", "root", 0o700),
        ("/var/lib/mosquitto", "mosquitto", "mosquitto", 0o750),
    ],
)
def test_file_ownership_and_mode(host, path, owner, group, mode):
    f = host.file(path)
    assert f.exists
    assert (f.user, f.group, f.mode) == (owner, group, mode)


def test_deployed_files_match_the_controller_pki(host):
    name = host.backend.name
    assert host.file("/etc/mosquitto/certs/ca.crt").content_string == CA.read_text()
    assert (
        host.file("/etc/mosquitto/certs/server.crt").content_string
        == (PKI / "brokers" / f"{name}.crt").read_text()
    )


def test_server_key_matches_certificate(host):
    cert_pub = host.check_output("openssl x509 -noout -pubkey -in /etc/mosquitto/certs/server.crt")
    key_pub = host.check_output("openssl pkey -pubout -in /etc/mosquitto/certs/server.key")
    assert cert_pub == key_pub and "BEGIN PUBLIC KEY" in key_pub


def test_ca_key_is_not_on_the_broker(host):
    # A line from the middle of the (encrypted) CA key: present nowhere on the broker's disk.
    marker = (PKI / "ca" / "ca.key").read_text().splitlines()[2]
    result = host.run(f"grep -rlF -- '{marker}' /etc /root /var /tmp /opt /srv /home")
    assert result.rc == 1, result.stdout


def test_password_file_holds_only_pbkdf2_hashes(host):
    content = host.file("/etc/mosquitto/passwd").content_string
    assert [line.split(":", 1)[0] for line in content.splitlines()] == ["fleet-monitor"]
    assert content.split(":", 1)[1].startswith("$7$220000$")  # mosquitto_password_iterations
    assert MONITOR_PASSWORD not in content
