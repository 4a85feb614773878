"""Re-issue rules (leaf and CRL renewal, SAN change, missing key, key type), device entry point, revoke."""

from __future__ import annotations

import datetime as dt
import json
import textwrap

import yaml

LEAVES = ["brokers/localhost", "brokers/broker2", "devices/dev-a", "devices/esp32-0042", "devices/dev-c"]


def _serials(pki, tools):
    return {leaf: tools.serial(pki.pki / f"{leaf}.crt") for leaf in LEAVES}


def _keys(pki):
    return {leaf: (pki.pki / f"{leaf}.key").read_bytes() for leaf in LEAVES}


def _days_left(tools, crl):
    nxt = tools.openssl("crl", "-in", str(crl), "-noout", "-nextupdate").stdout.split("=", 1)[1].strip()
    left = dt.datetime.strptime(nxt, "%b %d %H:%M:%S %Y %Z") - dt.datetime.now(dt.UTC).replace(tzinfo=None)
    return left.total_seconds() / 86400


def _ca(pki):
    return [(pki.pki / "ca" / name).read_bytes() for name in ("ca.crt", "ca.key")]


def test_leaves_expiring_within_the_window_are_reissued_once(copy_of_issued, tools):
    pki = copy_of_issued
    before, keys, ca = _serials(pki, tools), _keys(pki), _ca(pki)
    # Every 365-day leaf expires within a 365-day window; the new 366-day leaves do not. Likewise the
    # 30-day CRL is within a 45-day window, and its 60-day successor is not.
    window = {"pki_server_validity_days": 366, "pki_client_validity_days": 366, "pki_renew_before_days": 365}
    window |= {"pki_crl_validity_days": 60, "pki_crl_renew_before_days": 45}
    crl = pki.pki / "ca" / "crl.pem"
    assert 29 < _days_left(tools, crl) <= 30
    run = pki.run(extra=window)
    assert run.rc == 0, run.output[-3000:]
    after = _serials(pki, tools)
    assert all(after[leaf] != before[leaf] for leaf in LEAVES), (before, after)
    assert _keys(pki) == keys  # renewal keeps the keys
    assert _ca(pki) == ca  # and never touches the CA
    for leaf in LEAVES:
        purpose = "sslserver" if leaf.startswith("brokers/") else "sslclient"
        assert tools.verifies(pki.pki / "ca" / "ca.crt", pki.pki / f"{leaf}.crt", purpose)
    assert 59 < _days_left(tools, crl) <= 60
    crl_after = crl.read_bytes()
    again = pki.run(extra=window)
    assert again.rc == 0 and again.changed == 0, again.output[-3000:]
    assert _serials(pki, tools) == after
    assert crl.read_bytes() == crl_after


def test_san_change_and_missing_device_key_reissue_only_those_leaves(copy_of_issued, tools):
    pki = copy_of_issued
    before, keys, ca = _serials(pki, tools), _keys(pki), _ca(pki)
    pki.brokers["broker2"]["mosquitto_server_names"].append("mqtt.example.net")
    pki.write_inventory()
    (pki.pki / "devices" / "dev-a.key").unlink()  # the fleet deletes keys after flashing
    run = pki.run()
    assert run.rc == 0 and run.changed > 0, run.output[-3000:]
    after, new_keys = _serials(pki, tools), _keys(pki)
    assert {leaf for leaf in LEAVES if after[leaf] != before[leaf]} == {"brokers/broker2", "devices/dev-a"}
    assert {leaf for leaf in LEAVES if new_keys[leaf] != keys[leaf]} == {"devices/dev-a"}
    assert "DNS:mqtt.example.net" in tools.x509_text(pki.pki / "brokers" / "broker2.crt")
    pub_cert = tools.openssl(
        "x509", "-in", str(pki.pki / "devices" / "dev-a.crt"), "-noout", "-pubkey"
    ).stdout
    pub_key = tools.openssl("pkey", "-in", str(pki.pki / "devices" / "dev-a.key"), "-pubout").stdout
    assert pub_cert == pub_key
    assert _ca(pki) == ca


def test_leaf_key_type_change_reissues_keys_and_certificates(copy_of_issued, tools):
    pki = copy_of_issued
    before = _serials(pki, tools)
    run = pki.run(extra={"pki_leaf_key_type": "RSA", "pki_leaf_key_size": 2048})
    assert run.rc == 0, run.output[-3000:]
    after = _serials(pki, tools)
    for leaf in LEAVES:
        assert after[leaf] != before[leaf]
        text = tools.x509_text(pki.pki / f"{leaf}.crt")
        assert "Public-Key: (2048 bit)" in text and "rsaEncryption" in text
        key = tools.openssl("pkey", "-in", str(pki.pki / f"{leaf}.key"), "-noout", "-text").stdout
        assert "Private-Key: (2048 bit" in key


DEVICE_PLAY = textwrap.dedent(
    """\
    ---
    - name: Issue device certificates the way the fleet role does
      hosts: esp32_devices
      gather_facts: false
      tasks:
        - name: Issue this device's certificate on the controller
          ansible.builtin.include_role:
            name: esp32_fleet.mqtt_fleet.pki
            tasks_from: device
            apply:
              delegate_to: localhost
          vars:
            pki_device_id: "{{ esp32_device_id | default(inventory_hostname) }}"

        - name: Save the returned facts
          ansible.builtin.copy:
            content: "{{ pki_device_cert_info | to_json }}"
            dest: "{{ out_dir }}/{{ inventory_hostname }}.json"
            mode: "0644"
          delegate_to: localhost
    """
)


def test_device_entry_point_touches_only_its_device_and_returns_facts(copy_of_issued, tools, tmp_path):
    pki = copy_of_issued
    play = tmp_path / "device.yml"
    play.write_text(DEVICE_PLAY)
    out = tmp_path / "out"
    out.mkdir()
    (pki.pki / "devices" / "esp32-0042.key").unlink()
    brokers_and_ca = [tools.tree_hash(pki.pki / d) for d in ("ca", "brokers")]
    others = {d: (pki.pki / "devices" / f"{d}.crt").read_bytes() for d in ("dev-a", "dev-c")}
    run = pki.run(playbook=play, extra={"out_dir": str(out)})
    assert run.rc == 0, run.output[-3000:]
    assert [tools.tree_hash(pki.pki / d) for d in ("ca", "brokers")] == brokers_and_ca
    assert {d: (pki.pki / "devices" / f"{d}.crt").read_bytes() for d in ("dev-a", "dev-c")} == others
    for host, device in (("dev-a", "dev-a"), ("dev-b", "esp32-0042"), ("dev-c", "dev-c")):
        info = json.loads((out / f"{host}.json").read_text())
        cert = pki.pki / "devices" / f"{device}.crt"
        assert info["device_id"] == device
        assert info["cert_path"] == str(cert)
        assert info["key_path"] == str(pki.pki / "devices" / f"{device}.key")
        assert info["changed"] is (device == "esp32-0042")
        assert int(info["serial"]) == int(tools.serial(cert).split("=", 1)[1], 16)
        fp = tools.openssl("x509", "-in", str(cert), "-noout", "-fingerprint", "-sha256").stdout
        assert fp.strip().split("=", 1)[1].lower() == info["sha256_fingerprint"].lower()
        assert info["not_after"].endswith("Z") and len(info["not_after"]) == 15
        assert tools.verifies(pki.pki / "ca" / "ca.crt", cert, "sslclient")


REVOKE_PLAY = textwrap.dedent(
    """\
    ---
    - name: Revoke a device
      hosts: controller
      gather_facts: false
      tasks:
        - name: Revoke dev-c
          ansible.builtin.include_role:
            name: esp32_fleet.mqtt_fleet.pki
            tasks_from: revoke
          vars:
            pki_revoke_device_ids: [dev-c]
    """
)


def test_revoke_puts_the_serial_on_the_crl_once(copy_of_issued, tools, tmp_path):
    pki = copy_of_issued
    play = tmp_path / "revoke.yml"
    play.write_text(REVOKE_PLAY)
    run = pki.run(playbook=play)
    assert run.rc == 0 and run.changed > 0, run.output[-3000:]
    ca, crl = pki.pki / "ca" / "ca.crt", pki.pki / "ca" / "crl.pem"
    crl_check = ("-crl_check", "-CRLfile", str(crl))
    assert not tools.verifies(ca, pki.pki / "devices" / "dev-c.crt", "sslclient", *crl_check)
    assert tools.verifies(ca, pki.pki / "devices" / "dev-a.crt", "sslclient", *crl_check)
    revoked = yaml.safe_load((pki.pki / "ca" / "revoked.yml").read_text())["pki_revoked_certificates"]
    dev_c_serial = int(tools.serial(pki.pki / "devices" / "dev-c.crt").split("=", 1)[1], 16)
    assert [(r["device_id"], int(r["serial_number"])) for r in revoked] == [("dev-c", dev_c_serial)]
    text = tools.openssl("crl", "-in", str(crl), "-noout", "-text").stdout
    assert "Cessation Of Operation" in text
    again = pki.run(playbook=play)
    assert again.rc == 0 and again.changed == 0, again.output[-3000:]
    normal = pki.run()  # a normal run keeps the revocation on the CRL
    assert normal.rc == 0 and normal.changed == 0, normal.output[-3000:]
    assert not tools.verifies(ca, pki.pki / "devices" / "dev-c.crt", "sslclient", *crl_check)
    # When every leaf is due for renewal, the revoked device is the one left alone: a revoked device
    # never gets a fresh certificate from a normal run.
    before = _serials(pki, tools)
    window = {"pki_server_validity_days": 366, "pki_client_validity_days": 366, "pki_renew_before_days": 365}
    due = pki.run(extra=window)
    assert due.rc == 0, due.output[-3000:]
    after = _serials(pki, tools)
    assert after["devices/dev-c"] == before["devices/dev-c"]
    assert all(after[leaf] != before[leaf] for leaf in LEAVES if leaf != "devices/dev-c"), (before, after)
