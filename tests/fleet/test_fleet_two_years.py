"""Two years in the field with nobody at the keyboard: the clock moves (libfaketime) for the broker,
the boards' firmware and the monitor together, and at every step the installed upkeep wrapper runs
as its timer would run it, on that day. The fleet must come out of it with every board publishing,
having renewed its certificate over the air at least twice, with the broker's certificate renewed,
a CRL re-signed at every step and one complete CA rotation (introduce, switch, retire), no station
write after the first provisioning and no board silent longer than its reconnect backoff.

The clock: one file (FAKETIME_TIMESTAMP_FILE, "+<days>d"), read once a second by libfaketime in
every process of the fleet: the broker, the boards (`esp32sim run`), the monitor
(tests/fleet/monitor_process.py) and the upkeep (the installed wrapper, ansible-playbook and its
modules). The monotonic clock stays real (FAKETIME_DONT_FAKE_MONOTONIC), so the silences measured
are real seconds; tests/fleet/faketime_sleep says why Python's time.sleep needs help with that.

The broker is the test's real Mosquitto (tests/fleet/living.py), so every run is --limit localhost
(the broker play would configure this machine's own Mosquitto); after each run the test does the
broker play's part for it (Broker.sync: restart when the trust bundle changed, SIGHUP when only the
CRL or the broker certificate did). At a rotation phase the pki play runs first and the broker is
synced before the upkeep, as upkeep.yml deploys to the brokers before the boards renew.

The schedule (upkeep_period_days 120, one step per period): CRLs of 180 days re-signed 150 days
before their next update, so at every step; leaf certificates of 365 days renewed 150 days before
they expire. Expected: the boards renew at day 240 (window), 360 (introduce: onto the new CA) and
600 (window); the broker's certificate at 240, 480 (switch: from the new CA) and 720.
"""

from __future__ import annotations

import datetime
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from cryptography import x509

from .conftest import BIN, ROOT
from .living import (
    MONITOR_PASSWORD,
    TEST_BROKER,
    Broker,
    crl_paths,
    current_credential,
    field_state,
    free_port,
    station_state,
)

SLEEP_FIX = Path(__file__).with_name("faketime_sleep")
LIBFAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1")
STEPS = [(120, None), (240, None), (360, "introduce"), (480, "switch"), (600, "retire"), (720, None)]
# The firmware's reconnect backoff cap (esp32sim run --backoff-cap, protocol section 6) plus one
# reading interval: the longest a board may be silent while its broker goes away and comes back.
MAX_SILENCE = 60 + 5


def cert(pem: str | bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem.encode() if isinstance(pem, str) else pem)


def in_use(project, index: int) -> x509.Certificate:
    """The certificate the board connects with."""
    return cert(current_credential(field_state(project, index), station_state(project, index))[0])


def crls_signed(pki: Path) -> dict[str, datetime.datetime]:
    """When each CA's CRL was last signed (both during a rotation)."""
    return {p.parent.name: x509.load_pem_x509_crl(p.read_bytes()).last_update_utc for p in crl_paths(pki)}


class Clock:
    """The moving clock of the broker, the boards and the monitor."""

    def __init__(self, path: Path):
        self.path = path
        self.set(0)

    def set(self, days: int) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(f"+{days}d\n")
        tmp.replace(self.path)

    def env(self) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FAKETIME")}
        return dict(
            env,
            LD_PRELOAD=str(LIBFAKETIME),
            FAKETIME_TIMESTAMP_FILE=str(self.path),
            FAKETIME_CACHE_DURATION="1",
            FAKETIME_DONT_FAKE_MONOTONIC="1",
            PYTHONPATH=os.pathsep.join(filter(None, [str(SLEEP_FIX), env.get("PYTHONPATH")])),
        )


class Monitor:
    """tests/fleet/monitor_process.py under the moving clock; its output is the record of readings."""

    def __init__(self, base: Path, broker: Broker, clock: Clock):
        self.out = base / "monitor.jsonl"
        self.handle = open(self.out, "wb")  # noqa: SIM115
        env = dict(clock.env(), MONITOR_PASSWORD=MONITOR_PASSWORD)
        script = Path(__file__).with_name("monitor_process.py")
        ca = str(broker.project.pki / "ca" / "bundle.pem")
        self.proc = subprocess.Popen(
            [sys.executable, str(script), str(broker.monitor_port), ca], stdout=self.handle, env=env
        )

    def readings(self) -> dict[str, list[float]]:
        seen: dict[str, list[float]] = {}
        for line in self.out.read_text().splitlines():
            event = json.loads(line)
            if "topic" in event:
                seen.setdefault(event["topic"].split("/")[1], []).append(event["mono"])
        return seen

    def wait_all(self, boards, since: float, timeout: float = 2 * MAX_SILENCE) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            seen = self.readings()
            if all(any(t > since for t in seen.get(b, [])) for b in boards):
                return
            time.sleep(0.5)
        raise AssertionError(f"not every board published within {timeout} s: {self.out.read_text()[-2000:]}")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self.handle.close()


@pytest.fixture
def two_year_fleet(fleet_project):
    if not LIBFAKETIME.is_file():
        pytest.fail(f"{LIBFAKETIME} is missing: install Debian's faketime package (.ci/run does)")
    device_port, monitor_port = free_port(), free_port()
    boards = {"b1": {"esp32_mac": "24:0a:c4:00:00:01"}, "b2": {"esp32_mac": "24:0a:c4:00:00:02"}}
    project = fleet_project(boards, brokers=TEST_BROKER)
    base = project.base
    for name in ("sbin", "cron.d", "systemd"):
        (base / name).mkdir()
    vars_file = project.inventory / "group_vars" / "all.yml"
    data = yaml.safe_load(vars_file.read_text())
    data.update(
        {
            "esp32_provision_broker_uri": f"mqtts://localhost:{device_port}",
            "renewal_broker_host": "localhost",
            "renewal_broker_port": device_port,
            # The schedule of the module docstring.
            "pki_crl_validity_days": 180,
            "pki_crl_renew_before_days": 150,
            "pki_renew_before_days": 150,
            "esp32_provision_cert_renew_days": 150,
            # Device certificates come from the fleet play (as in inventories/local), never the pki play.
            "pki_issue_device_certs": False,
            "upkeep_period_days": 120,
            # The upkeep wrapper, installed into the project (tests/upkeep/install.yml).
            "upkeep_project_dir": str(ROOT),
            "upkeep_inventory": str(project.inventory),
            "upkeep_script_path": str(base / "sbin" / "esp32-fleet-upkeep"),
            "upkeep_state_file": str(base / "state" / "last-run.json"),
            "upkeep_log_file": str(base / "upkeep.log"),
            "upkeep_cron_file": str(base / "cron.d" / "esp32-fleet-upkeep"),
            "upkeep_systemd_dir": str(base / "systemd"),
        }
    )
    vars_file.write_text(yaml.safe_dump(data))
    rc, out, _ = project.run_playbook("playbooks/pki.yml")
    assert rc == 0, out[-3000:]
    rc, out, _ = project.run_playbook("tests/upkeep/install.yml")
    assert rc == 0, out[-3000:]
    # The first (and only) provisioning, at the station, on the real clock.
    rc, out, _ = project.run()
    assert rc == 0, out[-4000:]
    project.stop_lab()  # the boards leave their stations

    clock = Clock(base / "clock")
    broker = Broker(project, device_port, monitor_port, env=clock.env()).start()
    monitor = Monitor(base, broker, clock)
    firmware = []
    try:
        for index, _ in enumerate(boards):
            log = open(base / f"b{index + 1}.log", "wb")  # noqa: SIM115
            cmd = [str(BIN / "esp32sim"), "run", "--flash", str(project.sim_dir / f"ttyUSB{index}.flash")]
            # A day passes between two upkeep runs, so an hourly window check (the default) always
            # happens in between; a step here is seconds long.
            cmd += ["--window-check", "2"]
            firmware.append((subprocess.Popen(cmd, stdout=log, stderr=log, env=clock.env()), log))
        project.clock, project.broker, project.monitor = clock, broker, monitor
        yield project
    finally:
        for proc, log in firmware:
            proc.terminate()
            proc.wait(10)
            log.close()
        monitor.stop()
        broker.stop()


def upkeep(project, *args: str) -> str:
    """The installed wrapper, as the timer runs it, on the clock's day; its output is its log file."""
    cmd = [str(project.base / "sbin" / "esp32-fleet-upkeep"), "--limit", "localhost", *args]
    env = dict(project.clock.env(), ANSIBLE_NOCOLOR="1")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    log = (project.base / "upkeep.log").read_text() if (project.base / "upkeep.log").is_file() else ""
    assert done.returncode == 0, f"{done.stderr}\n{log[-5000:]}"
    return log


def test_two_years_in_the_field_with_no_hands(two_year_fleet):
    project, clock, broker, monitor = (
        two_year_fleet,
        two_year_fleet.clock,
        two_year_fleet.broker,
        two_year_fleet.monitor,
    )
    boards = ["b1", "b2"]
    pki = project.pki
    started = time.monotonic()
    monitor.wait_all(boards, since=0, timeout=60)
    stations = [project.nvs_region(i) for i in range(len(boards))]
    provisioned_rows = len(project.rows())
    first_ca = cert((pki / "ca" / "ca.crt").read_bytes())
    history = [(0, "-", [in_use(project, i).serial_number for i in range(len(boards))])]
    broker_serials = [cert((pki / "brokers" / "testbroker.crt").read_bytes()).serial_number]
    real_start = datetime.datetime.now(datetime.UTC)

    for day, phase in STEPS:
        clock.set(day)
        # libfaketime re-reads the clock file once a second, the boards check their window every 2 s.
        time.sleep(3)
        rotation = ["-e", f"pki_ca_rotation={phase}"] if phase else []
        if phase:
            rc, out, _ = project.run_playbook("playbooks/pki.yml", *rotation, env=clock.env())
            assert rc == 0, f"day {day} {phase}: {out[-4000:]}"
            broker.sync()
        upkeep(project, *rotation)
        synced = broker.sync()
        monitor.wait_all(boards, since=time.monotonic())
        serials = [in_use(project, i).serial_number for i in range(len(boards))]
        history.append((day, phase or synced or "-", serials))
        broker_serials.append(cert((pki / "brokers" / "testbroker.crt").read_bytes()).serial_number)
        # Every CA's CRL re-signed on this day (its validity is 180 days, so 4 periods in 2 years).
        signed = crls_signed(pki)
        today = real_start + datetime.timedelta(days=day - 1)
        assert all(at >= today for at in signed.values()), (day, signed)
    ended = time.monotonic()

    # The record, for the note: which certificate each board used after each step.
    print("\nday  phase/broker  " + "  ".join(f"{b:>40}" for b in boards))
    for day, what, serials in history:
        print(f"{day:>3}  {what:<12}  " + "  ".join(f"{s:>40x}" for s in serials))

    # Every board renewed over the air at 240, 360 and 600, and nothing else touched it.
    for i, board in enumerate(boards):
        used = [serials[i] for _, _, serials in history]
        changes = [day for (_, _, prev), (day, _, s) in itertools.pairwise(history) if s[i] != prev[i]]
        assert changes == [240, 360, 600], (board, changes, used)
        assert project.nvs_region(i) == stations[i], f"{board}'s station partition was written"
    later = project.rows()[provisioned_rows:]
    assert {r["result"] for r in later} == {"renewed"}, later
    assert sorted(r["device_id"] for r in later) == sorted(boards * 3), later

    # The broker's certificate was renewed at 240, from the new CA at the switch (480), and at 720.
    changes = [STEPS[k][0] for k in range(len(STEPS)) if broker_serials[k + 1] != broker_serials[k]]
    assert changes == [240, 480, 720], changes
    # The rotation is complete: one CA in the bundle, not the first one; the boards trust only it
    # and connect with a certificate it issued.
    bundle = x509.load_pem_x509_certificates((pki / "ca" / "bundle.pem").read_bytes())
    assert len(bundle) == 1 and bundle[0] != first_ca
    assert not (pki / "ca-next").exists()
    for i, board in enumerate(boards):
        assert field_state(project, i)["ca_cert"] == (pki / "ca" / "bundle.pem").read_text(), board
        assert in_use(project, i).issuer == bundle[0].subject, board

    # Every board still publishes, and none was silent longer than its reconnect backoff allows.
    seen = monitor.readings()
    print(f"\nmoved {STEPS[-1][0]} days in {ended - started:.0f} s; longest silence per board:")
    for board in boards:
        times = [started, *sorted(t for t in seen[board] if t >= started), ended]
        silence = max(b - a for a, b in itertools.pairwise(times))
        print(f"  {board}: {silence:.1f} s")
        assert silence <= MAX_SILENCE, (board, silence)
        assert times[-2] > ended - 15, f"{board} stopped publishing"
