"""The upkeep role's systemd branch in a container with systemd as PID 1: a daily, persistent,
randomized timer that systemd accepted, and a failed run that is loud (unit failed, one journal
line under the wrapper's tag, the state file the fleet status reads)."""

import json


def test_timer_is_enabled_active_daily_persistent_and_randomized(host):
    timer = host.service("esp32-fleet-upkeep.timer")
    assert timer.is_enabled and timer.is_running
    show = host.check_output(
        "systemctl show esp32-fleet-upkeep.timer -p TimersCalendar -p Persistent -p RandomizedDelayUSec"
    )
    assert "OnCalendar=*-*-* 00:00:00" in show and "Persistent=yes" in show  # "daily", normalized
    assert "RandomizedDelayUSec=1h" in show
    # systemd computed a next elapse: the timer is really scheduled.
    nxt = "systemctl show esp32-fleet-upkeep.timer -p NextElapseUSecRealtime --value"
    assert host.check_output(nxt).strip()
    unit = host.check_output("systemctl show esp32-fleet-upkeep.service -p Type -p ExecStart")
    assert "Type=oneshot" in unit and "/usr/local/sbin/esp32-fleet-upkeep" in unit


def test_a_failed_upkeep_fails_the_unit_logs_and_records_it(host):
    # The checkout is not in the container, so this run must fail (wrapper exit 2).
    run = host.run("systemctl start esp32-fleet-upkeep.service")
    assert run.rc != 0
    assert host.run("systemctl is-failed esp32-fleet-upkeep.service").stdout.strip() == "failed"
    journal = host.check_output("journalctl -t esp32-fleet-upkeep --no-pager -o cat")
    assert "FAILED: no project directory" in journal
    state = json.loads(host.file("/var/lib/esp32-fleet-upkeep/last-run.json").content_string)
    assert state["rc"] == 2
    assert host.file("/var/lib/esp32-fleet-upkeep/last-run.json").mode == 0o640
    # Reset for the next test run of this container (the scenario destroys it anyway).
    host.run("systemctl reset-failed esp32-fleet-upkeep.service")
