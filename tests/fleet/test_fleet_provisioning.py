"""End to end through playbooks/lab.yml and playbooks/fleet.yml against simulated boards: failure
isolation, rerun, idempotence (changed=0), key removal, MAC pinning and chip refusal."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MACS = ["24:0a:c4:00:00:01", "24:0a:c4:00:00:02", "24:0a:c4:00:00:03"]


def test_a_faulted_board_fails_alone_and_a_rerun_fixes_it(fleet_project):
    project = fleet_project({f"b{i + 1}": {"esp32_mac": mac} for i, mac in enumerate(MACS)})

    # Run 1: board 2 corrupts a flash block, so its write cannot verify.
    rc, out, _ = project.run(faults=["1:corrupt-block=1"])
    assert rc != 0, out
    last = project.last()
    assert last["b1"]["result"] == "provisioned"
    assert last["b3"]["result"] == "provisioned"
    assert last["b2"]["result"] == "failed"
    assert "1 board(s) failed: b2 (" in out
    assert "b2: failed" in out
    # Verified boards keep no private key on the controller; the failed one keeps its key for the retry.
    assert not (project.pki / "devices" / "b1.key").exists()
    assert not (project.pki / "devices" / "b3.key").exists()
    assert (project.pki / "devices" / "b2.key").exists()
    # No NVS image (it holds the key) was ever written to a file: it is built in memory.
    assert not list(project.base.rglob("*.nvs.bin"))
    assert not (project.base / "manifests" / ".work").exists()

    # Run 2: the fault is gone (a board swapped for a good one); only board 2 is redone.
    project.stop_lab()
    rc, out, recap = project.run()
    assert rc == 0, out
    run2 = project.rows()[3:]
    assert {r["device_id"]: r["result"] for r in run2} == {
        "b1": "unchanged",
        "b2": "provisioned",
        "b3": "unchanged",
    }
    assert recap["b1"]["changed"] == 0 and recap["b3"]["changed"] == 0
    assert recap["b2"]["changed"] > 0
    assert not (project.pki / "devices" / "b2.key").exists()

    # Run 3: nothing to do anywhere, and the manifest says so.
    rc, out, recap = project.run()
    assert rc == 0, out
    assert recap and all(host["changed"] == 0 for host in recap.values()), recap
    run3 = project.rows()[6:]
    assert [r["result"] for r in run3] == ["unchanged"] * 3
    assert all(r["cert_serial"] and r["nvs_sha256"] and r["esptool_version"] for r in run3)


def test_an_erased_board_gets_a_new_key_and_its_old_certificate_is_revoked(fleet_project):
    project = fleet_project({"b1": {"esp32_mac": MACS[0]}})
    rc, out, _ = project.run()
    assert rc == 0, out
    first = project.last()["b1"]
    assert project.nvs_region(0) != b"\xff" * 0x6000

    # Wipe the credentials on the board (as a user erasing flash would).
    project.stop_lab()
    with open(project.sim_dir / "ttyUSB0.flash", "r+b") as handle:
        handle.seek(0x9000)
        handle.write(b"\xff" * 0x6000)

    rc, out, _ = project.run()
    assert rc == 0, out
    second = project.last()["b1"]
    assert second["result"] == "provisioned"
    assert "NVS partition differs" in second["reason"]
    assert second["cert_serial"] != first["cert_serial"]
    revoked = (project.pki / "ca" / "revoked.yml").read_text()
    assert first["cert_serial"] in revoked
    assert second["cert_serial"] not in revoked


def test_a_pinned_mac_or_another_chip_is_refused_without_writing(fleet_project):
    project = fleet_project(
        {
            "b1": {"esp32_mac": MACS[0]},
            "b2": {"esp32_mac": "24:0a:c4:00:00:99"},
            "b3": {"esp32_mac": MACS[2]},
        }
    )
    rc, out, _ = project.run(faults=["2:chip=esp32s3"])
    assert rc != 0, out
    last = project.last()
    assert last["b1"]["result"] == "provisioned"
    assert last["b2"]["result"] == "failed"
    assert "MAC mismatch" in last["b2"]["reason"]
    assert "24:0a:c4:00:00:02" in last["b2"]["reason"]
    assert last["b3"]["result"] == "failed"
    assert "ESP32-S3, not ESP32" in last["b3"]["reason"]
    # Refused before any credential exists for them, and nothing written to their flash.
    for index, name in ((1, "b2"), (2, "b3")):
        assert not (project.pki / "devices" / f"{name}.crt").exists()
        assert project.nvs_region(index) == b"\xff" * 0x6000


def test_firmware_from_the_firmware_directory_is_flashed_and_updated_alone(fleet_project, tmp_path):
    firmware_dir = tmp_path / "firmware"
    firmware_dir.mkdir()
    image = firmware_dir / "0x10000_app.bin"
    image.write_bytes(bytes(range(256)) * 256)  # 64 KiB
    project = fleet_project({"b1": {"esp32_mac": MACS[0]}})
    fw = ("-e", f"esp32_provision_firmware_dir={firmware_dir}")

    rc, out, _ = project.run(*fw)
    assert rc == 0, out
    first = project.last()["b1"]
    assert first["result"] == "provisioned"
    assert first["firmware"][0]["offset"] == "0x10000"
    assert project.nvs_region(0, 0x10000, 0x10000) == image.read_bytes()

    rc, out, recap = project.run(*fw)
    assert rc == 0, out
    assert project.last()["b1"]["result"] == "unchanged"
    assert recap["b1"]["changed"] == 0

    # A new firmware build: only the firmware is written, the credentials (and certificate) stay.
    image.write_bytes(bytes(reversed(range(256))) * 256)
    rc, out, recap = project.run(*fw)
    assert rc == 0, out
    third = project.last()["b1"]
    assert third["result"] == "provisioned"
    assert third["reason"] == "firmware 0x10000_app.bin differs"
    assert third["cert_serial"] == first["cert_serial"]
    assert third["nvs_md5"] == first["nvs_md5"]
    assert project.nvs_region(0, 0x10000, 0x10000) == image.read_bytes()
    assert first["cert_serial"] not in (project.pki / "ca" / "revoked.yml").read_text()


def test_a_board_whose_certificate_is_due_is_reflashed_with_a_renewed_one(fleet_project):
    project = fleet_project({"b1": {"esp32_mac": MACS[0]}})
    # Run 1: a short-lived certificate (20 days, renewal window 10 days): not due yet.
    short = ("-e", "pki_client_validity_days=20", "-e", "pki_renew_before_days=10")
    rc, out, _ = project.run(*short, "-e", "esp32_provision_cert_renew_days=10")
    assert rc == 0, out
    first = project.last()["b1"]
    assert first["result"] == "provisioned"
    nvs_before = project.nvs_region(0)

    # Run 2: the normal settings (365 days, 30-day window): the 20-day certificate is now due.
    rc, out, recap = project.run()
    assert rc == 0, out
    second = project.last()["b1"]
    assert second["result"] == "provisioned"
    # The renewal window is written to NVS too (mqtt/renew_days: 10, now 30).
    assert second["reason"].startswith("settings changed; certificate renewed (expires "), second["reason"]
    assert "certificate renewed" in out  # the run summary says why the board was re-flashed
    assert second["cert_serial"] != first["cert_serial"]
    assert second["cert_not_after"] > first["cert_not_after"]
    assert project.nvs_region(0) != nvs_before
    assert recap["b1"]["changed"] > 0
    # The superseded certificate is revoked; the new one is not.
    revoked = (project.pki / "ca" / "revoked.yml").read_text()
    assert first["cert_serial"] in revoked
    assert second["cert_serial"] not in revoked

    # Run 3: renewed, nothing left to do.
    rc, out, recap = project.run()
    assert rc == 0, out
    assert project.last()["b1"]["result"] == "unchanged"
    assert all(host["changed"] == 0 for host in recap.values()), recap


def test_a_firmware_image_running_into_the_nvs_partition_is_refused_before_writing(fleet_project, tmp_path):
    # A merged bootloader+app image: it starts at 0x1000, before the NVS partition (0x9000-0xefff),
    # and its 0xA000 bytes end at 0xb000, inside it.
    firmware_dir = tmp_path / "firmware"
    firmware_dir.mkdir()
    project = fleet_project({"b1": {"esp32_mac": MACS[0]}})
    fw = ("-e", f"esp32_provision_firmware_dir={firmware_dir}")
    rc, out, _ = project.run(*fw)
    assert rc == 0, out
    nvs = project.nvs_region(0)
    assert nvs != b"\xff" * 0x6000

    # The firmware-only update path (credentials current, firmware new) is the one that wrote it.
    merged = firmware_dir / "0x1000_merged.bin"
    merged.write_bytes(b"\x5a" * 0xA000)
    rows = len(project.rows())
    rc, out, _ = project.run(*fw)
    assert rc != 0, out
    assert (
        f"b1: {merged} (0xa000 bytes at 0x1000, sectors 0x1000-0xafff) overlaps the NVS partition "
        "(0x6000 bytes at 0x9000, sectors 0x9000-0xefff): both cover 0x9000-0xafff" in out
    ), out
    # Stopped before any board was touched: nothing written, nothing recorded.
    assert project.nvs_region(0) == nvs
    assert project.nvs_region(0, 0x1000, 0x1000) == b"\xff" * 0x1000
    assert len(project.rows()) == rows


def test_images_of_one_board_are_checked_against_each_other_by_their_end(fleet_project, tmp_path):
    # A board's own list: the app is one byte longer than 64 KiB, so writing it erases the sector at
    # 0x20000 where the next image starts. Refused before a certificate is issued, not in the flash.
    app = tmp_path / "app.bin"
    app.write_bytes(b"\x01" * 0x10001)
    data = tmp_path / "data.bin"
    data.write_bytes(b"\x02" * 0x100)
    images = [{"offset": "0x10000", "path": str(app)}, {"offset": "0x20000", "path": str(data)}]
    project = fleet_project({"b1": {"esp32_mac": MACS[0], "esp32_firmware_images": images}})
    rc, out, _ = project.run()
    assert rc != 0, out
    assert f"b1: {app} (0x10001 bytes at 0x10000, sectors 0x10000-0x20fff) overlaps {data}" in out, out
    assert project.nvs_region(0) == b"\xff" * 0x6000
    assert not (project.pki / "devices" / "b1.crt").exists()


def test_a_topic_prefix_only_the_play_sees_is_refused_before_anything_is_issued(fleet_project, tmp_path):
    """The broker's ACL reads the prefix from the inventory: a role parameter would put a topic root
    into NVS that the broker never grants, so the board task refuses the board first."""
    project = fleet_project({"b1": {"esp32_mac": MACS[0]}})
    playbook = tmp_path / "prefix-in-play.yml"
    playbook.write_text(
        f"""---
- name: Create the CA
  hosts: controller
  gather_facts: false
  roles:
    - role: esp32_fleet.mqtt_fleet.pki
      vars:
        pki_issue_device_certs: false
- name: Start the lab
  ansible.builtin.import_playbook: {ROOT}/playbooks/lab.yml
- name: Provision with a prefix set where only this play sees it
  hosts: esp32_devices
  gather_facts: false
  roles:
    - role: esp32_fleet.mqtt_fleet.esp32_provision
      vars:
        esp32_provision_topic_prefix: elsewhere
"""
    )
    _, out, _ = project.run_playbook(playbook)
    assert "b1 FAILED (esp32_provision_topic_prefix gives the topic root elsewhere/b1" in out, out[-3000:]
    assert "would grant devices/b1/#" in out
    assert not (project.pki / "devices" / "b1.crt").exists()
    assert not (project.pki / "devices" / "b1.key").exists()
    assert project.nvs_region(0) == b"\xff" * 0x6000
