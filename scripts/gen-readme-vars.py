#!/usr/bin/env python3
"""Generate the README's role variable tables from each role's meta/argument_specs.yml.

Every input is documented twice (defaults/main.yml comments and argument specs) but written into the
README only from the specs, so the table cannot drift. The README holds one block per role:

    <!-- BEGIN VARS pki -->
    ... generated ...
    <!-- END VARS pki -->

Usage: scripts/gen-readme-vars.py [--check] [README]   (--check: exit 1 when the README is stale)
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


def render(role):
    specs = yaml.safe_load((ROOT / "roles" / role / "meta" / "argument_specs.yml").read_text())
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true")
    parser.add_argument("readme", nargs="?", default=str(ROOT / "README.md"))
    args = parser.parse_args()
    path = Path(args.readme)
    text = path.read_text()
    new = BLOCK.sub(lambda m: m.group(1) + render(m.group("role")) + m.group(3), text)
    if args.check:
        if new != text:
            print(f"{path} is stale: run scripts/gen-readme-vars.py", file=sys.stderr)
            return 1
        return 0
    if new != text:
        path.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
