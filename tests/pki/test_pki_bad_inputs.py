"""Bad input fails before any file is written (fresh tree) or changed (existing PKI), naming the variable."""

from __future__ import annotations

import pytest

# (id, extra vars, inventory change, words the failure must contain)
CASES = [
    ("unknown-key-type", {"pki_leaf_key_type": "DSA"}, None, ["pki_leaf_key_type", "DSA"]),
    ("rsa-1024", {"pki_ca_key_type": "RSA", "pki_ca_key_size": 1024}, None, ["pki_ca_key_size", "1024"]),
    ("leaf-validity-400", {"pki_server_validity_days": 400}, None, ["pki_server_validity_days", "366"]),
    ("client-validity-400", {"pki_client_validity_days": 400}, None, ["pki_client_validity_days"]),
    ("renew-window-too-long", {"pki_renew_before_days": 365}, None, ["pki_renew_before_days"]),
    ("crl-window", {"pki_crl_validity_days": 5}, None, ["pki_crl_validity_days"]),
    (
        "bad-san",
        {},
        ("broker2", ["broker2.example.net", "not a host!"]),
        ["mosquitto_server_names", "not a host!"],
    ),
    ("san-bad-ip", {}, ("broker2", ["IP:300.1.1.1"]), ["mosquitto_server_names", "IP:300.1.1.1"]),
]


def _apply(pki, extra, inventory_change):
    if inventory_change:
        host, names = inventory_change
        pki.brokers[host]["mosquitto_server_names"] = names
        pki.write_inventory()
    return pki.run(extra=extra or None)


def _assert_failed_naming(run, words):
    assert run.rc != 0
    assert run.recap.get("failed") == 1, run.output[-3000:]
    for word in words:
        assert word in run.output, (word, run.output[-3000:])


@pytest.mark.parametrize(("extra", "change", "words"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_on_a_fresh_tree_writes_nothing(new_pki, extra, change, words):
    run = _apply(new_pki, extra, change)
    _assert_failed_naming(run, words)
    assert not new_pki.pki.exists()


# Every case fails in the argument specs or in assert.yml, both before the first task that reads or
# writes the tree, so the tree does not change what happens: one case of each kind on an existing PKI
# (the fresh-tree test above runs all of them) proves "changes nothing" without 6 more playbook runs.
EXISTING = [c for c in CASES if c[0] in ("rsa-1024", "bad-san")]
EXISTING_IDS = [c[0] for c in EXISTING]


@pytest.mark.parametrize(("extra", "change", "words"), [c[1:] for c in EXISTING], ids=EXISTING_IDS)
def test_bad_input_on_an_existing_pki_changes_nothing(copy_of_issued, tools, extra, change, words):
    before = tools.tree_hash(copy_of_issued.pki)
    run = _apply(copy_of_issued, extra, change)
    _assert_failed_naming(run, words)
    assert tools.tree_hash(copy_of_issued.pki) == before


def test_wrong_ca_passphrase_fails_clearly_and_leaves_the_ca_untouched(copy_of_issued, tools):
    before = tools.tree_hash(copy_of_issued.pki)
    wrong = "wrong-passphrase-for-this-ca"
    copy_of_issued.write_inventory(passphrase=wrong)
    run = copy_of_issued.run()
    _assert_failed_naming(run, ["pki_ca_passphrase does not decrypt the existing CA key"])
    assert wrong not in run.output and tools.PASSPHRASE not in run.output
    assert tools.tree_hash(copy_of_issued.pki) == before


def test_short_passphrase_is_refused_before_anything_is_written(new_pki):
    new_pki.write_inventory(passphrase="short")
    run = new_pki.run()
    _assert_failed_naming(run, ["pki_ca_passphrase", "at least 8"])
    assert "short" not in run.output.replace("short_description", "")
    assert not new_pki.pki.exists()


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        ({"pki_ca_key_type": "RSA"}, ["pki_ca_key_type", "never", "re-issued silently"]),
        ({"pki_ca_key_curve": "secp384r1"}, ["pki_ca_key_curve", "never"]),
        ({"pki_ca_common_name": "Another CA"}, ["pki_ca_common_name", "Another CA"]),
    ],
    ids=["ca-key-type", "ca-curve", "ca-common-name"],
)
def test_the_ca_is_never_reissued_silently(copy_of_issued, tools, extra, words):
    before = tools.tree_hash(copy_of_issued.pki)
    run = copy_of_issued.run(extra=extra)
    _assert_failed_naming(run, words)
    assert tools.tree_hash(copy_of_issued.pki) == before


def test_a_ca_certificate_without_its_key_is_not_replaced(copy_of_issued, tools):
    (copy_of_issued.pki / "ca" / "ca.key").unlink()
    before = tools.tree_hash(copy_of_issued.pki)
    run = copy_of_issued.run()
    _assert_failed_naming(run, ["ca.key does not", "never", "creates a new CA silently"])
    assert tools.tree_hash(copy_of_issued.pki) == before
