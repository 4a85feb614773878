"""`ansible-playbook site.yml --check --diff` on a fresh machine: a new PKI directory, no manifest, no
simulated board started (check mode does not start the lab) and this machine as the broker. The run
must succeed, report what it would change, and change nothing: no PKI, no manifest, no board, and
the host's /etc/mosquitto byte-identical."""

from .conftest import MACS, FleetProject, snapshot


def test_site_check_mode_on_a_fresh_machine_reports_and_changes_nothing(tmp_path):
    project = FleetProject(
        tmp_path,
        {"b1": {"esp32_mac": MACS[0]}, "b2": {"esp32_mac": MACS[1]}},
        brokers={"localhost": {"mosquitto_server_names": ["localhost", "127.0.0.1"]}},
    )
    roots = (project.pki, tmp_path / "manifests", project.sim_dir, "/etc/mosquitto")
    before = snapshot(*roots)
    try:
        rc, out, recap = project.run_playbook("site.yml", "--check", "--diff")
    finally:
        project.stop_lab()
    assert rc == 0, out[-6000:]
    assert "Traceback" not in out
    # It says what it would do: a CA, the broker configuration, and credentials for every board.
    assert recap["localhost"]["changed"] > 0, recap
    for board in ("b1", "b2"):
        assert f"check mode: {board} would get new credentials" in out, out[-6000:]
    assert snapshot(*roots) == before
