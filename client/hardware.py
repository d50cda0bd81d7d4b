"""What this machine offers, in the shape ``register`` wants: cores, RAM, CUDA GPUs.

The parsing helpers take text so they are testable without the files; :func:`detect` reads
the real ``/proc`` files (falling back to ``os`` where there is no ``/proc``) and asks torch
about CUDA GPUs.
"""

from __future__ import annotations

import logging
import os
import platform
from pathlib import Path
from typing import Any

log = logging.getLogger("aifarm.client.hardware")

GIB = 1024**3


def cpu_cores() -> int:
    """Cores this process may run on (the affinity mask, as ``taskset``/cgroups set it), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def parse_cpu_model(cpuinfo: str) -> str | None:
    """The ``model name`` (x86) or ``Hardware``/``Model`` (ARM) line of ``/proc/cpuinfo`` text."""
    for key in ("model name", "Hardware", "Model", "cpu model"):
        for line in cpuinfo.splitlines():
            name, sep, value = line.partition(":")
            if sep and name.strip() == key and value.strip():
                return value.strip()
    return None


def cpu_model() -> str:
    try:
        found = parse_cpu_model(Path("/proc/cpuinfo").read_text(errors="replace"))
    except OSError:
        found = None
    return found or platform.processor() or platform.machine() or "unknown"


def parse_meminfo_total_gb(meminfo: str) -> float | None:
    """``MemTotal`` of ``/proc/meminfo`` text in GiB, or None if absent."""
    for line in meminfo.splitlines():
        if line.startswith("MemTotal:"):
            parts = line.split()
            if len(parts) >= 2 and parts[1].isdigit():
                unit = parts[2].lower() if len(parts) > 2 else "kb"
                scale = {"kb": 1024, "mb": 1024**2, "gb": 1024**3}.get(unit, 1)
                return int(parts[1]) * scale / GIB
    return None


def ram_total_gb() -> float:
    """Total RAM in GiB: ``/proc/meminfo``, else ``sysconf``; a small positive guess if neither works."""
    try:
        found = parse_meminfo_total_gb(Path("/proc/meminfo").read_text())
        if found:
            return found
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    except (AttributeError, ValueError, OSError):
        log.warning("cannot read the RAM size; reporting 1 GiB")
        return 1.0


def cuda_gpus() -> list[dict[str, Any]]:
    """``[{"name", "memory_gb"}]`` for every CUDA device torch sees; empty without CUDA."""
    try:
        import torch

        if not torch.cuda.is_available():
            return []
        gpus = []
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            gpus.append({"name": str(props.name), "memory_gb": round(props.total_memory / GIB, 2)})
        return gpus
    except Exception as error:  # a broken driver must not keep the client from running on CPU
        log.warning("cannot query CUDA GPUs: %s", error)
        return []


def detect(*, include_gpus: bool = True) -> dict[str, Any]:
    """``{"cpu_info", "ram_info", "gpu_info"}`` for ``register``.

    ``include_gpus=False`` reports no GPU (a client forced onto the CPU should not be sent
    work that needs one).
    """
    return {
        "cpu_info": {"cores": cpu_cores(), "model": cpu_model()},
        "ram_info": {"total_gb": round(ram_total_gb(), 2)},
        "gpu_info": cuda_gpus() if include_gpus else [],
    }
