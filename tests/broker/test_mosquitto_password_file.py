"""The mosquitto role's password-file module: mosquitto's own tools and broker agree with its hashes,
and the module is idempotent (check, real, idempotent check, idempotent real) without leaking passwords.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
LIBRARY = ROOT / "plugins" / "modules"
BIN = Path(sys.executable).parent

# mosquitto and mosquitto-clients are Debian packages `make test` installs (TEST_DEBS).
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def load():
    path = LIBRARY / "mosquitto_password_file.py"
    spec = importlib.util.spec_from_file_location("mosquitto_password_file", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


mpf = load()
# The module's default, which the role's mosquitto_password_iterations default repeats.
DEFAULT_ITERATIONS = yaml.safe_load(mpf.DOCUMENTATION)["options"]["iterations"]["default"]


def test_default_iterations_follow_owasp_and_the_role_uses_them():
    defaults = yaml.safe_load((ROOT / "roles" / "mosquitto" / "defaults" / "main.yml").read_text())
    assert DEFAULT_ITERATIONS >= 210000  # OWASP, PBKDF2-HMAC-SHA512
    assert defaults["mosquitto_password_iterations"] == DEFAULT_ITERATIONS
    task = (ROOT / "roles" / "mosquitto" / "tasks" / "passwords.yml").read_text()
    assert 'iterations: "{{ mosquitto_password_iterations }}"' in task


def test_hash_round_trip_and_format():
    encoded = mpf.hash_password("s3cret", 101)
    kind, iterations, salt, digest = encoded.split("$")[1:]
    assert (kind, iterations) == ("7", "101")
    assert len(salt) == 16 and len(digest) == 88  # base64 of 12 and 64 bytes
    assert mpf.verify_password("s3cret", encoded)
    assert not mpf.verify_password("s3cret ", encoded)
    assert not mpf.verify_password("s3cret", "$6$abc$def")
    assert not mpf.verify_password("s3cret", "$7$101$!!$??")


def test_plan_keeps_verified_entries_rehashes_changed_and_removes_absent():
    keep = mpf.hash_password("same", 101)
    old = mpf.hash_password("old", 101)
    existing = [("alice", keep), ("bob", old), ("carol", keep), ("dave", keep), ("alice", old)]
    users = [
        {"name": "alice", "password": "same", "state": "present"},
        {"name": "bob", "password": "new", "state": "present"},
        {"name": "carol", "password": None, "state": "absent"},
        {"name": "erin", "password": "fresh", "state": "present"},
    ]
    entries, added, updated, rehashed, removed = mpf.plan(existing, users, exclusive=True, iterations=101)
    assert [u for u, _ in entries] == ["alice", "bob", "erin"]
    assert dict(entries)["alice"] == keep  # untouched: no new salt
    assert mpf.verify_password("new", dict(entries)["bob"])
    assert (added, updated, rehashed, removed) == (["erin"], ["bob"], [], ["carol", "dave", "alice"])
    entries, _, _, _, removed = mpf.plan(existing[:4], users[:1], exclusive=False, iterations=101)
    assert [u for u, _ in entries] == ["alice", "bob", "carol", "dave"] and removed == []


def test_plan_rehashes_a_hash_below_the_configured_iterations_once():
    weak, strong = mpf.hash_password("pw", 101), mpf.hash_password("pw", 5000)
    existing = [("weak", weak), ("strong", strong), ("changed", mpf.hash_password("old", 101))]
    users = [{"name": n, "password": "pw", "state": "present"} for n in ("weak", "strong", "changed")]
    entries, added, updated, rehashed, removed = mpf.plan(existing, users, exclusive=True, iterations=2000)
    assert (added, updated, rehashed, removed) == ([], ["changed"], ["weak"], [])
    new = dict(entries)
    assert mpf.iterations_of(new["weak"]) == 2000 and mpf.verify_password("pw", new["weak"])
    assert mpf.iterations_of(new["changed"]) == 2000 and mpf.verify_password("pw", new["changed"])
    assert new["strong"] == strong  # more iterations than asked: kept as it is
    # Once: the re-made hash has enough iterations, so the next run keeps everything.
    again, *changes = mpf.plan(entries, users, exclusive=True, iterations=2000)
    assert again == entries and changes == [[], [], [], []]
    assert mpf.iterations_of("$6$abc$def") == 0


def test_verifies_hashes_written_by_mosquitto_passwd(tmp_path):
    path = tmp_path / "pw"
    path.touch(mode=0o600)
    # mosquitto_passwd prompts twice on stdin (never -b, which would put the password in argv).
    subprocess.run(["mosquitto_passwd", str(path), "alice"], input="p4ss\np4ss\n", text=True, check=True)
    [(user, encoded)] = mpf.parse(path.read_text())
    assert user == "alice" and encoded.startswith("$7$")
    assert mpf.verify_password("p4ss", encoded)
    assert not mpf.verify_password("p4sS", encoded)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("iterations", [101, DEFAULT_ITERATIONS])
def test_mosquitto_accepts_the_module_hashes(tmp_path, iterations):
    """A real broker with a password file from this module: right password in, wrong one out."""
    pwfile = tmp_path / "passwd"
    pwfile.write_text(mpf.render([("app", mpf.hash_password("rightpw", iterations))]))
    port = _free_port()
    conf = tmp_path / "mosquitto.conf"
    # `user root`: the test's temp dir is private to root, and mosquitto would otherwise drop to its
    # own user before reading the password file.
    user = "user root\n" if os.geteuid() == 0 else ""
    conf.write_text(f"{user}listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {pwfile}\n")
    broker = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(50):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
            time.sleep(0.1)

        def connack(password):
            client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
            client.username_pw_set("app", password)
            codes = []
            client.on_connect = lambda c, u, flags, rc, props: codes.append(rc)
            client.connect("127.0.0.1", port)
            for _ in range(100):
                client.loop(timeout=0.1)
                if codes:
                    break
            client.disconnect()
            return codes[0]

        assert connack("rightpw") == 0
        refused = connack("wrongpw")
        assert refused.is_failure and refused != 0
    finally:
        broker.terminate()
        broker.wait(timeout=10)


def _playbook(path):
    """Five runs of the module (check, real, check, real, changed users) and their results as JSON."""
    v1 = [{"name": "alice", "password": "first-secret"}, {"name": "bob", "password": "bob-secret"}]
    v2 = [{"name": "alice", "password": "second-secret"}, {"name": "bob", "state": "absent"}]
    runs = [("check 1", v1, True), ("real 1", v1, False), ("check 2", v1, True), ("real 2", v1, False),
            ("change", v2, False)]  # fmt: skip
    tasks = [
        {
            "name": name,
            "esp32_fleet.mqtt_fleet.mosquitto_password_file": {
                "path": str(path),
                "users": users,
                "mode": "0600",
            },
            "check_mode": check,
            "register": f"r{i}",
            "no_log": True,
        }
        for i, (name, users, check) in enumerate(runs, 1)
    ]
    results = "[r1, r2, r3, r4, r5] | community.general.remove_keys(target=['invocation']) | to_json"
    tasks.append(
        {
            "name": "Save the results",
            "ansible.builtin.copy": {
                "dest": f"{path}.json",
                "mode": "0600",
                "content": "{{ " + results + " }}",
            },
        }
    )
    return json.dumps([{"hosts": "localhost", "gather_facts": False, "tasks": tasks}])


def _run(tmp_path, playbook_text):
    playbook = tmp_path / "play.yml"
    playbook.write_text(playbook_text)
    env = dict(os.environ, ANSIBLE_LIBRARY=str(LIBRARY), ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"))
    return subprocess.run(
        [str(BIN / "ansible-playbook"), "-i", "localhost,", "-c", "local", "-v", str(playbook),
         "-e", f"ansible_python_interpreter={sys.executable}"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )  # fmt: skip


def test_module_rehashes_a_mosquitto_passwd_entry_once(tmp_path):
    """A file mosquitto_passwd wrote (101 iterations): check and real run re-hash it at the module's
    default, the next check and real run change nothing, and the broker's password still works."""
    path = tmp_path / "passwd"
    path.touch(mode=0o600)
    subprocess.run(["mosquitto_passwd", str(path), "alice"], input="p4ss\np4ss\n", text=True, check=True)
    assert mpf.iterations_of(mpf.parse(path.read_text())[0][1]) == 101
    users = [{"name": "alice", "password": "p4ss"}]
    runs = [("check 1", True), ("real 1", False), ("check 2", True), ("real 2", False)]
    tasks = [
        {"name": name, "mosquitto_password_file": {"path": str(path), "users": users, "mode": "0600"},
         "check_mode": check, "register": f"r{i}", "no_log": True}
        for i, (name, check) in enumerate(runs, 1)
    ]  # fmt: skip
    results = "[r1, r2, r3, r4] | community.general.remove_keys(target=['invocation']) | to_json"
    tasks.append(
        {
            "name": "Save",
            "ansible.builtin.copy": {
                "dest": f"{path}.json",
                "mode": "0600",
                "content": "{{ " + results + " }}",
            },
        }
    )
    result = _run(tmp_path, json.dumps([{"hosts": "localhost", "gather_facts": False, "tasks": tasks}]))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "p4ss" not in result.stdout + result.stderr
    r1, r2, r3, r4 = json.loads(Path(f"{path}.json").read_text())
    assert [r["changed"] for r in (r1, r2, r3, r4)] == [True, True, False, False]
    assert r1["rehashed"] == r2["rehashed"] == ["alice"] and r2["updated"] == []
    assert "alice (re-hashed: too few iterations)" in r2["diff"]["after"]
    [(user, encoded)] = mpf.parse(path.read_text())
    assert user == "alice" and mpf.iterations_of(encoded) == DEFAULT_ITERATIONS
    assert mpf.verify_password("p4ss", encoded)


def test_module_check_real_idempotent_and_change(tmp_path):
    path = tmp_path / "passwd"
    playbook = tmp_path / "play.yml"
    playbook.write_text(_playbook(path))
    env = dict(os.environ, ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"))
    result = subprocess.run(
        [str(BIN / "ansible-playbook"), "-i", "localhost,", "-c", "local", "-v", str(playbook),
         "-e", f"ansible_python_interpreter={sys.executable}"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    for secret in ("first-secret", "second-secret", "bob-secret"):
        assert secret not in result.stdout + result.stderr
    r1, r2, r3, r4, r5 = json.loads(Path(f"{path}.json").read_text())
    assert [r["changed"] for r in (r1, r2, r3, r4, r5)] == [True, True, False, False, True]
    assert r2["added"] == ["alice", "bob"]
    assert (r5["updated"], r5["removed"]) == (["alice"], ["bob"])
    [(user, encoded)] = mpf.parse(path.read_text())
    assert user == "alice" and mpf.verify_password("second-secret", encoded)
    assert oct(path.stat().st_mode & 0o777) == "0o600"
