"""Transports: a pseudo-terminal (symlinked to a stable path) and a TCP listener.

Each transport runs one board in a single-threaded select loop. Opening the port anew is a
power-on reset into the ROM bootloader, as esptool's DTR/RTS reset would be on a real board
(a pty has no modem lines a simulator could watch). For a pty, opens are seen through inotify
on the /dev/pts/N node, which reports every open() even when a process closes and reopens
the port faster than the simulator runs; without inotify the hang-up of the master (EIO when
nobody holds the slave) is the fallback. For TCP every new connection is a power-on.
"""

import contextlib
import ctypes
import errno
import os
import select
import socket
import struct
import time
import tty

from .commands import Session
from .device import Faults, Flash, Registers, parse_mac

IN_OPEN = 0x20
IN_CLOSE = 0x08 | 0x10
HANGUP_POLL = 0.01  # fallback: how often a closed pty is checked for a new opener


class Board:
    """A simulated ESP32: flash, eFuses (MAC), faults; sessions come and go with resets."""

    def __init__(self, flash_path, mac="24:0a:c4:00:00:01", faults=None, baud_pacing=False, log=None):
        self.flash = Flash(flash_path)
        self.mac = mac
        self.regs = Registers(mac=parse_mac(mac))
        self.faults = faults if isinstance(faults, Faults) else Faults.parse(faults)
        self.baud_pacing = baud_pacing
        self.log = log or (lambda msg: None)
        self.resets = 0
        self.unplugs = 0  # times the unplug fault pulled this board's port
        # Fleet --firmware: called when an opener resets the board into the ROM bootloader, and
        # when the last opener has gone (the board then runs its application again).
        self.on_power_on = None
        self.on_release = None

    def power_on(self) -> Session:
        if self.on_power_on:
            self.on_power_on()
        self.resets += 1
        self.log(f"power-on reset #{self.resets}: ROM bootloader waiting for download")
        session = Session(self.flash, self.regs, self.faults, log=self.log)
        # Pulled once, replugged, and left alone: a rerun after the replug must be able to finish.
        session.unplug_armed = session.unplug_armed and self.unplugs == 0
        return session

    def released(self):
        """Nobody holds the port any more."""
        if self.on_release:
            self.on_release()

    def close(self):
        self.flash.close()


class _Pacer:
    """Holds bytes back to what an 8N1 line at the session's baud rate would carry."""

    def __init__(self, enabled):
        self.enabled = enabled
        self.free_at = 0.0

    def reserve(self, nbytes: int, baud: int) -> float:
        """Reserve the line for nbytes; returns when they would have finished crossing it."""
        if not self.enabled:
            return 0.0
        now = time.monotonic()
        self.free_at = max(self.free_at, now) + nbytes * 10 / baud
        return self.free_at

    def wait(self) -> float:
        return max(0.0, self.free_at - time.monotonic()) if self.enabled else 0.0


class _Link:
    """One connected byte stream (pty master or TCP socket) and the session behind it."""

    def __init__(self, board, fd):
        self.board = board
        self.fd = fd
        self.session = None

    def reset(self):
        self.session = self.board.power_on()
        self.rx = _Pacer(self.board.baud_pacing)
        self.tx = _Pacer(self.board.baud_pacing)
        self.inbox = []  # (due_time, bytes): received bytes held back by pacing

    def timeout(self, default=0.2):
        t = default
        if self.inbox:
            t = min(t, max(0.0, self.inbox[0][0] - time.monotonic()))
        if self.session.out and self.board.baud_pacing:
            t = min(t, self.tx.wait())
        return t

    def wants_write(self):
        return bool(self.session.out) and self.tx.wait() == 0

    def on_readable(self) -> bool:
        """Read what arrived; False on EOF/hang-up."""
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            return True
        except OSError as e:
            if e.errno in (errno.EIO, errno.ECONNRESET):
                return False
            raise
        if not data:
            return False
        self.inbox.append((self.rx.reserve(len(data), self.session.baud), data))
        return True

    def on_writable(self) -> bool:
        out = self.session.out
        chunk = bytes(out[:256] if self.board.baud_pacing else out)
        try:
            n = os.write(self.fd, chunk)
        except BlockingIOError:
            return True
        except OSError as e:
            if e.errno in (errno.EIO, errno.EPIPE, errno.ECONNRESET):
                return False
            raise
        del out[:n]
        self.tx.reserve(n, self.session.baud)
        return True

    def process(self):
        now = time.monotonic()
        while self.inbox and self.inbox[0][0] <= now:
            self.session.feed(self.inbox.pop(0)[1])
        self.board.flash.flush()


class _Inotify:
    """Open events of one file, via inotify(7) through libc (no third-party package)."""

    def __init__(self, path):
        libc = ctypes.CDLL(None, use_errno=True)
        self.fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")
        if libc.inotify_add_watch(self.fd, os.fsencode(path), IN_OPEN | IN_CLOSE) < 0:
            err = ctypes.get_errno()
            os.close(self.fd)
            raise OSError(err, f"inotify_add_watch {path} failed")

    def events(self):
        """Masks of the queued events, oldest first."""
        masks = []
        while True:
            try:
                data = os.read(self.fd, 4096)
            except BlockingIOError:
                return masks
            off = 0
            while off + 16 <= len(data):
                _wd, mask, _cookie, length = struct.unpack_from("iIII", data, off)
                masks.append(mask)
                off += 16 + length

    def close(self):
        with contextlib.suppress(OSError):
            os.close(self.fd)


class PtyTransport:
    """A pty whose slave is reachable through a symlink such as /dev/ttyUSB0 or DIR/ttyUSB0."""

    def __init__(self, board, link_path):
        self.board = board
        self.link_path = os.path.abspath(link_path)
        self.unplugged = False
        self.master, slave = os.openpty()
        # Raw mode, so nothing echoes back before esptool configures the port itself.
        tty.setraw(slave)
        self.slave_name = os.ttyname(slave)
        # The slave is not kept open here: the master then sees a hang-up (EIO) when the
        # last user closes the port.
        os.close(slave)
        os.set_blocking(self.master, False)
        try:
            self.inotify = _Inotify(self.slave_name)
        except OSError as e:
            board.log(f"inotify unavailable ({e}); detecting reopens by hang-up only")
            self.inotify = None
        tmp = f"{self.link_path}.tmp{os.getpid()}"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        os.symlink(self.slave_name, tmp)
        os.replace(tmp, self.link_path)

    def _opened(self) -> bool:
        """True if somebody opened the slave since the last call (a power-on)."""
        if self.inotify is None:
            return False
        return any(m & IN_OPEN for m in self.inotify.events())

    def serve(self, stop):
        link = _Link(self.board, self.master)
        waits = [self.inotify.fd] if self.inotify else []
        while not stop.is_set():
            if self._opened():
                link.reset()
            if link.session is None:
                if self.inotify:
                    select.select(waits, [], [], 0.2)
                else:
                    self._fallback_wait(link, stop)
                continue
            r, w, _ = select.select(
                [self.master, *waits], [self.master] if link.wants_write() else [], [], link.timeout()
            )
            if self._opened():  # an open queued before data from the new opener: reset first
                link.reset()
                r = [self.master] if self.master in r else []
                w = []
            if self.master in r and not link.on_readable():
                link.session = None  # hung up: the board idles until the next open
                self.board.released()
                continue
            link.process()
            if link.session.unplugged:
                self.unplug()
                return
            if self.master in w and not link.on_writable():
                link.session = None
                self.board.released()

    def unplug(self):
        """The adapter is pulled: the port's path and its pty disappear; the opener gets a hang-up."""
        self.board.unplugs += 1
        self.board.log(f"unplugged: {self.link_path} is gone until the board is plugged in again")
        self.unplugged = True
        self.close()

    def _fallback_wait(self, link, stop):
        while not stop.is_set():
            try:
                data = os.read(self.master, 65536)
            except BlockingIOError:
                data = b""
            except OSError as e:
                if e.errno != errno.EIO:
                    raise
                time.sleep(HANGUP_POLL)
                continue
            link.reset()
            if data:
                link.inbox.append((0.0, data))
            return

    def close(self):
        # Idempotent (an unplugged port is closed again at shutdown): an fd closed twice could be
        # another board's by then.
        if self.master < 0:
            return
        with contextlib.suppress(FileNotFoundError):
            if os.path.islink(self.link_path) and os.readlink(self.link_path) == self.slave_name:
                os.unlink(self.link_path)
        if self.inotify:
            self.inotify.close()
        with contextlib.suppress(OSError):
            os.close(self.master)
        self.master = -1


class TcpTransport:
    """A TCP listener (esptool: --port socket://HOST:PORT); one client at a time."""

    def __init__(self, board, host, port):
        self.board = board
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(4)
        self.host, self.port = self.sock.getsockname()[:2]

    def serve(self, stop):
        while not stop.is_set():
            r, _, _ = select.select([self.sock], [], [], 0.2)
            if not r:
                continue
            conn, peer = self.sock.accept()
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.setblocking(False)
            self.board.log(f"TCP client {peer[0]}:{peer[1]} connected")
            try:
                self._serve_conn(conn, stop)
            finally:
                conn.close()
                self.board.released()

    def _serve_conn(self, conn, stop):
        link = _Link(self.board, conn.fileno())
        link.reset()
        while not stop.is_set():
            r, w, _ = select.select([conn], [conn] if link.wants_write() else [], [], link.timeout())
            if r and not link.on_readable():
                return
            link.process()
            if link.session.unplugged:
                self.board.unplugs += 1
                self.board.log("unplugged: the TCP connection drops")
                return
            if w and not link.on_writable():
                return

    def close(self):
        self.sock.close()
