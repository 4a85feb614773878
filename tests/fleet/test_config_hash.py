"""The settings fingerprint of the manifest (plugins/module_utils/fleet_config_hash.py and the
fleet_config_hash module): keyed, so the manifest does not reveal the Wi-Fi password; the key file is
0600 from its first byte and created once even by parallel boards; the unkeyed value of earlier
releases is recognised (computed exactly as their Jinja did), so upgrading does not re-flash."""

import hashlib
import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
from ansible_collections.esp32_fleet.mqtt_fleet.plugins.module_utils import fleet_config_hash as ch  # noqa: E402

MODULE = "esp32_fleet.mqtt_fleet.fleet_config_hash"
SETTINGS = {
    "device_id": "esp32-sim-01",
    "broker_uri": "mqtts://broker.test:8883",
    "topic_root": "devices/esp32-sim-01",
    "wifi_ssid": "lab",
    "ca_sha256": hashlib.sha256(b"ca").hexdigest(),
    "nvs_offset": 36864,
    "nvs_size": 24576,
}
SECRETS = {"wifi_password": "hunter2"}
# The expression earlier releases had in roles/esp32_provision/tasks/firmware.yml, verbatim but for
# the variable names.
OLD_JINJA = (
    "{{ {'device_id': s.device_id, 'broker_uri': s.broker_uri, 'topic_root': s.topic_root,"
    " 'wifi_ssid': s.wifi_ssid, 'wifi_password_sha256': pw | hash('sha256'), 'ca_sha256': s.ca_sha256,"
    " 'nvs_offset': s.nvs_offset, 'nvs_size': s.nvs_size} | to_json(sort_keys=true) | hash('sha256') }}"
)


def ansible(module, args, *flags, extra_vars=None):
    env = dict(os.environ, ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"), ANSIBLE_LOAD_CALLBACK_PLUGINS="1")
    env["ANSIBLE_STDOUT_CALLBACK"] = "ansible.builtin.json"
    cmd = [str(BIN / "ansible"), "localhost", "-m", module, "-a", json.dumps(args), *flags]
    if extra_vars:
        cmd += ["-e", json.dumps(extra_vars)]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    lines = done.stdout.splitlines()
    start = next((i for i, line in enumerate(lines) if line == "{"), None)
    assert start is not None, done.stdout + done.stderr
    out, _ = json.JSONDecoder().raw_decode("\n".join(lines[start:]))
    return out["plays"][0]["tasks"][0]["hosts"]["localhost"], done.stdout + done.stderr


def test_the_old_value_is_recomputed_exactly_as_the_old_jinja_did():
    result, _ = ansible(
        "ansible.builtin.debug", {"msg": OLD_JINJA}, extra_vars={"s": SETTINGS, "pw": "hunter2"}
    )
    assert result["msg"] == ch.legacy(SETTINGS, SECRETS)


def test_the_keyed_value_depends_on_key_settings_and_secret():
    key, other = b"k" * 32, b"o" * 32
    value = ch.keyed(key, SETTINGS, SECRETS)
    assert value.startswith("hmac-sha256:") and len(value) == len("hmac-sha256:") + 64
    assert value == ch.keyed(key, dict(reversed(SETTINGS.items())), SECRETS)  # order does not matter
    assert value != ch.keyed(other, SETTINGS, SECRETS)
    assert value != ch.keyed(key, dict(SETTINGS, wifi_ssid="lab2"), SECRETS)
    assert value != ch.keyed(key, SETTINGS, {"wifi_password": "hunter3"})
    with pytest.raises(ch.ConfigHashError, match="both in settings and secrets"):
        ch.keyed(key, SETTINGS, {"wifi_ssid": "x"})


def test_decide_accepts_the_keyed_or_the_old_value_of_the_same_settings():
    key = b"k" * 32
    old = ch.legacy(SETTINGS, SECRETS)
    new = ch.keyed(key, SETTINGS, SECRETS)
    assert ch.decide(new, SETTINGS, SECRETS, key) == (True, "keyed")
    assert ch.decide(old, SETTINGS, SECRETS, key) == (True, "legacy")
    assert ch.decide(old, SETTINGS, SECRETS, None) == (True, "legacy")  # check mode, no key yet
    assert ch.decide("", SETTINGS, SECRETS, key) == (False, "none")
    # Changed settings (or another key) are a difference in either form.
    assert ch.decide(old, SETTINGS, {"wifi_password": "hunter3"}, key) == (False, "different")
    assert ch.decide(new, dict(SETTINGS, nvs_size=8192), SECRETS, key) == (False, "different")
    assert ch.decide(new, SETTINGS, SECRETS, b"o" * 32) == (False, "different")
    assert ch.decide(new, SETTINGS, SECRETS, None) == (False, "different")


def test_the_key_is_created_0600_whatever_the_umask_and_then_reused(tmp_path):
    path = tmp_path / "manifests" / ".config-hmac.key"
    old_umask = os.umask(0)
    try:
        key, created = ch.ensure_key(str(path))
    finally:
        os.umask(old_umask)
    assert created is True and len(key) == 32
    assert path.stat().st_mode & 0o777 == 0o600
    assert ch.ensure_key(str(path)) == (key, False)
    assert sorted(p.name for p in path.parent.iterdir()) == [".config-hmac.key"]  # no temp file left


def _ensure(path, queue):
    queue.put(ch.ensure_key(path))


def test_parallel_first_uses_agree_on_one_key(tmp_path):
    path = str(tmp_path / ".config-hmac.key")
    queue = multiprocessing.Queue()
    workers = [multiprocessing.Process(target=_ensure, args=(path, queue)) for _ in range(8)]
    for w in workers:
        w.start()
    results = [queue.get(timeout=30) for _ in workers]
    for w in workers:
        w.join()
    assert len({key for key, _ in results}) == 1
    assert sum(created for _, created in results) == 1


def test_a_damaged_key_is_refused_not_replaced(tmp_path):
    path = tmp_path / ".config-hmac.key"
    path.write_text("not hex\n")
    with pytest.raises(ch.ConfigHashError, match="does not hold a key"):
        ch.ensure_key(str(path))
    assert path.read_text() == "not hex\n"


def test_module_check_mode_creates_nothing_then_real_runs_create_once(tmp_path):
    path = tmp_path / ".config-hmac.key"
    args = {
        "key_path": str(path),
        "settings": SETTINGS,
        "secrets": SECRETS,
        "recorded": ch.legacy(SETTINGS, SECRETS),
    }
    check, _ = ansible(MODULE, args, "--check")
    assert check["changed"] is True and check["config_sha256"] == ""
    assert (check["recorded_matches"], check["recorded_style"]) == (True, "legacy")
    assert not path.exists()

    first, out = ansible(MODULE, args)
    assert first["changed"] is True and first["key_created"] is True
    assert (first["recorded_matches"], first["recorded_style"]) == (True, "legacy")
    assert "hunter2" not in out

    again, _ = ansible(
        "esp32_fleet.mqtt_fleet.fleet_config_hash", dict(args, recorded=first["config_sha256"])
    )
    assert again["changed"] is False
    assert again["config_sha256"] == first["config_sha256"]
    assert (again["recorded_matches"], again["recorded_style"]) == (True, "keyed")
    check, _ = ansible(
        "esp32_fleet.mqtt_fleet.fleet_config_hash", dict(args, recorded=first["config_sha256"]), "--check"
    )
    assert check["changed"] is False and check["recorded_style"] == "keyed"


def test_module_reports_a_damaged_key_cleanly(tmp_path):
    path = tmp_path / ".config-hmac.key"
    path.write_text("short\n")
    res, _ = ansible(
        "esp32_fleet.mqtt_fleet.fleet_config_hash", {"key_path": str(path), "settings": SETTINGS}
    )
    assert res["failed"] is True
    assert "does not hold a key" in res["msg"]
    assert "Traceback" not in json.dumps(res)
