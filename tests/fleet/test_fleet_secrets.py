"""End to end through playbooks/fleet.yml against simulated boards: a --limit run covers only the
boards it names; the manifest does not give the Wi-Fi password away (keyed fingerprint, mode 0640,
no secret in -vvv output); and a manifest of the unkeyed kind is taken over without re-flashing."""

import hashlib
import json

MACS = ["24:0a:c4:00:00:01", "24:0a:c4:00:00:02", "24:0a:c4:00:00:03"]
PASSWORD = "hunter2"  # 7 characters: shorter than any "long enough to be a secret" rule
BROKER_URI = "mqtts://broker.test:8883"
SETTINGS_VARS = (
    "-e",
    f"esp32_provision_broker_uri={BROKER_URI}",
    "-e",
    "esp32_provision_wifi_ssid=lab",
    "-e",
    f"esp32_provision_wifi_password={PASSWORD}",
)
# What an attacker tries first: a short list of common passwords.
WORDS = ["123456", "password", "qwerty", "letmein", "dragon", "monkey", "sunshine", "iloveyou"]
WORDS += ["admin", "welcome", "hunter2", "trustno1", "football", "princess", "shadow", "master"]


def unkeyed(project, device_id, password):
    """The unkeyed settings hash of earlier releases (over this release's settings, so that only the
    keying differs): everything in it but the password is known to anyone who can read the inventory
    and the (public) CA."""
    ca = (project.pki / "ca" / "bundle.pem").read_bytes()
    data = {
        "device_id": device_id,
        "broker_uri": BROKER_URI,
        "topic_root": f"devices/{device_id}",
        "wifi_ssid": "lab",
        "wifi_password_sha256": hashlib.sha256(password.encode()).hexdigest(),
        "ca_sha256": hashlib.sha256(ca).hexdigest(),
        "nvs_offset": 36864,
        "nvs_size": 24576,
        "renew_days": 30,
    }
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def dictionary_attack(project, rows):
    """The password a guess reproduces some row's config_sha256 with, or None."""
    for row in rows:
        for word in WORDS:
            if row["config_sha256"] == unkeyed(project, row["device_id"], word):
                return word
    return None


def test_a_limited_run_records_and_touches_only_the_boards_it_names(fleet_project):
    project = fleet_project({f"b{i + 1}": {"esp32_mac": mac} for i, mac in enumerate(MACS)})
    rc, out, recap = project.run("--limit", "localhost,b2")
    assert rc == 0, out
    assert [(r["device_id"], r["result"]) for r in project.rows()] == [("b2", "provisioned")]
    assert "board(s) failed" not in out
    assert set(recap) == {"localhost", "b2"}
    assert project.nvs_region(1) != b"\xff" * 0x6000
    for index in (0, 2):  # never attempted: their flash is as the lab made it
        assert project.nvs_region(index) == b"\xff" * 0x6000

    # The full run afterwards does the other two and keeps b2 as it is.
    rc, out, _ = project.run()
    assert rc == 0, out
    assert {r["device_id"]: r["result"] for r in project.rows()[1:]} == {
        "b1": "provisioned",
        "b2": "unchanged",
        "b3": "provisioned",
    }


def test_the_manifest_does_not_give_the_wifi_password_away_and_upgrading_reflashes_nothing(fleet_project):
    project = fleet_project({"b1": {"esp32_mac": MACS[0]}})
    rc, out, _ = project.run(*SETTINGS_VARS, "-vvv")
    assert rc == 0, out
    assert "esp32_flash.py" in out  # the verbose output covers the module that gets the NVS image
    assert PASSWORD not in out

    # The attack works on a value of the old kind (so it is a real test) but not on the manifest.
    assert dictionary_attack(
        project, [{"device_id": "b1", "config_sha256": unkeyed(project, "b1", PASSWORD)}]
    )
    assert dictionary_attack(project, project.rows()) is None
    assert project.rows()[0]["config_sha256"].startswith("hmac-sha256:")
    for name in ("fleet.json", "fleet.csv"):
        assert (project.manifest.parent / name).stat().st_mode & 0o777 & ~0o640 == 0, name
    key = project.manifest.parent / ".config-hmac.key"
    assert key.stat().st_mode & 0o777 == 0o600

    # Upgrade: the manifest as an earlier release wrote it (unkeyed values), no key on the controller.
    data = json.loads(project.manifest.read_text())
    for row in data["rows"]:
        row["config_sha256"] = unkeyed(project, "b1", PASSWORD)
    project.manifest.write_text(json.dumps(data))
    key.unlink()
    nvs_before = project.nvs_region(0)
    rc, out, recap = project.run(*SETTINGS_VARS)
    assert rc == 0, out
    upgraded = project.rows()[-1]
    assert upgraded["result"] == "unchanged", upgraded["reason"]
    assert project.nvs_region(0) == nvs_before
    assert recap["b1"]["changed"] <= 1  # at most the new key, created on the controller
    assert key.stat().st_mode & 0o777 == 0o600
    # The board's new row is keyed, and the old rows no longer hold the attackable value.
    assert upgraded["config_sha256"].startswith("hmac-sha256:")
    assert dictionary_attack(project, project.rows()) is None

    rc, out, recap = project.run(*SETTINGS_VARS)
    assert rc == 0, out
    assert project.rows()[-1]["result"] == "unchanged"
    assert all(host["changed"] == 0 for host in recap.values()), recap
