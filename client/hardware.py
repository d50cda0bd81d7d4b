"""What this machine offers, in the shape ``register`` wants: cores, RAM, CUDA GPUs; and how
busy it is, in the shape ``heartbeat`` and ``task_progress`` carry (:class:`UtilizationProbe`).

The parsing helpers take text so they are testable without the files; :func:`detect` reads
the real ``/proc`` files (falling back to ``os`` where there is no ``/proc``) and asks torch
about CUDA GPUs.
"""

from __future__ import annotations

import contextlib
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


def cuda_utilization() -> list[dict[str, Any]]:
    """``[{"id", "utilization", "memory_used"}]`` (percent, MiB) for every CUDA device torch
    sees; empty without CUDA, or when the driver's management library (NVML, which torch asks
    through the ``pynvml`` module) cannot answer. No CUDA context is created."""
    try:
        import torch

        if not torch.cuda.is_available():
            return []
        gpus = []
        for index in range(torch.cuda.device_count()):
            entry: dict[str, Any] = {"id": index, "utilization": float(torch.cuda.utilization(index))}
            with contextlib.suppress(Exception):  # utilization without memory is still worth reporting
                entry["memory_used"] = round(torch.cuda.device_memory_used(index) / 2**20)
            gpus.append(entry)
        return gpus
    except Exception as error:
        log.debug("cannot read CUDA GPU utilization: %s", error)
        return []


class UtilizationProbe:
    """This machine's CPU and RAM use (psutil, when installed) and its CUDA GPUs' (torch, only
    with ``include_gpus``), as ``{"cpu_utilization", "ram_utilization", "gpu_utilization"}``;
    what cannot be measured is left out. CPU use is over the time since the previous sample."""

    def __init__(self, *, include_gpus: bool) -> None:
        self.include_gpus = include_gpus
        try:
            import psutil
        except ImportError:
            log.info("psutil is not installed: CPU and RAM use are not reported")
            self._psutil: Any = None
        else:
            self._psutil = psutil
            psutil.cpu_percent(interval=None)  # the start of the first interval

    def sample(self) -> dict[str, Any]:
        report: dict[str, Any] = {}
        if self._psutil is not None:
            report["cpu_utilization"] = round(min(100.0, self._psutil.cpu_percent(interval=None)), 1)
            report["ram_utilization"] = round(min(100.0, self._psutil.virtual_memory().percent), 1)
        if self.include_gpus and (gpus := cuda_utilization()):
            report["gpu_utilization"] = gpus
        return report


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
