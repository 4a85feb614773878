"""fleet_manifest and fleet_manifest_info run as Ansible modules (ad-hoc, the project's ansible.cfg):
check mode writes nothing, a real run appends, the info module reads the rows back, and a bad row is
a clear failure, not a traceback."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def module(name, args, *flags):
    env = dict(os.environ, ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"), ANSIBLE_LOAD_CALLBACK_PLUGINS="1")
    env["ANSIBLE_STDOUT_CALLBACK"] = "ansible.builtin.json"
    done = subprocess.run(
        [
            str(BIN / "ansible"),
            "localhost",
            "-m",
            f"esp32_fleet.mqtt_fleet.{name}",
            "-a",
            json.dumps(args),
            *flags,
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    # The JSON document starts at the first line that opens it (profile_tasks prints a line before).
    lines = done.stdout.splitlines()
    start = next((i for i, line in enumerate(lines) if line == "{"), None)
    assert start is not None, done.stdout + done.stderr
    out, _ = json.JSONDecoder().raw_decode("\n".join(lines[start:]))
    return out["plays"][0]["tasks"][0]["hosts"]["localhost"]


ROWS = [
    {"device_id": "b1", "mac": "24:0a:c4:00:00:01", "result": "provisioned", "cert_serial": "42"},
    {"device_id": "b2", "result": "failed", "reason": "MAC mismatch"},
]


def test_check_mode_writes_nothing(tmp_path):
    res = module("fleet_manifest", {"path": str(tmp_path / "m"), "rows": ROWS}, "--check")
    assert res["changed"] is True
    assert res["rows_appended"] == 2
    assert res["rows_total"] == 2
    assert not (tmp_path / "m").exists()


def test_append_then_read_back(tmp_path):
    res = module("fleet_manifest", {"path": str(tmp_path), "rows": ROWS})
    assert res["changed"] is True
    assert res["summary"]["provisioned"] == ["b1"]
    assert res["summary"]["failed"] == [{"device_id": "b2", "reason": "MAC mismatch"}]
    res = module("fleet_manifest", {"path": str(tmp_path), "rows": [dict(ROWS[0], result="unchanged")]})
    assert res["rows_total"] == 3

    info = module("fleet_manifest_info", {"path": str(tmp_path)}, "--check")
    assert info["changed"] is False
    assert info["rows_total"] == 3
    assert info["last"]["b1"]["result"] == "unchanged"
    assert info["last"]["b2"]["result"] == "failed"
    assert "b2" not in info["last_success"]
    assert info["last_success"]["b1"]["cert_serial"] == "42"


def test_info_on_a_missing_manifest_is_empty(tmp_path):
    info = module("fleet_manifest_info", {"path": str(tmp_path / "none")})
    assert info["rows_total"] == 0
    assert info["last"] == {}


def test_a_bad_row_fails_cleanly(tmp_path):
    res = module("fleet_manifest", {"path": str(tmp_path), "rows": [{"device_id": "b1", "result": "done"}]})
    assert res.get("failed") is True
    assert "result must be one of" in res["msg"]
    assert "Traceback" not in json.dumps(res)
    assert not (tmp_path / "fleet.json").exists()
