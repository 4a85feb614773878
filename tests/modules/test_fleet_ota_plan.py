"""The controller's decisions of an OTA rollout (module_utils/fleet_ota.py) and of the station's flash
layout (module_utils/esp32_provision_plan.py ota_layout, field_managed), without a broker or a board."""

from __future__ import annotations

from ansible_collections.esp32_fleet.mqtt_fleet.plugins.module_utils import esp32_provision_plan as plan
from ansible_collections.esp32_fleet.mqtt_fleet.plugins.module_utils import fleet_ota
from ansible_collections.esp32_fleet.mqtt_fleet.plugins.module_utils.fleet_manifest import (
    SUCCESS_RESULTS,
    normalize_row,
)

IMAGE = {
    "project": "fleet-sensor",
    "version": "1.1.0",
    "url": "https://h:8443/ota/x.bin",
    "sha256": "ab" * 32,
    "size": 4096,
}
FIRMWARE = {plan.BOOTLOADER, plan.OTA_0}
OLD_ROW = {"mac": "24:0a:c4:00:00:01", "nvs_md5": "a" * 32, "cert_serial": "12ab", "result": "provisioned"}


def test_a_new_board_gets_the_table_and_the_erased_otadata():
    assert plan.ota_layout(FIRMWARE, {}, True, False) == ("ota", True, [])


def test_a_board_with_the_layout_keeps_its_otadata():
    # From then on the bootloader and OTA own the otadata: a rerun must not send it back to ota_0.
    assert plan.ota_layout(FIRMWARE, dict(OLD_ROW, layout="ota"), True, False) == ("ota", False, [])


def test_a_board_provisioned_before_is_reported_not_repartitioned():
    layout, otadata, notes = plan.ota_layout(FIRMWARE, OLD_ROW, True, False)
    assert (layout, otadata) == ("legacy", False)
    assert "esp32_ota_migrate" in notes[0]


def test_migration_lays_the_table_and_otadata_down():
    layout, otadata, notes = plan.ota_layout(FIRMWARE, OLD_ROW, True, True)
    assert (layout, otadata) == ("ota", True)
    assert notes and "migrated" in notes[0]


def test_no_layout_without_a_bootloader_and_an_app_or_when_off():
    assert plan.ota_layout({plan.OTA_0}, {}, True, False) == ("", False, [])
    assert plan.ota_layout(set(), {}, True, False) == ("", False, [])
    assert plan.ota_layout(FIRMWARE, {}, False, False) == ("", False, [])
    # Off keeps what the record says (the station does not forget a layout it laid down).
    assert plan.ota_layout(FIRMWARE, dict(OLD_ROW, layout="ota"), False, False)[0] == "ota"


def test_an_app_from_ota_is_field_managed():
    assert plan.field_managed({"firmware_source": "ota"})
    assert not plan.field_managed({"firmware_source": "station"})
    assert not plan.field_managed({})


def test_who_gets_a_job():
    dev = {"id": "b1", "root": "devices/b1"}
    assert fleet_ota.needs_job(dev, {"fw": "1.1.0"}, "1.1.0") == (False, "current")
    assert fleet_ota.needs_job(dev, {"fw": "1.0.0"}, "1.1.0") == (True, "runs 1.0.0")
    # A board without a status yet still gets its (retained) job: it reads it when it connects.
    assert fleet_ota.needs_job(dev, None, "1.1.0") == (True, "no status yet")
    assert fleet_ota.needs_job(dict(dev, revoked=True), {"fw": "1.0.0"}, "1.1.0") == (False, "revoked")


def test_job_payload_and_ids():
    job = fleet_ota.new_job_id()
    assert fleet_ota.JOB_ID.match(job)
    assert fleet_ota.new_job_id() != job
    payload = fleet_ota.job_payload(job, IMAGE)
    assert payload == {
        "v": 1,
        "job": job,
        **{k: IMAGE[k] for k in ("project", "version", "url", "sha256", "size")},
    }


def test_only_a_final_report_of_this_job_counts():
    job = "j" * 20
    assert fleet_ota.report_outcome(None, job) is None
    assert fleet_ota.report_outcome({"job": "k" * 20, "state": "updated"}, job) is None
    assert fleet_ota.report_outcome({"job": job, "state": "downloading"}, job) is None
    assert fleet_ota.report_outcome({"job": job, "state": "bogus"}, job) is None
    got = fleet_ota.report_outcome(
        {"job": job, "state": "rolled-back", "version": "1.0.0", "error": "x"}, job
    )
    assert got == {"state": "rolled-back", "version": "1.0.0", "error": "x"}


def test_manifest_rows_keep_the_credentials_and_record_version_and_result():
    previous = dict(OLD_ROW, layout="ota", firmware_version="1.0.0", firmware_source="station")
    row = fleet_ota.manifest_row(
        "b1", previous, {"state": "updated", "before": "1.0.0", "version": "1.1.0"}, IMAGE, "T", 7.0
    )
    assert (
        row["result"] == "updated" and row["firmware_version"] == "1.1.0" and row["firmware_source"] == "ota"
    )
    assert row["cert_serial"] == "12ab" and row["nvs_md5"] == "a" * 32
    assert "1.0.0 -> 1.1.0" in row["reason"]
    back = fleet_ota.manifest_row(
        "b1",
        previous,
        {"state": "rolled-back", "version": "1.0.0", "error": "self-check failed"},
        IMAGE,
        "T",
        9.0,
    )
    assert (
        back["result"] == "rolled-back"
        and back["firmware_version"] == "1.0.0"
        and back["firmware_source"] == "station"
    )
    assert "self-check failed" in back["reason"]
    late = fleet_ota.manifest_row(
        "b1", previous, {"state": "timeout", "version": "1.0.0", "error": "no report"}, IMAGE, "T", 1.0
    )
    assert late["result"] == "ota-failed"
    same = fleet_ota.manifest_row("b1", previous, {"state": "current", "version": "1.1.0"}, IMAGE, "T", 0.0)
    assert same["result"] == "unchanged"
    gone = fleet_ota.manifest_row("b1", previous, {"state": "revoked"}, IMAGE, "T", 0.0)
    assert gone["result"] == "revoked"
    for r in (row, back, late, same, gone):
        normalize_row(r)  # every row is a valid manifest row
    # A board that took part in a rollout is still a working board for the next station run.
    assert {"updated", "rolled-back", "ota-failed"} <= set(SUCCESS_RESULTS)
