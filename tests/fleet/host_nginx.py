"""The host's Debian nginx, taken over by a test and left as found (tests/ota_server, tests/fleet OTA).

There is one nginx per machine: a FileLock keeps two tests (xdist workers) from sharing it; /etc/nginx
is copied away and restored, the logs the test made are removed, nginx is stopped unless it ran before.
Tests that use it must give the ota_server role their own cert_dir, root and access log (paths()).
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

from filelock import FileLock

NGINX_ETC = Path("/etc/nginx")
NGINX_LOG = Path("/var/log/nginx")
INIT = "/etc/init.d/nginx"
LOCK = "/run/lock/esp32-fleet-nginx-test.lock"


def running() -> bool:
    return subprocess.run([INIT, "status"], capture_output=True, check=False).returncode == 0


def paths() -> dict:
    """ota_server role variables of test-only directories (unique per call)."""
    tag = uuid.uuid4().hex[:8]
    return {
        "ota_server_cert_dir": f"/etc/nginx/esp32-fleet-ota-test-{tag}",
        "ota_server_root": f"/var/lib/esp32-fleet-test-{tag}/ota",
        "ota_server_access_log": str(NGINX_LOG / f"esp32-fleet-ota-test-{tag}.access.log"),
    }


@contextlib.contextmanager
def taken_over(base: Path, role_vars: dict):
    """Hold the host's nginx for the block; restore it afterwards."""
    with FileLock(LOCK):
        backup = Path(tempfile.mkdtemp(prefix="nginx-etc-", dir=base))
        shutil.copytree(NGINX_ETC, backup / "nginx", symlinks=True)
        was_running = running()
        logs_before = set(NGINX_LOG.iterdir()) if NGINX_LOG.exists() else set()
        try:
            yield
        finally:
            subprocess.run([INIT, "stop"], capture_output=True, check=False)
            shutil.rmtree(NGINX_ETC)
            shutil.copytree(backup / "nginx", NGINX_ETC, symlinks=True)
            shutil.rmtree(Path(role_vars["ota_server_root"]).parent, ignore_errors=True)
            for log in set(NGINX_LOG.iterdir()) - logs_before if NGINX_LOG.exists() else ():
                log.unlink()
            if was_running:
                subprocess.run([INIT, "start"], capture_output=True, check=True)
