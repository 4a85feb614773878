#!/usr/bin/env python3
"""Generate each role README's variable table from the role's meta/argument_specs.yml.

Every input is documented twice (defaults/main.yml comments and argument specs) but written into the
README only from the specs, so the table cannot drift. Every role with argument specs has a
roles/<role>/README.md holding one block for its own variables:

    <!-- BEGIN VARS pki -->
    ... generated ...
    <!-- END VARS pki -->

Usage: scripts/gen-readme-vars.py [--check] [--root DIR]
(--check: exit 1 when a table is stale; a role README or block that is missing is an error either way,
since the generator cannot know where the table belongs.)
"""

import argparse
import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"(<!-- BEGIN VARS (?P<role>[\w-]+) -->\n).*?(<!-- END VARS (?P=role) -->)", re.S)


def _cell(value):
    text = " ".join(str(value).split())
    return text.replace("|", "\\|")


def _default(spec):
    if "default" not in spec:
        return "**required**" if spec.get("required") else ""
    dumped = yaml.safe_dump(spec["default"], default_flow_style=True).strip()
    return f"`{_cell(dumped.removesuffix('...').strip())}`"


def render(spec_file):
    specs = yaml.safe_load(spec_file.read_text())
    options = specs["argument_specs"]["main"].get("options", {})
    rows = ["| variable | type | default | description |", "|---|---|---|---|"]
    for name in sorted(options):
        spec = options[name]
        kind = spec.get("type", "str")
        if spec.get("choices"):
            kind += " (" + ", ".join(str(c) for c in spec["choices"]) + ")"
        desc = spec.get("description", "")
        if isinstance(desc, list):
            desc = " ".join(desc)
        rows.append(f"| `{name}` | {_cell(kind)} | {_default(spec)} | {_cell(desc)} |")
    return "\n".join(rows) + "\n"


def update(root, check):
    """Rewrite (or, with check, only compare) every role README; return the list of problems."""
    problems = []
    for spec_file in sorted(root.glob("roles/*/meta/argument_specs.yml")):
        role = spec_file.parent.parent.name
        path = spec_file.parent.parent / "README.md"
        rel = path.relative_to(root)
        if not path.is_file():
            problems.append(f"{rel} is missing (it must hold the block <!-- BEGIN VARS {role} -->)")
            continue
        text = path.read_text()
        blocks = [m.group("role") for m in BLOCK.finditer(text)]
        if blocks != [role]:
            problems.append(
                f"{rel} must hold exactly one block <!-- BEGIN VARS {role} --> ... "
                f"<!-- END VARS {role} -->, found {blocks}"
            )
            continue
        table = render(spec_file)
        new = BLOCK.sub(lambda m, table=table: m.group(1) + table + m.group(3), text)
        if new == text:
            continue
        if check:
            problems.append(f"{rel} is stale: run scripts/gen-readme-vars.py")
        else:
            path.write_text(new)
    return problems


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report stale tables (exit 1)")
    parser.add_argument("--root", type=Path, default=ROOT, help="repository root (default: this checkout)")
    args = parser.parse_args()
    problems = update(args.root.resolve(), args.check)
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
