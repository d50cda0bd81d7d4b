"""The WebSocket protocol: parse and validate client messages. No I/O here.

See docs/protocol.md. :func:`parse` turns a text frame into one of the message dataclasses
or raises :class:`ProtocolError` with an error code and a message naming the field.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, ClassVar, TypeGuard

from store.clients import Hardware
from training.version import VERSION_RE

CLIENT_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,255}$")
TASK_TYPE_RE = re.compile(r"^[A-Za-z0-9_.-]{1,255}$")
MAX_METRICS = 64
MAX_GPUS = 64
KNOWN_TYPES = "register, task_request, task_progress, task_result, heartbeat"
UTILIZATION_KEYS = ("cpu_utilization", "ram_utilization", "gpu_utilization")
GPU_UTILIZATION_KEYS = ("id", "utilization", "memory_used")
MAX_GPU_MEMORY_MIB = 10**9


class ProtocolError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def invalid(message: str) -> ProtocolError:
    return ProtocolError("invalid_message", message)


@dataclass(frozen=True)
class Register:
    TYPE: ClassVar[str] = "register"
    hardware: Hardware
    client_id: str | None
    token: str | None
    protocol_version: int | None = None
    client_version: str | None = None


@dataclass(frozen=True)
class TaskRequest:
    TYPE: ClassVar[str] = "task_request"
    client_id: str | None


@dataclass(frozen=True)
class TaskProgress:
    TYPE: ClassVar[str] = "task_progress"
    task_id: int
    round: int | None
    progress: float
    metrics: dict[str, Any]
    utilization: dict[str, Any] | None = None


@dataclass(frozen=True)
class TaskResult:
    TYPE: ClassVar[str] = "task_result"
    task_id: int
    round: int | None
    status: str
    metrics: dict[str, Any]
    error: str | None


@dataclass(frozen=True)
class Heartbeat:
    """A sign of life between tasks, with the client's resource use."""

    TYPE: ClassVar[str] = "heartbeat"
    utilization: dict[str, Any] | None


Message = Register | TaskRequest | TaskProgress | TaskResult | Heartbeat


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


def _number(value: Any) -> TypeGuard[int | float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _int_field(body: dict[str, Any], key: str, where: str, lo: int, hi: int, *, required: bool) -> int | None:
    value = body.get(key)
    if value is None:
        if required:
            raise invalid(f"{where}.{key} is required")
        return None
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(f"{where}.{key} must be an integer")
    if not lo <= value <= hi:
        raise invalid(f"{where}.{key} must be in {lo}..{hi}")
    return value


def _optional_str(body: dict[str, Any], key: str, where: str, max_len: int = 255) -> str | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value or len(value) > max_len:
        raise invalid(f"{where}.{key} must be a non-empty string of at most {max_len} characters")
    return value


def _metrics(body: dict[str, Any], where: str) -> dict[str, Any]:
    value = body.get("metrics", {})
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise invalid(f"{where}.metrics must be an object")
    if len(value) > MAX_METRICS:
        raise invalid(f"{where}.metrics has more than {MAX_METRICS} entries")
    for key, item in value.items():
        if len(key) > 64:
            raise invalid(f"{where}.metrics key {key[:16]!r}... is longer than 64 characters")
        if item is None or isinstance(item, bool) or _number(item):
            continue
        if isinstance(item, str) and len(item) <= 256:
            continue
        raise invalid(f"{where}.metrics.{key} must be a finite number, a boolean or a short string")
    return value


def _percent(value: Any, where: str) -> float:
    if not _number(value) or not 0 <= value <= 100:
        raise invalid(f"{where} must be a number in 0..100")
    return float(value)


def _unknown_keys(value: dict[str, Any], known: tuple[str, ...], where: str) -> None:
    unknown = sorted(str(k)[:32] for k in value if k not in known)
    if unknown:
        raise invalid(
            f"{where} has unknown keys {', '.join(unknown[:5])}; expected some of {', '.join(known)}"
        )


def _utilization(body: dict[str, Any], where: str) -> dict[str, Any] | None:
    """The optional ``utilization`` object: the client's CPU, RAM and GPU use, in percent."""
    value = body.get("utilization")
    if value is None:
        return None
    where = f"{where}.utilization"
    if not isinstance(value, dict):
        raise invalid(f"{where} must be an object")
    _unknown_keys(value, UTILIZATION_KEYS, where)
    out: dict[str, Any] = {}
    for key in ("cpu_utilization", "ram_utilization"):
        if key in value:
            out[key] = _percent(value[key], f"{where}.{key}")
    if "gpu_utilization" in value:
        gpus = value["gpu_utilization"]
        if not isinstance(gpus, list) or len(gpus) > MAX_GPUS:
            raise invalid(f"{where}.gpu_utilization must be a list of at most {MAX_GPUS} objects")
        seen: set[int] = set()
        out["gpu_utilization"] = []
        for i, gpu in enumerate(gpus):
            at = f"{where}.gpu_utilization[{i}]"
            if not isinstance(gpu, dict):
                raise invalid(f"{at} must be an object")
            _unknown_keys(gpu, GPU_UTILIZATION_KEYS, at)
            gpu_id = _int_field(gpu, "id", at, 0, MAX_GPUS - 1, required=True)
            assert gpu_id is not None
            if gpu_id in seen:
                raise invalid(f"{at}.id {gpu_id} appears twice")
            seen.add(gpu_id)
            entry: dict[str, Any] = {
                "id": gpu_id,
                "utilization": _percent(gpu.get("utilization"), f"{at}.utilization"),
            }
            if "memory_used" in gpu:
                memory = gpu["memory_used"]
                if not _number(memory) or not 0 <= memory <= MAX_GPU_MEMORY_MIB:
                    raise invalid(f"{at}.memory_used must be a number of MiB in 0..{MAX_GPU_MEMORY_MIB}")
                entry["memory_used"] = memory
            out["gpu_utilization"].append(entry)
    return out or None  # {} reports nothing


def _hardware(body: dict[str, Any]) -> Hardware:
    cpu, ram, gpus = body.get("cpu_info"), body.get("ram_info"), body.get("gpu_info", [])
    if not isinstance(cpu, dict):
        raise invalid("register.cpu_info must be an object")
    if not isinstance(ram, dict):
        raise invalid("register.ram_info must be an object")
    if gpus is None:
        gpus = []
    if not isinstance(gpus, list) or len(gpus) > MAX_GPUS:
        raise invalid(f"register.gpu_info must be a list of at most {MAX_GPUS} objects")
    cores = _int_field(cpu, "cores", "register.cpu_info", 1, 4096, required=True)
    total_gb = ram.get("total_gb")
    if not _number(total_gb) or not 0 < total_gb <= 1_000_000:
        raise invalid("register.ram_info.total_gb must be a number in (0, 1000000]")
    gpu_memory = 0.0
    for i, gpu in enumerate(gpus):
        if not isinstance(gpu, dict):
            raise invalid(f"register.gpu_info[{i}] must be an object")
        mem = gpu.get("memory_gb", 0)
        if not _number(mem) or not 0 <= mem <= 100_000:
            raise invalid(f"register.gpu_info[{i}].memory_gb must be a number in [0, 100000]")
        name = gpu.get("name", "")
        if not isinstance(name, str) or len(name) > 255:
            raise invalid(f"register.gpu_info[{i}].name must be a string of at most 255 characters")
        gpu_memory = max(gpu_memory, float(mem))
    types = body.get("task_types")
    if types is not None and (
        not isinstance(types, list)
        or len(types) > 32
        or not all(isinstance(t, str) and TASK_TYPE_RE.match(t) for t in types)
    ):
        raise invalid("register.task_types must be a list of at most 32 task type names")
    assert cores is not None
    return Hardware(
        cpu_info=cpu,
        ram_info=ram,
        gpu_info=gpus,
        cores=cores,
        ram_gb=float(total_gb),
        gpu_count=len(gpus),
        gpu_memory_gb=gpu_memory,
        task_types=types,
    )


def parse(frame: str | bytes) -> Message:
    """Parse one text frame. Raises :class:`ProtocolError`."""
    if isinstance(frame, bytes):
        raise ProtocolError("invalid_json", "binary frames are not accepted; send JSON text")
    try:
        body = json.loads(frame, parse_constant=_reject_constant)
    except ValueError as error:
        raise ProtocolError("invalid_json", f"not valid JSON: {error}") from None
    if not isinstance(body, dict):
        raise ProtocolError("invalid_json", "a message must be a JSON object")
    kind = body.get("type")
    if kind == "register":
        client_id = _optional_str(body, "client_id", "register")
        token = _optional_str(body, "token", "register")
        if (client_id is None) != (token is None):
            raise invalid("register.client_id and register.token come together (reconnect) or not at all")
        if client_id is not None and not CLIENT_ID_RE.match(client_id):
            raise invalid("register.client_id has characters outside [A-Za-z0-9._:-]")
        protocol_version = _int_field(body, "protocol_version", "register", 1, 1_000_000, required=False)
        client_version = _optional_str(body, "client_version", "register", max_len=32)
        if client_version is not None and not VERSION_RE.match(client_version):
            raise invalid("register.client_version must be a version of the form MAJOR.MINOR.PATCH")
        return Register(_hardware(body), client_id, token, protocol_version, client_version)
    if kind == "task_request":
        return TaskRequest(_optional_str(body, "client_id", "task_request"))
    if kind == "task_progress":
        progress = body.get("progress")
        if not _number(progress) or not 0 <= progress <= 100:
            raise invalid("task_progress.progress must be a number in 0..100")
        task_id = _int_field(body, "task_id", "task_progress", 1, 2**31 - 1, required=True)
        assert task_id is not None
        return TaskProgress(
            task_id=task_id,
            round=_int_field(body, "round", "task_progress", 0, 10**6, required=False),
            progress=float(progress),
            metrics=_metrics(body, "task_progress"),
            utilization=_utilization(body, "task_progress"),
        )
    if kind == "task_result":
        status = body.get("status")
        if status not in ("completed", "failed"):
            raise invalid("task_result.status must be 'completed' or 'failed'")
        task_id = _int_field(body, "task_id", "task_result", 1, 2**31 - 1, required=True)
        assert task_id is not None
        error_text = body.get("error")
        if error_text is not None and not isinstance(error_text, str):
            raise invalid("task_result.error must be a string")
        return TaskResult(
            task_id=task_id,
            round=_int_field(body, "round", "task_result", 0, 10**6, required=False),
            status=status,
            metrics=_metrics(body, "task_result"),
            error=error_text[:10_000] if error_text else None,
        )
    if kind == "heartbeat":
        return Heartbeat(_utilization(body, "heartbeat"))
    if kind is None:
        raise ProtocolError("unknown_type", "a message needs a 'type'")
    raise ProtocolError(
        "unknown_type",
        f"unknown message type {str(kind)[:64]!r}; expected one of: {KNOWN_TYPES}",
    )


def error(code: str, message: str) -> str:
    return json.dumps({"type": "error", "code": code, "message": message})
