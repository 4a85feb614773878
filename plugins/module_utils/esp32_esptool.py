# Copyright: esp32-mqtt-fleet contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The esptool session shared by esp32_info and esp32_flash.

`open_session()` is the ONE choke point where the modules reach a board: it connects through
esptool's supported library API (`esptool.cmds`) and attaches the flash, yields an `Esp32Session`
(which uploads the stub and raises the baud only when data must move), and always resets (per
`after`) and closes the port. Unit tests replace exactly this function. `esptool_call()` runs an
action inside it with every esptool/pyserial failure translated into Esp32Error, a wall-clock
deadline, and esptool's output captured through its logger (a module's stdout must carry nothing but
its JSON result).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import signal
import time
import traceback
import zlib

from ansible_collections.esp32_fleet.mqtt_fleet.plugins.module_utils.esp32_errors import Esp32Error, classify

try:
    import esptool
    import serial
    from esptool import cmds
    from esptool.logger import EspLog, EspLogBase, log
    from esptool.targets import CHIP_LIST
    from esptool.util import FatalError, flash_size_bytes
except ImportError:  # the station's Python lacks esptool: modules fail with missing_required_lib
    HAS_ESPTOOL = False
    ESPTOOL_IMPORT_ERROR = traceback.format_exc()
    ESPTOOL_VERSION = None
    CHIP_LIST = []
    EspLogBase = object
else:
    HAS_ESPTOOL = True
    ESPTOOL_IMPORT_ERROR = None
    ESPTOOL_VERSION = esptool.__version__

ESPTOOL_REQUIREMENT = "esptool>=5.2 on the station"
ROM_BAUD = 115200
SECTOR_SIZE = 0x1000
BEFORE_CHOICES = ["default-reset", "no-reset", "no-reset-no-sync", "usb-reset"]
AFTER_CHOICES = ["hard-reset", "no-reset", "no-reset-stub", "watchdog-reset"]
LOG_TAIL = 40  # lines of esptool output returned on failure: enough to diagnose, not a wall of text


def connection_argument_spec(timeout):
    """Options every board-facing module shares (documented in each module's DOCUMENTATION)."""
    return dict(
        port=dict(type="str", required=True),
        baud=dict(type="int", default=460800),
        before=dict(type="str", default="default-reset", choices=BEFORE_CHOICES),
        after=dict(type="str", default="hard-reset", choices=AFTER_CHOICES),
        chip=dict(type="str", default="auto"),
        connect_attempts=dict(type="int", default=7),
        stub=dict(type="bool", default=True),
        timeout=dict(type="float", default=timeout),
    )


def check_esptool(module):
    """Fail with the install hint when esptool is missing or too old on the station."""
    from ansible.module_utils.basic import missing_required_lib

    if not HAS_ESPTOOL:
        module.fail_json(
            msg=missing_required_lib(ESPTOOL_REQUIREMENT), exception=ESPTOOL_IMPORT_ERROR, kind="invalid"
        )
    major, minor = (int(x) for x in ESPTOOL_VERSION.split(".")[:2])
    if (major, minor) < (5, 2):
        module.fail_json(
            msg=f"esptool {ESPTOOL_VERSION} is too old: install {ESPTOOL_REQUIREMENT}", kind="invalid"
        )
    chip = module.params.get("chip")
    if chip is not None and chip != "auto" and chip not in CHIP_LIST:
        module.fail_json(msg=f"chip {chip!r} is not one of auto, {', '.join(CHIP_LIST)}", kind="invalid")


def format_mac(octets):
    return ":".join(f"{b:02x}" for b in octets)


def normalize_mac(text):
    """Accept aa:bb:.., aa-bb-.. or aabb..; return aa:bb:cc:dd:ee:ff or raise Esp32Error."""
    digits = "".join(c for c in str(text).lower() if c not in ":-. ")
    if len(digits) != 12 or any(c not in "0123456789abcdef" for c in digits):
        raise Esp32Error(f"expected_mac {text!r} is not a MAC address", kind="invalid")
    return ":".join(digits[i : i + 2] for i in range(0, 12, 2))


class CaptureLogger(EspLogBase):
    """esptool logger that keeps lines in memory instead of printing them."""

    def __init__(self):
        self.lines = []
        self._partial = ""

    def _add(self, prefix, args, end="\n"):
        text = self._partial + prefix + " ".join(str(a) for a in args)
        if end == "\n":
            self.lines.append(text)
            self._partial = ""
        else:
            self._partial = text + (end or "")

    def print(self, *args, **kwargs):
        self._add("", args, kwargs.get("end", "\n"))

    def err(self, *args, suggestion=None):
        self._add("Error: ", args)

    def warn(self, *args, suggestion=None):
        self._add("Warning: ", args)

    def note(self, *args):
        self._add("Note: ", args)

    def hint(self, *args):
        self._add("Hint: ", args)

    def debug(self, *args):
        pass

    def set_verbosity(self, mode):
        pass

    def progress_bar(self, cur_iter, total_iters, prefix="", suffix="", bar_length=30):
        pass  # per-block progress is noise in a task result

    def tail(self):
        lines = [*self.lines, self._partial] if self._partial else self.lines
        return [line for line in lines if line.strip()][-LOG_TAIL:]


class Esp32Session:
    """A connected board. Every method talks to the board through esptool's API.

    It starts in the ROM bootloader at 115200 baud with the flash attached: enough for facts and
    region MD5s. `prepare_transfer()` uploads the stub and raises the baud only when data is about to
    move, so an idempotent rerun that writes nothing never pays for the stub upload.
    """

    def __init__(self, esp, stub, baud):
        self.esp = esp
        self._want_stub = stub
        self._baud = baud
        self._prepared = False

    def prepare_transfer(self):
        if self._prepared:
            return
        if self._want_stub:
            self.esp = cmds.run_stub(self.esp)  # use the object it returns: it is the stub loader
        if self._baud != ROM_BAUD:
            self.esp.change_baud(self._baud)
        cmds.attach_flash(self.esp)  # the stub configures SPI again
        self._prepared = True

    def info(self):
        esp = self.esp
        mac = format_mac(esp.read_mac())
        flash_id = esp.flash_id()
        size_name = cmds.detect_flash_size(esp)
        revision = esp.get_chip_revision()
        return dict(
            chip=esp.CHIP_NAME,
            description=esp.get_chip_description(),
            revision=f"v{revision // 100}.{revision % 100}",
            crystal_mhz=esp.get_crystal_freq(),
            features=list(esp.get_chip_features()),
            mac=mac,
            flash_id=f"0x{flash_id:06x}",
            flash_size=flash_size_bytes(size_name) if size_name else None,
            stub=self.esp.IS_STUB,
        )

    def md5(self, offset, size):
        """MD5 (hex) the board computes over a flash region: nothing but 16 bytes on the wire."""
        return self.esp.flash_md5sum(offset, size)

    def write(self, offset, data, compress):
        """Write one image; esptool erases the sectors it covers and checks the MD5 it wrote."""
        wire = len(data)
        if compress:
            wire = min(wire, len(zlib.compress(data, 9)))  # esptool sends compressed only if smaller
        start = time.monotonic()
        cmds.write_flash(
            self.esp, [(offset, data)], compress=compress, no_compress=not compress, no_progress=True
        )
        return dict(wire_bytes=wire, seconds=round(time.monotonic() - start, 3))

    def erase_all(self):
        cmds.erase_flash(self.esp)


@contextlib.contextmanager
def open_session(port, baud, before, after, chip, connect_attempts, stub):
    """THE choke point: connect and attach the flash; always reset per `after` and close the port."""
    esp = cmds.connect_esp(
        port=port,
        chip=chip,
        initial_baud=ROM_BAUD,
        before=before,
        connect_attempts=connect_attempts,
    )
    session = Esp32Session(esp, stub=stub, baud=baud)
    try:
        cmds.attach_flash(esp)
        yield session
        cmds.reset_chip(session.esp, after)
    finally:
        session.esp._port.close()  # also on failure: the next task (or a rerun) must be able to open it


class _Deadline(BaseException):  # not Exception: esptool code that catches Exception must not swallow it
    pass


@contextlib.contextmanager
def _deadline(seconds):
    """Wall-clock limit for one module run (SIGALRM: modules run in their own process)."""
    if not seconds or seconds <= 0:
        yield
        return

    def expire(signum, frame):
        raise _Deadline()

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def esptool_call(params, action):
    """Run action(session) on the board described by the module params.

    Returns what the action returns. Raises Esp32Error (with esptool's last lines in details["log"])
    on any failure.
    """
    logger = CaptureLogger()
    previous = EspLog.instance
    log.set_logger(logger)
    stdout = io.StringIO()
    connected = False
    present = _port_present(params["port"])
    try:
        with (
            contextlib.redirect_stdout(stdout),
            _deadline(params.get("timeout")),
            open_session(
                port=params["port"],
                baud=params["baud"],
                before=params["before"],
                after=params["after"],
                chip=params["chip"],
                connect_attempts=params["connect_attempts"],
                stub=params["stub"],
            ) as session,
        ):
            connected = True
            return action(session)
    except _Deadline:
        raise Esp32Error(
            f"timed out after {params['timeout']} s talking to {params['port']} (raise `timeout` for slow "
            "links or large images)",
            kind="timeout",
            log=logger.tail(),
        ) from None
    except Esp32Error as e:
        e.details.setdefault("log", logger.tail())
        raise
    except (FatalError, serial.SerialException, OSError) as e:
        err = classify(e)
        if connected and present and not _port_present(params["port"]):
            # A USB-serial adapter that is pulled takes its device node with it: say so, rather than
            # the EIO/"could not configure port" that pyserial reports on the dead descriptor.
            err = Esp32Error(
                f"serial port {params['port']} disappeared while the board was being written or read: it was "
                "disconnected mid-operation (USB cable pulled, hub reset or power lost); reconnect it and "
                f"rerun, only what is missing is redone (esptool: {err.msg})",
                kind="connection_lost",
                esptool_error=type(e).__name__,
            )
        err.details["log"] = logger.tail()
        raise err from None
    except Exception as e:  # anything else esptool raises must still end the task cleanly
        raise Esp32Error(
            f"esptool failed: {type(e).__name__}: {e}",
            kind="esptool",
            log=logger.tail(),
            exception=traceback.format_exc(),
        ) from None
    finally:
        EspLog.instance = previous  # unit tests run many calls in one process


def _port_present(port):
    """True when the port is a device path (not a pyserial URL such as socket://) that exists."""
    return "://" not in port and os.path.exists(port)


def md5_hex(data):
    return hashlib.md5(data).hexdigest()  # noqa: S324 - the board's SPI_FLASH_MD5 is MD5; not for security
