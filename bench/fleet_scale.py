#!/usr/bin/env python3
"""Fleet provisioning throughput: boards per minute for 1..32 simulated boards, per baud rate.

Not a test (pytest does not collect it): it prints numbers and writes bench/results/fleet.json.
Run from anywhere with the project's venv:

    .venv/bin/python bench/fleet_scale.py [--counts 1,4,16,32] [--provision-counts 1,4,16]

Every board is an esp32sim board with --baud-pacing (bytes cross the pty no faster than an 8N1 line
at the session's baud), flashed with a 64 KiB firmware image at 0x10000 plus its NVS partition.
Two measurements per (boards, baud):

* flash: the esp32_flash module's own code path (module_utils esp32_esptool.esptool_call +
  esp32_flashplan.flash_images, imported as Ansible imports them), one worker process per board
  (forks = boards), no Ansible start-up. Per board it times connecting (reset, sync, chip detection,
  attach), comparing (facts + MD5 of each region), uploading the stub (+ baud change), writing and
  verifying, and counts the bytes actually written to the serial port in each phase (SLIP framing
  included) to compare the write time with the line's physical floor (bytes x 10 / baud).
* provision: the real fleet play (playbooks/fleet.yml: identify, certificate, NVS, flash, verify,
  manifest) in a throwaway project with forks = boards, then the idempotent rerun (changed=0).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RESULTS = ROOT / "bench" / "results"
RECAP = re.compile(r"^(\S+)\s+:\s+ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", re.M)
FIRMWARE_SIZE = 64 * 1024  # 32 boards at 115200 stay within minutes; see README.md, "Benchmarks"
FIRMWARE_OFFSET = 0x10000
NVS_OFFSET = 0x9000
MAC_BASE = "24:0a:c4:10:00:01"
# Generous bound for one playbook run on a loaded 2-core machine (x3 of what a quiet one needs).
PLAYBOOK_TIMEOUT = 900


def firmware_like(size, seed=0):
    """Deterministic bytes that compress roughly like an ESP32 app image (~55-65 %)."""
    rng = random.Random(seed)
    words = [rng.randbytes(rng.randint(2, 12)) for _ in range(600)]
    out = bytearray()
    while len(out) < size:
        out += rng.choice(words) if rng.random() < 0.8 else rng.randbytes(8)
    return bytes(out[:size])


# -- flash: the module's code path, instrumented ----------------------------------------------------

_PHASE = {"name": "connect"}
_WIRE = {}


def _worker_init(root):
    """Import the module_utils the way the modules do (the checkout's collections/ link), and count
    serial writes."""
    import serial.serialposix

    path = str(Path(root) / "collections")
    if path not in sys.path:
        sys.path.insert(0, path)
    from ansible_collections.esp32_fleet.mqtt_fleet.plugins.module_utils import esp32_esptool

    orig_write = serial.serialposix.Serial.write

    def counting_write(self, data):
        _WIRE[_PHASE["name"]] = _WIRE.get(_PHASE["name"], 0) + len(data)
        return orig_write(self, data)

    serial.serialposix.Serial.write = counting_write
    # esptool warns on stderr that a pty has no DTR/RTS to reset with (the simulator resets on open);
    # a module's stderr is dropped by Ansible too. Failures come back as results, not as stderr.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)

    # Phase boundaries are the session methods flash_images calls, in this order: info + md5
    # (compare), prepare_transfer (stub, baud), write, md5 again (verify). Wrapping them times the
    # unchanged module logic instead of a re-implementation of it.
    session = esp32_esptool.Esp32Session

    def wrap(name, phase_of):
        orig = getattr(session, name)

        def timed(self, *args, **kwargs):
            _mark(phase_of(self))
            return orig(self, *args, **kwargs)

        setattr(session, name, timed)

    wrap("info", lambda s: "compare")
    wrap("md5", lambda s: "verify" if getattr(s, "_prepared", False) else "compare")
    wrap("prepare_transfer", lambda s: "stub")
    wrap("write", lambda s: "write")


_TIMES = {}
_T = {"last": 0.0}


def _mark(phase):
    """Close the running phase and start `phase` (phases only move forward)."""
    now = time.perf_counter()
    _TIMES[_PHASE["name"]] = _TIMES.get(_PHASE["name"], 0.0) + now - _T["last"]
    _PHASE["name"], _T["last"] = phase, now


def _flash_one(job):
    """One board, as the esp32_flash task would run it; returns per-phase seconds and wire bytes."""
    from ansible_collections.esp32_fleet.mqtt_fleet.plugins.module_utils import esp32_esptool, esp32_flashplan

    port, baud, images, mac = job
    _TIMES.clear()
    _WIRE.clear()
    _PHASE["name"], _T["last"] = "connect", time.perf_counter()
    start = _T["last"]
    params = dict(
        port=port,
        baud=baud,
        before="default-reset",
        after="hard-reset",
        chip="esp32",
        connect_attempts=7,
        stub=True,
        timeout=PLAYBOOK_TIMEOUT,
        expected_mac=mac,
        erase="none",
        verify=True,
        compress=True,
    )
    loaded = esp32_flashplan.load_images([dict(offset=o, path=p) for o, p in images], "none")
    reports = []
    try:
        result = esp32_esptool.esptool_call(
            params, lambda s: esp32_flashplan.flash_images(s, params, loaded, False, reports)
        )
    except Exception as e:  # the bench reports a failed board, it does not stop
        return dict(port=port, error=f"{type(e).__name__}: {e}")
    _mark("reset")  # reset_chip + close after the last session call
    _TIMES.pop("reset", None)
    total = time.perf_counter() - start
    return dict(
        port=port,
        changed=result["changed"],
        seconds=round(total, 3),
        phases={k: round(v, 3) for k, v in _TIMES.items()},
        tx_bytes=dict(_WIRE),
        module_wire_bytes=sum(r.get("wire_bytes", 0) for r in reports),
    )


def start_fleet(sim_dir, count):
    cmd = [str(BIN / "esp32sim"), "fleet", "start", "--count", str(count), "--dir", str(sim_dir)]
    subprocess.run([*cmd, "--mac-base", MAC_BASE, "--baud-pacing"], check=True, capture_output=True)
    return json.loads(
        subprocess.run(
            [str(BIN / "esp32sim"), "fleet", "status", "--dir", str(sim_dir)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    )


def stop_fleet(sim_dir):
    subprocess.run(
        [str(BIN / "esp32sim"), "fleet", "stop", "--dir", str(sim_dir)], check=False, capture_output=True
    )


def bench_flash(tmp, count, baud, images):
    """All boards at once, one process each; the pool is warm (imports done) before the clock starts."""
    sim_dir = tmp / f"flash-{count}-{baud}"
    status = start_fleet(sim_dir, count)
    try:
        jobs = [(b["port"], baud, images, b["mac"]) for b in status["boards"]]
        ctx = multiprocessing.get_context("fork")
        with ctx.Pool(count, initializer=_worker_init, initargs=(str(ROOT),)) as pool:
            pool.map(abs, range(count))  # every worker started and initialised
            t = time.perf_counter()
            boards = pool.map(_flash_one, jobs, chunksize=1)
            wall = time.perf_counter() - t
    finally:
        stop_fleet(sim_dir)
    errors = [b for b in boards if "error" in b]
    ok = [b for b in boards if "error" not in b]
    phases = {p: round(statistics.median(b["phases"].get(p, 0.0) for b in ok), 3) for p in _phase_names(ok)}
    write_tx = statistics.median(b["tx_bytes"].get("write", 0) for b in ok) if ok else 0
    floor = write_tx * 10 / baud
    row = dict(
        boards=count,
        baud=baud,
        forks=count,
        wall_s=round(wall, 2),
        boards_per_min=round(len(ok) / wall * 60, 1) if ok else 0.0,
        failed=len(errors),
        errors=[e["error"] for e in errors][:3],
        median_board_s=round(statistics.median(b["seconds"] for b in ok), 2) if ok else None,
        phases_median_s=phases,
        write_tx_bytes=int(write_tx),
        module_wire_bytes=ok[0]["module_wire_bytes"] if ok else None,
        write_floor_s=round(floor, 3),
        write_vs_floor=round(phases.get("write", 0) / floor, 2) if floor else None,
        tx_bytes_by_phase=ok[0]["tx_bytes"] if ok else {},
    )
    return row


def _phase_names(boards):
    order = ["connect", "compare", "stub", "write", "verify"]
    seen = {p for b in boards for p in b["phases"]}
    return [p for p in order if p in seen]


# -- provision: the real fleet play --------------------------------------------------------------


def ansible_env(forks):
    env = dict(os.environ, ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"), ANSIBLE_NOCOLOR="1")
    env["ANSIBLE_FORKS"] = str(forks)
    env["PATH"] = f"{BIN}:{env.get('PATH', '')}"
    return env


def run_playbook(project, playbook, forks):
    cmd = [str(BIN / "ansible-playbook"), "-i", str(project / "inventory"), str(ROOT / playbook)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    done = subprocess.run(
        cmd,
        cwd=project,
        env=ansible_env(forks),
        capture_output=True,
        text=True,
        timeout=PLAYBOOK_TIMEOUT,
        check=False,
    )
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    recap = {
        m[0]: {"changed": int(m[2]), "failed": int(m[4]) + int(m[3])} for m in RECAP.findall(done.stdout)
    }
    ok = done.returncode == 0 and recap and not any(r["failed"] for r in recap.values())
    if not ok:
        (project / f"failed-{Path(playbook).stem}.log").write_text(done.stdout + done.stderr)
    return dict(
        wall_s=round(wall, 2),
        cpu_s=round(cpu, 2),
        rc=done.returncode,
        ok=bool(ok),
        changed=sum(r["changed"] for r in recap.values()),
        tail=(done.stdout + done.stderr)[-1500:] if not ok else "",
    )


def make_project(base, count, baud, firmware):
    """A throwaway copy of inventories/local's shape with `count` boards and fresh state dirs."""
    from esp32sim.device import mac_add

    inv = base / "inventory"
    (inv / "group_vars").mkdir(parents=True)
    sim_dir = base / "lab" / "esp32sim"
    hosts = {
        f"esp32-bench-{i + 1:02d}": {"esp32_port": f"{sim_dir}/ttyUSB{i}", "esp32_mac": mac_add(MAC_BASE, i)}
        for i in range(count)
    }
    (inv / "hosts.yml").write_text(
        yaml.safe_dump(
            {
                "all": {
                    "children": {
                        "controller": {"hosts": {"localhost": None}},
                        # No broker: provisioning needs none, and this machine's broker is left alone.
                        "brokers": {"hosts": {}},
                        "esp32_devices": {"hosts": hosts},
                    }
                }
            }
        )
    )
    (inv / "group_vars" / "all.yml").write_text(
        yaml.safe_dump(
            {
                "ansible_connection": "local",
                "ansible_python_interpreter": "{{ ansible_playbook_python }}",
                "fleet_root": str(base),
                "pki_dir": str(base / "pki"),
                "pki_ca_passphrase": "bench-only-passphrase",
                "pki_issue_device_certs": False,
                "lab_enabled": True,
                "lab_esp32sim_dir": str(sim_dir),
                "lab_esp32sim_mac_base": MAC_BASE,
                "lab_esp32sim_baud_pacing": True,
                "esp32_provision_baud": baud,
                "esp32_provision_broker_host": "localhost",
                "esp32_provision_wifi_ssid": "bench-no-wifi",
            }
        )
    )
    fw = base / "files" / "firmware"
    fw.mkdir(parents=True)
    shutil.copy(firmware, fw / f"{FIRMWARE_OFFSET:#x}_app.bin")
    return sim_dir


def bench_provision(tmp, count, baud, firmware, pki_seed):
    base = tmp / f"prov-{count}-{baud}"
    sim_dir = make_project(base, count, baud, firmware)
    if pki_seed is not None:
        shutil.copytree(pki_seed, base / "pki")  # same CA for every run: the CA is not what is measured
    try:
        lab = run_playbook(base, "playbooks/lab.yml", count)
        if not lab["ok"]:
            return dict(boards=count, baud=baud, forks=count, error="lab play failed", tail=lab["tail"])
        if pki_seed is None:
            pki = run_playbook(base, "playbooks/pki.yml", 1)
            if not pki["ok"]:
                return dict(boards=count, baud=baud, forks=count, error="pki play failed", tail=pki["tail"])
        first = run_playbook(base, "playbooks/fleet.yml", count)
        rerun = run_playbook(base, "playbooks/fleet.yml", count) if first["ok"] else None
    finally:
        stop_fleet(sim_dir)
    row = dict(
        boards=count,
        baud=baud,
        forks=count,
        first_s=first["wall_s"],
        first_cpu_s=first["cpu_s"],
        first_ok=first["ok"],
        boards_per_min=round(count / first["wall_s"] * 60, 1) if first["ok"] else 0.0,
        rerun_s=rerun["wall_s"] if rerun else None,
        rerun_cpu_s=rerun["cpu_s"] if rerun else None,
        rerun_changed=rerun["changed"] if rerun else None,
        rerun_ok=rerun["ok"] if rerun else False,
    )
    if not first["ok"]:
        row["tail"] = first["tail"]
    elif rerun and not rerun["ok"]:
        row["tail"] = rerun["tail"]
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--counts", default="1,4,16,32", help="board counts (comma-separated)")
    ap.add_argument("--bauds", default="115200,921600", help="flashing baud rates (comma-separated)")
    ap.add_argument("--provision-counts", help="board counts for the fleet play (default: --counts)")
    ap.add_argument("--provision-bauds", help="baud rates for the fleet play (default: --bauds)")
    ap.add_argument("--skip-flash", action="store_true", help="only the fleet play bench")
    ap.add_argument("--skip-provision", action="store_true", help="only the module-path flash bench")
    ap.add_argument("--out", type=Path, default=RESULTS / "fleet.json")
    args = ap.parse_args()
    counts = [int(c) for c in args.counts.split(",")]
    bauds = [int(b) for b in args.bauds.split(",")]
    prov_counts = [int(c) for c in (args.provision_counts or args.counts).split(",")]
    prov_bauds = [int(b) for b in (args.provision_bauds or args.bauds).split(",")]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-fleet-") as d:
        tmp = Path(d)
        app = tmp / "app.bin"
        app.write_bytes(firmware_like(FIRMWARE_SIZE))
        nvs = tmp / "nvs.bin"  # an NVS-sized image of credential-like bytes (compresses poorly)
        nvs.write_bytes(random.Random(3).randbytes(24 * 1024))
        images = [(NVS_OFFSET, str(nvs)), (FIRMWARE_OFFSET, str(app))]
        print(
            f"firmware {FIRMWARE_SIZE} B at {FIRMWARE_OFFSET:#x}"
            f" + NVS {nvs.stat().st_size} B at {NVS_OFFSET:#x}"
        )
        print("flash (module code path, one process per board, --baud-pacing):")
        print(
            f"{'boards':>6} {'baud':>7} {'wall s':>7} {'boards/min':>10} {'connect':>8} {'compare':>8} "
            f"{'stub':>6} {'write':>6} {'verify':>7} {'write B':>8} {'floor s':>7} {'x floor':>7} {'fail':>4}"
        )
        flash_rows = []
        for baud in [] if args.skip_flash else bauds:
            for count in counts:
                row = bench_flash(tmp, count, baud, images)
                flash_rows.append(row)
                p = row["phases_median_s"]
                print(
                    f"{count:6d} {baud:7d} {row['wall_s']:7.2f} {row['boards_per_min']:10.1f} "
                    f"{p.get('connect', 0):8.2f} {p.get('compare', 0):8.2f} {p.get('stub', 0):6.2f} "
                    f"{p.get('write', 0):6.2f} {p.get('verify', 0):7.2f} {row['write_tx_bytes']:8d} "
                    f"{row['write_floor_s']:7.2f} {row['write_vs_floor'] or 0:7.2f} {row['failed']:4d}",
                    flush=True,
                )
        prov_rows = []
        if not args.skip_provision:
            print(
                "provision (playbooks/fleet.yml, forks = boards; rerun must report changed=0;"
                " x flash = first run / the flash wall time of the same boards and baud above):"
            )
            print(
                f"{'boards':>6} {'baud':>7} {'first s':>8} {'x flash':>7} {'cpu s':>7} {'cpu/board':>9} "
                f"{'boards/min':>10} {'rerun s':>8} {'cpu s':>7} {'changed':>7}"
            )
            flash_wall = {(r["boards"], r["baud"]): r["wall_s"] for r in flash_rows if r.get("wall_s")}
            # One CA for every run: issuing it is the pki bench's business (converge.py), not this one.
            seed = tmp / "seed"
            make_project(seed, 1, bauds[0], app)
            pki = run_playbook(seed, "playbooks/pki.yml", 1)
            pki_seed = seed / "pki" if pki["ok"] else None
            for baud in prov_bauds:
                for count in prov_counts:
                    row = bench_provision(tmp, count, baud, app, pki_seed)
                    prov_rows.append(row)
                    if "error" in row or not row["first_ok"]:
                        print(
                            f"{count:6d} {baud:7d} FAILED: {row.get('error', '')}"
                            f" {row.get('tail', '')[-600:]}"
                        )
                        continue
                    flash_s = flash_wall.get((count, baud))
                    ratio = row["first_s"] / flash_s if flash_s else None
                    row["first_vs_flash"] = round(ratio, 2) if ratio else None
                    row["first_cpu_per_board_s"] = round(row["first_cpu_s"] / count, 2)
                    print(
                        f"{count:6d} {baud:7d} {row['first_s']:8.2f} {ratio or 0:7.1f} "
                        f"{row['first_cpu_s']:7.1f} "
                        f"{row['first_cpu_per_board_s']:9.2f} "
                        f"{row['boards_per_min']:10.1f} {row['rerun_s'] or 0:8.2f} "
                        f"{row['rerun_cpu_s'] or 0:7.1f} "
                        f"{row['rerun_changed']!s:>7}",
                        flush=True,
                    )
    elapsed = time.perf_counter() - started
    result = dict(
        firmware_bytes=FIRMWARE_SIZE,
        nvs_bytes=24 * 1024,
        baud_pacing=True,
        flash=flash_rows,
        provision=prov_rows,
        elapsed_s=round(elapsed, 1),
        load_end=os.getloadavg(),
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out} in {elapsed:.0f} s")
    failed = any(r.get("failed") for r in flash_rows) or any(
        "error" in r or not r.get("first_ok") or r.get("rerun_changed") for r in prov_rows
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
