"""What the REST API accepts. The OpenAPI document (app/openapi.py) is built from these tables,
so the documentation and the checks cannot drift apart.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from flask import request

import server_settings
from app.errors import ApiError
from store.models import CLIENT_STATUSES, FEDERATED, TASK_STATUSES
from training.spec import SpecError, normalize_federated_config, optional_seconds

# name -> (JSON type, minimum, maximum)
REQUIREMENT_FIELDS: dict[str, tuple[str, float, float]] = {
    "cpu_cores": ("integer", 0, 4096),
    "ram_gb": ("number", 0, 1_000_000),
    "gpu_count": ("integer", 0, 64),
    "gpu_memory_gb": ("number", 0, 100_000),
}
PRIORITY_RANGE = (-1000, 1000)
MAX_SHARDS = 1000
MAX_CONFIG_BYTES = 64 << 10
TASK_TYPE_RE = re.compile(r"^[A-Za-z0-9_.-]{1,255}$")
TASK_STATUS_TARGETS = ("paused", "running", "stopped")
CLIENT_STATUS_TARGETS = ("disabled", "enabled")
CLIENT_FILTERS = (*CLIENT_STATUSES, "disabled")
PER_PAGE_MAX = 100
INT64_MAX = 2**63 - 1  # BIGINT's bound (and SQLite's INTEGER's): no number past it reaches SQL
PAGE_MAX = INT64_MAX // PER_PAGE_MAX  # so that the offset (page - 1) * per_page stays in bounds


def json_object() -> dict[str, Any]:
    body = request.get_json(force=True, silent=True)
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    return body


def _number(value: Any, kind: str) -> bool:
    if isinstance(value, bool):
        return False
    if kind == "integer":  # as JSON Schema says: 3.0 is the integer 3
        return isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    return isinstance(value, (int, float)) and math.isfinite(value)


def requirements(raw: Any) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ApiError(400, "requirements must be an object")
    unknown = sorted(set(raw) - set(REQUIREMENT_FIELDS))
    if unknown:
        raise ApiError(
            400, f"unknown requirement(s): {', '.join(unknown)}; known: {', '.join(REQUIREMENT_FIELDS)}"
        )
    out: dict[str, Any] = {}
    for key, value in raw.items():
        kind, lo, hi = REQUIREMENT_FIELDS[key]
        if not _number(value, kind) or not lo <= value <= hi:
            raise ApiError(400, f"requirements.{key} must be an {kind} in {lo:g}..{hi:g}")
        out[key] = int(value) if kind == "integer" else value
    return out


def new_task(body: dict[str, Any], settings: server_settings.Settings) -> dict[str, Any]:
    """Validate a POST /api/tasks body; returns the fields of the new task."""
    unknown = sorted(set(body) - {"type", "requirements", "priority", "config"})
    if unknown:
        raise ApiError(400, f"unknown field(s): {', '.join(unknown)}")
    task_type = body.get("type")
    if not isinstance(task_type, str) or not TASK_TYPE_RE.match(task_type):
        raise ApiError(400, "type is required: a name of letters, digits, '_', '.', '-' (at most 255)")
    priority = body.get("priority", 0)
    if not _number(priority, "integer") or not PRIORITY_RANGE[0] <= priority <= PRIORITY_RANGE[1]:
        raise ApiError(400, f"priority must be an integer in {PRIORITY_RANGE[0]}..{PRIORITY_RANGE[1]}")
    raw_config = body.get("config", {})
    if raw_config is None:
        raw_config = {}
    if not isinstance(raw_config, dict):
        raise ApiError(400, "config must be an object")
    if len(json.dumps(raw_config)) > MAX_CONFIG_BYTES:
        raise ApiError(400, f"config is larger than {MAX_CONFIG_BYTES} bytes")
    if task_type == FEDERATED:
        try:
            task_config = normalize_federated_config(
                raw_config,
                default_batch_size=settings.DEFAULT_BATCH_SIZE,
                default_epochs=settings.DEFAULT_EPOCHS,
            )
        except SpecError as error:
            raise ApiError(400, str(error)) from None
    else:
        task_config = dict(raw_config)
        task_config.setdefault("num_shards", 1)
        try:
            optional_seconds(task_config, "deadline_s")
        except SpecError as error:
            raise ApiError(400, str(error)) from None
    shards = task_config["num_shards"]
    if not _number(shards, "integer") or not 1 <= shards <= MAX_SHARDS:
        raise ApiError(400, f"config.num_shards must be an integer in 1..{MAX_SHARDS}")
    shards = task_config["num_shards"] = int(shards)
    if shards > settings.MAX_CLIENTS:
        raise ApiError(
            400,
            f"config.num_shards={shards} needs that many clients at once; MAX_CLIENTS={settings.MAX_CLIENTS}",
        )
    return {
        "type": task_type,
        "requirements": requirements(body.get("requirements")),
        "priority": int(priority),
        "config": task_config,
        "num_shards": shards,
    }


def page_args() -> tuple[int, int]:
    try:
        page = int(request.args.get("page", "1"))
        per_page = int(request.args.get("per_page", "20"))
    except ValueError:
        raise ApiError(400, "page and per_page must be integers") from None
    if not 1 <= page <= PAGE_MAX or not 1 <= per_page <= PER_PAGE_MAX:
        raise ApiError(400, f"page must be in 1..{PAGE_MAX} and per_page in 1..{PER_PAGE_MAX}")
    return page, per_page


def choice_arg(name: str, allowed: tuple[str, ...]) -> str | None:
    value = request.args.get(name)
    if value is None or value == "":
        return None
    if value not in allowed:
        raise ApiError(400, f"{name} must be one of {', '.join(allowed)}")
    return value


def task_status_filter() -> str | None:
    return choice_arg("status", TASK_STATUSES)


def ids_in_bounds(endpoint: str | None, values: dict[str, Any] | None) -> None:
    """Before any view: an integer in the path (a task id, a round, a rank) beyond 64 bits names
    nothing, so it is a 404 here rather than an overflow in the database driver (a 500)."""
    for name, value in (values or {}).items():
        if isinstance(value, int) and value > INT64_MAX:
            raise ApiError(
                404, f"no {name.removesuffix('_no').replace('_id', '')} {value}: beyond 64 bits", "not_found"
            )
