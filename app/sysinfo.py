"""This machine's CPU and RAM use from /proc (no extra dependency)."""

from __future__ import annotations

import os


def cpu_utilization() -> float:
    """One-minute load average as a percentage of the cores, capped at 100."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        return 0.0
    return round(min(100.0, 100.0 * load / (os.cpu_count() or 1)), 1)


def ram_utilization() -> float:
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) for line in f if ":" in line}
        total, available = info["MemTotal"], info["MemAvailable"]
    except (OSError, KeyError, ValueError, IndexError):
        return 0.0
    return round(100.0 * (total - available) / total, 1)
