# Copyright: esp32-mqtt-fleet contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Action plugin of esp32_fleet.mqtt_fleet.esp32_provision_board (documentation: plugins/modules/).

One task per board does what the esp32_provision role did in ~50: the controller's part (revocation
lookup, settings fingerprint, recorded certificate, key and certificate, NVS image) runs here, in
the controller's Python, with no module run; the board's part is one esptool session on its station
(the esp32_info or esp32_flash module, through the task's connection: delegate_to the station).

Every board is read first (esp32_info: chip, MAC, the board's own MD5 of its regions), so a wrong
board is refused before a key or certificate exists for it; an idempotent rerun ends there, having
written nothing. A board that needs something gets one more session (esp32_flash): compare, write
what differs, verify.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import os
import time

from ansible.plugins.action import ActionBase
from ansible_collections.esp32_fleet.mqtt_fleet.plugins.filter.esp32_fleet_revoked import (
    esp32_fleet_revocation,
)
from ansible_collections.esp32_fleet.mqtt_fleet.plugins.module_utils import esp32_image, pki_device
from ansible_collections.esp32_fleet.mqtt_fleet.plugins.module_utils import esp32_provision_plan as plan
from ansible_collections.esp32_fleet.mqtt_fleet.plugins.module_utils.esp32_errors import Esp32Error
from ansible_collections.esp32_fleet.mqtt_fleet.plugins.module_utils.esp32_nvsbuild import build as build_nvs
from ansible_collections.esp32_fleet.mqtt_fleet.plugins.module_utils.fleet_config_hash import (
    ConfigHashError,
    decide,
    ensure_key,
    keyed,
    read_key,
)

_INFO = "esp32_fleet.mqtt_fleet.esp32_info"
_FLASH = "esp32_fleet.mqtt_fleet.esp32_flash"
# Named in a failure's message (and so in the manifest row's reason): which session failed.
_STEP = {
    _INFO: "Read the board's chip facts and region MD5s",
    _FLASH: "Write the images to the board and verify them",
}

ARGUMENT_SPEC = dict(
    device_id=dict(type="str", required=True),
    port=dict(type="str", required=True),
    baud=dict(type="int", default=460800),
    chip=dict(type="str", default="esp32"),
    mac=dict(type="str", default=""),
    station=dict(type="str", default="localhost"),
    station_is_controller=dict(type="bool", default=True),
    station_ready=dict(type="bool", default=True),
    topic_root=dict(type="str", required=True),
    topic_root_broker=dict(type="str", required=True),
    previous=dict(type="dict", default={}),
    firmware=dict(
        type="list",
        elements="dict",
        default=[],
        options=dict(offset=dict(type="raw", required=True), path=dict(type="path", required=True)),
    ),
    nvs_offset=dict(type="int", required=True),
    nvs_size=dict(type="int", required=True),
    nvs_namespaces=dict(type="dict", required=True, no_log=True),
    ca_cert=dict(type="path", required=True),
    config_key_path=dict(type="path", required=True),
    config_settings=dict(type="dict", required=True),
    config_secrets=dict(type="dict", default={}, no_log=True),
    renew_days=dict(type="int", required=True),
    revoked_file=dict(type="path", required=True),
    pki_profile=dict(type="dict", required=True),
    pki_passphrase=dict(type="str", required=True, no_log=True),
    keep_key=dict(type="bool", default=False),
    revoke_replaced=dict(type="bool", default=True),
    ota_layout=dict(type="bool", default=True),
    ota_migrate=dict(type="bool", default=False),
)


class _Failure(Exception):
    def __init__(self, msg, **details):
        super().__init__(msg)
        self.msg = msg
        self.details = details


def _utcnow():
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0)


def _generated(offset, name, data):
    """An image made here (not a file): the partition table, the erased otadata."""
    return dict(
        offset=offset,
        path=None,
        data=data,
        name=name,
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        md5=hashlib.md5(data).hexdigest(),  # noqa: S324 - the board reports its regions' MD5
    )


def _checksums(path):
    sha, md5 = hashlib.sha256(), hashlib.md5()  # noqa: S324 - the board reports its regions' MD5
    with open(path, "rb") as handle:
        data = handle.read()
    sha.update(data)
    md5.update(data)
    return sha.hexdigest(), md5.hexdigest(), len(data)


class ActionModule(ActionBase):
    TRANSFERS_FILES = False
    _requires_connection = True

    def run(self, tmp=None, task_vars=None):
        result = super().run(tmp, task_vars)
        del tmp
        self._vars = task_vars or {}
        self._started = time.monotonic()
        args = self.validate_argument_spec(argument_spec=ARGUMENT_SPEC)[1]
        self._args = args
        self._row = {
            "device_id": args["device_id"],
            "host": self._vars.get("inventory_hostname", args["device_id"]),
            "mac": args["mac"].lower(),
            "chip": "",
            "port": args["port"],
            "station": args["station"],
            "firmware": [],
            "esptool_version": "",
            "config_sha256": "",
            "ca_sha256": "",
        }
        self._changed = False
        self._notes = []
        try:
            result.update(self._provision())
        except _Failure as exc:
            result.update(failed=True, msg=exc.msg, **exc.details)
        except (Esp32Error, ConfigHashError, pki_device.DeviceCertError, OSError) as exc:
            result.update(failed=True, msg=str(getattr(exc, "msg", exc)))
        finally:
            self._remove_tmp_path(self._connection._shell.tmpdir)
        result["changed"] = self._changed or result.get("changed", False)
        if self._notes:
            result["warnings"] = [f"{args['device_id']}: {note}" for note in self._notes]
        result["row"] = self._finish_row(result)
        return result

    # -- the steps -------------------------------------------------------------------------------

    def _provision(self):
        args = self._args
        check = bool(self._play_context.check_mode)
        if args["topic_root"] != args["topic_root_broker"]:
            raise _Failure(
                f"esp32_provision_topic_prefix gives the topic root {args['topic_root']} but is not among "
                "the board's inventory variables, so the broker's ACL would grant "
                f"{args['topic_root_broker']}/# instead: set it in group_vars of the devices (or all), "
                "or with -e, not in play vars or role parameters"
            )
        revoked = esp32_fleet_revocation(
            args["device_id"], args["pki_profile"]["devices_dir"], args["revoked_file"]
        )
        if revoked:
            self._row.update(
                cert_serial=str(revoked.get("serial_number", "")),
                result="revoked",
                reason=(
                    f"certificate revoked {revoked.get('revocation_date', '')} ({revoked.get('reason', '')});"
                    " not provisioned"
                ),
            )
            return {"reasons": []}
        firmware = self._firmware()
        self._trust_bundle(check)
        config_matches = self._fingerprint(check)
        previous = args["previous"]
        now = _utcnow()
        recorded = self._recorded_cert(previous)
        reasons = plan.credential_reasons(previous, config_matches, recorded, args["renew_days"], now)
        if reasons and not check:
            # The controller knows the board needs credentials: one session compares, writes and
            # verifies (a wrong board is refused there before anything is written, and the
            # credentials issued in memory for it are dropped).
            return self._write_credentials(reasons, firmware, previous)
        board = self._read_board(firmware, check)
        reasons = plan.credential_reasons(
            previous,
            config_matches,
            recorded,
            args["renew_days"],
            now,
            board={"mac": board["mac"], "nvs_md5": board["regions"][0]["md5"]},
        )
        fw_reasons = plan.firmware_reasons(firmware, [r["md5"] for r in board["regions"][1:]])
        if check:
            return self._preview(reasons, fw_reasons, previous)
        if reasons:
            return self._write_credentials(reasons, firmware, previous)
        if fw_reasons:
            flashed = self._flash(firmware, nvs=None)
            self._row.update(
                plan.recorded_credentials(previous), result="provisioned", reason="; ".join(fw_reasons)
            )
            return {"reasons": fw_reasons, "images": flashed["images"]}
        self._row.update(
            plan.recorded_credentials(previous),
            result="unchanged",
            reason="board holds the recorded credentials",
        )
        return {"reasons": []}

    def _firmware(self):
        """The images of the board's flash besides NVS: the firmware files, the two-OTA partition
        table and erased otadata when the layout goes down (plan.ota_layout), without the app slots
        of a board whose app came over the air."""
        args = self._args
        previous = args["previous"]
        images, missing = [], []
        for spec in args["firmware"]:
            path = spec["path"]
            if not os.path.isfile(path):
                missing.append(path)
                continue
            sha256, md5, size = _checksums(path)
            offset = spec["offset"]
            offset = int(offset, 0) if isinstance(offset, str) else int(offset)
            images.append(
                dict(offset=offset, path=path, name=os.path.basename(path), size=size, sha256=sha256, md5=md5)
            )
        if missing:
            raise _Failure(f"Missing firmware image(s): {missing}")
        layout, with_otadata, self._notes = plan.ota_layout(
            {i["offset"] for i in images}, previous, args["ota_layout"], args["ota_migrate"]
        )
        version, source = self._app_version(images, previous)
        if plan.field_managed(previous):
            kept = [i for i in images if not esp32_image.in_app_slot(i["offset"])]
            if len(kept) < len(images):
                self._notes.append(
                    f"app slots left as they are: the board runs {version or 'an app'} from an OTA rollout"
                )
            images = kept
        if layout == "ota":
            nvs = esp32_image.partition("nvs")
            if (args["nvs_offset"], args["nvs_size"]) != nvs:
                raise _Failure(
                    "esp32_provision_nvs_offset/esp32_provision_nvs_size must be the two-OTA partition "
                    f"table's nvs ({nvs[0]:#x}, {nvs[1]:#x}), got ({args['nvs_offset']:#x}, "
                    f"{args['nvs_size']:#x}); or set esp32_provision_ota_layout: false"
                )
            images.append(
                _generated(
                    esp32_image.PARTITION_TABLE_OFFSET, "partition-table.bin", esp32_image.partition_table()
                )
            )
            if with_otadata:
                offset, blank = esp32_image.ota_data_initial()
                images.append(_generated(offset, "ota_data_initial.bin", blank))
        images.sort(key=lambda image: image["offset"])
        self._row.update(
            firmware=plan.firmware_row(images),
            layout=layout,
            firmware_version=version,
            firmware_source=source,
        )
        return images

    @staticmethod
    def _app_version(images, previous):
        """(version, source) of the app the board will run: the app description of the image in
        ota_0, else what the board's record says (credentials only, or an app from OTA)."""
        if plan.field_managed(previous):
            return str(previous.get("firmware_version", "")), "ota"
        for image in images:
            if image["offset"] == plan.OTA_0:
                try:
                    return esp32_image.read_app_image(image["path"])["version"], "station"
                except esp32_image.ImageError:
                    return "", "station"  # not an ESP-IDF app (no app description): no version
        return str(previous.get("firmware_version", "") or ""), str(previous.get("firmware_source", "") or "")

    def _trust_bundle(self, check):
        """The SHA-256 of the CA bundle written into NVS: in the row and in the settings fingerprint."""
        try:
            with open(self._args["ca_cert"], "rb") as handle:
                data = handle.read()
        except FileNotFoundError:
            if not check:  # on a fresh controller in check mode every board then "would provision"
                raise _Failure(
                    f"{self._args['ca_cert']} does not exist: run playbooks/pki.yml first"
                ) from None
            data = None
        digest = hashlib.sha256(data or b"").hexdigest()
        self._args["config_settings"] = dict(self._args["config_settings"], ca_sha256=digest)
        self._row["ca_sha256"] = digest if data is not None else ""

    def _fingerprint(self, check):
        """The keyed settings fingerprint (the key stays on the controller): does it match the record?"""
        args = self._args
        path = args["config_key_path"]
        if check:
            key = read_key(path)
        else:
            key, created = ensure_key(path)
            self._changed |= created
        recorded = str(args["previous"].get("config_sha256", "") or "")
        matches, _style = decide(recorded, args["config_settings"], args["config_secrets"], key)
        self._row["config_sha256"] = (
            keyed(key, args["config_settings"], args["config_secrets"]) if key else ""
        )
        return matches

    def _recorded_cert(self, previous):
        if not str(previous.get("cert_serial", "") or ""):
            return None
        path = os.path.join(self._args["pki_profile"]["devices_dir"], self._args["device_id"] + ".crt")
        cert = pki_device.read_certificate(path)
        if cert is None:
            return None
        return {"serial_number": cert.serial_number, "not_after": cert.not_valid_after_utc}

    def _read_board(self, firmware, check):
        """Chip facts and the board's own MD5 of the NVS partition and of each firmware region."""
        args = self._args
        regions = [{"offset": args["nvs_offset"], "size": args["nvs_size"]}]
        regions += [{"offset": fw["offset"], "size": fw["size"]} for fw in firmware]
        standin = None
        if not args["station_ready"]:
            standin = "station venv"
        else:
            res = self._station(_INFO, dict(md5_regions=regions), allow_missing_port=check)
            if res is None:
                standin = f"port {args['port']}"
        if standin is not None:
            # Check mode on a station that cannot be read yet: unknown contents, every region differs.
            board = dict(
                mac=self._row["mac"],
                chip=args["chip"],
                description=f"{args['chip'].upper()} ({standin} absent in check mode)",
                regions=[{"md5": ""}] * len(regions),
            )
        else:
            board = res
        self._check_board(board)
        return board

    def _check_board(self, board):
        args = self._args
        self._row.update(mac=board["mac"].lower(), chip=board.get("description") or board.get("chip", ""))
        pin = args["mac"].lower()
        if pin and board["mac"].lower() != pin:
            raise self._mac_mismatch(board["mac"], pin)
        if board.get("chip", "").lower().replace("-", "") != args["chip"].lower():
            raise _Failure(
                f"Chip mismatch: {args['port']} holds {board.get('description') or board.get('chip')}, "
                f"the fleet is built for {args['chip']}"
            )

    def _preview(self, reasons, fw_reasons, previous):
        device = self._args["device_id"]
        if reasons:
            self._changed = True
            self._row.update(
                result="provisioned", reason="check mode, would provision: " + "; ".join(reasons)
            )
            msg = f"check mode: {device} would get new credentials ({'; '.join(reasons + fw_reasons)})"
        elif fw_reasons:
            self._changed = True
            self._row.update(
                plan.recorded_credentials(previous),
                result="provisioned",
                reason="check mode, would write: " + "; ".join(fw_reasons),
            )
            msg = f"check mode: {device} would get {'; '.join(fw_reasons)}"
        else:
            self._row.update(
                plan.recorded_credentials(previous),
                result="unchanged",
                reason="board holds the recorded credentials",
            )
            msg = f"{device}: board holds the recorded credentials"
        # Shown for every board in check mode, as ansible.builtin.debug shows its message.
        out = {"reasons": reasons + fw_reasons, "msg": msg, "_ansible_verbose_always": True}
        if self._play_context.diff and (reasons or fw_reasons):
            out["diff"] = dict(
                before_header=f"{device} (recorded)",
                after_header=f"{device} (this run)",
                before="".join(f"{k}: {previous.get(k, '')}\n" for k in ("cert_serial", "nvs_md5", "mac")),
                after="".join(f"{r}\n" for r in reasons + fw_reasons),
            )
        return out

    def _write_credentials(self, reasons, firmware, previous):
        """Issue (or keep) the key and certificate in memory, build the NVS image in memory, write
        and verify it with the firmware; then record the certificate (and the key, if kept) on the
        controller and name the certificate to revoke.

        A session that wrote nothing (wrong board, chip refused, port gone) leaves no new key or
        certificate anywhere. One that wrote part of an image may have left the key on the board:
        its key and certificate are recorded, so the rerun flashes the same credentials."""
        args = self._args
        creds = pki_device.issue(args["device_id"], args["pki_profile"], args["pki_passphrase"])
        image = build_nvs(self._with_credentials(creds), args["nvs_size"], 2)
        try:
            flashed = self._flash(firmware, nvs=image)
        except _Failure as exc:
            if exc.details.get("touched"):
                creds.persist(args["pki_profile"], keep_key=True)
                self._changed |= creds.changed
            raise
        # Only after a verified flash: until then the board still needs its old credentials.
        creds.persist(args["pki_profile"], keep_key=args["keep_key"])
        self._changed |= creds.changed
        cert = creds.facts()
        moved = previous and str(previous.get("mac", "")).lower() != self._row["mac"]
        if moved and "another board on this port" not in reasons:
            reasons = ["another board on this port", *reasons]
        self._row.update(
            cert_serial=str(cert["serial_number"]),
            cert_sha256=cert["sha256_fingerprint"],
            cert_not_after=cert["not_after"],
            nvs_sha256=hashlib.sha256(image).hexdigest(),
            nvs_md5=hashlib.md5(image).hexdigest(),  # noqa: S324 - the board reports MD5
            result="provisioned" if flashed["changed"] else "unchanged",
            reason="; ".join(reasons + flashed["firmware_reasons"]),
        )
        out = {"reasons": reasons, "images": flashed["images"], "cert": cert}
        revoke = plan.revocation(previous, cert["serial_number"], args["device_id"], args["revoke_replaced"])
        if revoke:
            out["revoke"] = revoke
        return out

    def _with_credentials(self, creds):
        """The NVS namespaces with the key and certificate files replaced by the issued PEM text (the
        same NVS strings the files would give)."""
        pems = {creds.key_path: creds.key_pem().decode(), creds.cert_path: creds.cert_pem().decode()}
        out = {}
        for ns, entries in self._args["nvs_namespaces"].items():
            out[ns] = {}
            for key, value in entries.items():
                if isinstance(value, dict) and value.get("file") in pems:
                    value = {"type": "string", "value": pems[value["file"]]}
                out[ns][key] = value
        return out

    def _flash(self, firmware, nvs):
        """One esp32_flash session: compare every image with the board, write what differs, verify."""
        args = self._args
        images = []
        if nvs is not None:
            images.append({"offset": args["nvs_offset"], "content_b64": base64.b64encode(nvs).decode()})
        for fw in firmware:
            if fw.get("data") is not None:
                images.append({"offset": fw["offset"], "content_b64": base64.b64encode(fw["data"]).decode()})
            elif args["station_is_controller"]:
                images.append({"offset": fw["offset"], "path": fw["path"]})
            else:  # a remote station gets the bytes inside the module's arguments: nothing staged
                with open(fw["path"], "rb") as handle:
                    images.append(
                        {"offset": fw["offset"], "content_b64": base64.b64encode(handle.read()).decode()}
                    )
        res = self._station(_FLASH, dict(images=images, expected_mac=self._row["mac"] or None, verify=True))
        self._changed |= bool(res.get("changed"))
        self._row.update(mac=res["mac"].lower(), chip=res.get("description") or res.get("chip", ""))
        reports = res.get("images", [])
        fw_reports = reports[1:] if nvs is not None else reports
        written = [
            f"firmware {fw['name']} differs"
            for fw, rep in zip(firmware, fw_reports, strict=False)
            if rep.get("status") == "written"
        ]
        return {
            "changed": bool(res.get("changed")),
            "images": reports,
            "firmware_reasons": written if nvs is not None else [],
        }

    def _station(self, module, module_args, allow_missing_port=False):
        """Run one esptool module on the station; its failure becomes this board's failure."""
        args = self._args
        module_args = dict(module_args, port=args["port"], baud=args["baud"], chip=args["chip"])
        res = self._execute_module(module_name=module, module_args=module_args, task_vars=self._vars)
        res.pop("invocation", None)
        if res.get("esptool_version"):
            self._row["esptool_version"] = res["esptool_version"]
        if res.get("failed"):
            if allow_missing_port and res.get("kind") == "port_missing" and "://" not in args["port"]:
                return None
            if res.get("kind") == "mac_mismatch" and res.get("mac"):
                raise self._mac_mismatch(res["mac"], self._row["mac"])
            details = {k: res[k] for k in ("kind", "log", "images") if k in res}
            # An image whose write started may be partly on the board (a pulled cable mid-write).
            details["touched"] = any(
                i.get("status") in ("written", "failed", "verify_failed") for i in res.get("images", [])
            )
            self._changed |= bool(res.get("changed"))
            raise _Failure(f"{_STEP[module]}: {res.get('msg', 'failed')}", **details)
        return res

    def _mac_mismatch(self, seen, expected):
        args = self._args
        return _Failure(
            f"MAC mismatch: {args['port']} on {args['station']} answers with {seen}, the inventory "
            f"pins {expected} (wrong board on this port?)",
            kind="mac_mismatch",
        )

    def _finish_row(self, result):
        row = dict(self._row)
        row["timestamp"] = _utcnow().strftime("%Y-%m-%dT%H:%M:%SZ")
        row["seconds"] = f"{time.monotonic() - self._started:.2f}"
        if result.get("failed"):
            row.update(
                result="failed", reason=str(result.get("msg", "failed")).split("\n", maxsplit=1)[0][:300]
            )
        return row
