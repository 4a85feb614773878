# Copyright: esp32-mqtt-fleet contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""One exception type for every failure the esp32_* modules report.

Modules catch only Esp32Error and turn it into fail_json(msg=..., kind=...), so no traceback ever
reaches the user; esptool and pyserial exceptions are translated into it by esp32_esptool.
"""

from __future__ import annotations

import errno
import re

# Stable machine-readable failure kinds (returned as `kind` by fail_json; playbooks may test them).
KINDS = (
    "port_missing",
    "port_busy",
    "port_permission",
    "no_answer",
    "connection_lost",
    "wrong_chip",
    "mac_mismatch",
    "image_too_large",
    "offset_unaligned",
    "overlap",
    "image_source",
    "verify_failed",
    "timeout",
    "invalid",
    "esptool",
)


class Esp32Error(Exception):
    """A failure with a user-facing message and a stable `kind`."""

    def __init__(self, msg, kind="esptool", **details):
        super().__init__(msg)
        self.msg = msg
        self.kind = kind
        self.details = details


# Ordered: the first pattern that matches an esptool/pyserial message decides the kind.
_PATTERNS = (
    ("port_busy", re.compile(r"exclusively lock|Errno 11\b|Errno 16\b|Resource busy|Access is denied", re.I)),
    ("port_permission", re.compile(r"Errno 13\b|Permission denied", re.I)),
    ("port_missing", re.compile(r"Errno 2\b|No such file|FileNotFoundError|Errno 111\b|refused", re.I)),
    ("wrong_chip", re.compile(r"Wrong chip argument|This chip is \S+.*, not ", re.I)),
    ("no_answer", re.compile(r"Failed to connect|No serial data received|Invalid head of packet", re.I)),
    ("verify_failed", re.compile(r"MD5 of file does not match|written flash region is empty", re.I)),
    (
        "connection_lost",
        re.compile(
            r"Timed out waiting for packet|Serial data stream stopped|device reports readiness"
            r"|No more data to read|Input/output error|Errno 5\b",
            re.I,
        ),
    ),
)

_ADVICE = {
    "port_missing": "check the port name and that the board (or simulator) is connected",
    "port_busy": "another process holds the port (a serial monitor, another flash run); close it",
    "port_permission": "the station user cannot open the port; add it to the dialout group",
    "no_answer": "the board did not answer: is it in download mode (hold BOOT, tap EN) and is "
    "`before` right for the adapter?",
    "wrong_chip": "the board is not the chip named in `chip`",
    "verify_failed": "the flash does not hold what was written; retry, then suspect the flash chip",
    "connection_lost": "the board stopped answering mid-operation; check the cable/power and rerun",
}


def classify(exc):
    """Translate an esptool FatalError, pyserial SerialException or OSError into Esp32Error."""
    if isinstance(exc, Esp32Error):
        return exc
    text = " ".join(str(exc).split())  # esptool messages span lines; one line reads better in a task
    kind = "esptool"
    if isinstance(exc, OSError) and exc.errno in (errno.ENOENT, errno.EACCES, errno.EBUSY, errno.EAGAIN):
        kind = {
            errno.ENOENT: "port_missing",
            errno.EACCES: "port_permission",
            errno.EBUSY: "port_busy",
            errno.EAGAIN: "port_busy",
        }[exc.errno]
    else:
        for name, pattern in _PATTERNS:
            if pattern.search(text):
                kind = name
                break
    advice = _ADVICE.get(kind)
    msg = f"{text} ({advice})" if advice else text
    return Esp32Error(msg, kind=kind, esptool_error=type(exc).__name__)
