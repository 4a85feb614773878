#!/usr/bin/env python3
"""Assemble bench/results/latest.md and its PNG charts from the benchmarks' JSON results.

    .venv/bin/python bench/report.py [--results DIR]

Reads converge.json (bench/converge.py), fleet.json (bench/fleet_scale.py) and broker.md
(bench/broker_load.py) when present; a missing one becomes a "not run" line, never an invented
number. Every section gives the numbers and their ratio to the section's baseline. Writes
latest.md, fleet_scaling.png and converge.png next to the inputs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display on a CI machine
import matplotlib.pyplot as plt
from converge import fastest_safe, shipped_pipelining  # bench/ is this script's directory

ROOT = Path(__file__).resolve().parents[1]


def cpu_model():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def os_name():
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return platform.platform()


def version(dist):
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def mosquitto_version():
    try:
        out = subprocess.run(["mosquitto", "-h"], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "not installed"
    first = (out.stdout or out.stderr).splitlines()
    return first[0].replace("mosquitto version ", "") if first else "unknown"


def git_revision():
    try:
        out = subprocess.run(
            ["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() or "unknown"


def machine_header():
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return [
        "| machine | |",
        "|---|---|",
        f"| date (UTC) | {datetime.now(UTC):%Y-%m-%d %H:%M} |",
        f"| CPU | {cpu_model()} x {os.cpu_count()} cores |",
        f"| load average (1/5/15 min, at report time) | {load} |",
        f"| OS | {os_name()}, kernel {platform.release()} |",
        f"| Python | {platform.python_version()} |",
        f"| ansible-core / esptool / paho-mqtt | {version('ansible-core')} / {version('esptool')} / "
        f"{version('paho-mqtt')} |",
        f"| mosquitto | {mosquitto_version()} |",
        f"| commit | {git_revision()} |",
    ]


def ratio(value, base):
    if value is None or not base:
        return "-"
    return f"{value / base:.2f}x"


def cpu(value):
    return "-" if value is None else f"{value:.1f}"


def converge_section(data, out_dir):
    lines = ["## Converge: site.yml", ""]
    if data is None:
        return [*lines, "Not run (bench/converge.py writes converge.json).", ""]
    if data.get("note"):
        lines += [f"**Note: {data['note']}.**", ""]
    results = data["results"]
    base_name = "shipped" if "shipped" in results else next(iter(results), None)
    lines += [
        "Fresh target (throwaway project, inventories/local's shape), idempotent rerun, `--check`, with the "
        "shipped configuration (ansible.cfg and playbooks as written)"
        f"{' and the variants asked for' if len(results) > 1 else ''}. "
        f"Broker: {data['broker']}. Ratios: wall time against the same variant's fresh run, and against "
        f"`{base_name}` for the same run.",
        "",
        "| variant | run | wall s | CPU s | changed | vs fresh | vs shipped | status |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for variant, rows in results.items():
        for run, row in rows.items():
            status = "ok" if row["ok"] else f"failed (rc {row['rc']})"
            if row["ok"] and run != "fresh" and row["changed"]:
                status = "NOT idempotent"
            b = results[base_name].get(run, {}).get("wall_s")
            lines.append(
                f"| {variant} | {run} | {row['wall_s']:.1f} | {row['cpu_s']:.1f} | {row['changed']} | "
                f"{ratio(row['wall_s'], rows['fresh']['wall_s'])} | {ratio(row['wall_s'], b)} | {status} |"
            )
    if not results:
        lines.append("| - | not run (`--variants` was empty) | | | | | | |")
    top = results.get(base_name, {}).get("fresh", {}).get("top10", [])
    if top:
        lines += ["", f"Ten slowest tasks of the fresh run ({base_name}):", "", "| s | task |", "|---:|---|"]
        lines += [f"| {t['seconds']:.2f} | {t['task']} |" for t in top]
    lines += ["", *ssh_lines(data.get("ssh", {}))]
    # Derived from the numbers above, then held against ansible.cfg as it is now.
    pipelining, sentence = fastest_safe(data)
    shipped = {True: "true", False: "false"}.get(shipped_pipelining(), "unknown")
    if pipelining is None:
        verdict = f"ansible.cfg ships `pipelining = {shipped}`; the data above cannot confirm or refute it."
    elif str(pipelining).lower() == shipped:
        verdict = f"ansible.cfg ships `pipelining = {shipped}`: matches."
    else:
        verdict = f"**ansible.cfg ships `pipelining = {shipped}`: does NOT match the data.**"
    lines += ["", f"Fastest safe configuration: **{sentence}**. {verdict}"]
    lines += ["", "![converge times](converge.png)", ""]
    converge_chart(results, data.get("ssh", {}), out_dir / "converge.png")
    return lines


def two(value):
    return "-" if value is None else f"{value:.2f}"


def ssh_lines(ssh):
    if "pipelining" not in ssh:
        reason = ssh.get("not_run") or f"failed: {ssh.get('error', 'no data')}"
        return [f"Pipelining and fact subsets over SSH: not run ({reason})."]
    lines = [
        f"Over real SSH to a throwaway container ({ssh['container']}; ready in {ssh['setup_s']:.0f} s), "
        "median of "
        f"interleaved runs. CPU: here (ansible and the ssh clients it waited for) + in the container (sshd, "
        f"the modules' Python). Ratios against `off` / `all`.",
    ]
    for title, rows, base, head in (
        (f"{ssh['tasks']} `stat` tasks, pipelining off and on", ssh["pipelining"], "off", "pipelining"),
        (
            "`ansible.builtin.setup`, fact subsets (pipelining as shipped)",
            ssh["fact_subsets"],
            "all",
            "gather_subset",
        ),
    ):
        b = rows[base]
        lines += [
            "",
            f"{title}:",
            "",
            f"| {head} | runs | wall s | samples s | CPU s here | CPU s container | vs {base} wall "
            f"| vs {base} CPU |",
            "|---|---:|---:|---|---:|---:|---:|---:|",
        ]
        for mode, row in rows.items():
            facts = f" ({row['facts']} facts)" if row.get("facts") else ""
            lines.append(
                f"| {mode}{facts} | {row['runs']} | {row['wall_s']:.2f} | "
                f"{', '.join(f'{w:.1f}' for w in row['walls'])} | "
                f"{row['cpu_s']:.2f} | {two(row['target_cpu_s'])} | {ratio(row['wall_s'], b['wall_s'])} | "
                f"{ratio(row['cpu_s'] + (row['target_cpu_s'] or 0), b['cpu_s'] + (b['target_cpu_s'] or 0))} |"
            )
    return lines


def converge_chart(results, ssh, path):
    runs = ["fresh", "rerun", "check"]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 3.8), gridspec_kw={"width_ratios": [3, 2]})
    width = 0.8 / max(1, len(results))
    for i, (variant, rows) in enumerate(results.items()):
        xs = [r + i * width for r in range(len(runs))]
        ys = [rows.get(r, {}).get("wall_s", 0) if rows.get(r, {}).get("ok") else 0 for r in runs]
        ax.bar(xs, ys, width, label=variant)
    ax.set_xticks([r + width * (len(results) - 1) / 2 for r in range(len(runs))], runs)
    ax.set_ylabel("wall seconds")
    ax.set_title("site.yml converge")
    if results:
        ax.legend(fontsize=8)
    if "pipelining" in ssh:
        labels, walls, cpus = [], [], []
        for group, prefix in (("pipelining", "pipelining "), ("fact_subsets", "facts ")):
            for mode, row in ssh[group].items():
                labels.append(prefix + mode)
                walls.append(row["wall_s"])
                cpus.append(row["cpu_s"] + (row["target_cpu_s"] or 0))
        xs = range(len(labels))
        ax2.bar([x - 0.2 for x in xs], walls, 0.4, label="wall (median)")
        ax2.bar([x + 0.2 for x in xs], cpus, 0.4, label="CPU, both ends")
        ax2.set_xticks(list(xs), labels, fontsize=8, rotation=15)
        ax2.legend(fontsize=8)
    else:
        ax2.text(0.5, 0.5, "not run", ha="center", va="center", transform=ax2.transAxes)
    ax2.set_ylabel("seconds")
    ax2.set_title("over SSH (throwaway container)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def fleet_section(data, out_dir):
    lines = ["## Fleet provisioning", ""]
    if data is None:
        return [*lines, "Not run (bench/fleet_scale.py writes fleet.json).", ""]
    if data.get("note"):
        lines += [f"**Note: {data['note']}.**", ""]
    lines += [
        f"Simulated boards with `--baud-pacing`; firmware {data['firmware_bytes'] // 1024} KiB at 0x10000"
        f" + NVS "
        f"{data['nvs_bytes'] // 1024} KiB; forks = boards.",
        "",
        "### Flash (esp32_flash's code path, one process per board)",
        "",
        "Per-board phase times are medians. *x floor*: measured write time over the line's physical floor "
        "(SLIP-framed bytes the host wrote during the write phase x 10 / baud). *vs 1 board*: boards/min "
        "against one board at the same baud (ideal: the board count).",
        "",
        "| boards | baud | wall s | boards/min | vs 1 board | connect s | compare s | stub s | write s | "
        "verify s | write bytes | floor s | x floor | failed |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in data["flash"]:
        one = next((x for x in data["flash"] if x["baud"] == r["baud"] and x["boards"] == 1), None)
        p = r["phases_median_s"]
        lines.append(
            f"| {r['boards']} | {r['baud']} | {r['wall_s']:.1f} | {r['boards_per_min']:.1f} | "
            f"{ratio(r['boards_per_min'], one and one['boards_per_min'])} | {p.get('connect', 0):.2f} | "
            f"{p.get('compare', 0):.2f} | {p.get('stub', 0):.2f} | {p.get('write', 0):.2f} | "
            f"{p.get('verify', 0):.2f} | {r['write_tx_bytes']} | {r['write_floor_s']:.2f} | "
            f"{r['write_vs_floor'] or 0:.2f} | {r['failed']} |"
        )
    if data["provision"]:
        lines += [
            "",
            "### Provision (playbooks/fleet.yml end to end: identify, certificate, NVS, flash, verify,"
            " manifest)",
            "",
            "| boards | baud | first run s | CPU s | boards/min | vs 1 board | idempotent rerun s | CPU s | "
            "rerun changed |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in data["provision"]:
            if "error" in r or not r.get("first_ok"):
                lines.append(
                    f"| {r['boards']} | {r['baud']} | failed: {r.get('error', 'see fleet.json')}"
                    " | | | | | | |"
                )
                continue
            one = next(
                (
                    x
                    for x in data["provision"]
                    if x["baud"] == r["baud"] and x["boards"] == 1 and x.get("first_ok")
                ),
                None,
            )
            lines.append(
                f"| {r['boards']} | {r['baud']} | {r['first_s']:.1f} | {cpu(r.get('first_cpu_s'))} | "
                f"{r['boards_per_min']:.1f} | {ratio(r['boards_per_min'], one and one['boards_per_min'])} | "
                f"{r['rerun_s'] or 0:.1f} | {cpu(r.get('rerun_cpu_s'))} | {r['rerun_changed']} |"
            )
    lines += ["", "![boards per minute](fleet_scaling.png)", ""]
    fleet_chart(data, out_dir / "fleet_scaling.png")
    return lines


def fleet_chart(data, path):
    fig, ax = plt.subplots(figsize=(7, 4))
    counts = set()
    for kind, style in (("flash", "-o"), ("provision", "--s")):
        rows = [r for r in data.get(kind, []) if r.get("boards_per_min")]
        for baud in sorted({r["baud"] for r in rows}):
            pts = sorted((r["boards"], r["boards_per_min"]) for r in rows if r["baud"] == baud)
            counts.update(p[0] for p in pts)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=f"{kind}, {baud} baud")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(counts), [str(c) for c in sorted(counts)])
    ax.minorticks_off()
    ax.set_xlabel("boards (forks = boards)")
    ax.set_ylabel("boards per minute")
    ax.set_title("Fleet provisioning throughput (simulated boards, paced)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def broker_section(results):
    md = results / "broker.md"
    if not md.exists():
        return ["## Broker load", "", "Not run (bench/broker_load.py writes broker.md).", ""]
    text = md.read_text().strip()
    # broker.md is a section of its own: demote its headings one level under this report's title.
    body = [f"#{line}" if line.startswith("#") else line for line in text.splitlines()]
    return [
        "## Broker load",
        "",
        "From bench/broker_load.py (its own report, included as written).",
        "",
        *body,
        "",
    ]


def micro_section(results):
    """The esptool/esp32_flash micro-benchmarks print tables; `make bench` tees them to *.txt."""
    lines = []
    for name, title in (
        ("esp32sim_speed.txt", "esptool CLI against esp32sim (bench/esp32sim_speed.py)"),
        ("esp32_flash_speed.txt", "esp32_flash task, first write vs rerun (bench/esp32_flash_speed.py)"),
    ):
        path = results / name
        if path.exists():
            lines += [f"### {title}", "", "```", path.read_text().rstrip(), "```", ""]
    return ["## Simulator and module micro-benchmarks", "", *lines] if lines else []


def load(path):
    return json.loads(path.read_text()) if path.exists() else None


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args()
    out = args.results
    out.mkdir(parents=True, exist_ok=True)
    lines = [
        "# Benchmark report",
        "",
        "Generated by `make bench` (bench/report.py); numbers are from the machine below. "
        "Reproduce: `make bench`. Method and caveats: README.md, section Benchmarks.",
        "",
        *machine_header(),
        "",
    ]
    lines += converge_section(load(out / "converge.json"), out)
    lines += fleet_section(load(out / "fleet.json"), out)
    lines += broker_section(out)
    lines += micro_section(out)
    (out / "latest.md").write_text("\n".join(lines).rstrip() + "\n")
    print(f"wrote {out / 'latest.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
