"""What the REST API accepts: one declaration per body, query and path parameter.

Each is a pydantic type (a ``TypedDict``: a key left out stays out, and null is refused where the
document does not allow it). The same declaration validates the request, names the field at
fault in the error ({"error", "message", "field"}, app/declare.py), and gives the OpenAPI
document its request schemas (app/openapi.py: :func:`component_schemas`, :func:`query_parameters`),
so the document and the checks cannot drift apart. A ``federated_training`` config is checked
further by training/spec.py.
"""

from __future__ import annotations

import functools
import json
from typing import Annotated, Any, Literal, NotRequired, Required

from flask import current_app, request
from flask.json.provider import DefaultJSONProvider
from pydantic import AfterValidator, ConfigDict, Field, TypeAdapter, ValidationError, with_config
from typing_extensions import TypedDict  # pydantic needs this one before Python 3.12

import server_settings
from app.declare import Whole, explain, finite_float, nested_within, refuse_constant
from app.errors import ApiError
from store.auth import PANEL_PREFIX
from store.models import CLIENT_STATUSES, FEDERATED, TASK_STATUSES
from training.spec import SpecError, normalize_federated_config, optional_seconds

PRIORITY_RANGE = (-1000, 1000)
MAX_SHARDS = 1000
MAX_CONFIG_BYTES = 64 << 10
MAX_CONFIG_DEPTH = 16
TASK_TYPE_PATTERN = r"^[A-Za-z0-9_.-]{1,255}$"
TASK_STATUS_TARGETS = ("paused", "running", "stopped")
CLIENT_STATUS_TARGETS = ("disabled", "enabled")
CLIENT_FILTERS = (*CLIENT_STATUSES, "disabled")
PER_PAGE_MAX = 100
INT64_MAX = 2**63 - 1  # BIGINT's bound (and SQLite's INTEGER's): no number past it reaches SQL
PAGE_MAX = INT64_MAX // PER_PAGE_MAX  # so that the offset (page - 1) * per_page stays in bounds

BODY = ConfigDict(strict=True, allow_inf_nan=False, extra="forbid")
QUERY = ConfigDict(strict=False, extra="ignore")  # query values are text: "2" is the page 2


def _integer(lo: int, hi: int, what: str = "an integer") -> Any:
    return Annotated[int, Field(ge=lo, le=hi, description=f"{what} in {lo}..{hi}"), Whole]


def _number(lo: float, hi: float) -> Any:
    return Annotated[float, Field(ge=lo, le=hi, description=f"a number in {lo:g}..{hi:g}")]


@with_config(BODY)
class Requirements(TypedDict, total=False):
    """What a client must offer to get a shard of the task."""

    cpu_cores: _integer(0, 4096)  # type: ignore[valid-type]
    ram_gb: _number(0, 1_000_000)  # type: ignore[valid-type]
    gpu_count: _integer(0, 64)  # type: ignore[valid-type]
    gpu_memory_gb: _number(0, 100_000)  # type: ignore[valid-type]


TaskType = Annotated[
    str,
    Field(
        pattern=TASK_TYPE_PATTERN,
        description="a name of letters, digits, '_', '.', '-' (at most 255 characters)",
    ),
]
Priority = Annotated[
    int,
    Field(
        ge=PRIORITY_RANGE[0],
        le=PRIORITY_RANGE[1],
        description=f"an integer in {PRIORITY_RANGE[0]}..{PRIORITY_RANGE[1]} (higher runs first)",
        json_schema_extra={"default": 0},
    ),
    Whole,
]
TaskConfig = Annotated[
    dict[str, Any] | None,
    Field(
        description=f"an object: free-form for most types, at most {MAX_CONFIG_BYTES} bytes; num_shards "
        f"(1..{MAX_SHARDS}, at most MAX_CLIENTS) splits the task into ranks. For type '{FEDERATED}', "
        "see FederatedConfig"
    ),
]


@with_config(BODY)
class NewTask(TypedDict):
    """``POST /api/tasks``."""

    type: Required[TaskType]
    requirements: NotRequired[Annotated[Requirements | None, Field(description="an object of requirements")]]
    priority: NotRequired[Priority]
    config: NotRequired[TaskConfig]


@with_config(BODY)
class TaskStatusChange(TypedDict):
    """``PUT /api/tasks/{task_id}/status``."""

    status: Annotated[
        Literal["paused", "running", "stopped"], Field(description="one of " + ", ".join(TASK_STATUS_TARGETS))
    ]


@with_config(BODY)
class ClientStatusChange(TypedDict):
    """``PUT /api/clients/{client_id}/status``."""

    status: Annotated[
        Literal["disabled", "enabled"], Field(description="one of " + ", ".join(CLIENT_STATUS_TARGETS))
    ]


#: ``expires_in`` of a new admin token: at least a second, at most ten years.
EXPIRES_IN_MAX = 10 * 365 * 24 * 3600
LABEL_MAX = 255
#: What a label may not hold (C0 and C1 control characters: it is shown in lists and logs), and
#: the prefix kept for the panel's sign-ins (store/auth.py PANEL_PREFIX).
CONTROL_CHARS = "\u0000-\u001f\u007f-\u009f"


def _not_a_panel_label(label: str) -> str:
    if label.startswith(PANEL_PREFIX):
        raise ValueError(f"labels starting with {PANEL_PREFIX!r} are kept for panel sign-ins")
    return label


@with_config(BODY)
class NewToken(TypedDict, total=False):
    """``POST /api/tokens`` (an empty body is ``{}``)."""

    label: Annotated[
        str,
        Field(
            min_length=1,
            max_length=LABEL_MAX,
            pattern=f"^[^{CONTROL_CHARS}]*$",
            description=f"a string of 1..{LABEL_MAX} characters without control characters, "
            f"not starting with {PANEL_PREFIX!r}",
            json_schema_extra={"default": "api", "not": {"pattern": f"^{PANEL_PREFIX}"}},
        ),
        AfterValidator(_not_a_panel_label),
    ]
    expires_in: Annotated[
        int | None,
        Field(
            ge=1,
            le=EXPIRES_IN_MAX,
            description=f"an integer number of seconds in 1..{EXPIRES_IN_MAX}, or null: never expires",
        ),
        Whole,
    ]


NonEmpty = Annotated[str, Field(min_length=1, max_length=1024, description="a non-empty string")]


@with_config(BODY)
class SignIn(TypedDict):
    """``POST /admin/login``."""

    username: NonEmpty
    password: NonEmpty


@with_config(QUERY)
class PageQuery(TypedDict, total=False):
    page: Annotated[int, Field(ge=1, le=PAGE_MAX, description=f"an integer in 1..{PAGE_MAX}"), Whole]
    per_page: Annotated[
        int, Field(ge=1, le=PER_PAGE_MAX, description=f"an integer in 1..{PER_PAGE_MAX}"), Whole
    ]


#: The statuses a list may be filtered by (as Literal types: pydantic checks them).
TaskStatusName: Any = Literal[TASK_STATUSES]
ClientStatusName: Any = Literal[CLIENT_FILTERS]


@with_config(QUERY)
class TaskQuery(PageQuery, total=False):
    """``GET /api/tasks``: a filter and a page."""

    status: Annotated[TaskStatusName, Field(description="one of " + ", ".join(TASK_STATUSES))]
    type: Annotated[str, Field(max_length=255, description="a task type (at most 255 characters)")]


@with_config(QUERY)
class ClientQuery(PageQuery, total=False):
    """``GET /api/clients``: a filter and a page."""

    status: Annotated[ClientStatusName, Field(description="one of " + ", ".join(CLIENT_FILTERS))]


#: A path's integer (a task id, a round, a rank): Flask's converter takes digits only, and
#: :func:`ids_in_bounds` answers 404 past 64 bits.
PathInteger = Annotated[int, Field(ge=0, le=INT64_MAX)]

BODIES: dict[str, Any] = {
    "Requirements": Requirements,
    "NewTask": NewTask,
    "TaskStatusChange": TaskStatusChange,
    "ClientStatusChange": ClientStatusChange,
    "SignIn": SignIn,
    "NewAdminToken": NewToken,
}
_ADAPTERS: dict[Any, TypeAdapter[Any]] = {
    kind: TypeAdapter(kind) for kind in (*BODIES.values(), PageQuery, TaskQuery, ClientQuery)
}


@functools.cache
def _schema(kind: Any) -> dict[str, Any]:
    return _ADAPTERS[kind].json_schema()


def check(kind: Any, data: Any, where: str = "") -> Any:
    """``data`` as ``kind`` declares it, or an ApiError 400 naming the field."""
    try:
        return _ADAPTERS[kind].validate_python(data)
    except ValidationError as refused:
        message, field = explain(_schema(kind), where, refused.errors())
        raise ApiError(400, message, field=field or None) from None


def component_schemas() -> dict[str, Any]:
    """The request bodies' JSON Schemas, for the OpenAPI document's components."""
    out: dict[str, Any] = {}
    for name, kind in BODIES.items():
        schema = TypeAdapter(kind).json_schema(ref_template="#/components/schemas/{model}")
        out.update(schema.pop("$defs", {}))
        out[name] = schema
    return out


def query_parameters(kind: Any) -> list[dict[str, Any]]:
    """The OpenAPI parameters of a query declaration."""
    schema = _ADAPTERS[kind].json_schema()
    required = set(schema.get("required", []))
    return [
        {"name": name, "in": "query", "required": name in required, "schema": prop}
        for name, prop in schema["properties"].items()
    ]


def path_parameter(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": TypeAdapter(PathInteger).json_schema()}


class JSONProvider(DefaultJSONProvider):
    """Flask's JSON, except that NaN, Infinity and numbers past a float (1e999) are refused (they
    are not JSON, and the database's JSON column and every answer would carry them), and that a
    body nested past Python's recursion limit is invalid JSON (a 400), not a RecursionError (a 500)."""

    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        kwargs.setdefault("parse_constant", refuse_constant)  # NaN and Infinity are not JSON
        kwargs.setdefault("parse_float", finite_float)  # nor is 1e999
        try:
            return super().loads(s, **kwargs)
        except RecursionError:
            raise ValueError("nested too deeply") from None


def json_object() -> dict[str, Any]:
    try:
        body = current_app.json.loads(request.get_data(cache=True))
    except ValueError as refused:  # not JSON at all (UnicodeDecodeError too), or nested too deeply
        why = str(refused)[:120]
        raise ApiError(400, f"the body must be a JSON object; this is not JSON: {why}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    return body


def new_task(body: dict[str, Any], settings: server_settings.Settings) -> dict[str, Any]:
    """Validate a POST /api/tasks body; returns the fields of the new task."""
    fields: NewTask = check(NewTask, body)
    task_type = fields["type"]
    raw_config = fields.get("config") or {}
    if len(json.dumps(raw_config)) > MAX_CONFIG_BYTES:
        raise ApiError(400, f"config is larger than {MAX_CONFIG_BYTES} bytes", field="config")
    if not nested_within(raw_config, MAX_CONFIG_DEPTH):
        raise ApiError(400, f"config nests deeper than {MAX_CONFIG_DEPTH} levels", field="config")
    try:
        if task_type == FEDERATED:
            task_config = normalize_federated_config(
                raw_config,
                default_batch_size=settings.DEFAULT_BATCH_SIZE,
                default_epochs=settings.DEFAULT_EPOCHS,
            )
        else:
            task_config = dict(raw_config)
            task_config.setdefault("num_shards", 1)
            optional_seconds(task_config, "deadline_s")
    except SpecError as error:
        raise ApiError(400, str(error), field=error.field or "config") from None
    shards = task_config["num_shards"]
    if isinstance(shards, float) and shards.is_integer():
        shards = int(shards)
    if isinstance(shards, bool) or not isinstance(shards, int) or not 1 <= shards <= MAX_SHARDS:
        raise ApiError(
            400, f"config.num_shards must be an integer in 1..{MAX_SHARDS}", field="config.num_shards"
        )
    task_config["num_shards"] = shards
    if shards > settings.MAX_CLIENTS:
        raise ApiError(
            400,
            f"config.num_shards={shards} needs that many clients at once; MAX_CLIENTS={settings.MAX_CLIENTS}",
            field="config.num_shards",
        )
    return {
        "type": task_type,
        "requirements": dict(fields.get("requirements") or {}),
        "priority": fields.get("priority", 0),
        "config": task_config,
        "num_shards": shards,
    }


def status_change(kind: Any) -> str:
    """The ``status`` of a PUT .../status body."""
    return str(check(kind, json_object())["status"])


def query(kind: Any) -> dict[str, Any]:
    """The query string as ``kind`` declares it; empty values are left out ("?status=" is no filter)."""
    raw = {key: value for key, value in request.args.items() if value != ""}
    return dict(check(kind, raw))


def page_args(kind: Any = PageQuery) -> tuple[int, int]:
    args = query(kind)
    return int(args.get("page", 1)), int(args.get("per_page", 20))


def task_status_filter() -> str | None:
    status = query(TaskQuery).get("status")
    return str(status) if status is not None else None


def ids_in_bounds(endpoint: str | None, values: dict[str, Any] | None) -> None:
    """Before any view: an integer in the path (a task id, a round, a rank) beyond 64 bits names
    nothing, so it is a 404 here rather than an overflow in the database driver (a 500)."""
    for name, value in (values or {}).items():
        if isinstance(value, int) and value > INT64_MAX:
            raise ApiError(
                404, f"no {name.removesuffix('_no').replace('_id', '')} {value}: beyond 64 bits", "not_found"
            )
