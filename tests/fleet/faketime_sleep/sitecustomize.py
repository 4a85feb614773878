"""Loaded (PYTHONPATH) by every Python process under the moving clock of
tests/fleet/test_fleet_two_years.py: time.sleep() as a select() timeout.

Debian 12's libfaketime 0.9.10 breaks time.sleep() when the monotonic clock is not faked
(FAKETIME_DONT_FAKE_MONOTONIC=1): CPython sleeps with clock_nanosleep(CLOCK_MONOTONIC,
TIMER_ABSTIME), and 0.9.10 shifts that absolute deadline by the fake offset, so the call fails with
EINVAL (fixed in libfaketime 0.9.11, wolfcw/libfaketime#426). Faking the monotonic clock instead
hangs every threading wait with a timeout (their deadline is handed to sem_clockwait unshifted).
select() takes a relative timeout, which libfaketime leaves alone. Nothing else changes: the clock
the process reads is still the moved one."""

import select
import time


def _sleep(seconds):
    if seconds < 0:
        raise ValueError("sleep length must be non-negative")
    select.select([], [], [], seconds)


time.sleep = _sleep
