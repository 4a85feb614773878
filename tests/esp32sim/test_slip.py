"""SLIP framing unit tests."""

from esp32sim import slip


def test_roundtrip_with_escapes():
    payload = b"\x00\xc0\xdb\xdc\xdd\xc0\xc0\xdb"
    framed = slip.encode(payload)
    assert framed == b"\xc0\x00\xdb\xdc\xdb\xdd\xdc\xdd\xdb\xdc\xdb\xdc\xdb\xdd\xc0"
    dec = slip.Decoder()
    # Fed byte by byte, with noise before the frame and a second frame right after.
    events = []
    for b in b"noise" + framed + slip.encode(b"two"):
        events += dec.feed(bytes([b]))
    assert events == [("frame", payload), ("frame", b"two")]


def test_bad_escape_poisons_only_its_frame():
    dec = slip.Decoder()
    events = dec.feed(b"\xc0ab\xdb\x01cd\xc0" + slip.encode(b"ok"))
    assert events[0][0] == "error" and "0xdb 0x01" in events[0][1]
    assert events[-1] == ("frame", b"ok")
    events = dec.feed(b"\xc0abc\xdb\xc0")
    assert events == [("error", "SLIP escape at end of frame")]
