"""The simulator's image builder against the real esptool (`image-info`), and the checks the
twin's bootloader and esp_ota_end model make (esp32sim/appimage.py)."""

import hashlib
import struct
import subprocess

import pytest

from esp32sim import appimage
from esp32sim.firmware import read_partition_table

from .conftest import BIN, ESP32SIM

ESPTOOL = str(BIN / "esptool")


def image_info(path) -> str:
    proc = subprocess.run([ESPTOOL, "image-info", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@pytest.mark.parametrize(
    "kw",
    [{}, {"size": 200_000, "selfcheck_fail": True}, {"extra": b"hello rodata"}],
    ids=["plain", "padded-selfcheck-fail", "extra"],
)
def test_esptool_accepts_app_images_and_reads_their_description(tmp_path, kw):
    data = appimage.build_app_image("fleet-app", "2.3.4-rc1", **kw)
    path = tmp_path / "app.bin"
    path.write_bytes(data)
    out = image_info(path)
    assert "Detected image type: ESP32" in out
    assert "Chip ID: 0 (ESP32)" in out
    assert "Project name: fleet-app" in out
    assert "App version: 2.3.4-rc1" in out
    assert "Checksum: " in out and "(valid)" in out.split("Checksum: ")[1].splitlines()[0]
    digest = hashlib.sha256(data[:-32]).hexdigest()
    assert f"Validation hash: {digest} (valid)" in out
    assert "DROM" in out.split("Segments Information")[1]
    if "size" in kw:
        assert len(data) == kw["size"] + (-kw["size"] % 16)
    info = appimage.verify_image(data)
    assert info.app_desc.project_name == "fleet-app" and info.app_desc.version == "2.3.4-rc1"
    assert info.length == len(data)
    assert appimage.has_selfcheck_fail_marker(data, info) == bool(kw.get("selfcheck_fail"))


def test_esptool_accepts_the_bootloader_image(tmp_path):
    data = appimage.build_bootloader_image()
    path = tmp_path / "bootloader.bin"
    path.write_bytes(data)
    out = image_info(path)
    assert "Bootloader Information" in out and "Bootloader version: 1" in out
    assert "Validation hash: " in out and "(valid)" in out.split("Validation hash: ")[1].splitlines()[0]
    assert appimage.verify_image(data, offset=0x1000).app_desc is None


def test_same_inputs_make_the_same_bytes_and_versions_differ():
    a = appimage.build_app_image("p", "1.0.0", size=65536)
    assert a == appimage.build_app_image("p", "1.0.0", size=65536)
    assert a != appimage.build_app_image("p", "1.0.1", size=65536)
    with pytest.raises(ValueError, match="longer than 31"):
        appimage.build_app_image("p", "v" * 32)


def _resign(data: bytearray) -> bytes:
    """Recompute the appended SHA-256 (as a corrupted-but-rehashed image would have)."""
    data[-32:] = hashlib.sha256(bytes(data[:-32])).digest()
    return bytes(data)


def test_verification_refuses_what_esp_image_verify_refuses():
    good = bytearray(appimage.build_app_image("p", "1.0.0"))
    cases = {
        "invalid magic": bytes([0xE8]) + bytes(good[1:]),
        "mismatch chip ID": appimage.build_app_image("p", "1.0.0", chip_id=9),
        # one bit of segment data: the checksum is checked before the hash
        "Checksum failed": bytes(good[:100]) + bytes([good[100] ^ 1]) + bytes(good[101:]),
        # a padding byte is covered by the hash only
        "Image hash failed": bytes(good[:-34]) + bytes([good[-34] ^ 1]) + bytes(good[-33:]),
        "runs past the end": bytes(good[:600]),
    }
    bad_count = bytearray(good)
    bad_count[1] = 17
    cases["segment count 17 exceeds"] = bytes(bad_count)
    odd = bytearray(good)
    struct.pack_into("<I", odd, 24 + 4, struct.unpack_from("<I", odd, 28)[0] + 2)
    cases["invalid segment length"] = _resign(odd)
    for reason, data in cases.items():
        with pytest.raises(appimage.ImageError, match=reason):
            appimage.verify_image(data)
    with pytest.raises(appimage.ImageError, match="doesn't fit in partition"):
        appimage.verify_image(bytes(good), part_size=len(good) - 32)
    # The header check esp_https_ota makes on the first bytes.
    assert appimage.check_header(bytes(good[:288])).project_name == "p"
    with pytest.raises(appimage.ImageError, match="mismatch chip ID"):
        appimage.check_header(appimage.build_app_image("p", "1", chip_id=9)[:288])


def test_cli_builds_images_esptool_reads(tmp_path):
    app, boot = tmp_path / "a.bin", tmp_path / "b.bin"
    run = [ESP32SIM, "image", "app", "--project", "lab-fw", "--version", "1.4.0", "--out", str(app)]
    proc = subprocess.run([*run, "--selfcheck-fail", "--size", "65536"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert f"sha256 {hashlib.sha256(app.read_bytes()).hexdigest()}" in proc.stdout
    assert app.stat().st_size == 65536 and appimage.SELFCHECK_FAIL_MARKER in app.read_bytes()
    out = image_info(app)
    assert "Project name: lab-fw" in out and "App version: 1.4.0" in out
    proc = subprocess.run(
        [ESP32SIM, "image", "bootloader", "--out", str(boot)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert "Bootloader Information" in image_info(boot)
    proc = subprocess.run([*run[:-2], "--out", str(app), "--size", "10"], capture_output=True, text=True)
    assert proc.returncode == 2 and "without padding" in proc.stderr


def test_partition_table_is_read_back_by_the_twin():
    table = appimage.build_partition_table()

    class Flash:
        def read(self, addr, n):
            return table[addr - 0x8000 : addr - 0x8000 + n]

    parts = read_partition_table(Flash())
    assert parts["ota_1"] == (0x00, 0x11, 0x190000, 0x180000)
    assert parts["otadata"] == (0x01, 0x00, 0x310000, 0x2000)
