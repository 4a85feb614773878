"""A board unplugged in the middle of its flash write, through the real playbooks: it alone fails
with a clear reason, nothing half-written is recorded as good, and a rerun after the replug finishes it."""

import hashlib

from .conftest import MACS


def test_a_board_unplugged_mid_write_fails_alone_and_a_rerun_after_replug_completes_it(fleet_project):
    project = fleet_project({f"b{i + 1}": {"esp32_mac": mac} for i, mac in enumerate(MACS)})
    # Board 2 is pulled 1 KiB into the first block of its NVS write (the image is one block).
    faults = ["1:unplug-after-write-blocks=0"]

    rc, out, _ = project.run(faults=faults)
    assert rc != 0, out
    assert "Traceback" not in out
    last = project.last()
    assert last["b1"]["result"] == "provisioned" and last["b3"]["result"] == "provisioned"
    failed = last["b2"]
    assert failed["result"] == "failed"
    reason = failed["reason"]
    assert reason.startswith("Write the images to the board and verify them: "), reason
    assert "disconnected" in reason and "port" in reason, reason
    # The half-written image is not recorded: no NVS checksum, no certificate claimed for the board.
    assert failed["nvs_md5"] == "" and failed["nvs_sha256"] == "" and failed["cert_serial"] == ""
    # The fault leaves the first KiB of the image on the board and nothing after it.
    half = project.nvs_region(1)
    assert half[:1024] != b"\xff" * 1024 and half[1024:] == b"\xff" * (0x6000 - 1024)
    # The port is gone, as with a pulled adapter; the key stays on the controller for the retry.
    assert not (project.sim_dir / "ttyUSB1").exists()
    assert (project.pki / "devices" / "b2.key").exists()
    assert not list(project.base.rglob("*.nvs.bin"))

    # Rerun with the same lab: `esp32sim fleet start` (playbooks/lab.yml) replugs board 2.
    rc, out, recap = project.run(faults=faults)
    assert rc == 0, out
    second = project.rows()[3:]
    assert {r["device_id"]: r["result"] for r in second} == {
        "b1": "unchanged",
        "b2": "provisioned",
        "b3": "unchanged",
    }
    assert recap["b1"]["changed"] == 0 and recap["b3"]["changed"] == 0 and recap["b2"]["changed"] > 0
    done = project.last()["b2"]
    assert done["reason"] == "no successful run recorded"
    assert done["nvs_md5"] and done["nvs_md5"] != hashlib.md5(half).hexdigest()

    assert hashlib.md5(project.nvs_region(1)).hexdigest() == done["nvs_md5"]
    assert not (project.pki / "devices" / "b2.key").exists()

    # Third run: nothing to do anywhere.
    rc, out, recap = project.run(faults=faults)
    assert rc == 0, out
    assert recap and all(host["changed"] == 0 for host in recap.values()), recap
    assert [r["result"] for r in project.rows()[6:]] == ["unchanged"] * 3
