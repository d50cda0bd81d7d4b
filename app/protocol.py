"""The WebSocket protocol: one declaration per client message, parsed and validated. No I/O.

See docs/protocol.md. Each message is a pydantic model; a field's ``description`` is what the
field must be, and it is both the error a client gets ("task_progress.progress must be a number
in 0..100") and the text of the published JSON Schema (:func:`describe`, served as
``GET /api/protocol.json``), so the two cannot drift apart. :func:`parse` turns a text frame into
one of the message models or raises :class:`ProtocolError` with an error code and a message
naming the field.

Top-level keys a message does not declare are ignored (a newer client may add some: the
versions in ``register`` say what it speaks); inside ``utilization`` they are refused.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.json_schema import SkipJsonSchema

from app.declare import Declared, Whole, explain, finite_float, nested_within, refuse_constant, schema_of
from store.clients import Hardware
from training.version import VERSION_RE

CLIENT_ID_PATTERN = r"^[A-Za-z0-9._:-]{1,255}$"
TASK_TYPE_PATTERN = r"^[A-Za-z0-9_.-]{1,255}$"
MAX_METRICS = 64
MAX_GPUS = 64
MAX_TASK_TYPES = 32
MAX_DEPTH = 16  # nesting of objects and lists in one frame (cpu_info may carry a little)
TASK_ID_MAX = 2**31 - 1
ROUND_MAX = 10**6
MAX_GPU_MEMORY_MIB = 10**9
ERROR_TEXT_MAX = 10_000
KNOWN_TYPES = "register, task_request, task_progress, task_result, heartbeat, rotate_token"


class ProtocolError(Exception):
    def __init__(self, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field  # the path of the field at fault ("task_progress.progress"), when one is


def invalid(message: str) -> ProtocolError:
    return ProtocolError("invalid_message", message)


def _integral(value: Any) -> Any:
    """Ids and rounds: a numeric string ("7") or an integral number (7.0) is that integer."""
    if isinstance(value, str) and value.isdigit() and len(value) <= 20:
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _none_is_empty(value: Any) -> Any:
    return {} if value is None else value


# A Field comes before a BeforeValidator in Annotated, so that its bounds reach the JSON Schema.
TaskId = Annotated[
    int,
    Field(ge=1, le=TASK_ID_MAX, description=f"an integer in 1..{TASK_ID_MAX}"),
    BeforeValidator(_integral),
]
Round = Annotated[
    int, Field(ge=0, le=ROUND_MAX, description=f"an integer in 0..{ROUND_MAX}"), BeforeValidator(_integral)
]
ClientId = Annotated[
    str,
    Field(pattern=CLIENT_ID_PATTERN, description="at most 255 characters of [A-Za-z0-9._:-]"),
]
TaskTypeName = Annotated[
    str, Field(pattern=TASK_TYPE_PATTERN, description="a task type name: letters, digits, '_', '.', '-'")
]
Percent = Annotated[float, Field(ge=0, le=100, description="a number in 0..100")]
ShortText = Annotated[
    str, Field(min_length=1, max_length=255, description="a non-empty string of at most 255 characters")
]
MetricValue = Annotated[
    float | bool | Annotated[str, Field(max_length=256)] | None,
    Field(description="a finite number, a boolean or a short string"),
]
Metrics = Annotated[
    dict[Annotated[str, Field(max_length=64)], MetricValue],
    Field(
        max_length=MAX_METRICS,
        description=f"an object of at most {MAX_METRICS} entries: names of at most 64 characters, "
        "each a finite number, a boolean or a short string",
    ),
    BeforeValidator(_none_is_empty),
]


Model = Declared


def _message_schema(schema: dict[str, Any], *, reconnect: bool = False) -> None:
    """A message's JSON Schema: ``type`` is required (it has a default only for Python callers);
    a reconnecting ``register`` sends ``client_id`` and ``token`` together."""
    schema["required"] = ["type", *schema.get("required", [])]
    if reconnect:
        schema["dependentRequired"] = {"client_id": ["token"], "token": ["client_id"]}


class ClientMessage(Model):
    """A message a client sends; in its JSON Schema, ``type`` is required."""

    model_config = ConfigDict(json_schema_extra=lambda schema: _message_schema(schema))


class CpuInfo(Model):
    model_config = ConfigDict(extra="allow")
    cores: Annotated[int, Field(ge=1, le=4096, description="an integer in 1..4096"), Whole]


class RamInfo(Model):
    model_config = ConfigDict(extra="allow")
    total_gb: float = Field(gt=0, le=1_000_000, description="a number in (0, 1000000]")


class GpuInfo(Model):
    model_config = ConfigDict(extra="allow")
    name: str = Field("", max_length=255, description="a string of at most 255 characters")
    memory_gb: float = Field(0, ge=0, le=100_000, description="a number in [0, 100000]")


class GpuUse(Model):
    model_config = ConfigDict(extra="forbid")
    id: Annotated[
        int,
        Field(ge=0, le=MAX_GPUS - 1, description=f"the GPU's index, an integer in 0..{MAX_GPUS - 1}"),
        Whole,
    ]
    utilization: Percent
    memory_used: float | None = Field(
        None, ge=0, le=MAX_GPU_MEMORY_MIB, description=f"a number of MiB in 0..{MAX_GPU_MEMORY_MIB}"
    )


GpuList = Annotated[
    list[GpuUse], Field(max_length=MAX_GPUS, description=f"a list of at most {MAX_GPUS} objects")
]


class Utilization(Model):
    """The client's resource use, in percent; every key optional, others refused."""

    model_config = ConfigDict(extra="forbid")
    # Optional, but not null: a key sent is a report.
    cpu_utilization: Percent | SkipJsonSchema[None] = None
    ram_utilization: Percent | SkipJsonSchema[None] = None
    gpu_utilization: GpuList | SkipJsonSchema[None] = None

    @field_validator("cpu_utilization", "ram_utilization", "gpu_utilization", mode="before")
    @classmethod
    def _not_null(cls, value: Any) -> Any:
        if value is None:
            raise ValueError("must not be null: leave the key out instead")
        return value

    @field_validator("gpu_utilization")
    @classmethod
    def _ids_once(cls, gpus: list[GpuUse] | None) -> list[GpuUse] | None:
        seen: set[int] = set()
        for i, gpu in enumerate(gpus or []):
            if gpu.id in seen:
                raise ValueError(f"gpu_utilization[{i}].id {gpu.id} appears twice")
            seen.add(gpu.id)
        return gpus

    def reported(self) -> dict[str, Any] | None:
        """What was reported, as stored: None when nothing was ({} reports nothing)."""
        return self.model_dump(exclude_none=True) or None


UtilizationField = Annotated[
    Utilization | None,
    Field(None, description="an object with some of cpu_utilization, ram_utilization, gpu_utilization"),
]


class Register(ClientMessage):
    """The first message on every connection; ``client_id`` and ``token`` only to reconnect."""

    model_config = ConfigDict(json_schema_extra=lambda schema: _message_schema(schema, reconnect=True))

    TYPE: ClassVar[str] = "register"
    type: Literal["register"] = "register"
    cpu_info: CpuInfo = Field(description="an object with cores")
    ram_info: RamInfo = Field(description="an object with total_gb")
    gpu_info: Annotated[
        list[GpuInfo],
        Field(max_length=MAX_GPUS, description=f"a list of at most {MAX_GPUS} objects"),
        BeforeValidator(lambda v: [] if v is None else v),
    ] = Field(default_factory=list)
    task_types: list[TaskTypeName] | None = Field(
        None, max_length=MAX_TASK_TYPES, description=f"a list of at most {MAX_TASK_TYPES} task type names"
    )
    # Both or neither; null is taken for absent, but the schema offers only strings.
    client_id: ClientId | SkipJsonSchema[None] = None
    token: ShortText | SkipJsonSchema[None] = None
    protocol_version: (
        Annotated[int, Field(ge=1, le=1_000_000, description="an integer in 1..1000000"), Whole] | None
    ) = None
    client_version: str | None = Field(
        None, max_length=32, pattern=VERSION_RE.pattern, description="a version of the form MAJOR.MINOR.PATCH"
    )

    @model_validator(mode="after")
    def _reconnect_needs_both(self) -> Register:
        if (self.client_id is None) != (self.token is None):
            raise ValueError("register.client_id and register.token come together (reconnect) or not at all")
        return self

    @property
    def hardware(self) -> Hardware:
        return Hardware(
            cpu_info=self.cpu_info.model_dump(),
            ram_info=self.ram_info.model_dump(),
            gpu_info=[gpu.model_dump() for gpu in self.gpu_info],
            cores=self.cpu_info.cores,
            ram_gb=float(self.ram_info.total_gb),
            gpu_count=len(self.gpu_info),
            gpu_memory_gb=max((float(gpu.memory_gb) for gpu in self.gpu_info), default=0.0),
            task_types=list(self.task_types) if self.task_types is not None else None,
        )


class TaskRequest(ClientMessage):
    """Ask for work; the server answers with ``task`` now or when fitting work appears."""

    TYPE: ClassVar[str] = "task_request"
    type: Literal["task_request"] = "task_request"
    client_id: ShortText | None = None


class TaskProgress(ClientMessage):
    """Progress of a task this client holds."""

    TYPE: ClassVar[str] = "task_progress"
    type: Literal["task_progress"] = "task_progress"
    task_id: TaskId
    round: Round | None = None
    progress: Percent
    metrics: Metrics = Field(default_factory=dict)
    utilization: UtilizationField = None


class TaskResult(ClientMessage):
    """The result of a task this client holds; a federated round uploads its update first."""

    TYPE: ClassVar[str] = "task_result"
    type: Literal["task_result"] = "task_result"
    task_id: TaskId
    round: Round | None = None
    status: Literal["completed", "failed"] = Field(description="'completed' or 'failed'")
    metrics: Metrics = Field(default_factory=dict)
    error: str | None = Field(None, description=f"a string (kept to {ERROR_TEXT_MAX} characters)")

    @field_validator("error")
    @classmethod
    def _bounded(cls, text: str | None) -> str | None:
        return text[:ERROR_TEXT_MAX] if text else None


class Heartbeat(ClientMessage):
    """A sign of life between tasks, with the client's resource use."""

    TYPE: ClassVar[str] = "heartbeat"
    type: Literal["heartbeat"] = "heartbeat"
    utilization: UtilizationField = None


class RotateToken(ClientMessage):
    """Replace this client's token with a new one, sent back in ``token_rotated``; the old one
    stops working at once. The connection stays registered."""

    TYPE: ClassVar[str] = "rotate_token"
    type: Literal["rotate_token"] = "rotate_token"


Message = Register | TaskRequest | TaskProgress | TaskResult | Heartbeat | RotateToken
MODELS: dict[str, type[Model]] = {
    m.TYPE: m for m in (Register, TaskRequest, TaskProgress, TaskResult, Heartbeat, RotateToken)
}
_ANY_MESSAGE: TypeAdapter[Message] = TypeAdapter(Annotated[Message, Field(discriminator="type")])


def describe() -> dict[str, Any]:
    """The JSON Schema of every client message (one ``oneOf`` keyed by ``type``)."""
    schema = _ANY_MESSAGE.json_schema()
    schema["title"] = "AI Farm WebSocket messages, client to server (docs/protocol.md)"
    return schema


def parse(frame: str | bytes) -> Message:
    """Parse one text frame. Raises :class:`ProtocolError`."""
    if isinstance(frame, bytes):
        raise ProtocolError("invalid_json", "binary frames are not accepted; send JSON text")
    try:
        body = json.loads(frame, parse_constant=refuse_constant, parse_float=finite_float)
    except RecursionError:
        raise ProtocolError("invalid_json", f"nested deeper than {MAX_DEPTH} levels") from None
    except ValueError as error:
        raise ProtocolError("invalid_json", f"not valid JSON: {error}") from None
    if not isinstance(body, dict):
        raise ProtocolError("invalid_json", "a message must be a JSON object")
    if not nested_within(body, MAX_DEPTH):
        raise ProtocolError("invalid_json", f"nested deeper than {MAX_DEPTH} levels")
    kind = body.get("type")
    if kind is None:
        raise ProtocolError("unknown_type", "a message needs a 'type'")
    model = MODELS.get(kind) if isinstance(kind, str) else None
    if model is None:
        raise ProtocolError(
            "unknown_type", f"unknown message type {str(kind)[:64]!r}; expected one of: {KNOWN_TYPES}"
        )
    try:
        return model.model_validate(body)  # type: ignore[return-value]
    except ValidationError as refused:
        message, field = explain(schema_of(model), kind, refused.errors())
        raise ProtocolError("invalid_message", message, field) from None
