#!/usr/bin/env python3
"""Converge times of site.yml: fresh target, idempotent rerun, --check; per Ansible configuration.

Not a test (pytest does not collect it): it prints numbers and writes bench/results/converge.json.

    .venv/bin/python bench/converge.py [--variants NAME,...] [--out FILE]

A fresh target is a throwaway project with inventories/local's shape (same hosts, group_vars and
three simulated boards) and empty pki/, manifests/ and lab/ directories, running this checkout's
site.yml, roles and modules. The broker is THIS machine's (init.d), exactly as `make site`
configures it: the run reconfigures it with the throwaway CA (run `make site` afterwards to put the
project's own PKI back). Mosquitto is already installed, so "fresh" excludes the package download.

Each variant runs fresh → rerun (must report changed=0) → --check (must report changed=0) and keeps
the fresh run's ten slowest tasks (ansible.posix.profile_tasks). CPU seconds (user+sys of
ansible-playbook and everything it started) are printed beside wall seconds: on a loaded machine
they are the steadier number. The fastest variant whose rerun and check report changed=0 is the
recommended ansible.cfg default.
"""

from __future__ import annotations

import argparse
import json
import os
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
PROFILE_LINE = re.compile(r"^(.+?) -{3,} (\d+\.\d+)s$", re.M)
RUN_TIMEOUT = 900  # one site.yml run on a loaded 2-core machine, with margin (x3)

# What is compared. `pipelining`: ANSIBLE_PIPELINING (the [defaults]/[connection] setting; the
# [ssh_connection] one does not reach the local connection every host of this inventory uses).
# `broker_gather_subset`: the broker play's fact subset (None: the play as written, all facts).
VARIANTS = {
    "pipelining-off": dict(pipelining=False, broker_gather_subset=None),
    "pipelining-on": dict(pipelining=True, broker_gather_subset=None),
    "pipelining-on-min-facts": dict(pipelining=True, broker_gather_subset=["min"]),
}


def make_project(base, variant):
    """Copy the inventory, site.yml and playbooks/ (roles and plugins stay in this checkout)."""
    shutil.copytree(ROOT / "inventories" / "local", base / "inventories" / "local")
    shutil.copy(ROOT / "site.yml", base / "site.yml")
    shutil.copytree(ROOT / "playbooks", base / "playbooks")
    subset = VARIANTS[variant]["broker_gather_subset"]
    if subset is not None:
        path = base / "playbooks" / "broker.yml"
        plays = yaml.safe_load(path.read_text())
        for play in plays:
            if play.get("hosts") == "brokers" and play.get("gather_facts", True):
                play["gather_subset"] = subset
        path.write_text(yaml.safe_dump(plays, sort_keys=False))
    return base / "lab" / "esp32sim"


def run(base, variant, *extra):
    env = dict(os.environ, ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"), ANSIBLE_NOCOLOR="1")
    env["ANSIBLE_PIPELINING"] = str(VARIANTS[variant]["pipelining"])
    env["PROFILE_TASKS_TASK_OUTPUT_LIMIT"] = "10"
    env["PROFILE_TASKS_SORT_ORDER"] = "descending"
    env["PATH"] = f"{BIN}:{env.get('PATH', '')}"
    cmd = [str(BIN / "ansible-playbook"), "-i", "inventories/local", "site.yml", *extra]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    done = subprocess.run(
        cmd, cwd=base, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False
    )
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    out = done.stdout + done.stderr
    recap = RECAP.findall(done.stdout)
    failed = sum(int(m[3]) + int(m[4]) for m in recap)
    ok = done.returncode == 0 and bool(recap) and failed == 0
    profile = []
    if "TASKS RECAP" in done.stdout:
        tail = done.stdout.split("TASKS RECAP", 1)[1]
        profile = [dict(task=m[0].strip(), seconds=float(m[1])) for m in PROFILE_LINE.findall(tail)][:10]
    row = dict(
        wall_s=round(wall, 2),
        cpu_s=round(cpu, 2),
        ok=ok,
        rc=done.returncode,
        changed=sum(int(m[2]) for m in recap),
        top10=profile,
    )
    if not ok:
        row["tail"] = out[-2000:]
    return row


def fact_subsets(repeat):
    """The broker play's fact gathering alone: ansible.builtin.setup per subset, median of `repeat`.

    An ad-hoc run of one setup task; the ansible start-up is in every number alike, so the
    differences between subsets are what gathering them costs on this machine."""
    env = dict(os.environ, ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"), ANSIBLE_NOCOLOR="1")
    env["ANSIBLE_CALLBACK_RESULT_FORMAT"] = "json"
    rows = {}
    for subset in ("all", "min"):
        walls, cpus = [], []
        for _ in range(repeat):
            cmd = [str(BIN / "ansible"), "localhost", "-c", "local", "-m", "ansible.builtin.setup"]
            cmd += ["-a", f"gather_subset={subset}", "-e", f"ansible_python_interpreter={sys.executable}"]
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            t = time.perf_counter()
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
            walls.append(time.perf_counter() - t)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpus.append((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime))
            if done.returncode:
                return {"error": (done.stdout + done.stderr)[-800:]}
        facts = done.stdout.split("=>", 1)[1] if "=>" in done.stdout else "{}"
        try:
            count = len(json.loads(facts)["ansible_facts"])
        except (ValueError, KeyError):
            count = None
        rows[subset] = dict(
            wall_s=round(statistics.median(walls), 2), cpu_s=round(statistics.median(cpus), 2), facts=count
        )
    return rows


def pipelining_ab(repeat, tmp):
    """Pipelining alone, off and on interleaved (so load drift hits both alike): 20 stat tasks."""
    play = tmp / "ab.yml"
    tasks = [
        {"name": f"Stat {i}", "ansible.builtin.stat": {"path": str(ROOT / "site.yml")}} for i in range(20)
    ]
    play.write_text(json.dumps([{"hosts": "localhost", "gather_facts": False, "tasks": tasks}]))
    env = dict(os.environ, ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"), ANSIBLE_NOCOLOR="1")
    env["ANSIBLE_CALLBACKS_ENABLED"] = "ansible.posix.profile_tasks"
    samples = {"off": [], "on": []}
    for _ in range(repeat):
        for mode in ("off", "on"):
            env["ANSIBLE_PIPELINING"] = str(mode == "on")
            cmd = [str(BIN / "ansible-playbook"), "-i", "localhost,", "-c", "local", str(play)]
            cmd += ["-e", f"ansible_python_interpreter={sys.executable}"]
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            t = time.perf_counter()
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
            wall = time.perf_counter() - t
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            if done.returncode:
                return {"error": (done.stdout + done.stderr)[-800:]}
            cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
            samples[mode].append((wall, cpu))
    return {
        mode: dict(
            wall_s=round(statistics.median(w for w, _ in rows), 2),
            cpu_s=round(statistics.median(c for _, c in rows), 2),
            runs=len(rows),
            tasks=20,
        )
        for mode, rows in samples.items()
    }


def stop_lab(sim_dir):
    subprocess.run(
        [str(BIN / "esp32sim"), "fleet", "stop", "--dir", str(sim_dir)], check=False, capture_output=True
    )


def bench_variant(tmp, variant):
    # A plain directory name: playbooks/lab.yml matches board ports against lab_esp32sim_dir as a
    # regular expression, so a '+' or '.' in the path would hide the boards from it.
    base = tmp / f"v{list(VARIANTS).index(variant)}"
    sim_dir = make_project(base, variant)
    rows = {}
    try:
        rows["fresh"] = run(base, variant)
        if rows["fresh"]["ok"]:
            rows["rerun"] = run(base, variant)
            rows["check"] = run(base, variant, "--check")
    finally:
        stop_lab(sim_dir)  # the lab play's simulated boards outlive ansible-playbook by design
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--variants",
        # The baseline and the recommended configuration; pipelining-on alone separates the two
        # effects when asked for (the fact subsets are also timed on their own below).
        default="pipelining-off,pipelining-on-min-facts",
        help=f"comma-separated, of: {', '.join(VARIANTS)}",
    )
    ap.add_argument("--ab-repeat", type=int, default=3, help="pipelining off/on pairs of 20 tasks (0: skip)")
    ap.add_argument("--facts-repeat", type=int, default=3, help="runs per fact subset (0: skip)")
    ap.add_argument("--out", type=Path, default=RESULTS / "converge.json")
    args = ap.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant(s): {', '.join(unknown)}")
    started = time.perf_counter()
    results = {}
    print(f"{'variant':<26} {'run':<6} {'wall s':>7} {'cpu s':>7} {'changed':>7}  status")
    with tempfile.TemporaryDirectory(prefix="bench-converge-") as d:
        for variant in variants:
            results[variant] = bench_variant(Path(d), variant)
            for name, row in results[variant].items():
                status = "ok" if row["ok"] else f"FAILED rc={row['rc']}"
                if row["ok"] and name != "fresh" and row["changed"]:
                    status = "NOT IDEMPOTENT"
                print(
                    f"{variant:<26} {name:<6} {row['wall_s']:7.2f} {row['cpu_s']:7.2f} "
                    f"{row['changed']:7d}  {status}",
                    flush=True,
                )
                if not row["ok"]:
                    print("   " + row["tail"][-800:].replace("\n", "\n   "))

    def safe(rows):
        return all(rows.get(k, {}).get("ok") for k in ("fresh", "rerun", "check")) and not any(
            rows[k]["changed"] for k in ("rerun", "check")
        )

    with tempfile.TemporaryDirectory(prefix="bench-ab-") as d:
        ab = pipelining_ab(args.ab_repeat, Path(d)) if args.ab_repeat > 0 else {}
    if ab:
        print("\npipelining alone (20 stat tasks, off/on interleaved, median):")
        for mode, row in ab.items():
            if mode == "error":
                print(f"  FAILED: {row}")
                continue
            print(f"  pipelining {mode:<3} {row['wall_s']:6.2f} s wall {row['cpu_s']:6.2f} s CPU")
    facts = fact_subsets(args.facts_repeat) if args.facts_repeat > 0 else {}
    if facts:
        print("\nfact gathering alone (ad-hoc setup on localhost, median):")
        for subset, row in facts.items():
            if subset == "error":
                print(f"  FAILED: {row}")
                continue
            print(
                f"  gather_subset={subset:<4} {row['wall_s']:6.2f} s wall {row['cpu_s']:6.2f} s CPU "
                f"{row['facts']} facts"
            )
    candidates = {v: r for v, r in results.items() if safe(r)}
    best = (
        min(candidates, key=lambda v: sum(candidates[v][k]["wall_s"] for k in candidates[v]))
        if candidates
        else None
    )
    for variant, rows in results.items():
        if rows["fresh"]["ok"]:
            print(f"\n{variant}: slowest tasks of the fresh run")
            for t in rows["fresh"]["top10"]:
                print(f"  {t['seconds']:6.2f}s  {t['task']}")
    print(f"\nfastest safe configuration: {best or 'none (every variant failed or was not idempotent)'}")
    elapsed = time.perf_counter() - started
    out = dict(
        variants={v: VARIANTS[v] for v in variants},
        results=results,
        best=best,
        fact_subsets=facts,
        pipelining_ab=ab,
        broker="this host's mosquitto (init.d), reconfigured as make site does",
        elapsed_s=round(elapsed, 1),
        load_end=os.getloadavg(),
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out} in {elapsed:.0f} s")
    return 0 if best else 1


if __name__ == "__main__":
    sys.exit(main())
