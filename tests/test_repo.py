"""Repository-level checks: generated docs in sync, the two README commands, nothing secret tracked."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# A PEM private key block WITH key material (tests may mention the marker itself).
PEM_KEY = re.compile(rb"-----BEGIN [A-Z ]*PRIVATE KEY-----\r?\n[A-Za-z0-9+/=]{40,}")


def test_readme_variable_tables_match_argument_specs():
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen-readme-vars.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr


def test_readme_gives_the_two_commands_and_ci_runs_make_test():
    readme = (ROOT / "README.md").read_text()
    assert "make site" in readme and "make test" in readme
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_no_key_or_pki_output_is_tracked():
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True)
    tracked = files.stdout.splitlines()
    suspicious = [
        f
        for f in tracked
        if (f.startswith("pki/") or f.endswith((".key", ".p12")) or "vault_pass" in f)
        and not f.startswith("tests/fixtures/")
    ]
    assert suspicious == []
    for path in tracked:
        p = ROOT / path
        if p.is_file() and p.stat().st_size < 1_000_000:
            data = p.read_bytes()
            assert not PEM_KEY.search(data) or path.startswith("tests/fixtures/"), path
