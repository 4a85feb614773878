# Copyright: esp32-mqtt-fleet contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Build an ESP-IDF NVS partition image from a structured dict with esp-idf-nvs-partition-gen's API.

Everything the upstream generator gets wrong or reports obscurely (a size that is not a multiple of
4096 exits 0 and writes nothing, too little space writes a 0-byte file, over-long keys are caught only
by its CSV front end) is validated here first, naming the offending namespace.key. The generator's
output is deterministic, so the image's sha256 decides whether anything changed.
"""

from __future__ import annotations

import contextlib
import io
import traceback

from ansible_collections.esp32_fleet.mqtt_fleet.plugins.module_utils.esp32_errors import Esp32Error
from ansible_collections.esp32_fleet.mqtt_fleet.plugins.module_utils.esp32_flashplan import parse_int

try:
    from esp_idf_nvs_partition_gen import nvs_partition_gen as nvsgen
except ImportError:
    HAS_NVSGEN = False
    NVSGEN_IMPORT_ERROR = traceback.format_exc()
else:
    HAS_NVSGEN = True
    NVSGEN_IMPORT_ERROR = None

NVSGEN_REQUIREMENT = "esp-idf-nvs-partition-gen>=0.3 on the host that builds the image"
PAGE_SIZE = 4096
MIN_SIZE = 3 * PAGE_SIZE  # below this the generator makes a read-only partition: not what devices need
MAX_KEY = 15  # NVS keys and namespace names: 16 bytes including the NUL
MAX_STRING = 4000  # bytes including the terminating NUL (NVS v2)
INT_RANGES = {
    "u8": (0, 2**8 - 1),
    "i8": (-(2**7), 2**7 - 1),
    "u16": (0, 2**16 - 1),
    "i16": (-(2**15), 2**15 - 1),
    "u32": (0, 2**32 - 1),
    "i32": (-(2**31), 2**31 - 1),
    "u64": (0, 2**64 - 1),
    "i64": (-(2**63), 2**63 - 1),
}
VALUE_TYPES = (*INT_RANGES, "string", "blob")


def _check_name(name, what):
    if not isinstance(name, str) or not name:
        raise Esp32Error(f"{what} {name!r} must be a non-empty string", kind="invalid")
    encoded = name.encode("utf-8")
    if len(encoded) > MAX_KEY:
        raise Esp32Error(
            f"{what} {name!r} is {len(encoded)} bytes: NVS allows at most {MAX_KEY}", kind="invalid"
        )


def _read(path, label, binary):
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise Esp32Error(f"{label}: cannot read {path}: {e.strerror}", kind="invalid") from None
    if binary:
        return data
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise Esp32Error(f"{label}: {path} is not UTF-8 text (use type: blob)", kind="invalid") from None


def normalize_entry(label, value):
    """Map one user value to (encoding, value) for the generator, validating it."""
    if isinstance(value, bool):
        value = {"type": "u8", "value": int(value)}
    elif isinstance(value, int):
        value = {"type": "i32", "value": value}
    elif isinstance(value, str):
        value = {"type": "string", "value": value}
    elif not isinstance(value, dict):
        raise Esp32Error(f"{label}: unsupported value of type {type(value).__name__}", kind="invalid")
    unknown = set(value) - {"type", "value", "file"}
    if unknown or ("file" in value) == ("value" in value):
        raise Esp32Error(
            f"{label}: give exactly one of value or file (and optionally type), got keys {sorted(value)}",
            kind="invalid",
        )
    kind = value.get("type") or (
        "string" if "file" in value or isinstance(value.get("value"), str) else "i32"
    )
    if kind not in VALUE_TYPES:
        raise Esp32Error(f"{label}: type {kind!r} is not one of {', '.join(VALUE_TYPES)}", kind="invalid")
    data = _read(value["file"], label, binary=kind == "blob") if "file" in value else value["value"]
    if kind in INT_RANGES:
        try:
            number = parse_int(data, label)
        except Esp32Error:
            raise Esp32Error(f"{label}: {kind} value is not an integer", kind="invalid") from None
        low, high = INT_RANGES[kind]
        if not low <= number <= high:
            raise Esp32Error(f"{label}: {number} is out of range for {kind} ({low}..{high})", kind="invalid")
        return kind, number
    if kind == "blob":
        if isinstance(data, str):
            data = data.encode("utf-8")
        return "binary", bytes(data)
    if not isinstance(data, str):
        raise Esp32Error(f"{label}: string value must be text, got {type(data).__name__}", kind="invalid")
    if "\0" in data:
        raise Esp32Error(f"{label}: NVS strings cannot contain NUL characters", kind="invalid")
    size = len(data.encode("utf-8")) + 1
    if size > MAX_STRING:
        raise Esp32Error(
            f"{label}: string is {size} bytes with its NUL, NVS allows at most {MAX_STRING} "
            "(store it as type: blob)",
            kind="invalid",
        )
    return "string", data


def normalize(namespaces):
    """Validate the whole structure; return [(namespace, [(key, encoding, value)])]."""
    if not isinstance(namespaces, dict) or not namespaces:
        raise Esp32Error("namespaces must be a non-empty dict of namespace -> {key: value}", kind="invalid")
    result = []
    for ns, entries in namespaces.items():
        _check_name(ns, "namespace")
        if not isinstance(entries, dict) or not entries:
            raise Esp32Error(f"namespace {ns!r} must be a non-empty dict of key -> value", kind="invalid")
        items = []
        for key, value in entries.items():
            _check_name(key, f"key {ns}.")
            items.append((key, *normalize_entry(f"{ns}.{key}", value)))
        result.append((ns, items))
    return result


def secret_strings(namespaces):
    """The values to mask wherever they would appear in the module's output: every text given as a
    string or blob value, whatever its length (a 7-character Wi-Fi password is still a password).
    Numbers, booleans, type names and file paths are not secrets (the files' contents are read here
    and never returned), and masking them would only garble the returned digests."""
    out = set()
    for entries in (namespaces or {}).values():
        for value in (entries or {}).values() if isinstance(entries, dict) else ():
            if isinstance(value, dict) and value.get("type") in (None, "string", "blob"):
                value = value.get("value")
            if isinstance(value, str) and value:
                out.add(value)
    return out


def parse_size(value):
    size = parse_int(value, "size")
    if size % PAGE_SIZE or size < MIN_SIZE:
        raise Esp32Error(
            f"size {size:#x} must be a multiple of {PAGE_SIZE:#x} and at least {MIN_SIZE:#x} (3 pages)",
            kind="invalid",
        )
    return size


def build(namespaces, size, version):
    """Return the partition image (bytes) for validated input; raise Esp32Error naming the key that
    does not fit."""
    entries = normalize(namespaces)
    page_version = {1: nvsgen.Page.VERSION1, 2: nvsgen.Page.VERSION2}[version]
    out = io.BytesIO()
    noise = io.StringIO()  # the generator logs through a shared logger: keep it off the module's stdout
    label = "namespace header"
    try:
        with contextlib.redirect_stdout(noise), contextlib.redirect_stderr(noise):
            # The generator keeps the last page in reserve (NVS needs one free page to garbage-collect).
            nvs = nvsgen.nvs_open(out, size - PAGE_SIZE, page_version)
            for ns, items in entries:
                label = f"namespace {ns}"
                nvsgen.write_entry(nvs, ns, "namespace", "", "")
                for key, encoding, value in items:
                    label = f"{ns}.{key}"
                    nvsgen.write_entry(nvs, key, "data", encoding, value)
            label = "the reserved page"
            nvsgen.nvs_close(nvs)
    except nvsgen.InsufficientSizeError:
        raise Esp32Error(
            f"the entries do not fit in a {size:#x}-byte partition: space ran out at {label}; raise size",
            kind="invalid",
        ) from None
    except (nvsgen.InputError, nvsgen.PageFullError, ValueError, TypeError) as e:
        raise Esp32Error(f"{label}: the NVS generator refused it: {e}", kind="invalid") from None
    image = out.getvalue()
    if len(image) != size:  # the generator's silent failure mode is a short (even empty) image
        raise Esp32Error(f"the NVS generator produced {len(image)} bytes instead of {size}", kind="invalid")
    return image
