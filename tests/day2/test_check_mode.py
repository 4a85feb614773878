"""`ansible-playbook site.yml --check --diff` on a fresh machine: a new PKI directory, no manifest, no
simulated board started (check mode does not start the lab) and this machine as the broker. The run
must succeed, report what it would change, and change nothing: no PKI, no manifest, no board, and
the host's /etc/mosquitto byte-identical."""

import yaml

from .conftest import MACS, FleetProject, snapshot


def _check_run(project, *also_unchanged):
    """site.yml --check --diff: it succeeds, says both boards would get credentials, and changes
    nothing under the PKI, the manifests, the lab and also_unchanged."""
    roots = (project.pki, project.base / "manifests", project.sim_dir, *also_unchanged)
    before = snapshot(*roots)
    try:
        rc, out, recap = project.run_playbook("site.yml", "--check", "--diff")
    finally:
        project.stop_lab()
    assert rc == 0, out[-6000:]
    assert "Traceback" not in out
    for board in ("b1", "b2"):
        assert f"check mode: {board} would get new credentials" in out, out[-6000:]
    assert snapshot(*roots) == before
    return out, recap


def test_site_check_mode_on_a_fresh_machine_reports_and_changes_nothing(tmp_path):
    project = FleetProject(
        tmp_path,
        {"b1": {"esp32_mac": MACS[0]}, "b2": {"esp32_mac": MACS[1]}},
        brokers={"localhost": {"mosquitto_server_names": ["localhost", "127.0.0.1"]}},
    )
    _, recap = _check_run(project, "/etc/mosquitto")
    # It says what it would do: a CA, the broker configuration, and credentials for every board.
    assert recap["localhost"]["changed"] > 0, recap


def test_check_mode_on_a_brand_new_station_previews_its_boards(tmp_path):
    """A station the fleet play has never prepared has no esptool venv, and check mode creates none:
    its boards cannot be read, so they are previewed as boards that would be provisioned, not failed.
    The station is this machine over the local connection, with a venv path that does not exist."""
    venv = tmp_path / "station-venv"
    project = FleetProject(
        tmp_path,
        {
            "b1": {"esp32_mac": MACS[0], "esp32_station": "stn"},
            "b2": {"esp32_mac": MACS[1], "esp32_station": "stn"},
        },
    )
    hosts_file = project.inventory / "hosts.yml"
    inventory = yaml.safe_load(hosts_file.read_text())
    inventory["all"]["children"]["esp32_stations"] = {
        "hosts": {
            "stn": {
                # As inventories/example: the boards' play runs the esptool modules in the venv.
                "ansible_python_interpreter": str(venv / "bin" / "python"),
                "esp32_provision_station_venv": str(venv),
                # No apt or pip here: what is under test is the missing venv, not the installers.
                "esp32_provision_install_station_deps": False,
            }
        }
    }
    hosts_file.write_text(yaml.safe_dump(inventory))
    out, recap = _check_run(project, venv)
    # Without the venv the esptool modules cannot start on the station ("module interpreter ... not
    # found"): the boards are read only where the station is ready.
    assert "interpreter" not in out, out[-6000:]
    assert recap["b1"]["failed"] == recap["b2"]["failed"] == 0, recap
