"""The fleet manifest writer (plugins/module_utils/fleet_manifest.py): append-only, atomic, JSON and
CSV in agreement, earlier runs kept, bad rows refused before anything is written."""

import csv
import importlib.util
import json
import multiprocessing
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location(
    "fleet_manifest", ROOT / "plugins" / "module_utils" / "fleet_manifest.py"
)
fm = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fm)


def row(device_id, result="provisioned", **extra):
    return {"device_id": device_id, "result": result, "mac": "24:0a:c4:00:00:01", **extra}


def read_csv(directory):
    with open(Path(directory) / "fleet.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_first_write_creates_json_and_csv_with_every_field(tmp_path):
    fw = [{"offset": "0x10000", "sha256": "ab" * 32, "name": "0x10000_app.bin"}]
    fm.append_rows(tmp_path / "m", [row("b1", firmware=fw, cert_serial="123")])
    data = json.loads((tmp_path / "m" / "fleet.json").read_text())
    assert data["version"] == 1
    assert len(data["rows"]) == 1
    assert set(data["rows"][0]) == set(fm.FIELDS)
    assert data["rows"][0]["firmware"] == fw
    rows = read_csv(tmp_path / "m")
    assert list(rows[0]) == list(fm.FIELDS)
    assert rows[0]["device_id"] == "b1"
    assert rows[0]["cert_serial"] == "123"
    assert rows[0]["firmware"] == "0x10000=" + "ab" * 32


def test_later_runs_append_and_keep_earlier_rows(tmp_path):
    fm.append_rows(tmp_path, [row("b1"), row("b2", "failed", reason="MAC mismatch")])
    fm.append_rows(tmp_path, [row("b1", "unchanged"), row("b2")])
    rows = fm.load_rows(tmp_path)
    assert [(r["device_id"], r["result"]) for r in rows] == [
        ("b1", "provisioned"),
        ("b2", "failed"),
        ("b1", "unchanged"),
        ("b2", "provisioned"),
    ]
    assert [r["result"] for r in read_csv(tmp_path)] == ["provisioned", "failed", "unchanged", "provisioned"]


def test_no_temporary_files_are_left_and_mode_is_applied(tmp_path):
    fm.append_rows(tmp_path, [row("b1")], mode=0o640)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [".fleet.lock", "fleet.csv", "fleet.json"]
    assert (tmp_path / "fleet.json").stat().st_mode & 0o777 == 0o640


def test_an_invalid_row_writes_nothing(tmp_path):
    fm.append_rows(tmp_path, [row("b1")])
    before = (tmp_path / "fleet.json").read_bytes()
    with pytest.raises(fm.ManifestError, match="result must be one of"):
        fm.append_rows(tmp_path, [row("b2"), row("b3", "maybe")])
    with pytest.raises(fm.ManifestError, match="unknown manifest field"):
        fm.append_rows(tmp_path, [row("b2", colour="red")])
    with pytest.raises(fm.ManifestError, match="needs a device_id"):
        fm.append_rows(tmp_path, [{"result": "provisioned"}])
    assert (tmp_path / "fleet.json").read_bytes() == before


def test_a_failed_rename_keeps_the_previous_manifest(tmp_path, monkeypatch):
    fm.append_rows(tmp_path, [row("b1")])
    before = (tmp_path / "fleet.json").read_bytes()

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(fm.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        fm.append_rows(tmp_path, [row("b2")])
    assert (tmp_path / "fleet.json").read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".fleet.json.")]


def test_csv_alone_is_read_back_so_its_rows_are_not_lost(tmp_path):
    fm.append_rows(tmp_path, [row("b1", firmware=[{"offset": "0x10000", "sha256": "cd" * 32}])])
    (tmp_path / "fleet.json").unlink()
    rows = fm.append_rows(tmp_path, [row("b1", "unchanged")])
    assert [r["result"] for r in rows] == ["provisioned", "unchanged"]
    assert rows[0]["firmware"] == [{"offset": "0x10000", "sha256": "cd" * 32}]


def test_corrupt_json_is_reported_not_overwritten(tmp_path):
    (tmp_path / "fleet.json").write_text("{not json")
    with pytest.raises(fm.ManifestError, match="not valid JSON"):
        fm.append_rows(tmp_path, [row("b1")])
    assert (tmp_path / "fleet.json").read_text() == "{not json"


def test_last_rows_and_summary():
    rows = [
        row("b1"),
        row("b2"),
        row("b2", "failed", reason="flash verify failed"),
        row("b1", "unchanged"),
        row("b3", "revoked", reason="certificate revoked"),
        row("b4", "renewed", reason="renewed over the air"),
    ]
    assert fm.last_rows(rows)["b2"]["result"] == "failed"
    # A renewal over the air is the device's last success too (the station compares with it).
    assert fm.last_rows(rows, fm.SUCCESS_RESULTS)["b4"]["result"] == "renewed"
    assert fm.last_rows(rows, ("provisioned", "unchanged"))["b2"]["result"] == "provisioned"
    assert fm.summarize(rows[2:]) == {
        "provisioned": [],
        "unchanged": ["b1"],
        "revoked": ["b3"],
        "renewed": ["b4"],
        "failed": [{"device_id": "b2", "reason": "flash verify failed"}],
    }


def _writer(directory, name, count):
    for i in range(count):
        fm.append_rows(directory, [row(f"{name}-{i}")])


def test_concurrent_writers_lose_no_row(tmp_path):
    procs = [multiprocessing.Process(target=_writer, args=(str(tmp_path), f"w{n}", 15)) for n in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert all(p.exitcode == 0 for p in procs)
    rows = fm.load_rows(tmp_path)
    assert len(rows) == 60
    assert len(read_csv(tmp_path)) == 60
    assert len({r["device_id"] for r in rows}) == 60
    assert os.path.getsize(tmp_path / "fleet.json") > 0


def test_files_are_0640_by_default_even_over_an_older_0644_manifest(tmp_path):
    fm.append_rows(tmp_path, [row("b1")])
    os.chmod(tmp_path / "fleet.json", 0o644)
    fm.append_rows(tmp_path, [row("b1", "unchanged")])
    for name in ("fleet.json", "fleet.csv"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o640


def test_an_unkeyed_settings_hash_is_blanked_once_the_device_has_a_keyed_one(tmp_path):
    old = "ab" * 32
    fm.append_rows(tmp_path, [row("b1", config_sha256=old), row("b2", config_sha256=old)])
    fm.append_rows(tmp_path, [row("b1", "unchanged", config_sha256="hmac-sha256:" + "cd" * 32)])
    rows = fm.load_rows(tmp_path)
    assert [(r["device_id"], r["result"], r["config_sha256"]) for r in rows] == [
        ("b1", "provisioned", ""),  # superseded: blanked, the row itself kept
        ("b2", "provisioned", old),  # b2 has no keyed value yet: still needed to decide
        ("b1", "unchanged", "hmac-sha256:" + "cd" * 32),
    ]
    assert [r["config_sha256"] for r in read_csv(tmp_path)] == ["", old, "hmac-sha256:" + "cd" * 32]
