"""Sanity: each module's DOCUMENTATION agrees with its argument_spec, and ansible-doc renders it."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from ansible.module_utils import basic
from ansible.utils.plugin_docs import merge_fragment

ROOT = Path(__file__).resolve().parents[2]
MODULES = [
    "esp32_info",
    "esp32_flash",
    "esp32_nvs",
    "fleet_config_hash",
    "fleet_manifest",
    "fleet_manifest_info",
]


def documentation(module):
    """DOCUMENTATION with its doc fragments merged in, the way ansible-doc merges them."""
    doc = yaml.safe_load(module.DOCUMENTATION)
    for name in doc.pop("extends_documentation_fragment", []):
        path = ROOT / "plugins" / "doc_fragments" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(f"doc_fragment_{name}", path)
        fragment_module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(fragment_module)
        fragment = yaml.safe_load(fragment_module.ModuleDocFragment.DOCUMENTATION)
        merge_fragment(doc.setdefault("options", {}), fragment["options"])
    return doc


class _Captured(Exception):
    pass


def captured_spec(load_module, name, monkeypatch):
    """The argument_spec main() passes to AnsibleModule (captured, then main() is stopped)."""
    seen = {}

    def fake_init(self, argument_spec, **kwargs):
        seen["spec"] = argument_spec
        seen["kwargs"] = kwargs
        raise _Captured()

    monkeypatch.setattr(basic.AnsibleModule, "__init__", fake_init)
    module = load_module(name)
    with pytest.raises(_Captured):
        module.main()
    return module, seen["spec"], seen["kwargs"]


def compare(doc_options, spec, where):
    """Yield one line per disagreement between documented options and the argument spec."""
    for name in sorted(set(doc_options) | set(spec)):
        path = f"{where}{name}"
        if name not in spec:
            yield f"{path}: documented but not in argument_spec"
            continue
        if name not in doc_options:
            yield f"{path}: in argument_spec but not documented"
            continue
        doc, arg = doc_options[name], spec[name]
        if not doc.get("description"):
            yield f"{path}: no description"
        for field, fallback in (("type", "str"), ("required", False), ("choices", None), ("elements", None)):
            documented, declared = doc.get(field, fallback), arg.get(field, fallback)
            if documented != declared:
                yield f"{path}: {field} documented {documented!r}, spec {declared!r}"
        doc_default, arg_default = doc.get("default"), arg.get("default")
        if isinstance(arg_default, str) and isinstance(doc_default, int):
            doc_default = hex(doc_default) if arg_default.startswith("0x") else str(doc_default)
        if doc_default != arg_default:
            yield f"{path}: default documented {doc_default!r}, spec {arg_default!r}"
        yield from compare(doc.get("suboptions", {}), arg.get("options", {}) or {}, f"{path}.")


@pytest.mark.parametrize("name", MODULES)
def test_documentation_options_match_argument_spec(name, monkeypatch, module_loader):
    module, spec, kwargs = captured_spec(module_loader, name, monkeypatch)
    doc = documentation(module)
    assert doc["module"] == name
    problems = list(compare(doc["options"], spec, ""))
    assert problems == []
    # check/diff support claimed in DOCUMENTATION must match what the module declares
    assert kwargs.get("supports_check_mode") is (doc["attributes"]["check_mode"]["support"] == "full")
    yaml.safe_load(module.EXAMPLES)
    returned = yaml.safe_load(module.RETURN)
    assert all(v.get("description") for v in returned.values())


@pytest.mark.parametrize("name", MODULES)
def test_ansible_doc_renders(name):
    env = dict(os.environ, ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"), ANSIBLE_NOCOLOR="1")
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "ansible-doc"), "-M", str(ROOT / "plugins" / "modules"), name],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    assert "OPTIONS" in proc.stdout and "RETURN VALUES" in proc.stdout
    assert "[WARNING]" not in proc.stderr and "ERROR" not in proc.stderr
