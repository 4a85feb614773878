"""playbooks/revoke.yml on the controller: the devices' current certificates go on the revocation list
and the CRL (openssl refuses them, the others still verify), the manifest gets one `revoked` row per
device, a second run changes nothing, and bad `device` input fails naming it with nothing changed.
(The broker side, reload and ACL, is checked end to end in molecule/fleet.)"""

from __future__ import annotations

import json

import pytest
import yaml

PLAYBOOK_NAME = "revoke.yml"


@pytest.fixture
def controller_only(copy_of_issued, tmp_path):
    """The issued PKI with an empty brokers group: the broker play of revoke.yml has no host here."""
    pki = copy_of_issued
    pki.brokers = {}
    pki.write_inventory()
    return pki


def _revoke(pki, tools, device, *args):
    extra = {"esp32_provision_manifest_dir": str(pki.base / "manifests")}
    if device is not None:
        extra["device"] = device
    return pki.run(*args, extra=extra, playbook=tools.ROOT / "playbooks" / PLAYBOOK_NAME)


def _rows(pki):
    path = pki.base / "manifests" / "fleet.json"
    return json.loads(path.read_text())["rows"] if path.exists() else []


def _crl_refuses(tools, pki, device):
    proc = tools.openssl(
        "verify", "-crl_check", "-purpose", "sslclient", "-CAfile", str(pki.pki / "ca" / "ca.crt"),
        "-CRLfile", str(pki.pki / "ca" / "crl.pem"), str(pki.pki / "devices" / f"{device}.crt"), check=False,
    )  # fmt: skip
    return proc.returncode != 0 and "certificate revoked" in proc.stdout + proc.stderr


def test_revoke_two_devices_then_nothing_changes(controller_only, tools):
    pki = controller_only
    serials = {
        d: int(tools.serial(pki.pki / "devices" / f"{d}.crt").split("=", 1)[1], 16) for d in tools.DEVICE_IDS
    }

    run = _revoke(pki, tools, "dev-a, esp32-0042")
    assert run.rc == 0, run.output[-3000:]
    assert run.changed >= 2, run.output[-3000:]  # revocation list and CRL

    revoked = yaml.safe_load((pki.pki / "ca" / "revoked.yml").read_text())["pki_revoked_certificates"]
    assert sorted((r["device_id"], int(r["serial_number"])) for r in revoked) == sorted(
        [("dev-a", serials["dev-a"]), ("esp32-0042", serials["esp32-0042"])]
    )
    assert _crl_refuses(tools, pki, "dev-a")
    assert _crl_refuses(tools, pki, "esp32-0042")
    assert not _crl_refuses(tools, pki, "dev-c")
    assert tools.verifies(
        pki.pki / "ca" / "ca.crt", pki.pki / "devices" / "dev-c.crt", "sslclient",
        "-crl_check", "-CRLfile", str(pki.pki / "ca" / "crl.pem"),
    )  # fmt: skip

    rows = _rows(pki)
    assert sorted((r["device_id"], r["result"], r["host"]) for r in rows) == [
        ("dev-a", "revoked", "dev-a"),
        ("esp32-0042", "revoked", "dev-b"),
    ]
    assert {r["device_id"]: int(r["cert_serial"]) for r in rows} == {
        "dev-a": serials["dev-a"],
        "esp32-0042": serials["esp32-0042"],
    }

    tree = tools.tree_hash(pki.pki)
    again = _revoke(pki, tools, ["dev-a"], "--diff")
    assert again.rc == 0 and again.changed == 0, again.output[-3000:]
    assert "dev-a: already revoked" in again.output
    assert tools.tree_hash(pki.pki) == tree
    assert len(_rows(pki)) == 2


@pytest.mark.parametrize(
    ("device", "words"),
    [
        (None, ["device", "nothing"]),
        ("", ["device"]),
        (" , ", ["device"]),
        ("dev-a,no-such-board", ["device", "unknown: no-such-board"]),
        ([], ["device"]),
    ],
    ids=["unset", "empty", "only-commas", "unknown-id", "empty-list"],
)
def test_bad_device_fails_naming_device_and_changes_nothing(controller_only, tools, device, words):
    pki = controller_only
    tree = tools.tree_hash(pki.pki)
    run = _revoke(pki, tools, device)
    assert run.rc != 0
    assert run.recap.get("failed") == 1, run.output[-3000:]
    for word in words:
        assert word in run.output, (word, run.output[-3000:])
    assert tools.tree_hash(pki.pki) == tree
    assert _rows(pki) == []


ROUNDS = 3  # each round starts two runs at once on a fresh copy; one lost revocation fails the test


def test_two_overlapping_revokes_both_hold(issued, tools, tmp_path):
    """Two revoke.yml runs started together (-e device=dev-a and -e device=dev-c) on the same PKI: both
    revocations end up on ca/revoked.yml and in the CRL, and openssl refuses both certificates."""
    for attempt in range(ROUNDS):
        pki = issued[0].clone(tmp_path / f"round{attempt}")
        pki.brokers = {}
        pki.write_inventory()
        manifests = {"esp32_provision_manifest_dir": str(pki.base / "manifests")}
        revoke = tools.ROOT / "playbooks" / PLAYBOOK_NAME
        procs = [
            pki.start(extra={"device": device, **manifests}, playbook=revoke, name=device)
            for device in ("dev-a", "dev-c")
        ]
        runs = [pki.wait(proc) for proc in procs]
        for run in runs:
            assert run.rc == 0, run.output[-3000:]
            assert "revoked now" in run.output
        revoked = yaml.safe_load((pki.pki / "ca" / "revoked.yml").read_text())["pki_revoked_certificates"]
        assert sorted(r["device_id"] for r in revoked) == ["dev-a", "dev-c"], (attempt, revoked)
        assert _crl_refuses(tools, pki, "dev-a"), attempt
        assert _crl_refuses(tools, pki, "dev-c"), attempt
        assert not _crl_refuses(tools, pki, "esp32-0042")
        assert sorted(r["device_id"] for r in _rows(pki)) == ["dev-a", "dev-c"]
