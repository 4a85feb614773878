"""One exclusive lock for read-modify-write of shared files by concurrent ansible-playbook runs.

An fcntl.flock on a lock file next to the files it guards, held until the ``with`` block ends or the
process dies (the kernel releases it, so a killed run never leaves a stale lock). fleet_manifest.py
holds it around the manifest, the pki role's pki_crl module around the revocation list and the CRL.
Standard library only.
"""

import contextlib
import os

try:
    import fcntl
except ImportError:  # pragma: no cover - not on POSIX
    fcntl = None


@contextlib.contextmanager
def exclusive_lock(lock_path, mode=0o644):
    """Hold an exclusive lock on ``lock_path`` (created with ``mode`` when missing) inside the block."""
    fd = os.open(lock_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, mode)
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        # Closing the descriptor releases the lock.
        os.close(fd)
