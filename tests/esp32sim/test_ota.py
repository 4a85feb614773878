"""OTA conformance of the firmware twin (docs/device-protocol.md section 7, ESP-IDF's
esp_https_ota + a bootloader with CONFIG_BOOTLOADER_APP_ROLLBACK_ENABLE): a real Mosquitto, a real
HTTPS server that requires a client certificate of the fleet CA, the test playing the controller."""

import datetime
import hashlib
import http.server
import ssl
import struct
import threading

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from esp32sim import appimage, ota
from esp32sim.firmware import Firmware
from esp32sim.nvs import parse_nvs

from .fw_harness import Broker, Client, Pki, make_flash, pem, pem_key

PROJECT = "fleet-app"
OTADATA = 0x310000
OTA_0, OTA_1, SLOT = 0x10000, 0x190000, 0x180000
# esp_rom_crc32_le(UINT32_MAX, &ota_seq, 4) for ota_seq 1 and 2, printed by ESP-IDF's own C
# implementation (components/esp_rom/linux/esp_rom_crc.c, esp-idf 102122904a, built with gcc).
IDF_CRC = {1: 0x4743989A, 2: 0x55F63774}


@pytest.fixture(scope="module")
def pki():
    return Pki()


@pytest.fixture(scope="module")
def broker(tmp_path_factory, pki):
    b = Broker(tmp_path_factory.mktemp("ota-broker"), pki)
    yield b
    b.stop()


@pytest.fixture
def controller(broker, pki):
    c = Client(broker, pki.controller, cn="fleet-pki")
    yield c
    c.close()


class ImageServer:
    """HTTPS with a client certificate of the fleet CA required (what nginx does in production)."""

    def __init__(self, directory, pki, cert_pem=None, key_pem=None):
        self.files, self.requests, self.after = {}, [], {}
        (directory / "srv.crt").write_text(cert_pem or pem(pki.server))
        (directory / "srv.key").write_text(key_pem or pem_key(pki.server_key))
        (directory / "srv.key").chmod(0o600)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(directory / "srv.crt", directory / "srv.key")
        ctx.load_verify_locations(cadata=pki.ca.pem)
        ctx.verify_mode = ssl.CERT_REQUIRED
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                peer = self.connection.getpeercert()
                cn = dict(x[0] for x in peer["subject"])["commonName"]
                server.requests.append((self.path, cn))
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                self.wfile.flush()
                if self.path in server.after:
                    server.after.pop(self.path)()

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def add(self, name, data, host="localhost"):
        self.files[f"/ota/{name}"] = data
        return f"https://{host}:{self.port}/ota/{name}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def server(tmp_path_factory, pki):
    s = ImageServer(tmp_path_factory.mktemp("ota-server"), pki)
    yield s
    s.close()


class Boards:
    def __init__(self, tmp_path, broker, pki, name):
        self.tmp, self.broker, self.pki = tmp_path, broker, pki
        self.tag = hashlib.sha256(name.encode()).hexdigest()[:6]
        self.n = 0
        self.running = []

    def provision(self, version="1.0.0", table=True):
        """A board as the station leaves it: bootloader, partition table, erased otadata, app v1."""
        self.n += 1
        device = f"esp32-ota-{self.tag}-{self.n}"
        key_pem, cert_pem, _ = self.pki.ca.client(device)
        extra = {0x10000: appimage.build_app_image(PROJECT, version)}
        if table:
            extra[0x1000] = appimage.build_bootloader_image()
            extra[0x8000] = appimage.build_partition_table()
        path = make_flash(self.tmp / f"{device}.flash", device, self.broker, cert_pem, key_pem, extra=extra)
        return device, path

    def boot(self, path, **kw):
        kw.setdefault("interval", 0.25)
        kw.setdefault("backoff_cap", 0.3)
        kw.setdefault("settle", 0.2)
        kw.setdefault("connect_timeout", 5.0)
        fw = Firmware(str(path), **kw)
        self.running.append(fw)
        return fw.start()

    def stop_all(self):
        for fw in self.running:
            fw.stop()
        for fw in self.running:
            assert not [e for e in fw.events if e["event"] == "panic"], fw.events


@pytest.fixture
def boards(tmp_path, broker, pki, request):
    b = Boards(tmp_path, broker, pki, request.node.name)
    yield b
    b.stop_all()


def otadata(path):
    raw = path.read_bytes()
    return [ota.Entry.unpack(raw[OTADATA + i * 0x1000 : OTADATA + i * 0x1000 + 32]) for i in (0, 1)]


def field(path):
    return parse_nvs(path.read_bytes()[0x312000:0x318000]).get("fleet", {})


def job_for(server, name, image, version, **over):
    job = {
        "v": 1,
        "job": hashlib.sha256(f"{name}{version}".encode()).hexdigest()[:24],
        "project": PROJECT,
        "version": version,
        "url": server.add(name, image),
        "sha256": hashlib.sha256(image).hexdigest(),
        "size": len(image),
    }
    return {**job, **over}


def report(controller, device, state, timeout=15, since=0):
    return controller.wait(f"devices/{device}/ota/report", lambda m: m["state"] == state, timeout, since)


def test_otadata_crc_is_esp_idfs():
    for seq, crc in IDF_CRC.items():
        assert ota.ota_select_crc(seq) == crc


def test_update_boots_the_new_image_marks_it_valid_and_reports(boards, controller, server):
    device, path = boards.provision()
    fw = boards.boot(path)
    root = f"devices/{device}"
    status = controller.wait(f"{root}/status", lambda m: m.get("online"))
    assert (status["fw"], status["slot"]) == ("1.0.0", "ota_0")
    # The bootloader's first boot of erased otadata: seq 1, VALID, in sector 0 (set_actual_ota_seq).
    first = otadata(path)[0]
    assert (first.seq, first.state, first.crc) == (1, ota.VALID, IDF_CRC[1])
    image = appimage.build_app_image(PROJECT, "2.0.0", size=300_000)
    job = job_for(server, "update.bin", image, "2.0.0")
    controller.publish(f"{root}/ota/job", job)
    done = report(controller, device, "updated")
    assert {k: v for k, v in done.items() if not k.startswith("_")} == {
        "v": 1, "job": job["job"], "state": "updated", "version": "2.0.0", "error": ""
    }  # fmt: skip
    assert report(controller, device, "downloading")["version"] == "1.0.0"
    assert ("/ota/update.bin", device) in server.requests  # the board's own client certificate
    fw.wait_for("ota-report", state="updated")
    assert path.read_bytes()[OTA_1 : OTA_1 + len(image)] == image
    e0, e1 = otadata(path)
    assert (e1.seq, e1.state, e1.crc) == (2, ota.VALID, IDF_CRC[2])
    assert (e0.seq, e0.state) == (1, ota.VALID)
    assert [e["event"] for e in fw.events if e["event"] in ("restart", "ota-valid")] == [
        "restart",
        "ota-valid",
    ]
    boot = [e for e in fw.events if e["event"] == "boot"][-1]
    assert (boot["fw"], boot["slot"], boot["ota_state"]) == ("2.0.0", "ota_1", "PENDING_VERIFY")
    assert field(path)["ota_done"] == job["job"] and "ota_job" not in field(path)
    status = controller.wait(f"{root}/status", lambda m: m.get("fw") == "2.0.0" and m.get("online"))
    assert status["slot"] == "ota_1"
    # After a plain reset the version still comes from the image in flash; the job is not redone.
    fw.stop()
    fw = boards.boot(path)
    boot = fw.wait_for("boot")
    assert (boot["fw"], boot["slot"], boot["ota_state"]) == ("2.0.0", "ota_1", "VALID")
    fw.wait_for("published", seq=3)
    assert not [e for e in fw.events if e["event"].startswith("ota-")]


def test_a_failing_self_check_rolls_back_to_the_previous_image(boards, controller, server):
    device, path = boards.provision()
    fw = boards.boot(path)
    image = appimage.build_app_image(PROJECT, "2.0.0-bad", selfcheck_fail=True)
    job = job_for(server, "bad.bin", image, "2.0.0-bad")
    controller.publish(f"devices/{device}/ota/job", job)
    back = report(controller, device, "rolled-back")
    assert (back["version"], back["job"]) == ("1.0.0", job["job"])
    assert back["error"] == "self-check failed on 2.0.0-bad"
    fw.wait_for("ota-report", state="rolled-back")
    e0, e1 = otadata(path)
    assert (e0.seq, e0.state, e1.seq, e1.state) == (1, ota.VALID, 2, ota.INVALID)
    boots = [(e["fw"], e["slot"]) for e in fw.events if e["event"] == "boot"]
    assert boots == [("1.0.0", "ota_0"), ("2.0.0-bad", "ota_1"), ("1.0.0", "ota_0")]
    status = controller.all(f"devices/{device}/status")[-1]  # published on connect, before the report
    assert (status["fw"], status["slot"]) == ("1.0.0", "ota_0")
    assert field(path)["ota_done"] == job["job"]


@pytest.mark.parametrize(
    "case, error",
    [
        ("sha256", "SHA-256 mismatch"),
        ("size", "size mismatch"),
        ("image-project", "image project 'other-app' is not the running app's 'fleet-app'"),
        ("job-project", "project 'other-app' is not the running app's 'fleet-app'"),
        ("chip", "mismatch chip ID, expected 0, found 9"),
        ("corrupt", "image verification failed: Checksum failed"),
        ("http", "download failed: HTTP 404"),
    ],
)
def test_a_bad_download_fails_and_changes_nothing(boards, controller, server, case, error):
    device, path = boards.provision()
    fw = boards.boot(path)
    fw.wait_for("published", seq=1)
    before = path.read_bytes()
    project = "other-app" if case == "image-project" else PROJECT
    image = appimage.build_app_image(project, "2.0.0", chip_id=9 if case == "chip" else 0)
    over = {
        "sha256": {"sha256": "0" * 64},
        "size": {"size": len(image) + 16},
        "job-project": {"project": "other-app"},
    }.get(case, {})
    if case == "corrupt":  # rehashed after the damage: only esp_ota_end's verification sees it
        image = bytearray(image)
        image[400] ^= 0xFF
        image = bytes(image)
    job = job_for(server, f"{case}.bin", image, "2.0.0", **over)
    if case == "http":
        job["url"] += ".missing"
    controller.publish(f"devices/{device}/ota/job", job)
    failed = report(controller, device, "failed")
    assert error in failed["error"] and failed["version"] == "1.0.0"
    fw.wait_for("ota-report", state="failed")
    after = path.read_bytes()
    assert after[OTA_0 : OTA_0 + SLOT] == before[OTA_0 : OTA_0 + SLOT]
    assert after[OTADATA : OTADATA + 0x2000] == before[OTADATA : OTADATA + 0x2000]
    if case in ("image-project", "job-project", "chip"):  # refused before the first write
        assert after[OTA_1 : OTA_1 + SLOT] == b"\xff" * SLOT
    assert not [e for e in fw.events if e["event"] == "restart"]
    assert field(path)["ota_done"] == job["job"] and "ota_job" not in field(path)


def _server_cert(pki, ca, names):
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    return pem(cert), pem_key(key)


@pytest.mark.parametrize("case", ["wrong-name", "rogue-ca"])
def test_the_image_server_certificate_is_checked(boards, controller, pki, tmp_path, case):
    """esp-tls: the server must chain to the board's trust bundle and carry the URL's host name."""
    ca, names = (pki.ca, ["ota.invalid"]) if case == "wrong-name" else (pki.rogue, ["localhost"])
    srv = ImageServer(tmp_path, pki, *_server_cert(pki, ca, names))
    try:
        device, path = boards.provision()
        fw = boards.boot(path)
        image = appimage.build_app_image(PROJECT, "2.0.0")
        job = job_for(srv, "x.bin", image, "2.0.0")
        controller.publish(f"devices/{device}/ota/job", job)
        failed = report(controller, device, "failed")
        assert "server certificate rejected" in failed["error"]
        why = "Hostname mismatch" if case == "wrong-name" else "unable to get local issuer certificate"
        assert why in failed["error"]
        assert not srv.requests
        fw.wait_for("ota-report", state="failed")
    finally:
        srv.close()


def test_power_loss_during_the_download_keeps_the_old_image_and_the_job_completes(boards, controller, server):
    device, path = boards.provision()
    fw = boards.boot(path, ota_power_loss=100_000)
    image = appimage.build_app_image(PROJECT, "2.1.0", size=250_000)
    job = job_for(server, "cut.bin", image, "2.1.0")
    controller.publish(f"devices/{device}/ota/job", job)
    lost = fw.wait_for("power-loss", timeout=15)
    assert lost["during"] == "OTA download after 100000 bytes" and fw.power_lost
    # The job survives the power cut in nvs_field; otadata still selects ota_0.
    done = report(controller, device, "updated", timeout=20)
    assert done["version"] == "2.1.0" and done["job"] == job["job"]
    boots = [(e["fw"], e["slot"]) for e in fw.events if e["event"] == "boot"]
    assert boots == [("1.0.0", "ota_0"), ("1.0.0", "ota_0"), ("2.1.0", "ota_1")]
    assert len([e for e in fw.events if e["event"] == "ota-start"]) == 2  # restarted from the top
    states = [m["state"] for m in controller.all(f"devices/{device}/ota/report")]
    assert states == ["downloading", "downloading", "updated"]  # nothing reported for the cut
    assert otadata(path)[1].state == ota.VALID


def test_a_reset_before_the_mark_valid_aborts_and_rolls_back(boards, controller, server, broker):
    device, path = boards.provision()
    fw = boards.boot(path, selfcheck_timeout=60)
    fw.wait_for("published", seq=1)
    image = appimage.build_app_image(PROJECT, "3.0.0")
    job = job_for(server, "abort.bin", image, "3.0.0")
    server.after["/ota/abort.bin"] = broker.stop  # the network goes right after the download
    try:
        controller.publish(f"devices/{device}/ota/job", job)
        boot = fw.wait_for("boot", slot="ota_1", timeout=15)
        assert boot["ota_state"] == "PENDING_VERIFY"
        fw.wait_for("connect-failed", since=fw.events.index(boot))
        fw.stop()  # reset (or power cut) while the new app has not marked itself valid
        assert otadata(path)[1].state == ota.PENDING_VERIFY
    finally:
        broker.start()
    fw = boards.boot(path)
    back = report(controller, device, "rolled-back", timeout=15)
    assert back["version"] == "1.0.0" and back["error"].startswith("self-check failed on 3.0.0")
    assert "ABORTED" in back["error"]
    notes = [e["note"] for e in fw.events if e["event"] == "bootloader"]
    assert any("PENDING_VERIFY: marked ABORTED" in n for n in notes)
    assert fw.wait_for("boot")["slot"] == "ota_0"
    assert otadata(path)[1].state == ota.ABORTED
    fw.wait_for("ota-report", state="rolled-back")
    assert field(path)["ota_done"] == job["job"]


def test_current_version_and_an_answered_job_is_ignored(boards, controller, server):
    device, path = boards.provision(version="1.0.0")
    fw = boards.boot(path)
    image = appimage.build_app_image(PROJECT, "1.0.0")
    job = job_for(server, "same.bin", image, "1.0.0")
    controller.publish(f"devices/{device}/ota/job", job)
    cur = report(controller, device, "current")
    assert (cur["job"], cur["version"], cur["error"]) == (job["job"], "1.0.0", "")
    fw.wait_for("ota-report", state="current")
    assert field(path)["ota_done"] == job["job"] and not server.requests.count(("/ota/same.bin", device))
    # The job is still retained: a reboot sees it again and leaves it alone.
    fw.stop()
    mark = controller.mark()
    fw = boards.boot(path)
    fw.wait_for("published", seq=4)
    assert not [e for e in fw.events if e["event"].startswith("ota-")]
    assert not controller.all(f"devices/{device}/ota/report", since=mark)


def test_a_legacy_board_without_a_partition_table_has_no_ota(boards, controller, server):
    device, path = boards.provision(table=False)
    fw = boards.boot(path)
    assert fw.wait_for("boot")["partition_table"] == "no"
    image = appimage.build_app_image(PROJECT, "2.0.0")
    job = job_for(server, "legacy.bin", image, "2.0.0")
    controller.publish(f"devices/{device}/ota/job", job)
    failed = report(controller, device, "failed")
    assert failed["error"] == "no OTA partitions"
    status = controller.wait(f"devices/{device}/status", lambda m: m.get("online"))
    assert status["fw"].startswith("esp32sim-") and "slot" not in status
    fw.wait_for("ota-report", state="failed")


def test_bootloader_falls_back_when_the_selected_image_is_damaged(tmp_path):
    """bootloader_utility_load_boot_image: an invalid selected slot is skipped, otadata untouched."""
    from esp32sim.device import Flash

    flash = Flash(str(tmp_path / "f.flash"))
    flash.program(0x8000, appimage.build_partition_table())
    flash.program(OTA_0, appimage.build_app_image(PROJECT, "1.0.0"))
    new = bytearray(appimage.build_app_image(PROJECT, "2.0.0"))
    new[-1] ^= 1  # the appended SHA-256 no longer matches
    flash.program(OTA_1, bytes(new))
    layout = ota.layout_from_table({"otadata": (1, 0, OTADATA, 0x2000), "ota_0": (0, 0x10, OTA_0, SLOT),
                                    "ota_1": (0, 0x11, OTA_1, SLOT)})  # fmt: skip
    first = ota.boot(flash, layout)
    assert first.slot == 0 and first.image.app_desc.version == "1.0.0"
    assert ota.set_boot_partition(flash, layout, 1) == (1, 2)
    second = ota.boot(flash, layout)
    assert second.slot == 0 and any("ota_1 is not bootable: Image hash failed" in n for n in second.notes)
    raw = flash.read(OTADATA + 0x1000, 32)
    assert struct.unpack_from("<I", raw, 24)[0] == ota.PENDING_VERIFY  # NEW -> PENDING_VERIFY happened
    flash.close()


def test_the_ota_power_loss_fault_is_a_firmware_fault_of_the_fleet(tmp_path):
    import argparse

    from esp32sim import fleet

    def args(*faults, firmware=True):
        return argparse.Namespace(
            count=2, dir=str(tmp_path), mac_base="24:0a:c4:00:00:01", baud_pacing=False,
            fault_board=list(faults), firmware=firmware, firmware_interval=5.0,
        )  # fmt: skip

    cfg = fleet.build_config(args("1:ota-power-loss=65536", "1:corrupt-block=2"))
    assert cfg["boards"][1]["firmware_faults"] == ["ota-power-loss=65536"]
    assert cfg["boards"][1]["faults"] == ["corrupt-block=2"]
    assert "firmware_faults" not in cfg["boards"][0]  # a fleet.json without the fault is unchanged
    with pytest.raises(ValueError, match="needs --firmware"):
        fleet.build_config(args("0:ota-power-loss=1", firmware=False))
    with pytest.raises(ValueError, match="needs a byte count"):
        fleet.build_config(args("0:ota-power-loss=lots"))
