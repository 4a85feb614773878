"""Day-2 fault and input-safety tests. The throwaway fleet project is tests/fleet's FleetProject
(loaded from its conftest, not copied); the snapshot helper proves a refused run changed nothing."""

import hashlib
import importlib.util
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

_spec = importlib.util.spec_from_file_location(
    "fleet_conftest_for_day2", ROOT / "tests" / "fleet" / "conftest.py"
)
_fleet = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_fleet)
FleetProject = _fleet.FleetProject
RECAP = _fleet.RECAP

MACS = ["24:0a:c4:00:00:01", "24:0a:c4:00:00:02", "24:0a:c4:00:00:03"]


def snapshot(*roots):
    """Path -> (mode, sha256 or link target) of everything under roots (read-only; missing roots are
    recorded as missing, so a run that creates them shows up as a difference)."""
    state = {}
    for root in map(Path, roots):
        if not root.exists() and not root.is_symlink():
            state[str(root)] = "missing"
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in [*dirnames, *sorted(filenames)]:
                path = Path(dirpath) / name
                st = path.lstat()
                if path.is_symlink():
                    state[str(path)] = ("link", os.readlink(path))
                elif path.is_dir():
                    state[str(path)] = ("dir", oct(st.st_mode))
                else:
                    digest = hashlib.sha256(path.read_bytes()).hexdigest()
                    state[str(path)] = ("file", oct(st.st_mode), st.st_uid, st.st_gid, digest)
        state[str(root)] = ("root", oct(root.lstat().st_mode))
    return state


@pytest.fixture
def fleet_project(tmp_path):
    """The same fixture as tests/fleet's: FleetProject instances whose labs are stopped afterwards."""
    projects = []

    def make(boards, brokers=None):
        project = FleetProject(tmp_path, boards, brokers)
        projects.append(project)
        return project

    yield make
    for project in projects:
        project.stop_lab()
