"""Make the checkout importable as the collection it is: `collections/ansible_collections/esp32_fleet/
mqtt_fleet` links to the repository root, so the plugins' own imports
(`ansible_collections.esp32_fleet.mqtt_fleet.plugins.module_utils...`) resolve in-process as they do
when Ansible runs them."""

import sys
from pathlib import Path

COLLECTIONS = str(Path(__file__).resolve().parents[1] / "collections")
if COLLECTIONS not in sys.path:
    sys.path.insert(0, COLLECTIONS)

# `make check` runs everything but these: whole playbooks against throwaway PKIs, fleets and brokers
# (minutes each). Marked here by file, so a new test file is in the fast loop unless listed.
INTEGRATION = (
    "tests/day2/",
    "tests/fleet/test_fleet_",
    "tests/fleet/test_smoke.py",
    "tests/pki/test_pki_bad_inputs.py",
    "tests/pki/test_pki_changes.py",
    "tests/pki/test_pki_crl_",
    "tests/pki/test_pki_issue.py",
    "tests/pki/test_pki_renew_broker.py",
    "tests/pki/test_pki_rotation.py",
    "tests/ota_server/",
    "tests/test_collection.py",
    "tests/upkeep/test_upkeep_",
)


def pytest_collection_modifyitems(config, items):
    root = Path(__file__).resolve().parents[1]
    for item in items:
        rel = Path(item.fspath).resolve().relative_to(root).as_posix()
        if rel.startswith(INTEGRATION):
            item.add_marker("integration")
