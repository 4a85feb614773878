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


def _load_module(tools, name):
    path = tools.ROOT / "plugins" / "modules" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_in_process(monkeypatch, capsys, module, args):
    """Run a module's main() in this process (real AnsibleModule) and return its JSON result."""
    from ansible.module_utils import basic

    monkeypatch.setattr(basic, "_ANSIBLE_ARGS", json.dumps({"ANSIBLE_MODULE_ARGS": args}).encode())
    monkeypatch.setattr(basic, "_ANSIBLE_PROFILE", "legacy")
    with pytest.raises(SystemExit):
        module.main()
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("existing", [None, 0o644], ids=["new-key", "replaced-0644-key"])
def test_a_new_private_key_is_0600_from_its_first_byte(tools, tmp_path, monkeypatch, capsys, existing):
    """Every mode the key file ever gets (os.open at creation, every chmod), with umask 0 so that
    nothing hides a wider mode: none may open it to group or others, even for a moment. A spy that
    records and calls through; the module and AnsibleModule run for real."""
    import os

    pki_private_key = _load_module(tools, "pki_private_key")
    key = tmp_path / "k.pem"
    if existing is not None:  # a key of another curve, world-readable: the module replaces it
        args = {"path": str(key), "curve": "secp384r1"}
        assert _run_in_process(monkeypatch, capsys, pki_private_key, args)["changed"]
        key.chmod(existing)
    modes = []
    real_open, real_chmod = os.open, os.chmod

    def spy_open(path, flags, mode=0o777, *args, **kwargs):
        if flags & os.O_CREAT and os.path.dirname(os.fsdecode(path)) == str(tmp_path):
            modes.append(("open", os.fsdecode(path), mode))
        return real_open(path, flags, mode, *args, **kwargs)

    def spy_chmod(path, mode, *args, **kwargs):
        if os.path.dirname(os.fsdecode(path)) == str(tmp_path):
            modes.append(("chmod", os.fsdecode(path), mode))
        return real_chmod(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "open", spy_open)
    monkeypatch.setattr(os, "chmod", spy_chmod)
    old_umask = os.umask(0)
    try:
        result = _run_in_process(monkeypatch, capsys, pki_private_key, {"path": str(key), "mode": "0600"})
    finally:
        os.umask(old_umask)
    assert result["changed"] and result["curve"] == "secp256r1", result
    assert any(call == "open" for call, _, _ in modes), modes  # the spy saw the file being created
    wider = [(call, path, oct(mode)) for call, path, mode in modes if mode & 0o077]
    assert wider == [], wider
    assert key.stat().st_mode & 0o777 == 0o600
