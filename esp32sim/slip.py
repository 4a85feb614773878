"""SLIP framing as the ESP ROM speaks it (RFC 1055 with 0xC0 delimiters on both ends)."""

END = 0xC0
ESC = 0xDB
ESC_END = 0xDC
ESC_ESC = 0xDD


def encode(payload: bytes) -> bytes:
    """Frame one packet: C0 + escaped payload + C0."""
    body = payload.replace(b"\xdb", b"\xdb\xdd").replace(b"\xc0", b"\xdb\xdc")
    return b"\xc0" + body + b"\xc0"


class FrameError(Exception):
    """A frame that cannot be decoded (bad escape sequence)."""


class Decoder:
    """Incremental SLIP decoder.

    `feed()` returns a list of events: ``("frame", bytes)`` for a complete packet and
    ``("error", str)`` for a broken one. Bytes outside a frame are line noise and are
    dropped, as the ROM does; a bad escape poisons the current frame until its closing C0.
    """

    def __init__(self):
        self._buf = None  # None: between frames; bytearray: inside a frame
        self._escape = False
        self._bad = None

    def reset(self):
        self._buf = None
        self._escape = False
        self._bad = None

    @property
    def in_frame(self) -> bool:
        return self._buf is not None

    def feed(self, data: bytes) -> list:
        events = []
        for b in data:
            if self._buf is None:
                if b == END:
                    self._buf = bytearray()
                continue
            if b == END:
                if self._escape and self._bad is None:
                    self._bad = "SLIP escape at end of frame"
                if self._bad is not None:
                    events.append(("error", self._bad))
                    # The closing C0 may really be the opening one of the next frame.
                    self._buf = bytearray()
                elif self._buf:
                    events.append(("frame", bytes(self._buf)))
                    self._buf = None
                # An empty frame (C0 C0) is a frame boundary: stay inside a new frame.
                self._escape = False
                self._bad = None
                continue
            if self._escape:
                self._escape = False
                if b == ESC_END:
                    self._buf.append(END)
                elif b == ESC_ESC:
                    self._buf.append(ESC)
                elif self._bad is None:
                    self._bad = f"invalid SLIP escape 0xdb 0x{b:02x}"
            elif b == ESC:
                self._escape = True
            else:
                self._buf.append(b)
        return events
