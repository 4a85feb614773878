"""Fleet mode: N boards in one background daemon, each with its own pty, MAC and flash file.

DIR/fleet.json   what was asked for (boards, ports, MACs, faults)
DIR/fleet.pid    the daemon's pid, written once every pty is ready, removed when it exits
DIR/fleet.log    the daemon's log
DIR/ttyUSB<i>    symlink to board i's /dev/pts/N;  DIR/ttyUSB<i>.flash its flash image

With `--firmware` each board also runs its application (esp32sim.firmware) whenever nobody has
its serial port open: opening the port is the reset into the ROM bootloader (the firmware stops
at once, mid-write if need be, as on a real board), closing it lets the board boot again from
flash. An unprovisioned board boots, finds no `mqtt` namespace and idles.
"""

import contextlib
import datetime
import json
import os
import signal
import subprocess
import sys
import threading
import time

from .device import Faults, mac_add
from .transport import Board, PtyTransport

CONFIG = "fleet.json"
PIDFILE = "fleet.pid"
LOGFILE = "fleet.log"
START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0
# `fleet start` on a running fleet with unplugged boards asks the daemon to plug them back in.
REPLUG_SIGNAL = signal.SIGUSR1
FIRMWARE_FAULTS = ("ota-power-loss",)
_LOG_LOCK = threading.Lock()


def _emit(line):
    """One whole line on the daemon's log (stderr), even with many board threads writing."""
    with _LOG_LOCK:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()


def _paths(d):
    return os.path.join(d, CONFIG), os.path.join(d, PIDFILE), os.path.join(d, LOGFILE)


def build_config(args) -> dict:
    if args.count < 1:
        raise ValueError("--count must be at least 1")
    faults, fw_faults = {}, {}
    for spec in args.fault_board:
        idx, sep, fault = spec.partition(":")
        if not sep or not idx.isdigit() or int(idx) >= args.count:
            raise ValueError(f"--fault-board {spec!r}: expected I:KIND[=VALUE] with 0 <= I < {args.count}")
        if fault.partition("=")[0] in FIRMWARE_FAULTS:
            # A fault of the running firmware, not of the ROM loader: only with --firmware.
            if not getattr(args, "firmware", False):
                raise ValueError(f"--fault-board {spec!r}: needs --firmware")
            from .firmware import parse_ota_fault

            parse_ota_fault(fault)
            fw_faults.setdefault(int(idx), []).append(fault)
            continue
        Faults.parse([fault])
        faults.setdefault(int(idx), []).append(fault)
    d = os.path.abspath(args.dir)
    boards = []
    for i in range(args.count):
        port = os.path.join(d, f"ttyUSB{i}")
        boards.append(
            {
                "index": i,
                "port": port,
                "flash": f"{port}.flash",
                "mac": mac_add(args.mac_base, i),
                "faults": faults.get(i, []),
            }
        )
        if fw_faults.get(i):  # only when set: a fleet.json from before stays the same fleet
            boards[-1]["firmware_faults"] = fw_faults[i]
    cfg = {"dir": d, "baud_pacing": bool(args.baud_pacing), "boards": boards}
    if getattr(args, "firmware", False):
        if args.firmware_interval <= 0:
            raise ValueError("--firmware-interval must be positive")
        cfg["firmware"] = {"interval": args.firmware_interval}
    return cfg


def _read_pid(pidfile):
    try:
        with open(pidfile) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def _is_our_daemon(pid, d) -> bool:
    """True when pid is alive and is the fleet daemon of this directory (not a reused pid)."""
    if pid is None:
        return False
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\x00")
    except OSError:
        return False
    return b"esp32sim.cli" in argv and b"run" in argv and os.fsencode(d) in argv


def status(d) -> dict:
    d = os.path.abspath(d)
    cfg_path, pidfile, _ = _paths(d)
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        cfg = {"dir": d, "boards": [], "baud_pacing": False}
    pid = _read_pid(pidfile)
    alive = _is_our_daemon(pid, d)
    boards = []
    for b in cfg["boards"]:
        target = os.path.realpath(b["port"]) if os.path.islink(b["port"]) else None
        boards.append({**b, "pty": target, "alive": bool(alive and target and os.path.exists(target))})
    return {
        "dir": d,
        "pid": pid if alive else None,
        "pids": [pid] if alive else [],
        "alive": alive,
        "baud_pacing": cfg.get("baud_pacing", False),
        "firmware": cfg.get("firmware"),
        "count": len(boards),
        "boards": boards,
        "ports": [b["port"] for b in boards],
        "macs": [b["mac"] for b in boards],
    }


def start(args) -> int:
    try:
        cfg = build_config(args)
    except ValueError as e:
        print(f"esp32sim fleet: {e}", file=sys.stderr)
        return 2
    d = cfg["dir"]
    os.makedirs(d, mode=0o700, exist_ok=True)  # holds the boards' flash, i.e. their keys
    cfg_path, pidfile, logfile = _paths(d)
    current = status(d)
    if current["alive"]:
        with open(cfg_path) as f:
            running = json.load(f)
        if running == cfg and all(b["alive"] for b in current["boards"]):
            print(
                f"esp32sim fleet: already running ({len(cfg['boards'])} boards in {d}, pid {current['pid']})"
            )
            return 0
        if running == cfg:
            return _replug(d, current)
        print(
            f"esp32sim fleet: a different fleet is running in {d} (pid {current['pid']}); "
            "stop it first with `esp32sim fleet stop --dir DIR`",
            file=sys.stderr,
        )
        return 1
    with contextlib.suppress(FileNotFoundError):
        os.unlink(pidfile)
    tmp = f"{cfg_path}.tmp"
    with open(tmp, "w") as f:
        json.dump(cfg, f, indent=2)
    os.replace(tmp, cfg_path)
    with open(logfile, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "esp32sim.cli", "fleet", "run", "--dir", d],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,  # survives the caller (an Ansible task, a shell)
            close_fds=True,
        )
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if _read_pid(pidfile) == proc.pid:
            print(f"esp32sim fleet: started {len(cfg['boards'])} boards in {d} (pid {proc.pid})")
            return 0
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    if proc.poll() is None:
        proc.terminate()
        proc.wait(5)
    tail = ""
    with contextlib.suppress(OSError), open(logfile, errors="replace") as f:
        tail = f.read()[-600:].strip().replace("\n", " | ")
    print(f"esp32sim fleet: the daemon did not become ready: {tail}", file=sys.stderr)
    return 1


def _replug(d, current) -> int:
    """Plug the unplugged boards of a running fleet back in (the daemon re-creates their ports)."""
    pulled = [b["index"] for b in current["boards"] if not b["alive"]]
    os.kill(current["pid"], REPLUG_SIGNAL)
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        now = status(d)
        if now["alive"] and all(b["alive"] for b in now["boards"]):
            names = ", ".join(str(i) for i in pulled)
            print(f"esp32sim fleet: replugged board(s) {names} in {d} (pid {current['pid']})")
            return 0
        time.sleep(0.05)
    print(f"esp32sim fleet: board(s) {pulled} in {d} did not come back; see {LOGFILE}", file=sys.stderr)
    return 1


def stop(args) -> int:
    d = os.path.abspath(args.dir)
    _, pidfile, _ = _paths(d)
    pid = _read_pid(pidfile)
    if not _is_our_daemon(pid, d):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(pidfile)
        print(f"esp32sim fleet: not running in {d}")
        return 0
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT
    while time.monotonic() < deadline and _is_our_daemon(pid, d):
        time.sleep(0.05)
    if _is_our_daemon(pid, d):
        os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(pidfile)
    print(f"esp32sim fleet: stopped pid {pid} in {d}")
    return 0


class _FirmwareHost:
    """Runs one board's firmware while its port is closed (and it is plugged in)."""

    def __init__(self, index, board, interval, faults=()):
        self.index = index
        self.board = board
        self.interval = interval
        # ota-power-loss=N happens once per board: a later boot (after esptool) is not cut again.
        from .firmware import parse_ota_fault

        self.ota_power_loss = None
        for f in faults:
            self.ota_power_loss = parse_ota_fault(f)
        self.lock = threading.Lock()
        self.fw = None
        self.port_open = False
        self.unplugged = False
        board.on_power_on = self.port_opened
        board.on_release = self.port_closed

    def log(self, msg):
        _emit(f"board {self.index}: firmware: {msg}")

    def port_opened(self):
        # Called by the transport before the bootloader session starts: the firmware is halted
        # (no more flash writes, its connection dropped) before esptool's first command runs.
        with self.lock:
            self.port_open = True
            if self.fw is not None and self.fw.alive:
                self.fw.halt()
                stamp = datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")[:23]
                self.log(f"{stamp}Z reset into the ROM bootloader (port opened)")

    def port_closed(self):
        with self.lock:
            self.port_open = False

    def pull(self):
        with self.lock:
            self.unplugged = True
            if self.fw is not None:
                self.fw.halt()

    def plug(self):
        with self.lock:
            self.unplugged = False
            self.port_open = False

    def tick(self):
        """Boot the firmware if the board should be running it and is not (the old one is gone)."""
        from .firmware import Firmware

        with self.lock:
            if self.port_open or self.unplugged or (self.fw is not None and self.fw.alive):
                return
            if self.fw is not None and self.fw.power_lost:
                self.ota_power_loss = None
            # Months of readings: bounded memory, and fleet.log gets one reading an hour per board.
            self.fw = Firmware(
                self.board.flash,
                interval=self.interval,
                log=self.log,
                keep_events=10000,
                log_every_reading=max(1, round(3600 / self.interval)),
                ota_power_loss=self.ota_power_loss,
            ).start()

    def close(self):
        with self.lock:
            fw, self.fw = self.fw, None
            self.unplugged = True
        if fw is not None:
            fw.stop(3)


def run_daemon(args) -> int:
    """The daemon: serve every board until SIGTERM."""
    d = os.path.abspath(args.dir)
    cfg_path, pidfile, _ = _paths(d)
    with open(cfg_path) as f:
        cfg = json.load(f)
    stop_event = threading.Event()
    replug = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: stop_event.set())
    signal.signal(signal.SIGINT, lambda *a: stop_event.set())
    signal.signal(REPLUG_SIGNAL, lambda *a: replug.set())
    transports, boards, threads, hosts = [], [], [], []
    firmware = cfg.get("firmware")
    try:
        for b in cfg["boards"]:

            def log(msg, i=b["index"]):
                _emit(f"board {i}: {msg}")

            board = Board(
                b["flash"], mac=b["mac"], faults=b["faults"], baud_pacing=cfg["baud_pacing"], log=log
            )
            boards.append(board)
            if firmware:
                hosts.append(
                    _FirmwareHost(b["index"], board, firmware["interval"], b.get("firmware_faults", ()))
                )
            transports.append(PtyTransport(board, b["port"]))
        for t in transports:
            th = threading.Thread(target=t.serve, args=(stop_event,), daemon=True)
            th.start()
            threads.append(th)
        tmp = f"{pidfile}.tmp"
        with open(tmp, "w") as f:
            f.write(f"{os.getpid()}\n")
        os.replace(tmp, pidfile)
        print(f"fleet ready: {len(boards)} boards", file=sys.stderr, flush=True)
        while not stop_event.is_set():
            stop_event.wait(0.1)
            for host, t in zip(hosts, transports, strict=False):
                if t.unplugged and not host.unplugged:
                    host.pull()  # the USB cable is the board's power too
                host.tick()
            if replug.is_set():
                replug.clear()
                for i, t in enumerate(transports):
                    if t.unplugged:
                        transports[i] = PtyTransport(boards[i], t.link_path)
                        if hosts:
                            hosts[i].plug()
                        th = threading.Thread(target=transports[i].serve, args=(stop_event,), daemon=True)
                        th.start()
                        threads[i] = th
                        print(f"board {i}: plugged in again", file=sys.stderr, flush=True)
            # An unplugged board's thread ends on purpose; any other end is a crash.
            if any(not th.is_alive() and not t.unplugged for th, t in zip(threads, transports, strict=True)):
                print("a board thread died; stopping the fleet", file=sys.stderr, flush=True)
                return 1
        return 0
    finally:
        stop_event.set()
        for host in hosts:
            host.close()
        for th in threads:
            th.join(2)
        for t in transports:
            t.close()
        for board in boards:
            board.close()
        if _read_pid(pidfile) == os.getpid():
            os.unlink(pidfile)


def main(args) -> int:
    if args.fleet_command == "start":
        return start(args)
    if args.fleet_command == "stop":
        return stop(args)
    if args.fleet_command == "status":
        print(json.dumps(status(args.dir), indent=2))
        return 0
    if args.fleet_command == "run":
        return run_daemon(args)
    return 2
