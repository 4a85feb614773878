"""Repository-level checks: generated docs in sync, links that resolve, the two README commands,
nothing secret tracked."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GENERATOR = ROOT / "scripts" / "gen-readme-vars.py"
# A PEM private key block WITH key material (tests may mention the marker itself).
PEM_KEY = re.compile(rb"-----BEGIN [A-Z ]*PRIVATE KEY-----\r?\n[A-Za-z0-9+/=]{40,}")


def _generate(root, *args):
    return subprocess.run(
        [sys.executable, str(GENERATOR), "--root", str(root), *args], capture_output=True, text=True
    )


def test_role_readme_variable_tables_match_argument_specs():
    result = _generate(ROOT, "--check")
    assert result.returncode == 0, result.stderr


def test_every_role_with_argument_specs_has_a_readme_with_its_table():
    roles = sorted(p.parents[1].name for p in ROOT.glob("roles/*/meta/argument_specs.yml"))
    assert roles == [
        "esp32_provision",
        "mosquitto",
        "ota",
        "ota_server",
        "pki",
        "renewal",
        "upkeep",
    ]
    for role in roles:
        text = (ROOT / "roles" / role / "README.md").read_text()
        assert f"<!-- BEGIN VARS {role} -->\n| variable | type | default | description |" in text, role


@pytest.fixture
def role_copy(tmp_path):
    """The roles' argument specs and READMEs, copied where the test may make them disagree."""
    for spec in ROOT.glob("roles/*/meta/argument_specs.yml"):
        role = spec.parents[1]
        (tmp_path / "roles" / role.name / "meta").mkdir(parents=True)
        shutil.copy(spec, tmp_path / "roles" / role.name / "meta" / "argument_specs.yml")
        shutil.copy(role / "README.md", tmp_path / "roles" / role.name / "README.md")
    return tmp_path


def test_a_stale_role_table_fails_the_check_until_regenerated(role_copy):
    spec = role_copy / "roles" / "mosquitto" / "meta" / "argument_specs.yml"
    old = "Seconds each TLS listener gets to present the deployed certificate"
    assert old in spec.read_text()
    spec.write_text(spec.read_text().replace(old, "Seconds (changed) each TLS listener gets to present"))

    stale = _generate(role_copy, "--check")
    assert stale.returncode == 1
    assert "roles/mosquitto/README.md is stale" in stale.stderr
    assert "pki" not in stale.stderr and "esp32_provision" not in stale.stderr

    assert _generate(role_copy).returncode == 0
    readme = (role_copy / "roles" / "mosquitto" / "README.md").read_text()
    assert "| `mosquitto_probe_timeout` | int | `15` | Seconds (changed) each TLS listener" in readme
    assert _generate(role_copy, "--check").returncode == 0


def test_a_role_readme_without_its_table_fails_the_check(role_copy):
    readme = role_copy / "roles" / "pki" / "README.md"
    readme.write_text(readme.read_text().replace("<!-- BEGIN VARS pki -->", "<!-- BEGIN VARS mosquitto -->"))
    (role_copy / "roles" / "esp32_provision" / "README.md").unlink()

    result = _generate(role_copy, "--check")
    assert result.returncode == 1
    assert "roles/pki/README.md must hold exactly one block <!-- BEGIN VARS pki -->" in result.stderr
    assert "roles/esp32_provision/README.md is missing" in result.stderr
    # Generating cannot repair it either: it does not know where the table belongs.
    assert _generate(role_copy).returncode == 1


# Markdown pages whose relative links must resolve: the root README, docs/, every role's README and
# the READMEs of the simulator and the benchmarks.
DOC_GLOBS = ("README.md", "docs/*.md", "roles/*/README.md", "esp32sim/README.md", "bench/README.md")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.S | re.M)
CODE_SPAN = re.compile(r"(`+).+?\1", re.S)


def _anchors(markdown):
    """GitHub's heading anchors: lower case, punctuation except - and _ dropped, spaces to -; a repeated
    heading gets -1, -2, ..."""
    seen = {}
    for line in FENCE.sub("", markdown).splitlines():
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            slug = re.sub(r"[^\w\- ]", "", m.group(1).lower()).replace(" ", "-")
            seen[slug] = seen.get(slug, -1) + 1
            if seen[slug]:
                seen[f"{slug}-{seen[slug]}"] = 0
    return set(seen)


def broken_links(page):
    """Relative links of one Markdown page that point at no file (or at no heading of that file)."""
    text = CODE_SPAN.sub("", FENCE.sub("", page.read_text()))
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I):  # https:, mailto: ...
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest.read_text()):
            broken.append(f"{target} (no heading #{anchor} in {dest.name})")
    return broken


def test_relative_markdown_links_resolve():
    pages = sorted({p for pattern in DOC_GLOBS for p in ROOT.glob(pattern)})
    assert len(pages) >= 10, pages
    broken = {str(p.relative_to(ROOT)): b for p in pages if (b := broken_links(p))}
    assert broken == {}


def test_the_link_check_finds_a_broken_file_and_a_broken_anchor(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# A page\n\n## Some `code` here\n")
    page = tmp_path / "README.md"
    page.write_text(
        "[ok](docs/a.md) [ok](docs/a.md#some-code-here) [ok](#top) [ext](https://example.invalid/x)\n"
        "`[in code](nowhere.md)`\n\n```\n[in a fence](nowhere.md)\n```\n\n# Top\n"
        "[gone](docs/b.md) [bad anchor](docs/a.md#missing)\n"
    )
    assert broken_links(page) == [
        "docs/b.md (no such file)",
        "docs/a.md#missing (no heading #missing in a.md)",
    ]


def test_readme_gives_the_two_commands_and_ci_runs_make_test():
    readme = (ROOT / "README.md").read_text()
    assert "make site" in readme and "make test" in readme
    # The root README is the entry page (issue 4: about 200 lines); the rest lives in docs/ and the
    # role, simulator and benchmark READMEs it links to.
    assert len(readme.splitlines()) <= 200
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
