"""The converged scenario run again with --check --diff reports changed=0 for every host: check mode
on a converged fleet predicts no change (issue 7, input safety); so does the upkeep the timer runs
(playbooks/upkeep.yml: pki, broker, renewal, status), as nothing is due on a fresh fleet. Runs
before the destructive revoke test (test_fleet_zz_revoke.py), which pytest collects after this file."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ANSIBLE_PLAYBOOK = str(Path(sys.executable).parent / "ansible-playbook")
CONVERGE = Path(os.environ["MOLECULE_SCENARIO_DIRECTORY"]) / "converge.yml"
UPKEEP = Path(os.environ["MOLECULE_PROJECT_DIRECTORY"]) / "playbooks" / "upkeep.yml"
# The inventory directory (hosts and group_vars of molecule.yml), as the provisioner uses it.
INVENTORY = str(Path(os.environ["MOLECULE_EPHEMERAL_DIRECTORY"]) / "inventory")
ANSI = re.compile(r"\x1b\[[0-9;]*m")
RECAP = re.compile(
    r"^(?P<host>\S+)\s*:\s*ok=\d+\s+changed=(?P<changed>\d+)\s+unreachable=(?P<unr>\d+)\s+failed=(?P<failed>\d+)",
    re.M,
)


@pytest.mark.parametrize(
    ("playbook", "hosts"),
    [
        (CONVERGE, {"localhost", "esp32-fleet-broker-fleet", "esp32-mol-01", "esp32-mol-02", "esp32-mol-03"}),
        (UPKEEP, {"localhost", "esp32-fleet-broker-fleet"}),
    ],
    ids=["converge", "upkeep"],
)
def test_check_diff_on_the_converged_fleet_changes_nothing(playbook, hosts):
    # The verifier inherits the provisioner's environment (ANSIBLE_CONFIG, roles and module paths).
    proc = subprocess.run(
        [ANSIBLE_PLAYBOOK, "-i", INVENTORY, str(playbook), "--check", "--diff"],
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    # Molecule forces colour on for its own output: strip the escape codes before reading the recap.
    out = ANSI.sub("", proc.stdout + proc.stderr)
    assert proc.returncode == 0, out[-4000:]
    recap = {m["host"]: (int(m["changed"]), int(m["unr"]), int(m["failed"])) for m in RECAP.finditer(out)}
    assert hosts <= set(recap), recap
    assert {h: v for h, v in recap.items() if v != (0, 0, 0)} == {}, out[-4000:]
