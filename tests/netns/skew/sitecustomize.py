"""Loaded (through PYTHONPATH) only into daemons the fault suite runs under libfaketime.

libfaketime 0.9.10 told to leave the monotonic clock alone (FAKETIME_DONT_FAKE_MONOTONIC=1, as a
real skewed host's clock would be) fails `clock_nanosleep` with EINVAL, which Python's
`time.sleep` uses. This puts the same wait through `select`, which it leaves alone. It must not
change anything else: every other clock read goes through libfaketime untouched.
"""

import os
import select
import time

if "faketime" in os.environ.get("LD_PRELOAD", ""):

    def _sleep(seconds: float) -> None:
        if seconds < 0:
            raise ValueError("sleep length must be non-negative")
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            select.select([], [], [], left)

    time.sleep = _sleep
