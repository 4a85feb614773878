"""Command line: `esp32sim serve | fleet start|stop|status | boot | run | image app|bootloader`."""

import argparse
import signal
import sys
import threading

from . import __version__
from .device import Faults, parse_mac


def _host_port(text):
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host or "127.0.0.1", int(port)


def _mac(text):
    try:
        parse_mac(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text.lower()


def _fault(text):
    try:
        Faults.parse([text])
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def build_parser():
    p = argparse.ArgumentParser(prog="esp32sim", description="A simulated ESP32 for esptool.")
    p.add_argument("--version", action="version", version=f"esp32sim {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run one board in the foreground")
    where = s.add_mutually_exclusive_group(required=True)
    where.add_argument("--pty", metavar="PATH", help="symlink to create for the board's pty")
    where.add_argument("--tcp", metavar="HOST:PORT", type=_host_port, help="TCP listen address")
    s.add_argument("--flash", required=True, metavar="FILE", help="flash image (created as 4 MiB of 0xFF)")
    s.add_argument("--mac", type=_mac, default="24:0a:c4:00:00:01", help="base MAC in eFuse")
    s.add_argument("--baud-pacing", action="store_true", help="delay bytes to the line rate (8N1)")
    s.add_argument(
        "--fault",
        action="extend",
        nargs="+",
        type=_fault,
        default=[],
        metavar="KIND[=VALUE]",
        help="hang-after-write-blocks=N, corrupt-block=N, unplug-after-write-blocks=N, chip=NAME"
        " (repeatable)",
    )
    s.add_argument("--quiet", action="store_true", help="do not log events to stderr")

    f = sub.add_parser("fleet", help="run N boards in the background")
    fsub = f.add_subparsers(dest="fleet_command", required=True)
    fs = fsub.add_parser("start", help="start N boards (idempotent)")
    fs.add_argument("--count", type=int, required=True)
    fs.add_argument("--dir", required=True)
    fs.add_argument("--mac-base", type=_mac, default="24:0a:c4:00:00:01")
    fs.add_argument("--baud-pacing", action="store_true")
    fs.add_argument(
        "--fault-board",
        action="extend",
        nargs="+",
        default=[],
        metavar="I:KIND[=VALUE]",
        help="fault for board I: a --fault of `serve`, or (with --firmware) ota-power-loss=N: cut the"
        " power once after N bytes of an OTA download",
    )
    fs.add_argument(
        "--firmware",
        action="store_true",
        help="run each board's firmware (esp32sim run) while nobody has its port open",
    )
    fs.add_argument(
        "--firmware-interval", type=float, default=5.0, metavar="S", help="seconds between readings"
    )
    for name, text in (("stop", "stop the boards of DIR"), ("status", "print JSON status of DIR")):
        fx = fsub.add_parser(name, help=text)
        fx.add_argument("--dir", required=True)
    fr = fsub.add_parser("run", help=argparse.SUPPRESS)  # the daemon itself (internal)
    fr.add_argument("--dir", required=True)

    b = sub.add_parser("boot", help="run the provisioned firmware from a flash image")
    b.add_argument("--flash", required=True, metavar="FILE")
    b.add_argument("--nvs-offset", type=lambda x: int(x, 0), default=0x9000)
    b.add_argument("--nvs-size", type=lambda x: int(x, 0), default=0x6000)
    b.add_argument("--interval", type=float, default=5.0, help="seconds between readings")
    n = b.add_mutually_exclusive_group()
    n.add_argument("--once", action="store_true", help="publish one reading and exit")
    n.add_argument("--count", type=int, help="publish N readings and exit")
    b.add_argument("--timeout", type=float, default=10.0, help="network timeout in seconds")
    b.add_argument("--topic-override", metavar="TOPIC", help="publish here instead of the own topic")

    r = sub.add_parser("run", help="run the provisioned board's firmware (renewal included) until SIGTERM")
    r.add_argument("--flash", required=True, metavar="FILE")
    r.add_argument("--interval", type=float, default=5.0, help="seconds between readings")
    part = "(default: the partition table at 0x8000, else %s)"
    r.add_argument("--nvs-offset", type=lambda x: int(x, 0), help=f"the nvs partition {part % '0x9000'}")
    r.add_argument("--nvs-size", type=lambda x: int(x, 0), default=0x6000)
    r.add_argument("--field-offset", type=lambda x: int(x, 0), help=f"nvs_field {part % '0x312000'}")
    r.add_argument("--field-size", type=lambda x: int(x, 0), default=0x6000)
    r.add_argument("--backoff-cap", type=float, default=60.0, metavar="S", help="reconnect backoff cap")
    r.add_argument("--reject-wait", type=float, default=3600.0, metavar="S", help="wait after `rejected`")
    r.add_argument(
        "--window-check", type=float, default=3600.0, metavar="S", help="renewal window check period"
    )
    r.add_argument("--quiet", action="store_true", help="do not print events")

    im = sub.add_parser("image", help="build ESP32 images (the simulator's SDK)")
    isub = im.add_subparsers(dest="image_command", required=True)
    ia = isub.add_parser("app", help="an app image with an esp_app_desc_t (esptool image-info reads it)")
    ia.add_argument("--project", required=True, help="esp_app_desc_t.project_name (at most 31 bytes)")
    ia.add_argument("--version", required=True, help="esp_app_desc_t.version (at most 31 bytes)")
    ia.add_argument("--out", required=True, metavar="FILE")
    ia.add_argument(
        "--selfcheck-fail",
        action="store_true",
        help="add the esp32sim:selfcheck=fail marker: the twin's self-check of this image fails",
    )
    ia.add_argument("--size", type=lambda x: int(x, 0), metavar="N", help="pad the file to N bytes")
    ia.add_argument("--extra", default="", metavar="TEXT", help="text to put into the image's rodata")
    ia.add_argument(
        "--chip-id", type=lambda x: int(x, 0), default=0, metavar="N", help="header chip id (0 = ESP32)"
    )
    ib = isub.add_parser("bootloader", help="a second-stage bootloader image for 0x1000")
    ib.add_argument("--out", required=True, metavar="FILE")
    return p


def cmd_image(args):
    import hashlib

    from . import appimage

    try:
        if args.image_command == "app":
            data = appimage.build_app_image(
                args.project,
                args.version,
                extra=args.extra.encode(),
                size=args.size,
                selfcheck_fail=args.selfcheck_fail,
                chip_id=args.chip_id,
            )
            what = f"app {args.project} {args.version}"
        else:
            data = appimage.build_bootloader_image()
            what = "bootloader"
    except ValueError as e:
        print(f"esp32sim image: {e}", file=sys.stderr)
        return 2
    try:
        with open(args.out, "wb") as f:
            f.write(data)
    except OSError as e:
        print(f"esp32sim image: cannot write {args.out}: {e.strerror}", file=sys.stderr)
        return 1
    print(f"esp32sim image: {args.out}: {what}, {len(data)} bytes, sha256 {hashlib.sha256(data).hexdigest()}")
    return 0


def _log_to_stderr(prefix):
    def log(msg):
        print(f"{prefix}{msg}", file=sys.stderr, flush=True)

    return log


def cmd_serve(args):
    from .transport import Board, PtyTransport, TcpTransport

    log = (lambda msg: None) if args.quiet else _log_to_stderr("esp32sim: ")
    try:
        board = Board(args.flash, mac=args.mac, faults=args.fault, baud_pacing=args.baud_pacing, log=log)
    except OSError as e:
        print(f"esp32sim: cannot use flash file {args.flash}: {e.strerror}", file=sys.stderr)
        return 1
    stop = threading.Event()

    def on_signal(signum, frame):
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        if args.pty:
            transport = PtyTransport(board, args.pty)
            where = f"{transport.link_path} -> {transport.slave_name}"
        else:
            transport = TcpTransport(board, *args.tcp)
            where = f"socket://{transport.host}:{transport.port}"
    except OSError as e:
        board.close()
        what = args.pty or f"{args.tcp[0]}:{args.tcp[1]}"
        print(f"esp32sim: cannot open {what}: {e.strerror or e}", file=sys.stderr)
        return 1
    # The first stdout line names the port: scripts and fixtures read it.
    print(f"esp32sim: board {args.mac} on {where}", flush=True)
    try:
        transport.serve(stop)
    finally:
        transport.close()
        board.close()
    return 0


def cmd_run(args):
    """The board's application in the foreground: one line per event on stdout, until SIGTERM."""
    import os

    from .boot import EXIT_CONFIG, BootError, config_from_image
    from .device import Flash
    from .firmware import Firmware, partition_layout

    if not os.path.isfile(args.flash):
        print(f"esp32sim run: no flash image {args.flash}", file=sys.stderr)
        return EXIT_CONFIG
    flash = Flash(args.flash)
    try:
        nvs = (args.nvs_offset, args.nvs_size) if args.nvs_offset is not None else None
        field = (args.field_offset, args.field_size) if args.field_offset is not None else None
        nvs_part, _, _ = partition_layout(flash, nvs, field)
        try:
            if nvs_part is None:
                raise BootError(EXIT_CONFIG, "the partition table has no nvs partition")
            config_from_image(flash.read(*nvs_part), nvs_part[0])
        except BootError as e:
            print(f"esp32sim run: {e}", file=sys.stderr)
            return e.code
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *a: stop.set())
        signal.signal(signal.SIGINT, lambda *a: stop.set())
        log = None if args.quiet else (lambda line: print(line, flush=True))
        fw = Firmware(
            flash,
            interval=args.interval,
            log=log,
            nvs=nvs,
            field=field,
            backoff_cap=args.backoff_cap,
            reject_wait=args.reject_wait,
            window_check=args.window_check,
        ).start()
        while not stop.wait(0.2) and fw.alive:
            pass
        fw.stop()
        return 0
    finally:
        flash.close()


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return cmd_serve(args)
    if args.command == "fleet":
        from . import fleet

        return fleet.main(args)
    if args.command == "boot":
        from . import boot

        return boot.main(args)
    if args.command == "run":
        return cmd_run(args)
    if args.command == "image":
        return cmd_image(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
