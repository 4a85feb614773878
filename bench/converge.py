#!/usr/bin/env python3
"""Converge times of site.yml (fresh target, idempotent rerun, --check) and pipelining over SSH.

Not a test (pytest does not collect it): it prints numbers and writes bench/results/converge.json.

    .venv/bin/python bench/converge.py [--variants NAME,...] [--ssh-repeat N] [--out FILE]

A fresh target is a throwaway project with inventories/local's shape (same hosts, group_vars and
three simulated boards) and empty pki/, manifests/ and lab/ directories, running this checkout's
site.yml, roles and modules. The broker is THIS machine's (init.d), exactly as `make site`
configures it: the run reconfigures it with the throwaway CA (run `make site` afterwards to put the
project's own PKI back). Mosquitto is already installed, so "fresh" excludes the package download.

By default the trio fresh → rerun (must report changed=0) → --check (must report changed=0) runs
once, for the shipped configuration (ansible.cfg and playbooks as written), keeping the fresh run's
ten slowest tasks (ansible.posix.profile_tasks); `--variants` adds whole-site configurations to
compare by hand. Pipelining and the fact subsets are compared where they matter, over real SSH to a
throwaway container of the project's image (ssh_ab). CPU seconds (user+sys of ansible and what it
started and waited for) are printed beside wall seconds: on a loaded machine they are the steadier
number.
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

SSH_IMAGE = "localhost/esp32-fleet-debian:bookworm"  # scripts/build-image.sh (make image)

# Whole-site configurations. `pipelining`: ANSIBLE_PIPELINING (None: ansible.cfg as written).
# `broker_gather_subset`: the broker play's fact subset (None: the play as written, all facts).
VARIANTS = {
    "shipped": dict(pipelining=None, broker_gather_subset=None),
    "pipelining-off": dict(pipelining=False, broker_gather_subset=None),
    "pipelining-on": dict(pipelining=True, broker_gather_subset=None),
    "min-facts": dict(pipelining=None, broker_gather_subset=["min"]),
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
    env.pop("ANSIBLE_PIPELINING", None)
    if VARIANTS[variant]["pipelining"] is not None:
        env["ANSIBLE_PIPELINING"] = str(VARIANTS[variant]["pipelining"])
    env["PROFILE_TASKS_TASK_OUTPUT_LIMIT"] = "10"
    env["PROFILE_TASKS_SORT_ORDER"] = "descending"
    env["PATH"] = f"{BIN}:{env.get('PATH', '')}"
    cmd = [str(BIN / "ansible-playbook"), "-i", "inventories/local", "site.yml", *extra]
    done, wall, cpu = timed(cmd, env, timeout=RUN_TIMEOUT, cwd=base)
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


def timed(cmd, env, timeout=300, cwd=None):
    """Run cmd; return (CompletedProcess, wall s, CPU s of it and the children it waited for)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return done, wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def shipped_pipelining():
    """ANSIBLE_PIPELINING as ansible.cfg sets it (ansible-config, so every section that can set it counts)."""
    env = {k: v for k, v in os.environ.items() if k != "ANSIBLE_PIPELINING"}
    env["ANSIBLE_CONFIG"] = str(ROOT / "ansible.cfg")
    done = subprocess.run(
        [str(BIN / "ansible-config"), "dump", "--format", "json"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    try:
        rows = json.loads(done.stdout)
    except ValueError:
        return None
    return next((bool(r["value"]) for r in rows if r.get("name") == "ANSIBLE_PIPELINING"), None)


def podman(*args, timeout=120, stdin=None):
    return subprocess.run(
        ["podman", *args], input=stdin, capture_output=True, text=True, timeout=timeout, check=False
    )


def start_ssh_target(name, key_pub):
    """A throwaway container of the project's image with sshd on 127.0.0.1:<ephemeral>; returns the port.

    Same recipe as molecule/station/prepare.yml (openssh-server from the Debian mirror), without
    systemd: sshd is the only service the A/B needs. Raises RuntimeError with podman's words."""
    steps = [
        (("run", "-d", "--name", name, "-p", "127.0.0.1::22", SSH_IMAGE, "sleep", "infinity"), 120, None),
        # Bounded: ~10 s here with a reachable mirror; a dead mirror fails the step, not the bench.
        (
            (
                "exec",
                "-e",
                "DEBIAN_FRONTEND=noninteractive",
                name,
                "sh",
                "-c",
                "apt-get update -q && apt-get install -y -q --no-install-recommends openssh-server",
            ),
            180,
            None,
        ),
        (
            (
                "exec",
                "-i",
                name,
                "sh",
                "-c",
                "mkdir -p -m 700 /root/.ssh /run/sshd && cat > /root/.ssh/authorized_keys"
                " && chmod 600 /root/.ssh/authorized_keys && /usr/sbin/sshd",
            ),
            60,
            key_pub,
        ),
    ]
    for args, timeout, stdin in steps:
        done = podman(*args, timeout=timeout, stdin=stdin)
        if done.returncode:
            raise RuntimeError(f"podman {args[0]}: {(done.stdout + done.stderr)[-600:]}")
    port = podman("port", name, "22").stdout.strip().rsplit(":", 1)[-1]
    if not port.isdigit():
        raise RuntimeError(f"podman port {name} 22: no published port")
    return int(port)


def container_cpu(name):
    """CPU seconds the container has used so far (its cgroup v1 cpuacct; None where unreadable):
    sshd and the modules' Python run there, outside this process tree."""
    path = podman("inspect", "--format", "{{.State.CgroupPath}}", name).stdout.strip()
    usage = Path("/sys/fs/cgroup/cpuacct") / path.lstrip("/") / "cpuacct.usage"
    return (lambda: int(usage.read_text()) / 1e9) if path and usage.is_file() else (lambda: None)


def close_masters(cp_dir):
    """Stop the SSH control masters of one run (ControlPersist would keep them 60 s after it)."""
    for sock in cp_dir.glob("*"):
        subprocess.run(
            ["ssh", "-o", f"ControlPath={sock}", "-O", "exit", "bench"],
            capture_output=True,
            timeout=30,
            check=False,
        )


def ssh_ab(repeat, ntasks, tmp):
    """Pipelining off/on and fact subsets all/min over real SSH, against a throwaway container.

    Stations and remote brokers are reached over SSH, where pipelining saves the temp-file round
    trips of every task (mkdir, sftp put, chmod, exec, rm become one exec); the local connection
    barely has them. Off and on alternate (the order flips every pair) so load drift hits both
    alike. Every run gets its own ControlPath directory: it pays its own SSH connection, as a new
    ansible-playbook run does. CPU: here (ansible and the ssh clients it waited for) and in the
    container (sshd, the modules' Python)."""
    missing = [tool for tool in ("podman", "ssh", "ssh-keygen") if not shutil.which(tool)]
    if missing:
        return {"not_run": f"{', '.join(missing)} not installed"}
    os.environ.setdefault("CONTAINERS_CONF", str(ROOT / "molecule" / "containers.conf"))
    if podman("image", "exists", SSH_IMAGE).returncode:
        return {"not_run": f"image {SSH_IMAGE} missing (make image builds it)"}
    name = f"bench-ssh-{os.getpid()}"
    key = tmp / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True, timeout=30)
    out = dict(container=f"{name} ({SSH_IMAGE}, sshd on 127.0.0.1)", tasks=ntasks)
    try:
        t = time.perf_counter()
        port = start_ssh_target(name, (tmp / "id_ed25519.pub").read_text())
        inventory = tmp / "inventory.ini"
        inventory.write_text(
            f"bench ansible_connection=ssh ansible_host=127.0.0.1 ansible_port={port} ansible_user=root "
            f"ansible_ssh_private_key_file={key} ansible_python_interpreter=/usr/bin/python3 "
            "ansible_ssh_common_args='-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null'\n"
        )
        env = dict(os.environ, ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"), ANSIBLE_NOCOLOR="1")
        env.pop("ANSIBLE_PIPELINING", None)
        runs = iter(range(10**6))
        target_cpu = container_cpu(name)

        def ansible(cmd, extra_env=None):
            cp_dir = tmp / f"cp{next(runs)}"
            cp_dir.mkdir()
            target = target_cpu()
            try:
                done, wall, cpu = timed(
                    cmd, dict(env, ANSIBLE_SSH_CONTROL_PATH_DIR=str(cp_dir), **(extra_env or {}))
                )
            finally:
                close_masters(cp_dir)
            if done.returncode:
                raise RuntimeError(f"{' '.join(cmd[:3])}: {(done.stdout + done.stderr)[-600:]}")
            after = target_cpu()
            return done, wall, (cpu, None if target is None else after - target)

        # The first connection also waits for sshd to listen; not a sample.
        deadline = time.monotonic() + 30
        while True:
            try:
                ansible([str(BIN / "ansible"), "-i", str(inventory), "bench", "-m", "ansible.builtin.ping"])
                break
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)
        out["setup_s"] = round(time.perf_counter() - t, 1)

        play = tmp / "ab.yml"
        tasks = [
            {"name": f"Stat {i}", "ansible.builtin.stat": {"path": "/etc/hostname"}} for i in range(ntasks)
        ]
        play.write_text(json.dumps([{"hosts": "bench", "gather_facts": False, "tasks": tasks}]))
        samples = {"off": [], "on": []}
        facts = {"all": [], "min": []}
        counts = {}
        for i in range(repeat):
            for mode in ("off", "on")[:: 1 if i % 2 == 0 else -1]:
                cmd = [str(BIN / "ansible-playbook"), "-i", str(inventory), str(play)]
                _, wall, cpu = ansible(cmd, {"ANSIBLE_PIPELINING": str(mode == "on")})
                samples[mode].append((wall, cpu))
            # Fact subsets with the shipped configuration (the broker play's setting is the question).
            for subset in ("all", "min")[:: 1 if i % 2 == 0 else -1]:
                cmd = [str(BIN / "ansible"), "-i", str(inventory), "bench", "-m", "ansible.builtin.setup"]
                cmd += ["-a", f"gather_subset={subset}"]
                done, wall, cpu = ansible(cmd, {"ANSIBLE_CALLBACK_RESULT_FORMAT": "json"})
                facts[subset].append((wall, cpu))
                try:
                    counts[subset] = len(json.loads(done.stdout.split("=>", 1)[1])["ansible_facts"])
                except (IndexError, ValueError, KeyError):
                    counts[subset] = None

        def summary(rows):
            targets = [t for _, (_, t) in rows if t is not None]
            return dict(
                wall_s=round(statistics.median(w for w, _ in rows), 2),
                cpu_s=round(statistics.median(c for _, (c, _) in rows), 2),
                target_cpu_s=round(statistics.median(targets), 2) if len(targets) == len(rows) else None,
                runs=len(rows),
                walls=[round(w, 2) for w, _ in rows],
            )

        out["pipelining"] = {mode: summary(rows) for mode, rows in samples.items()}
        out["fact_subsets"] = {s: dict(summary(rows), facts=counts.get(s)) for s, rows in facts.items()}
        out["fact_subsets_pipelining"] = shipped_pipelining()
    except (RuntimeError, subprocess.SubprocessError, OSError) as exc:
        out["error"] = str(exc)[-800:]
    finally:
        podman("rm", "-f", "-t", "0", name)
    return out


def fastest_safe(data):
    """(pipelining value or None, sentence) from converge.json's data: the faster mode over SSH, if the
    whole-site trio (fresh, rerun and --check changed=0) passed with it in the same data."""
    ab = data.get("ssh", {}).get("pipelining")
    if not ab:
        reason = data.get("ssh", {}).get("not_run") or data.get("ssh", {}).get("error") or "not run"
        return None, f"not derived: the SSH pipelining A/B did not run ({reason})"

    # Wall time decides when the samples do not overlap; on a loaded machine they do, and the CPU
    # both ends spent (this machine's ansible and ssh, the container's sshd and modules) decides.
    def total(m):
        return ab[m]["cpu_s"] + (ab[m].get("target_cpu_s") or 0)

    walls_apart = max(ab["on"]["walls"]) < min(ab["off"]["walls"]) or max(ab["off"]["walls"]) < min(
        ab["on"]["walls"]
    )
    if walls_apart:
        on, basis = ab["on"]["wall_s"] < ab["off"]["wall_s"], "wall"
    else:
        on, basis = total("on") < total("off"), "CPU (wall samples overlap)"
    mode = "on" if on else "off"
    verified = [
        v
        for v, rows in data["results"].items()
        if trio_safe(rows) and data["variants"][v].get("pipelining_effective") == on
    ]
    speed = (
        f"decided by {basis}; over SSH on = {ab['on']['wall_s'] / ab['off']['wall_s']:.2f}x off in wall, "
        f"{total('on') / total('off'):.2f}x in CPU"
    )
    if not verified:
        return None, (
            f"pipelining {mode} is faster ({speed}) but no site.yml trio ran with it here "
            f"(`--variants pipelining-{mode}`): not proven safe"
        )
    return (
        on,
        f"pipelining {mode} ({speed}; site.yml rerun and --check changed=0 with it: {', '.join(verified)})",
    )


def trio_safe(rows):
    return all(rows.get(k, {}).get("ok") for k in ("fresh", "rerun", "check")) and not any(
        rows[k]["changed"] for k in ("rerun", "check")
    )


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
        default="shipped",
        help=f"comma-separated whole-site configurations, of: {', '.join(VARIANTS)} (default: shipped)",
    )
    ap.add_argument("--ssh-repeat", type=int, default=3, help="off/on and all/min pairs over SSH (0: skip)")
    ap.add_argument("--ssh-tasks", type=int, default=20, help="stat tasks per pipelining run")
    ap.add_argument("--out", type=Path, default=RESULTS / "converge.json")
    args = ap.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant(s): {', '.join(unknown)}")
    started = time.perf_counter()
    shipped = shipped_pipelining()
    results = {}
    print(f"ansible.cfg ships pipelining = {shipped}")
    print(f"{'variant':<16} {'run':<6} {'wall s':>7} {'cpu s':>7} {'changed':>7}  status")
    with tempfile.TemporaryDirectory(prefix="bench-converge-") as d:
        for variant in variants:
            results[variant] = bench_variant(Path(d), variant)
            for name, row in results[variant].items():
                status = "ok" if row["ok"] else f"FAILED rc={row['rc']}"
                if row["ok"] and name != "fresh" and row["changed"]:
                    status = "NOT IDEMPOTENT"
                print(
                    f"{variant:<16} {name:<6} {row['wall_s']:7.2f} {row['cpu_s']:7.2f} "
                    f"{row['changed']:7d}  {status}",
                    flush=True,
                )
                if not row["ok"]:
                    print("   " + row["tail"][-800:].replace("\n", "\n   "))
    for variant, rows in results.items():
        if rows["fresh"]["ok"]:
            print(f"\n{variant}: slowest tasks of the fresh run")
            for t in rows["fresh"]["top10"]:
                print(f"  {t['seconds']:6.2f}s  {t['task']}")

    ssh = {"not_run": "--ssh-repeat 0"}
    if args.ssh_repeat > 0:
        with tempfile.TemporaryDirectory(prefix="bench-ssh-") as d:
            ssh = ssh_ab(args.ssh_repeat, args.ssh_tasks, Path(d))
    print("\nover SSH (throwaway container, median; ratio vs off / vs all):")
    if "not_run" in ssh or "error" in ssh:
        print(f"  {'not run' if 'not_run' in ssh else 'FAILED'}: {ssh.get('not_run') or ssh.get('error')}")
    else:
        print(f"  container ready in {ssh['setup_s']:.1f} s")
        for label, rows, base in (
            (f"pipelining ({ssh['tasks']} stat tasks)", ssh["pipelining"], "off"),
            ("gather_subset (ansible.builtin.setup)", ssh["fact_subsets"], "all"),
        ):
            for mode, row in rows.items():
                extra = f"  {row['facts']} facts" if "facts" in row else ""
                target = "-" if row["target_cpu_s"] is None else f"{row['target_cpu_s']:.2f}"
                print(
                    f"  {label} {mode:<3} {row['wall_s']:6.2f} s wall "
                    f"{row['wall_s'] / rows[base]['wall_s']:5.2f}x, CPU {row['cpu_s']:6.2f} s here + "
                    f"{target} s in the container{extra}"
                )

    elapsed = time.perf_counter() - started
    out = dict(
        variants={
            v: dict(
                VARIANTS[v],
                pipelining_effective=shipped
                if VARIANTS[v]["pipelining"] is None
                else VARIANTS[v]["pipelining"],
            )
            for v in variants
        },
        shipped_pipelining=shipped,
        results=results,
        ssh=ssh,
        broker="this host's mosquitto (init.d), reconfigured as make site does",
        elapsed_s=round(elapsed, 1),
        load_end=os.getloadavg(),
    )
    pipelining, sentence = fastest_safe(out)
    out["fastest_safe_pipelining"] = pipelining
    print(f"\nfastest safe configuration: {sentence}")
    ok = all(trio_safe(rows) for rows in results.values()) and "error" not in ssh
    if pipelining is not None and pipelining != shipped:
        print(f"ansible.cfg ships pipelining = {shipped}: it does NOT match the data")
        ok = False
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out} in {elapsed:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
