"""The NVS parser against images made by Espressif's generator (API and CLI)."""

import struct
import subprocess
import sys

import pytest

from esp32sim.nvs import NvsError, parse_nvs, parse_nvs_report

from .nvs_images import build_nvs

PEM = "-----BEGIN CERTIFICATE-----\n" + "QUJD" * 300 + "\n-----END CERTIFICATE-----\n"


def _entries(image):
    """(page, index, key) of every written entry header, for targeted damage."""
    found = []
    for p in range(len(image) // 4096):
        page = image[p * 4096 : (p + 1) * 4096]
        if struct.unpack_from("<I", page)[0] == 0xFFFFFFFF:
            continue
        i = 0
        while i < 126:
            st = (page[32 + i // 4] >> ((i % 4) * 2)) & 3
            off = 64 + 32 * i
            if st == 0b10:
                key = page[off + 8 : off + 24].split(b"\0")[0].decode()
                found.append((p, i, key, page[off + 1]))
                i += max(1, page[off + 2])
            else:
                i += 1
    return found


def test_all_types_and_multipage_values():
    blob = bytes(range(256)) * 30  # 7680 bytes: blob_data chunks on two pages
    image = build_nvs(
        {
            "mqtt": {
                "broker_uri": ("string", "mqtts://localhost:8883"),
                "ca_cert": ("string", PEM),
                "fill": ("string", "x" * 3500),  # pushes later values onto the next page
                "client_key": ("string", PEM.replace("CERTIFICATE", "PRIVATE KEY")),
            },
            "ints": {
                "u8": ("u8", "255"),
                "i8": ("i8", "-128"),
                "u16": ("u16", "65535"),
                "i16": ("i16", "-32768"),
                "u32": ("u32", "4294967295"),
                "i32": ("i32", "-2147483648"),
                "u64": ("u64", "18446744073709551615"),
                "i64": ("i64", "-9223372036854775808"),
            },
            "blobs": {"big": ("hex2bin", blob.hex()), "small": ("base64", "aGVsbG8=")},
        },
        size=0x8000,
    )
    report = parse_nvs_report(image, strict=True)
    ns = report.namespaces
    assert report.problems == [] and report.pages >= 3
    assert ns["mqtt"] == {
        "broker_uri": "mqtts://localhost:8883",
        "ca_cert": PEM,
        "fill": "x" * 3500,
        "client_key": PEM.replace("CERTIFICATE", "PRIVATE KEY"),
    }
    assert ns["ints"] == {
        "u8": 255,
        "i8": -128,
        "u16": 65535,
        "i16": -32768,
        "u32": 4294967295,
        "i32": -2147483648,
        "u64": 18446744073709551615,
        "i64": -9223372036854775808,
    }
    assert ns["blobs"] == {"big": blob, "small": b"hello"}
    # The big blob really is split over pages (blob_data chunks + a blob_index).
    big = [(p, t) for p, _, k, t in _entries(image) if k == "big"]
    assert {t for _, t in big} == {0x42, 0x48} and len({p for p, t in big if t == 0x42}) >= 2


def test_version1_blob():
    image = build_nvs({"v1": {"b": ("binary", "abc" * 100), "s": ("string", "hi")}}, version=1)
    assert parse_nvs(image, strict=True) == {"v1": {"b": b"abc" * 100, "s": "hi"}}


def test_cli_generated_image(tmp_path):
    (tmp_path / "key.pem").write_text(PEM)
    (tmp_path / "nvs.csv").write_text(
        "key,type,encoding,value\n"
        "mqtt,namespace,,\n"
        "device_id,data,string,esp32-sim-07\n"
        f"client_key,file,string,{tmp_path / 'key.pem'}\n"
        "wifi,namespace,,\n"
        "ssid,data,string,lab-net\n"
        "channel,data,u8,6\n"
    )
    subprocess.run(
        [sys.executable, "-m", "esp_idf_nvs_partition_gen", "generate", "nvs.csv", "nvs.bin", "0x6000"],
        cwd=tmp_path,
        check=True,
        capture_output=True,
    )
    ns = parse_nvs((tmp_path / "nvs.bin").read_bytes(), strict=True)
    assert ns == {
        "mqtt": {"device_id": "esp32-sim-07", "client_key": PEM},
        "wifi": {"ssid": "lab-net", "channel": 6},
    }


def test_erased_entries_are_ignored():
    image = bytearray(build_nvs({"wifi": {"ssid": ("string", "old"), "password": ("string", "pw")}}))
    page, index, _, _ = next(e for e in _entries(image) if e[2] == "ssid")
    span = image[page * 4096 + 64 + 32 * index + 2]
    assert span == 2
    # Mark the item erased (state 00, header and data entries) as ESP-IDF does when a key is
    # deleted or replaced.
    for i in range(index, index + span):
        image[page * 4096 + 32 + i // 4] &= ~(0b11 << ((i % 4) * 2)) & 0xFF
    assert parse_nvs(bytes(image), strict=True) == {"wifi": {"password": "pw"}}


def test_crc_mismatches():
    image = build_nvs({"mqtt": {"device_id": ("string", "esp32-sim-01"), "n": ("u32", "7")}})
    # Data CRC: flip a byte of the string's payload.
    page, index, _, _ = next(e for e in _entries(image) if e[2] == "device_id")
    bad = bytearray(image)
    bad[page * 4096 + 64 + 32 * (index + 1)] ^= 0x20
    report = parse_nvs_report(bytes(bad))
    assert report.namespaces == {"mqtt": {"n": 7}}
    assert any("data CRC mismatch" in p for p in report.problems)
    with pytest.raises(NvsError, match="data CRC"):
        parse_nvs(bytes(bad), strict=True)
    # Entry CRC: change the u32 value without fixing the entry's CRC.
    page, index, _, _ = next(e for e in _entries(image) if e[2] == "n")
    bad = bytearray(image)
    bad[page * 4096 + 64 + 32 * index + 24] = 8
    assert parse_nvs(bytes(bad)) == {"mqtt": {"device_id": "esp32-sim-01"}}
    # Page header CRC: the whole page is ignored.
    bad = bytearray(image)
    bad[5] ^= 1
    report = parse_nvs_report(bytes(bad))
    assert report.namespaces == {} and "header CRC" in report.problems[0]


def test_not_an_nvs_partition():
    assert parse_nvs(b"\xff" * 0x6000) == {}
    with pytest.raises(NvsError):
        parse_nvs(b"\xff" * 100)
    report = parse_nvs_report(b"\x00" * 0x3000)
    assert report.namespaces == {} and report.problems
