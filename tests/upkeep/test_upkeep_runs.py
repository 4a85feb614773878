"""playbooks/upkeep.yml through the installed wrapper, against a throwaway PKI, with the clock moved by
libfaketime: nothing due is a no-op (and --check too); a CRL inside its renewal window is re-signed
once; the status fails when the CRL lapses sooner than the upkeep period allows, and passes once
upkeep has run; an unsafe vault password file is refused, loudly."""

from __future__ import annotations

import datetime as dt
import json
import stat
import subprocess

DAY = dt.timedelta(days=1)


def next_update(crl) -> dt.datetime:
    out = subprocess.run(
        ["openssl", "crl", "-in", str(crl), "-noout", "-nextupdate"],
        capture_output=True,
        text=True,
        check=True,
    )
    return dt.datetime.strptime(out.stdout.split("=", 1)[1].strip(), "%b %d %H:%M:%S %Y %Z").replace(
        tzinfo=dt.UTC
    )


def test_nothing_due_changes_nothing_and_records_a_good_run(controller):
    crl = controller.pki / "ca" / "crl.pem"
    before = crl.read_bytes()
    for args in (["--check"], []):
        run = controller.upkeep(*args)
        assert run.rc == 0, (run.output + run.log)[-4000:]
        assert run.changed == 0, run.log[-4000:]
        assert "esp32-fleet-upkeep: ok:" in run.output
    assert crl.read_bytes() == before
    assert controller.state()["rc"] == 0
    status = json.loads(controller.status_file.read_text())
    assert stat.S_IMODE(controller.status_file.stat().st_mode) == 0o640
    kinds = {(r["kind"], r["name"]): r for r in status["rows"]}
    assert kinds[("crl", "ca")]["state"] == "ok" and kinds[("broker", "broker2")]["state"] == "ok"
    assert kinds[("device", "dev-a")]["last_seen"] == "unknown" and status["at_risk"] == []
    assert "nothing at risk" in run.log


def test_a_crl_inside_its_window_is_resigned_once(controller):
    crl = controller.pki / "ca" / "crl.pem"
    old = next_update(crl)
    # +25 days: 5 days left of the 30-day CRL, inside the 10-day window.
    run = controller.upkeep(faketime="+25 days")
    assert run.rc == 0, (run.output + run.log)[-4000:]
    assert run.changed == 1, run.log[-4000:]  # the CRL, nothing else
    new = next_update(crl)
    assert dt.timedelta(days=24) < new - old < dt.timedelta(days=26)
    again = controller.upkeep(faketime="+25 days")
    assert again.rc == 0 and again.changed == 0, again.log[-4000:]


def test_status_fails_when_the_crl_lapses_before_upkeep_and_passes_after_it(controller):
    # +29 days without upkeep: 1 day left, less than the daily period plus a day's margin.
    run = controller.playbook("playbooks/status.yml", faketime="+29 days")
    assert run.rc != 0, run.output[-3000:]
    assert "AT RISK: crl ca" in run.output, run.output[-3000:]
    status = json.loads(controller.status_file.read_text())
    assert status["at_risk"] == ["crl ca"]

    # Upkeep re-signs it; its own status step passes, and so does the next status.
    run = controller.upkeep(faketime="+29 days")
    assert run.rc == 0, (run.output + run.log)[-4000:]
    assert "nothing at risk" in run.log
    run = controller.playbook("playbooks/status.yml", faketime="+29 days")
    assert run.rc == 0, run.output[-3000:]


def test_an_unsafe_vault_password_file_is_refused_loudly(controller):
    controller.vault_file.chmod(0o640)
    run = controller.upkeep()
    assert run.rc == 2
    assert "esp32-fleet-upkeep: FAILED: vault password file" in run.output and "chmod 0600" in run.output
    assert controller.state()["rc"] == 2
    assert not controller.log_file.exists()  # ansible-playbook never ran

    # ... and the status reports the failed run.
    controller.vault_file.chmod(0o600)
    run = controller.playbook("playbooks/status.yml")
    assert run.rc != 0 and "AT RISK: upkeep" in run.output, run.output[-3000:]
    assert "upkeep: failed (last run" in run.output
