"""The collection as a user gets it: built into a tarball, installed into a throwaway collections path,
and used from a playbook that lives OUTSIDE the checkout, by FQCN only, with no ansible.cfg of ours."""

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
NS = "esp32_fleet.mqtt_fleet"
# What a build must leave out: development files, and anything a run makes (state and secrets).
NOT_SHIPPED = (
    "tests/",
    "bench/",
    "molecule/",
    "esp32sim/",
    "scripts/",
    ".ci/",
    "collections/",
    "lab/",
    "pki/",
    "manifests/",
    ".venv/",
    ".git/",
)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    base = tmp_path_factory.mktemp("collection")
    # A clean environment: no ANSIBLE_* of the caller, no ansible.cfg (the cwd is outside the checkout).
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_")}
    env.update(
        ANSIBLE_COLLECTIONS_PATH=str(base / "collections"),
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_LOCAL_TEMP=str(base / "tmp"),
        PATH=f"{BIN}:{env.get('PATH', '')}",
    )
    subprocess.run(
        [str(BIN / "ansible-galaxy"), "collection", "build", "--output-path", str(base), str(ROOT)],
        cwd=base,
        env=env,
        check=True,
        capture_output=True,
        timeout=300,
    )
    [tarball] = base.glob("esp32_fleet-mqtt_fleet-*.tar.gz")
    # --no-deps: the collections it depends on come with the `ansible` package (no Galaxy here).
    subprocess.run(
        [
            str(BIN / "ansible-galaxy"),
            "collection",
            "install",
            "--no-deps",
            "--offline",
            "-p",
            str(base / "collections"),
            str(tarball),
        ],
        cwd=base,
        env=env,
        check=True,
        capture_output=True,
        timeout=300,
    )
    return base, tarball, env


def test_the_tarball_ships_the_collection_and_nothing_else(installed):
    _, tarball, _ = installed
    with tarfile.open(tarball) as tar:
        names = tar.getnames()
        for member in tar.getmembers():
            if member.isfile() and member.size < 1_000_000:
                body = tar.extractfile(member).read()
                assert b"PRIVATE KEY-----\n" not in body, member.name
    for prefix in NOT_SHIPPED:
        assert not [n for n in names if n.startswith(prefix)], prefix
    for needed in (
        "MANIFEST.json",
        "meta/runtime.yml",
        "playbooks/site.yml",
        "plugins/modules/esp32_flash.py",
        "plugins/module_utils/esp32_esptool.py",
        "plugins/filter/esp32_fleet_revoked.py",
        "roles/esp32_provision/tasks/main.yml",
        "roles/pki/meta/argument_specs.yml",
        "COPYING",
    ):
        assert needed in names, needed


def test_ansible_doc_renders_a_module_of_the_installed_collection(installed):
    base, _, env = installed
    done = subprocess.run(
        [str(BIN / "ansible-doc"), f"{NS}.esp32_flash"],
        cwd=base,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    # Rendered from the installed copy, not from the checkout.
    assert str(base / "collections" / "ansible_collections" / "esp32_fleet" / "mqtt_fleet") in done.stdout
    for word in ("Writes one or more images", "port", "EXAMPLES", "RETURN VALUES"):
        assert word in done.stdout


def test_a_playbook_outside_the_checkout_provisions_a_board_by_fqcn(installed):
    base, _, env = installed
    project = base / "user-project"
    (project / "inventory" / "group_vars").mkdir(parents=True)
    sim = project / "lab"
    (project / "inventory" / "hosts.yml").write_text(
        yaml.safe_dump(
            {
                "all": {
                    "children": {
                        "controller": {"hosts": {"localhost": None}},
                        "brokers": {"hosts": {}},
                        "esp32_devices": {
                            "hosts": {
                                "board-1": {"esp32_port": f"{sim}/ttyUSB0", "esp32_mac": "24:0a:c4:00:00:01"}
                            }
                        },
                    }
                }
            }
        )
    )
    (project / "inventory" / "group_vars" / "all.yml").write_text(
        yaml.safe_dump(
            {
                "ansible_connection": "local",
                "ansible_python_interpreter": "{{ ansible_playbook_python }}",
                "fleet_root": str(project),
                "pki_dir": str(project / "pki"),
                "pki_ca_passphrase": "test-only-passphrase",
                "pki_issue_device_certs": False,
                "lab_enabled": True,
                "lab_esp32sim_dir": str(sim),
                "lab_esp32sim_baud_pacing": False,
            }
        )
    )
    (project / "site.yml").write_text(
        yaml.safe_dump(
            [
                {"name": "Start the simulated board", "ansible.builtin.import_playbook": f"{NS}.lab"},
                {"name": "Create the PKI", "ansible.builtin.import_playbook": f"{NS}.pki"},
                {"name": "Provision the board", "ansible.builtin.import_playbook": f"{NS}.fleet"},
                {
                    "name": "Read the board back with a module of the collection",
                    "hosts": "esp32_devices",
                    "gather_facts": False,
                    "tasks": [
                        {
                            "name": "Read chip facts",
                            f"{NS}.esp32_info": {"port": "{{ esp32_port }}"},
                            "register": "info",
                        },
                        {
                            "name": "Save them",
                            "delegate_to": "localhost",
                            "ansible.builtin.copy": {
                                "content": "{{ info | to_json }}",
                                "dest": f"{project}/info.json",
                                "mode": "0600",
                            },
                        },
                    ],
                },
            ],
            sort_keys=False,
        )
    )
    try:
        done = subprocess.run(
            [str(BIN / "ansible-playbook"), "-i", "inventory", "site.yml"],
            cwd=project,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
        rows = json.loads((project / "manifests" / "fleet.json").read_text())["rows"]
        assert [(r["device_id"], r["result"]) for r in rows] == [("board-1", "provisioned")]
        info = json.loads((project / "info.json").read_text())
        assert info["mac"] == "24:0a:c4:00:00:01"
    finally:
        subprocess.run(
            [str(BIN / "esp32sim"), "fleet", "stop", "--dir", str(sim)],
            capture_output=True,
            timeout=60,
            check=False,
        )
