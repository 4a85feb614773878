"""The status decision (plugins/module_utils/fleet_status.py) with chosen clocks: what is ok, due
(the next upkeep renews it), at risk (nothing renews it in time) or expired."""

import datetime as dt

import pytest
from ansible_collections.esp32_fleet.mqtt_fleet.plugins.module_utils import fleet_status as fs

NOW = dt.datetime(2026, 6, 1, 12, 0, tzinfo=dt.UTC)
DAY = dt.timedelta(days=1)


@pytest.mark.parametrize(
    ("left", "renewable", "state", "risk"),
    [
        (20, True, "ok", False),  # outside the 10-day window
        (5, True, "due", False),  # inside it: the next daily upkeep re-signs it
        (5, False, "at-risk", True),  # inside it and nothing renews it (device, CA)
        (1.5, True, "at-risk", True),  # sooner than period (1) + margin (1): the next run may be late
        (2.0, True, "due", False),  # exactly period + margin left: still in time
        (0, True, "expired", True),
        (-3, False, "expired", True),
    ],
)
def test_classify(left, renewable, state, risk):
    assert fs.classify(NOW + left * DAY, NOW, 10, renewable, 1, 1) == (state, risk)


def test_a_longer_upkeep_period_puts_the_same_crl_at_risk():
    # 5 days left is fine for a daily timer, not for a weekly one.
    assert fs.classify(NOW + 5 * DAY, NOW, 10, True, 1, 1) == ("due", False)
    assert fs.classify(NOW + 5 * DAY, NOW, 10, True, 7, 1) == ("at-risk", True)


def test_entry_says_who_renews_and_only_devices_get_device_columns():
    crl = fs.entry("crl", "ca", NOW + 3 * DAY, NOW, 10, 1, 1)
    assert crl["state"] == "due" and crl["renewed_by"] == "upkeep" and crl["days_left"] == 3.0
    assert crl["expires"] == "2026-06-04T12:00:00Z" and "last_seen" not in crl
    # Boards renew over the air: 3 days left inside the window is due (the next upkeep answers), 1 day
    # left with a daily timer is at risk.
    dev = fs.entry("device", "d1", NOW + 3 * DAY, NOW, 30, 1, 1, **fs.device_fields(None))
    assert dev["state"] == "due" and dev["renewed_by"] == "upkeep (over the air)"
    assert fs.entry("device", "d1", NOW + 1 * DAY, NOW, 30, 1, 1)["state"] == "at-risk"
    assert dev["renewal_state"] == dev["last_seen"] == dev["firmware_version"] == "unknown"


def test_device_columns_come_from_the_manifest_when_recorded():
    row = {"last_seen": "2026-05-31T10:00:00Z", "firmware_version": "1.2.0", "renewal_state": ""}
    assert fs.device_fields(row) == {
        "renewal_state": "unknown",
        "last_seen": "2026-05-31T10:00:00Z",
        "firmware_version": "1.2.0",
    }


def test_device_columns_prefer_what_the_board_reported_just_now():
    row = {"last_seen": "2026-05-31T10:00:00Z", "firmware_version": "1.2.0"}
    report = {"renewal_state": "pending", "firmware_version": "1.3.0", "last_reading": "2026-06-01T04:00:05Z"}
    assert fs.device_fields(row, report) == {
        "renewal_state": "pending",
        "last_seen": "2026-06-01T04:00:05Z",
        "firmware_version": "1.3.0",
    }
    # Listened to, and no reading came: silent, whatever the manifest once recorded.
    quiet = {"renewal_state": "offline", "firmware_version": None, "last_reading": None}
    assert fs.device_fields(row, quiet) == {
        "renewal_state": "offline",
        "last_seen": "silent",
        "firmware_version": "1.2.0",
    }


@pytest.mark.parametrize(
    ("state", "expected"),
    [
        (None, ("never", False)),
        ({"time": "2026-06-01T04:12:00Z", "rc": 0}, ("ok", False)),
        ({"time": "2026-06-01T04:12:00Z", "rc": 2}, ("failed", True)),
        ({"time": "2026-05-28T04:12:00Z", "rc": 0}, ("stale", True)),  # 4.3 days > 2 * 1 + 1
        ({"rc": 0}, ("unreadable", True)),
        ({"unreadable": True}, ("unreadable", True)),
    ],
)
def test_classify_upkeep(state, expected):
    assert fs.classify_upkeep(state, NOW, 1, 1)[:2] == expected


def test_parse_time_takes_iso_and_asn1():
    assert fs.parse_time("20260604120000Z") == NOW + 3 * DAY
    assert fs.parse_time("2026-06-04T12:00:00Z") == NOW + 3 * DAY
    assert fs.parse_time("2026-06-04T12:00:00") == NOW + 3 * DAY


def test_table_lists_every_row_and_names_what_is_at_risk():
    rows = [
        fs.entry("crl", "ca", NOW + 1 * DAY, NOW, 10, 1, 1),
        fs.entry("broker", "b1", NOW + 200 * DAY, NOW, 30, 1, 1),
    ]
    upkeep = {"state": "failed", "at_risk": True, "detail": "last run exited 2"}
    table = fs.render_table(rows, upkeep)
    assert table[0].split()[:2] == ["KIND", "NAME"]
    assert table[1].startswith("crl") and "at-risk" in table[1]
    assert table[2].startswith("broker") and " ok " in table[2]
    assert table[-2] == "upkeep: failed (last run exited 2)"
    assert table[-1] == "AT RISK: crl ca, upkeep"
    calm = fs.render_table(rows[1:], {"state": "ok", "at_risk": False, "detail": "x"})
    assert calm[-1] == "nothing at risk"
