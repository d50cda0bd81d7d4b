"""This machine's CPU and RAM use, measured with psutil (``GET /api/metrics``)."""

from __future__ import annotations

import threading
import time

import psutil

WINDOW = 0.25  # seconds of a fresh measurement
MAX_AGE = 30.0  # a reading older than this is not "now": measure afresh

_lock = threading.Lock()
_last: float | None = None  # when this process last read the CPU times


def cpu_utilization() -> float:
    """The share of the host's CPU time that was busy (all cores, 0..100) since this process
    last asked, when that was between WINDOW and MAX_AGE seconds ago; otherwise over a fresh
    WINDOW (the call then sleeps that long, yielding under gevent).

    Busy and idle times come from the kernel's counters (``/proc/stat`` on Linux), compared
    between two readings: a measurement of utilization, not the load average."""
    global _last
    with _lock:
        if _last is None or not WINDOW <= time.monotonic() - _last <= MAX_AGE:
            psutil.cpu_percent(interval=None)  # the start of the window
            time.sleep(WINDOW)
        value = psutil.cpu_percent(interval=None)
        _last = time.monotonic()
    return round(min(100.0, max(0.0, value)), 1)


def ram_utilization() -> float:
    """Memory in use (total less available) as a percentage of the total."""
    return round(float(psutil.virtual_memory().percent), 1)
