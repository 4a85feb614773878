"""The schedule the upkeep role installs, rendered into a temp root by tests/upkeep/install.yml: the
cron entry (where systemd is not PID 1) and the systemd service and timer, checked by
systemd-analyze; a second install changes nothing."""

from __future__ import annotations

import re
import shutil
import stat
import subprocess

import pytest


def test_the_cron_entry_runs_the_wrapper_daily(installed):
    lines = installed.cron_file.read_text().splitlines()
    assert lines[0] == "#Ansible: esp32-fleet-upkeep"
    match = re.fullmatch(r"(\d+) 4 \* \* \* root (\S+) >/dev/null 2>&1", lines[1])
    assert match and 0 <= int(match[1]) < 60, lines
    assert match[2] == str(installed.script)
    # cron ignores /etc/cron.d files that group or others can write.
    assert stat.S_IMODE(installed.cron_file.stat().st_mode) & 0o022 == 0


def test_the_wrapper_is_root_owned_and_executable(installed):
    st = installed.script.stat()
    assert st.st_uid == 0 and stat.S_IMODE(st.st_mode) == 0o755
    subprocess.run(["bash", "-n", str(installed.script)], check=True)


def test_the_systemd_units_verify(installed):
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze is not installed")  # Debian's systemd package ships it
    service = installed.systemd_dir / "esp32-fleet-upkeep.service"
    timer = installed.systemd_dir / "esp32-fleet-upkeep.timer"
    proc = subprocess.run(
        ["systemd-analyze", "verify", str(service), str(timer)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Type=oneshot" in service.read_text()
    assert f"ExecStart={installed.script}" in service.read_text()
    text = timer.read_text()
    assert "OnCalendar=daily" in text and "Persistent=true" in text and "RandomizedDelaySec=1h" in text


def test_installing_again_changes_nothing(installed):
    for args in (["--check"], []):
        run = installed.playbook("tests/upkeep/install.yml", *args)
        assert run.rc == 0 and run.changed == 0, run.output[-3000:]
