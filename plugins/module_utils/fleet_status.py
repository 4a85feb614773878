# Copyright: esp32-mqtt-fleet contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Fleet status decisions: what expires when, and whether anything will renew it in time.

Pure Python (standard library only): the module fleet_status reads the certificates, CRLs, the
manifest and the upkeep state file and hands plain values to these functions, which the unit tests
call directly with chosen clocks.

The rule, per expiring thing (CRL nextUpdate, certificate notAfter):

- ``expired``  -- already past: at risk.
- ``at-risk``  -- fewer days left than one upkeep period plus a margin: even when upkeep renews this
  kind of thing, the next scheduled run may come after it has lapsed; or inside its renewal window
  while nothing renews it automatically (CAs, whose rotation is an operator's decision).
- ``due``      -- inside its renewal window and upkeep renews it: the next run will.
- ``ok``       -- outside its renewal window.
"""

import datetime as dt

DAY = 86400.0
UNKNOWN = "unknown"

# How each kind of thing is renewed; only upkeep happens without a person. Device certificates are
# renewed over the air (docs/device-protocol.md): the board asks inside its window, upkeep answers.
RENEWED_BY = {
    "crl": "upkeep",
    "broker": "upkeep",
    "device": "upkeep (over the air)",
    "ca": "CA rotation (operator)",
}


def days_left(expires, now):
    """Days (fractional) from ``now`` until ``expires`` (both aware datetimes)."""
    return (expires - now).total_seconds() / DAY


def classify(expires, now, renew_before_days, renewable, period_days, margin_days):
    """Return ``(state, at_risk)`` for one expiring thing (see the module docstring)."""
    left = days_left(expires, now)
    if left <= 0:
        return "expired", True
    if left < period_days + margin_days:
        return "at-risk", True
    if left < renew_before_days:
        return ("due", False) if renewable else ("at-risk", True)
    return "ok", False


def classify_upkeep(state, now, period_days, margin_days):
    """Return ``(state, at_risk, detail)`` for the last upkeep run.

    ``state`` is the wrapper's state file as a dict ({'time': ISO-8601, 'rc': int}) or None when no
    run through the installed timer has been recorded (a checkout that has not installed it, or
    before its first run): reported, not a risk by itself -- the expiry rules above still apply. A
    failed last run is a risk; so is a last run older than two periods plus the margin (the timer
    is not running)."""
    if not state:
        return "never", False, "no run of the upkeep timer recorded"
    try:
        when = parse_time(state["time"])
        rc = int(state["rc"])
    except (KeyError, TypeError, ValueError):
        return "unreadable", True, "the upkeep state file is not {time, rc}"
    age = days_left(now, when)
    if rc != 0:
        return "failed", True, "last run {} exited {}".format(state["time"], rc)
    if age > 2 * period_days + margin_days:
        return (
            "stale",
            True,
            "last run {} ({:.1f} days ago): is the timer running?".format(state["time"], age),
        )
    return "ok", False, "last run {} exited 0".format(state["time"])


def parse_time(text):
    """An aware datetime from ISO-8601 (``Z`` accepted) or ASN.1 ``YYYYMMDDHHMMSSZ``."""
    text = str(text).strip()
    if len(text) == 15 and text.endswith("Z") and text[:14].isdigit():
        return dt.datetime.strptime(text, "%Y%m%d%H%M%SZ").replace(tzinfo=dt.UTC)
    value = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


def entry(kind, name, expires, now, renew_before_days, period_days, margin_days, **extra):
    """One row of the status: the thing, its expiry, days left, state and who renews it."""
    renewable = RENEWED_BY[kind].startswith("upkeep")
    state, at_risk = classify(expires, now, renew_before_days, renewable, period_days, margin_days)
    row = {
        "kind": kind,
        "name": name,
        "expires": expires.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "days_left": round(days_left(expires, now), 1),
        "state": state,
        "at_risk": at_risk,
        "renewed_by": RENEWED_BY[kind],
    }
    row.update(extra)
    return row


def device_fields(row, report=None):
    """The columns only a device's own reports can fill: from what the board reported just now
    (report: fleet_renewal's observe, its retained status and the readings seen while listening)
    where given, else its manifest row where recorded, else ``unknown`` (nothing is guessed). A board
    that was listened to and sent no reading is ``silent``."""
    row = row or {}
    fields = {
        "renewal_state": row.get("renewal_state") or UNKNOWN,
        "last_seen": row.get("last_seen") or UNKNOWN,
        "firmware_version": row.get("firmware_version") or UNKNOWN,
    }
    if report:
        fields["renewal_state"] = report.get("renewal_state") or fields["renewal_state"]
        fields["firmware_version"] = report.get("firmware_version") or fields["firmware_version"]
        fields["last_seen"] = report.get("last_reading") or "silent"
    return fields


COLUMNS = (
    ("kind", "KIND"),
    ("name", "NAME"),
    ("expires", "EXPIRES (UTC)"),
    ("days_left", "DAYS"),
    ("state", "STATE"),
    ("renewed_by", "RENEWED BY"),
    ("renewal_state", "RENEWAL"),
    ("last_seen", "LAST READING"),
    ("firmware_version", "FIRMWARE"),
)


def render_table(rows, upkeep):
    """The human table: one line per row, then the upkeep line and a verdict line."""
    keys = [key for key, header in COLUMNS]
    cells = [[header for key, header in COLUMNS]]
    for row in rows:
        cells.append([str(row.get(key, "-")) for key in keys])
    widths = [max(len(line[i]) for line in cells) for i in range(len(keys))]
    lines = ["  ".join(line[i].ljust(widths[i]) for i in range(len(keys))).rstrip() for line in cells]
    lines.append("upkeep: {} ({})".format(upkeep["state"], upkeep["detail"]))
    risks = [r["kind"] + " " + r["name"] for r in rows if r["at_risk"]]
    if upkeep["at_risk"]:
        risks.append("upkeep")
    lines.append("AT RISK: " + ", ".join(risks) if risks else "nothing at risk")
    return lines
