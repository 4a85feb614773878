"""esp32_nvs: build, parse back, idempotence, validation naming the offending key, secrecy."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import pytest

from esp32sim.nvs import parse_nvs

SECRET = (
    "-----BEGIN EC PRIV" + "ATE KEY-----\nnot-a-real-key-but-secret-7f3a\n-----END EC PRIV" + "ATE KEY-----\n"
)


@pytest.fixture
def pem_files(tmp_path):
    ca = tmp_path / "ca.crt"
    ca.write_text("-----BEGIN CERTIFICATE-----\n" + "QUJD" * 300 + "\n-----END CERTIFICATE-----\n")
    key = tmp_path / "device.key"
    key.write_text(SECRET)
    blob = tmp_path / "blob.bin"
    blob.write_bytes(bytes(range(256)) * 8)
    return dict(ca=str(ca), key=str(key), blob=str(blob))


def fleet_namespaces(files):
    return {
        "mqtt": {
            "broker_uri": "mqtts://broker.example.net:8883",
            "device_id": "esp32-sim-01",
            "topic_root": "fleet/esp32-sim-01",
            "ca_cert": {"file": files["ca"]},
            "client_cert": {"value": "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"},
            "client_key": {"file": files["key"]},
        },
        "wifi": {"ssid": "lab", "password": "hunter2-wifi"},
        "app": {
            "interval_s": {"type": "u16", "value": 30},
            "offset": -5,
            "enabled": True,
            "big": {"type": "u64", "value": "0xFFFFFFFFFFFF"},
            "calib": {"file": files["blob"], "type": "blob"},
        },
    }


def test_round_trip_and_idempotence(run_module, tmp_path, pem_files):
    dest = tmp_path / "nvs.bin"
    ns = fleet_namespaces(pem_files)
    check = run_module("esp32_nvs", dict(dest=str(dest), namespaces=ns), check_mode=True, diff=True)
    assert check["changed"] is True and not dest.exists()

    first = run_module("esp32_nvs", dict(dest=str(dest), namespaces=ns))
    assert first["changed"] is True
    image = dest.read_bytes()
    assert len(image) == 0x6000 == first["size"]
    assert first["sha256"] == hashlib.sha256(image).hexdigest()
    assert stat.S_IMODE(os.stat(dest).st_mode) == 0o600

    parsed = parse_nvs(image)
    assert parsed["mqtt"]["broker_uri"] == "mqtts://broker.example.net:8883"
    assert parsed["mqtt"]["client_key"] == SECRET
    assert parsed["mqtt"]["ca_cert"] == Path(pem_files["ca"]).read_text()
    assert parsed["wifi"] == {"ssid": "lab", "password": "hunter2-wifi"}
    assert parsed["app"]["interval_s"] == 30
    assert parsed["app"]["offset"] == -5
    assert parsed["app"]["enabled"] == 1
    assert parsed["app"]["big"] == 0xFFFFFFFFFFFF
    assert bytes(parsed["app"]["calib"]) == bytes(range(256)) * 8

    mtime = dest.stat().st_mtime_ns
    again = run_module("esp32_nvs", dict(dest=str(dest), namespaces=ns), check_mode=True)
    assert again["changed"] is False
    again = run_module("esp32_nvs", dict(dest=str(dest), namespaces=ns))
    assert again["changed"] is False
    assert dest.stat().st_mtime_ns == mtime

    ns["wifi"]["password"] = "changed"
    changed = run_module("esp32_nvs", dict(dest=str(dest), namespaces=ns))
    assert changed["changed"] is True
    assert parse_nvs(dest.read_bytes())["wifi"]["password"] == "changed"


def test_output_is_deterministic_and_matches_the_generator_cli(run_module, tmp_path):
    """Same bytes as the upstream CLI gives for the equivalent CSV (so the image is the real format)."""
    import subprocess
    import sys

    ns = {"mqtt": {"device_id": "esp32-sim-01", "port": {"type": "u16", "value": 8883}}}
    a = run_module("esp32_nvs", dict(dest=str(tmp_path / "a.bin"), namespaces=ns))
    b = run_module("esp32_nvs", dict(dest=str(tmp_path / "b.bin"), namespaces=ns))
    assert a["sha256"] == b["sha256"]
    csv = tmp_path / "in.csv"
    csv.write_text(
        "key,type,encoding,value\nmqtt,namespace,,\ndevice_id,data,string,esp32-sim-01\nport,data,u16,8883\n"
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "esp_idf_nvs_partition_gen",
            "generate",
            str(csv),
            str(tmp_path / "cli.bin"),
            "0x6000",
        ],
        check=True,
        capture_output=True,
        cwd=tmp_path,
    )
    assert hashlib.sha256((tmp_path / "cli.bin").read_bytes()).hexdigest() == a["sha256"]


def test_secrets_never_appear_in_the_result(run_module, tmp_path, pem_files):
    result = run_module(
        "esp32_nvs", dict(dest=str(tmp_path / "n.bin"), namespaces=fleet_namespaces(pem_files))
    )
    text = json.dumps(result)
    assert "hunter2-wifi" not in text and "secret-7f3a" not in text
    assert "mqtt.client_key" in result["keys"]


def test_mode_is_enforced_on_an_existing_file(run_module, tmp_path):
    dest = tmp_path / "n.bin"
    ns = {"a": {"b": "c"}}
    run_module("esp32_nvs", dict(dest=str(dest), namespaces=ns))
    os.chmod(dest, 0o644)
    result = run_module("esp32_nvs", dict(dest=str(dest), namespaces=ns))
    assert result["changed"] is True
    assert stat.S_IMODE(os.stat(dest).st_mode) == 0o600


@pytest.mark.parametrize(
    ("namespaces", "size", "expected"),
    [
        ({"mqtt": {"a_key_of_16_char": "x"}}, 0x6000, "a_key_of_16_char"),
        ({"namespace_of_16c": {"k": "x"}}, 0x6000, "namespace_of_16c"),
        ({"mqtt": {"ca_cert": "x" * 4000}}, 0x6000, "mqtt.ca_cert"),
        ({"app": {"n": {"type": "u8", "value": 256}}}, 0x6000, "app.n"),
        ({"app": {"n": {"type": "f32", "value": 1}}}, 0x6000, "app.n"),
        ({"app": {"n": {"value": "x", "file": "/etc/hostname"}}}, 0x6000, "app.n"),
        ({"app": {"n": {"file": "/nonexistent/ca.crt"}}}, 0x6000, "app.n"),
        ({"app": {f"k{i}": "v" * 3000 for i in range(12)}}, 0x6000, "app.k"),
        ({"app": {"k": "v"}}, 0x6800, "multiple of 0x1000"),
        ({"app": {"k": "v"}}, 0x2000, "at least 0x3000"),
        ({"app": {}}, 0x6000, "app"),
    ],
)
def test_validation_names_the_offending_key(run_module, tmp_path, namespaces, size, expected):
    dest = tmp_path / "n.bin"
    result = run_module("esp32_nvs", dict(dest=str(dest), namespaces=namespaces, size=size))
    assert result["failed"] is True
    assert expected in result["msg"]
    assert not dest.exists()  # never a 0-byte or partial image


def test_fit_error_names_the_key_where_space_ran_out(run_module, tmp_path):
    namespaces = {"app": {f"k{i}": "v" * 3000 for i in range(12)}}
    result = run_module("esp32_nvs", dict(dest=str(tmp_path / "n.bin"), namespaces=namespaces))
    assert "do not fit" in result["msg"] and "app.k" in result["msg"]
    fits = run_module("esp32_nvs", dict(dest=str(tmp_path / "n.bin"), namespaces=namespaces, size="0x10000"))
    assert fits["changed"] is True and fits["size"] == 0x10000


def test_a_short_secret_is_masked_at_any_verbosity(tmp_path):
    """A 7-character Wi-Fi password (shorter than any length rule) never shows, even with -vvv."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    secret = "Zq7#xkW"
    play = [
        {
            "name": "Build an image holding a short secret",
            "hosts": "localhost",
            "gather_facts": False,
            "tasks": [
                {
                    "name": "Build the image",
                    "esp32_fleet.mqtt_fleet.esp32_nvs": {
                        "dest": str(tmp_path / "nvs.bin"),
                        "namespaces": {
                            "wifi": {"ssid": "lab", "password": secret},
                            "app": {"interval_s": {"type": "u16", "value": 30}},
                        },
                    },
                    "register": "nvs",
                },
                {"name": "Show the result", "ansible.builtin.debug": {"var": "nvs"}},
            ],
        }
    ]
    (tmp_path / "play.yml").write_text(json.dumps(play))
    env = dict(os.environ, ANSIBLE_CONFIG=str(root / "ansible.cfg"), ANSIBLE_NOCOLOR="1")
    done = subprocess.run(
        [
            str(Path(sys.executable).parent / "ansible-playbook"),
            "-vvv",
            "-i",
            "localhost,",
            "-c",
            "local",
            "-e",
            f"ansible_python_interpreter={sys.executable}",
            str(tmp_path / "play.yml"),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "invocation" in out  # -vvv shows the module's arguments: the place a leak would be
    assert secret not in out
    # Numbers are not masked, so the returned digests stay intact.
    sha256 = hashlib.sha256((tmp_path / "nvs.bin").read_bytes()).hexdigest()
    assert sha256 in out
