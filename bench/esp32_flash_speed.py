#!/usr/bin/env python3
"""Time esp32_flash calls against the simulator: first write vs idempotent rerun.

Not a test (pytest does not collect it): it prints numbers. Run from the repository root:

    .venv/bin/python bench/esp32_flash_speed.py [--repeat N]

For each transport (pty, TCP) and pacing (off, --baud-pacing at the module's 460800 baud) it starts
a fresh simulated board, then runs one esp32_flash task through ansible-playbook twice with a ~1 MiB
firmware image at 0x10000 and a 24 KiB NVS image (built by esp32_nvs) at 0x9000. It reports the
task's wall time (from the json callback, i.e. including connection, stub upload and reset, but not
ansible-playbook's own start-up) and the module's per-image write seconds and bytes on the wire.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def firmware(path):
    """~1 MiB that compresses like code (repeated random 256-byte chunks), deterministic."""
    rng = random.Random(5)
    chunks = [bytes(rng.getrandbits(8) for _ in range(256)) for _ in range(64)]
    path.write_bytes(b"".join(rng.choice(chunks) for _ in range(4096)))


def pem(label, der_bytes, rng):
    """PEM-shaped text around random bytes: compresses as badly as a real certificate or key."""
    import base64
    import textwrap

    body = base64.b64encode(bytes(rng.getrandbits(8) for _ in range(der_bytes))).decode()
    return f"-----BEGIN {label}-----\n" + "\n".join(textwrap.wrap(body, 64)) + f"\n-----END {label}-----\n"


def credentials():
    """The fleet's NVS layout with realistic sizes (ECDSA P-256 device cert/key, RSA-sized CA)."""
    rng = random.Random(7)
    return {
        "mqtt": {
            "broker_uri": "mqtts://broker.example.net:8883",
            "device_id": "esp32-bench-01",
            "topic_root": "fleet/esp32-bench-01",
            "ca_cert": pem("CERTIFICATE", 1300, rng),
            "client_cert": pem("CERTIFICATE", 650, rng),
            "client_key": pem("EC PRIVATE KEY", 121, rng),
        },
        "wifi": {"ssid": "lab", "password": "bench-wifi-password"},
    }


def playbook(tmp, tasks):
    play = tmp / "play.yml"
    play.write_text(
        json.dumps(
            [dict(hosts="localhost", gather_facts=False, collections=["esp32_fleet.mqtt_fleet"], tasks=tasks)]
        )
    )
    env = dict(
        os.environ,
        ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"),
        ANSIBLE_STDOUT_CALLBACK="ansible.posix.json",
        ANSIBLE_CALLBACKS_ENABLED="ansible.posix.json",
        ANSIBLE_LOCALHOST_WARNING="false",
    )
    cmd = [str(BIN / "ansible-playbook"), "-i", "localhost,", "-c", "local"]
    cmd += ["-e", f"ansible_python_interpreter={sys.executable}", str(play)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp, check=False)
    data = json.loads(proc.stdout)
    task = data["plays"][0]["tasks"][-1]
    result = task["hosts"]["localhost"]
    if result.get("failed"):
        raise SystemExit(f"task failed: {result.get('msg')}")
    start = datetime.fromisoformat(task["task"]["duration"]["start"].replace("Z", "+00:00"))
    end = datetime.fromisoformat(task["task"]["duration"]["end"].replace("Z", "+00:00"))
    return (end - start).total_seconds(), result


def start_sim(tmp, transport, pacing):
    flash = tmp / f"flash-{transport}-{pacing}.bin"
    flash.unlink(missing_ok=True)  # a fresh board: the first write must really write
    cmd = [str(BIN / "esp32sim"), "serve", "--flash", str(flash), "--quiet"]
    cmd += ["--tcp", "127.0.0.1:0"] if transport == "tcp" else ["--pty", str(tmp / f"tty-{pacing}")]
    if pacing:
        cmd.append("--baud-pacing")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    return proc, line.split(" on ", 1)[1].split(" -> ")[0].strip()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=1, help="fresh boards per configuration")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        app = tmp / "app.bin"
        firmware(app)
        nvs = tmp / "nvs.bin"
        playbook(tmp, [dict(esp32_nvs=dict(dest=str(nvs), namespaces=credentials()))])
        print(
            f"images: app {app.stat().st_size} B at 0x10000, nvs {nvs.stat().st_size} B at 0x9000; "
            "baud 460800 (the module default)"
        )
        # What any module costs here (AnsiballZ, interpreter start-up): the floor under every number below.
        floor = statistics.median(playbook(tmp, [dict(**{"ansible.builtin.ping": {}})])[0] for _ in range(3))
        print(f"ansible.builtin.ping task on this machine: {floor:.2f} s")
        header = f"{'transport':9} {'pacing':6} {'first write s':>13} {'rerun s':>8} {'app write s':>11} "
        print(header + f"{'app wire B':>10} {'nvs write s':>11} {'nvs wire B':>10}")
        for transport in ("pty", "tcp"):
            for pacing in (False, True):
                firsts, reruns, app_s, nvs_s = [], [], [], []
                for _ in range(args.repeat):
                    proc, port = start_sim(tmp, transport, pacing)
                    try:
                        task = dict(
                            esp32_flash=dict(
                                port=port,
                                images=[
                                    dict(offset=0x9000, path=str(nvs)),
                                    dict(offset=0x10000, path=str(app)),
                                ],
                            )
                        )
                        first, result = playbook(tmp, [task])
                        assert result["changed"], result
                        rerun, again = playbook(tmp, [task])
                        assert not again["changed"], again
                    finally:
                        proc.terminate()
                        proc.wait()
                    firsts.append(first)
                    reruns.append(rerun)
                    nvs_img, app_img = result["images"]
                    app_s.append(app_img["seconds"])
                    nvs_s.append(nvs_img["seconds"])
                print(
                    f"{transport:9} {'on' if pacing else 'off':6} {statistics.median(firsts):13.2f} "
                    f"{statistics.median(reruns):8.2f} {statistics.median(app_s):11.2f} "
                    f"{app_img['wire_bytes']:10d} "
                    f"{statistics.median(nvs_s):11.2f} {nvs_img['wire_bytes']:10d}"
                )
        load = os.getloadavg()[0]
        print(f"(median of {args.repeat} fresh board(s) per row; load average {load:.1f} at the end)")


if __name__ == "__main__":
    main()
