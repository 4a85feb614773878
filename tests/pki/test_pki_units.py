"""The role's own plugins: the SAN filters and the pki_private_key module (docs and behaviour)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest


@pytest.fixture(scope="module")
def san(tools):
    path = tools.ROOT / "plugins" / "filter" / "pki_san.py"
    spec = importlib.util.spec_from_file_location("pki_san", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_san_entries_are_typed_deduplicated_and_ordered(san):
    names = [
        "localhost",
        "127.0.0.1",
        "Broker.Example.COM",
        "2001:DB8::10",
        "IP:10.0.0.1",
        "DNS:a.b",
        "*.lan",
    ]
    assert san.pki_san_entries([*names, "localhost"]) == [
        "DNS:localhost",
        "IP:127.0.0.1",
        "DNS:broker.example.com",
        "IP:2001:db8::10",
        "IP:10.0.0.1",
        "DNS:a.b",
        "DNS:*.lan",
    ]


@pytest.mark.parametrize(
    "bad",
    ["not a host!", "999.1.1.1", "-x.example", "a..b", "under_score", "IP:host.example", "", "x" * 64, 42],
)
def test_san_invalid_reports_what_is_neither_a_name_nor_an_address(san, bad):
    assert san.pki_san_invalid(["ok.example", bad]) == [bad]


def test_a_san_string_instead_of_a_list_is_invalid(san):
    assert san.pki_san_invalid("broker.example") == ["broker.example"]


def test_ansible_doc_renders_the_module(tools):
    doc = subprocess.run(
        [str(tools.ROOT / ".venv" / "bin" / "ansible-doc"), "esp32_fleet.mqtt_fleet.pki_private_key"],
        cwd=tools.ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for word in ("regenerate", "passphrase", "EXAMPLES", "RETURN VALUES", "check_mode"):
        assert word in doc


MODULE_PLAY = textwrap.dedent(
    """\
    ---
    - name: Exercise pki_private_key
      hosts: localhost
      gather_facts: false
      vars:
        key: "{{ out }}/k.pem"
        pass: "module-test-passphrase"
      tasks:
        - {name: Check mode on a missing key, esp32_fleet.mqtt_fleet.pki_private_key: {path: "{{ key }}", passphrase: "{{ pass }}"},
           check_mode: true, register: r_check}
        - {name: Create, esp32_fleet.mqtt_fleet.pki_private_key: {path: "{{ key }}", passphrase: "{{ pass }}", mode: "0600"},
           register: r_create}
        - {name: Again, esp32_fleet.mqtt_fleet.pki_private_key: {path: "{{ key }}", passphrase: "{{ pass }}", mode: "0600"},
           register: r_again}
        - {name: Other type refused, esp32_fleet.mqtt_fleet.pki_private_key: {path: "{{ key }}", passphrase: "{{ pass }}", type: RSA,
           regenerate: false}, register: r_refused, ignore_errors: true}
        - {name: Wrong passphrase refused, esp32_fleet.mqtt_fleet.pki_private_key: {path: "{{ key }}", passphrase: "not-the-one",
           regenerate: false}, register: r_wrong, ignore_errors: true}
        - {name: Other curve replaces, esp32_fleet.mqtt_fleet.pki_private_key: {path: "{{ key }}", passphrase: "{{ pass }}",
           curve: secp384r1}, register: r_curve}
        - name: Save
          ansible.builtin.copy:
            content: "{{ {'check': r_check, 'create': r_create, 'again': r_again, 'refused': r_refused,
                          'wrong': r_wrong, 'curve': r_curve} | to_json }}"
            dest: "{{ out }}/results.json"
            mode: "0600"
    """
)


def test_module_creates_keeps_refuses_and_replaces(tools, tmp_path):
    play = tmp_path / "play.yml"
    play.write_text(MODULE_PLAY)
    proc = subprocess.run(
        [
            str(tools.ROOT / ".venv" / "bin" / "ansible-playbook"),
            "-i",
            "localhost,",
            "-c",
            "local",
            "-e",
            f"out={tmp_path}",
            "-e",
            f"ansible_python_interpreter={sys.executable}",
            str(play),
        ],
        cwd=tmp_path,
        env=dict(os.environ, ANSIBLE_CONFIG=str(tools.ROOT / "ansible.cfg")),
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout[-3000:]
    r = json.loads((tmp_path / "results.json").read_text())
    assert r["check"]["changed"] and r["check"]["reason"] == "key file missing"
    assert r["create"]["changed"] and r["create"]["curve"] == "secp256r1"
    assert not r["again"]["changed"]
    assert r["again"]["public_key_sha256"] == r["create"]["public_key_sha256"]
    assert r["refused"]["failed"] and "refusing to replace" in r["refused"]["msg"]
    assert r["wrong"]["failed"] and "passphrase does not decrypt" in r["wrong"]["msg"]
    assert r["curve"]["changed"] and r["curve"]["curve"] == "secp384r1"
    text = (tmp_path / "k.pem").read_text()
    assert text.startswith("-----BEGIN ENCRYPTED PRIVATE KEY-----")
    assert (tmp_path / "k.pem").stat().st_mode & 0o777 == 0o600
