#!/usr/bin/env python3
"""How long typical esptool commands take against esp32sim, per transport, with/without pacing.

Runs the real esptool CLI (a fresh process per command, as a user or Ansible would) and prints
wall-clock seconds. Usage: .venv/bin/python bench/esp32sim_speed.py [--repeat N]
"""

import argparse
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

BIN = Path(sys.executable).parent
ESPTOOL = str(BIN / "esptool")
ESP32SIM = str(BIN / "esp32sim")


def firmware_like(size, seed=0):
    """Bytes that compress roughly like an ESP32 app image (~55-65 % of the original)."""
    rng = random.Random(seed)
    words = [rng.randbytes(rng.randint(2, 12)) for _ in range(600)]
    out = bytearray()
    while len(out) < size:
        out += rng.choice(words) if rng.random() < 0.8 else rng.randbytes(8)
    return bytes(out[:size])


def start_sim(tmp, transport, pacing, name):
    cmd = [ESP32SIM, "serve", "--quiet", "--flash", str(tmp / f"{name}.flash")]
    cmd += ["--pty", str(tmp / f"{name}-tty")] if transport == "pty" else ["--tcp", "127.0.0.1:0"]
    if pacing:
        cmd.append("--baud-pacing")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    port = re.search(r" on (\S+)", line).group(1)
    return proc, port


def timed(port, *args):
    t = time.perf_counter()
    subprocess.run([ESPTOOL, "--port", port, *args], check=True, capture_output=True)
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeat", type=int, default=3, help="runs per command (median printed)")
    ap.add_argument("--size", type=int, default=1 << 20, help="image size for write/verify")
    args = ap.parse_args()
    image = firmware_like(args.size)
    comp = len(zlib.compress(image, 9))
    print(f"esptool against esp32sim: image {args.size} bytes, {comp} compressed; median of {args.repeat}")
    print(
        f"{'transport':<9} {'pacing':<7} {'read-mac':>9} {'write-flash -b 921600':>22} {'verify-flash':>13}"
    )
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        (tmp / "app.bin").write_bytes(image)
        for transport in ("pty", "tcp"):
            for pacing in (False, True):
                proc, port = start_sim(tmp, transport, pacing, f"{transport}{int(pacing)}")
                try:
                    rows = {"read-mac": [], "write": [], "verify": []}
                    for _ in range(args.repeat):
                        rows["read-mac"].append(timed(port, "read-mac"))
                        rows["write"].append(
                            timed(port, "-b", "921600", "write-flash", "0x10000", str(tmp / "app.bin"))
                        )
                        rows["verify"].append(timed(port, "verify-flash", "0x10000", str(tmp / "app.bin")))
                finally:
                    proc.terminate()
                    proc.wait()
                med = {k: statistics.median(v) for k, v in rows.items()}
                print(
                    f"{transport:<9} {'on' if pacing else 'off':<7} {med['read-mac']:>8.2f}s "
                    f"{med['write']:>21.2f}s {med['verify']:>12.2f}s"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
