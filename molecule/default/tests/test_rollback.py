"""Day-2 operations on a live broker, each a full converge through the scenario's playbook and
inventory: a change that breaks the broker is rolled back and the play fails naming the cause; a
re-run changes nothing and keeps sessions; a re-issued server certificate is reloaded without
dropping connected clients. Runs after test_default.py (file order) against the Debian 12 container
only (the Debian 13 one runs the same role code); each case ends with the broker in its original
state. The longest outage during each change is measured and printed ("[availability] ...").
"""

import datetime
import json
import os
import re
import shutil
import socket
import ssl
import uuid
from pathlib import Path

import pytest
import testinfra
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

# Not the `host` fixture: these tests run once, against the Debian 12 container only.
NAME = "esp32-fleet-broker-default"
PKI = Path(os.environ["PKI_DIR"])
DEVICES_PORT, APPS_PORT = 18883, 18884  # molecule.yml publishes the container's 8883/8884 here
# The scenario's test-only secrets (molecule.yml group_vars).
CA_PASSPHRASE = b"molecule-test-passphrase"
MONITOR_PASSWORD = "molecule-monitor-password"  # noqa: S105


def presented_certificate():
    ctx = ssl.create_default_context(cafile=str(PKI / "ca" / "ca.crt"))
    ctx.load_cert_chain(PKI / "devices" / "esp32-dev-a.crt", PKI / "devices" / "esp32-dev-a.key")
    with (
        socket.create_connection(("localhost", DEVICES_PORT), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        return tls.getpeercert(binary_form=True)


def listeners_custom(**changes):
    """The scenario's mosquitto_listeners_custom with changes: an extra var replaces the whole
    inventory value, so it must repeat the listeners the scenario enables."""
    custom = {"applications": {"state": "present"}, "plaintext": {"state": "present"}}
    for name, settings in changes.items():
        custom[name] = {**custom.get(name, {}), **settings}
    return {"mosquitto_listeners_custom": custom}


def main_pid(host):
    return host.check_output("systemctl show -p MainPID --value mosquitto")


@pytest.fixture
def host():
    return testinfra.get_host(f"podman://{NAME}")


@pytest.fixture
def original(host):
    before = {
        "cert": presented_certificate(),
        "conf": host.file("/etc/mosquitto/mosquitto.conf").content_string,
        "key": host.file("/etc/mosquitto/certs/server.key").content_string,
    }
    yield before
    # Whatever happened, the broker must serve the original configuration again.
    assert host.service("mosquitto").is_running
    assert presented_certificate() == before["cert"]
    assert host.file("/etc/mosquitto/mosquitto.conf").content_string == before["conf"]
    assert host.file("/etc/mosquitto/certs/server.key").content_string == before["key"]


@pytest.fixture
def watch(kit, availability):
    """Converge with an availability monitor on the devices listener running throughout."""

    def run(*extra):
        with availability(DEVICES_PORT, kit.device("esp32-dev-a")) as monitor:
            rc, out, raw = kit.converge(NAME, *extra)
        return rc, out, raw, monitor

    return run


# --- rollback ------------------------------------------------------------------------------------


def test_key_that_does_not_match_the_certificate_is_refused(original, watch, tmp_path):
    broken = tmp_path / "pki"
    shutil.copytree(PKI, broken)
    shutil.copy(PKI / "devices" / "esp32-dev-b.key", broken / "brokers" / f"{NAME}.key")
    rc, out, raw, monitor = watch("-e", f"mosquitto_pki_dir={broken}")
    assert rc != 0
    assert "refused before the broker was touched (reloaded)" in out, raw[-3000:]
    assert "is not the key of /etc/mosquitto/certs/server.crt" in out
    assert "last working configuration was restored" in out
    assert "PRIVATE KEY" not in raw  # no key material in the output
    assert monitor.failures == 0  # found before the broker saw it: it served throughout


def test_listener_address_not_on_the_host_is_refused(host, original, watch):
    # 192.0.2.1 (TEST-NET-1) is on no interface of the container: mosquitto would exit at start.
    change = listeners_custom(devices={"address": "192.0.2.1"})
    pid = main_pid(host)
    rc, out, raw, monitor = watch("-e", json.dumps(change))
    assert rc != 0
    assert "refused before the broker was touched (restarted)" in out, raw[-3000:]
    assert "listener devices: address 192.0.2.1 is not on this host" in out
    assert re.search(r"this host's addresses are 127\.0\.0\.1, ", out), out[-2000:]
    assert "last working configuration was restored" in out
    assert "Run the broker under systemd" not in out
    assert main_pid(host) == pid  # neither the new configuration nor the restored one was restarted
    assert monitor.failures == 0


def test_listener_port_held_by_another_process_is_refused(host, original, watch):
    # A stranger on the port the applications listener is moved to.
    hold = "import socket, time; s = socket.socket(); s.bind(('', 9884)); s.listen(); time.sleep(600)"
    holder = host.run(f'setsid python3 -c "{hold}" >/dev/null 2>&1 & echo $!').stdout.strip()
    try:
        assert holder.isdigit()
        listening = "ss -Hltn 'sport = :9884' | grep -q . && exit 0"
        assert host.run(f"for i in $(seq 300); do {listening}; sleep 0.1; done; exit 1").rc == 0
        change = listeners_custom(applications={"state": "present", "port": 9884})
        rc, out, raw, monitor = watch("-e", json.dumps(change))
    finally:
        host.run(f"kill {holder}")
    assert rc != 0
    assert "refused before the broker was touched (restarted)" in out, raw[-3000:]
    assert "listener applications: port 9884 is in use by another process (0.0.0.0:9884)" in out
    assert "last working configuration was restored" in out
    assert monitor.failures == 0


def test_file_the_broker_user_cannot_read_is_refused(host, original, watch):
    # /root is 0700: the files are root:mosquitto 0640 but the broker's user cannot reach them.
    try:
        rc, out, raw, monitor = watch("-e", "mosquitto_cert_dir=/root/fleet-certs")
    finally:
        host.run("rm -rf /root/fleet-certs")
    assert rc != 0
    assert "refused before the broker was touched (restarted)" in out, raw[-3000:]
    assert "user mosquitto cannot read /root/fleet-certs/ca.crt, /root/fleet-certs/server.crt" in out
    assert "last working configuration was restored" in out
    assert monitor.failures == 0


# --- re-run and renewal --------------------------------------------------------------------------


def test_rerun_changes_nothing_and_keeps_sessions_and_retained_messages(host, original, kit, watch):
    client_id = f"rerun-{uuid.uuid4().hex[:8]}"
    topic, retained_topic = "plant/line-2/esp32-dev-b/q", "plant/line-2/esp32-dev-b/status"
    payload = uuid.uuid4().hex.encode()

    def subscriber():
        return kit.Mqtt(
            APPS_PORT, username="fleet-monitor", password=MONITOR_PASSWORD,
            client_id=client_id, clean_start=False, session_expiry=3600,
        )  # fmt: skip

    with subscriber() as sub:
        assert sub.subscribe(topic) == 1
    with kit.Mqtt(DEVICES_PORT, cert=kit.device("esp32-dev-b")) as dev_b:
        assert dev_b.publish(topic, payload) == 0
        # 16 "no matching subscribers" is a success too
        assert not dev_b.publish(retained_topic, b"online", retain=True).is_failure
    pid = main_pid(host)
    rc, out, raw, monitor = watch()
    try:
        assert rc == 0, raw[-3000:]
        assert re.search(rf"{NAME}\s*:\s*ok=\d+\s+changed=0\s", out), raw[-1500:]
        assert main_pid(host) == pid  # neither restarted nor started again
        assert monitor.failures == 0
        with subscriber() as sub:
            assert sub.session_present
            assert kit.wait_for(lambda: (topic, payload) in sub.messages)
        with kit.Mqtt(APPS_PORT, username="fleet-monitor", password=MONITOR_PASSWORD) as fresh:
            assert fresh.subscribe(retained_topic) == 1
            assert kit.wait_for(lambda: (retained_topic, b"online") in fresh.retained)
    finally:
        with kit.Mqtt(DEVICES_PORT, cert=kit.device("esp32-dev-b")) as dev_b:
            dev_b.publish(retained_topic, b"", retain=True)


def reissue_broker_certificate(pki, dest):
    """A copy of the PKI whose broker certificate is re-issued by the same CA: new key, new serial,
    same subject and extensions (what a renewal produces)."""
    shutil.copytree(pki, dest)
    ca_cert = x509.load_pem_x509_certificate((pki / "ca" / "ca.crt").read_bytes())
    ca_key = serialization.load_pem_private_key((pki / "ca" / "ca.key").read_bytes(), CA_PASSPHRASE)
    old = x509.load_pem_x509_certificate((pki / "brokers" / f"{NAME}.crt").read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(old.subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=90))
    )
    for extension in old.extensions:
        if extension.oid == x509.ExtensionOID.SUBJECT_KEY_IDENTIFIER:
            ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
            builder = builder.add_extension(ski, extension.critical)
        else:
            builder = builder.add_extension(extension.value, extension.critical)
    cert = builder.sign(ca_key, hashes.SHA256())
    (dest / "brokers" / f"{NAME}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (dest / "brokers" / f"{NAME}.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert.public_bytes(serialization.Encoding.DER)


def test_reissued_server_certificate_is_reloaded_without_dropping_clients(
    host, original, kit, watch, tmp_path
):
    renewed = reissue_broker_certificate(PKI, tmp_path / "pki")
    pid = main_pid(host)
    with (
        kit.Mqtt(APPS_PORT, username="fleet-monitor", password=MONITOR_PASSWORD) as monitor,
        kit.Mqtt(DEVICES_PORT, cert=kit.device("esp32-dev-a")) as dev_a,
    ):
        assert monitor.subscribe("devices/esp32-dev-a/#") == 1
        rc, out, raw, availability = watch("-e", f"mosquitto_pki_dir={tmp_path / 'pki'}")
        assert rc == 0, raw[-3000:]
        assert "Run the broker under systemd (reloaded)" in out
        assert main_pid(host) == pid  # SIGHUP, not a restart
        assert presented_certificate() == renewed  # new connections get the new certificate
        # Both clients stayed connected through the reload and still exchange messages.
        assert dev_a.publish("devices/esp32-dev-a/after-renewal", b"1") == 0
        assert kit.wait_for(lambda: ("devices/esp32-dev-a/after-renewal", b"1") in monitor.messages)
        assert monitor.disconnects == [] and dev_a.disconnects == []
        assert availability.failures == 0
        # Back to the scenario's certificate, the same way.
        rc, out, raw = kit.converge(NAME)
        assert rc == 0, raw[-3000:]
        assert main_pid(host) == pid
        assert dev_a.publish("devices/esp32-dev-a/after-renewal", b"2") == 0
        assert kit.wait_for(lambda: ("devices/esp32-dev-a/after-renewal", b"2") in monitor.messages)
        assert monitor.disconnects == [] and dev_a.disconnects == []
