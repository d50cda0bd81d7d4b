"""The ``federated_training`` task config: names, defaults and limits, checked without torch.

The web tier calls :func:`normalize_federated_config` when a task is submitted and stores
the normalized config, so workers and clients read every field without defaults of their own.

The config is declared once, as the pydantic model :class:`FederatedConfig`: a field's
``description`` is what it must be ("an integer in 1..10000"), both in the published JSON
Schema (:func:`federated_config_schema`) and in the error a user gets ("config.rounds must be
in 1..10000, got 0"). Fields are checked in the order they are declared; the rules that span
fields (``num_shards`` against the dataset, ``min_fit_clients`` against ``num_shards``, the
strategy against the quorum) are validators of the model.
"""

from __future__ import annotations

import copy
import functools
import math
import typing
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic.json_schema import SkipJsonSchema

from aggregation.spec import (
    REF_TEMPLATE,
    STRATEGIES,
    SpecField,
    StrategyName,
    Whole,
    choice_field,
    explain,
    integer_field,
    no_default,
    normalize_strategy,
    not_null,
    number_field,
    shown,
    strategy_params_defs,
    strategy_params_ref,
)

TASK_TYPE = "federated_training"

ModelName = Literal["mlp", "cnn"]
DatasetName = Literal["digits", "synthetic"]
PartitionName = Literal["iid", "dirichlet"]
MODELS: tuple[str, ...] = typing.get_args(ModelName)
DATASETS: tuple[str, ...] = typing.get_args(DatasetName)
PARTITIONS: tuple[str, ...] = typing.get_args(PartitionName)

# Size of each dataset's train split (the same for every seed: the split is stratified), so a
# task with more shards than training examples is refused at submit time without loading data.
# tests/unit/test_training_registry.py checks these against ``training.data.load_split``.
TRAIN_SIZES: dict[str, int] = {"digits": 1438, "synthetic": 400}

DEFAULT_ROUNDS = 10
MAX_ROUNDS = 10_000
MAX_SHARDS = 1_000
MAX_LOCAL_EPOCHS = 1_000
MAX_BATCH_SIZE = 65_536
MAX_DEADLINE_S = 30 * 86400.0  # an assignment's deadline, and a round's timeout, at most 30 days
MAX_ROUND_RETRIES = 100
MAX_SEED = 2**31 - 1


class SpecError(SpecField):
    """A config that cannot run; the message says which field and why (``field``: its path,
    such as ``config.rounds``, when one field is to blame)."""


def _between(lo: float, hi: float, *, lo_open: bool) -> FieldInfo:
    """A number in (lo, hi] or [lo, hi], its ends written as Python writes floats (0.0)."""
    return number_field(lo, hi, lo_open=lo_open, hi_open=False, text=repr)


Shards = Annotated[int, integer_field(1, MAX_SHARDS), Whole]
Seconds = Annotated[float, _between(0.0, MAX_DEADLINE_S, lo_open=True)]
SECONDS_DESCRIPTION = "a number in (0.0, 2592000.0], or null"


class FederatedConfig(BaseModel):
    """The config of a federated_training task (docs/deployment.md, "Federated config
    reference"). Unknown keys are refused; an absent key takes its default: local_epochs and
    batch_size the server's DEFAULT_EPOCHS and DEFAULT_BATCH_SIZE."""

    # Fields are checked in the order they are declared; the stored config (normalized())
    # lists them in STORED_ORDER.

    model_config = ConfigDict(
        strict=True,
        allow_inf_nan=False,
        extra="forbid",
        title="FederatedConfig",
    )

    num_shards: Shards = 1
    strategy: Annotated[StrategyName, choice_field(STRATEGIES)] = "fedavg"
    strategy_params: dict[str, Any] = Field(
        default_factory=dict,
        validate_default=True,
        description="an object (the chosen strategy's parameters)",
    )
    partition: Annotated[PartitionName, choice_field(PARTITIONS)] = "iid"
    model: Annotated[ModelName, choice_field(MODELS)] = "mlp"
    dataset: Annotated[DatasetName, choice_field(DATASETS)] = "digits"
    rounds: Annotated[int, integer_field(1, MAX_ROUNDS), Whole] = DEFAULT_ROUNDS
    # Absent: the server's DEFAULT_EPOCHS and DEFAULT_BATCH_SIZE; null is refused.
    local_epochs: Annotated[int, integer_field(1, MAX_LOCAL_EPOCHS), Whole] | SkipJsonSchema[None] = Field(
        None, json_schema_extra=no_default
    )
    batch_size: Annotated[int, integer_field(1, MAX_BATCH_SIZE), Whole] | SkipJsonSchema[None] = Field(
        None, json_schema_extra=no_default
    )
    lr: Annotated[float, _between(0.0, 10.0, lo_open=True)] = 0.05
    momentum: Annotated[float, _between(0.0, 0.999, lo_open=False)] = 0.0
    alpha: Annotated[float, _between(0.0, 1000.0, lo_open=True)] = 0.5
    seed: Annotated[int, integer_field(0, MAX_SEED), Whole] = 0
    deadline_s: Seconds | None = Field(None, description=SECONDS_DESCRIPTION)
    round_timeout_s: Seconds | None = Field(None, description=SECONDS_DESCRIPTION)
    min_fit_fraction: Annotated[float, _between(0.0, 1.0, lo_open=True)] = 1.0
    min_fit_clients: Annotated[int, integer_field(1, MAX_SHARDS), Whole] = 1
    max_round_retries: Annotated[int, integer_field(0, MAX_ROUND_RETRIES), Whole] = 2

    @field_validator("local_epochs", "batch_size", mode="before")
    @classmethod
    def _given(cls, value: Any) -> Any:
        return not_null(value)

    @field_validator("strategy_params")
    @classmethod
    def _strategy_params(cls, params: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        if "strategy" not in info.data or "num_shards" not in info.data:
            return params  # the strategy or num_shards is refused: that is the error
        return normalize_strategy(info.data["strategy"], params, info.data["num_shards"])

    @field_validator("dataset")
    @classmethod
    def _enough_examples(cls, dataset: str, info: ValidationInfo) -> str:
        num_shards = info.data.get("num_shards")
        if num_shards is not None and num_shards > TRAIN_SIZES[dataset]:
            raise SpecField(
                f"config.num_shards must be at most {TRAIN_SIZES[dataset]} for dataset {dataset!r} "
                f"(one training example per shard at least), got {num_shards}",
                "num_shards",
            )
        return dataset

    @model_validator(mode="wrap")
    @classmethod
    def _quorum(cls, raw: Any, handler: Any) -> FederatedConfig:
        config: FederatedConfig = handler(raw)
        num_shards = config.num_shards
        if config.min_fit_clients > num_shards:
            raise SpecField(
                f"config.min_fit_clients={config.min_fit_clients} is more than num_shards={num_shards}: "
                "a round could never reach its quorum",
                "min_fit_clients",
            )
        needed = quorum(config.model_dump())
        if needed < num_shards:
            # A round closed on its quorum aggregates that many updates: the rule must work on
            # them (checked on the parameters as given, so defaults that depend on the number
            # of updates are taken for the quorum).
            try:
                normalize_strategy(config.strategy, raw.get("strategy_params", {}), needed)
            except ValueError as exc:
                field = exc.field if isinstance(exc, SpecField) else None
                raise SpecField(f"with a quorum of {needed} of {num_shards} updates, {exc}", field) from exc
        return config

    def normalized(self, *, default_batch_size: int, default_epochs: int) -> dict[str, Any]:
        """The config as stored: every key, in :data:`STORED_ORDER`."""
        values = self.model_dump()
        values["local_epochs"] = default_epochs if self.local_epochs is None else self.local_epochs
        values["batch_size"] = default_batch_size if self.batch_size is None else self.batch_size
        return {key: values[key] for key in STORED_ORDER}


#: The keys of a stored config, in their order.
STORED_ORDER: tuple[str, ...] = (
    "model",
    "dataset",
    "rounds",
    "num_shards",
    "local_epochs",
    "batch_size",
    "lr",
    "momentum",
    "partition",
    "alpha",
    "seed",
    "strategy",
    "strategy_params",
    "deadline_s",
    "round_timeout_s",
    "min_fit_fraction",
    "min_fit_clients",
    "max_round_retries",
)
KNOWN_KEYS = frozenset(FederatedConfig.model_fields)


def _strategy_params_by_strategy(schema: dict[str, Any], ref_template: str) -> None:
    """``strategy_params`` is the chosen strategy's: one ``if``/``then`` per strategy (no
    ``strategy`` means fedavg), and ``num_shards`` is at most the dataset's train size."""
    rules: list[dict[str, Any]] = []
    for name in STRATEGIES:
        condition: dict[str, Any] = {"properties": {"strategy": {"const": name}}}
        if name != "fedavg":
            condition["required"] = ["strategy"]
        ref = {"$ref": ref_template.format(model=strategy_params_ref(name))}
        rules.append({"if": condition, "then": {"properties": {"strategy_params": ref}}})
    for dataset, size in TRAIN_SIZES.items():
        condition = {"properties": {"dataset": {"const": dataset}}}
        if dataset != "digits":
            condition["required"] = ["dataset"]
        if size < MAX_SHARDS:
            rules.append({"if": condition, "then": {"properties": {"num_shards": {"maximum": size}}}})
    schema["allOf"] = rules


def _got(value: Any, number: bool) -> str:
    return repr(float(value)) if number and isinstance(value, (int, float)) else shown(value)


def _explain(errors: list[Any]) -> SpecError:
    refused = explain(
        FederatedConfig,
        "config",
        errors,
        got=_got,
        unknown=lambda keys: f"unknown config field(s): {', '.join(keys)}",
        extra_before="num_shards",
        finite=False,
    )
    return SpecError(str(refused), refused.field)


def normalize_federated_config(
    raw: Mapping[str, Any], *, default_batch_size: int, default_epochs: int
) -> dict[str, Any]:
    """Return the complete config of a ``federated_training`` task, or raise :class:`SpecError`.

    Unset fields take their defaults: ``batch_size`` from ``DEFAULT_BATCH_SIZE`` and
    ``local_epochs`` from ``DEFAULT_EPOCHS`` (the server's settings), the rest from this module.
    """
    if not isinstance(raw, Mapping):
        raise SpecError("config must be an object", "config")
    try:
        config = FederatedConfig.model_validate(dict(raw))
    except ValidationError as refused:
        raise _explain(refused.errors()) from None
    return config.normalized(default_batch_size=default_batch_size, default_epochs=default_epochs)


_SECONDS: TypeAdapter[float] = TypeAdapter(Seconds)


def optional_seconds(raw: Mapping[str, Any], key: str) -> float | None:
    """An optional duration in seconds: absent or null, or a number in (0, 30 days]."""
    value = raw.get(key)
    if value is None:
        return None
    try:
        return _SECONDS.validate_python(value, strict=True)
    except ValidationError as refused:
        error = refused.errors()[0]
        path = f"config.{key}"
        if error["type"] in ("float_type", "float_parsing"):
            raise SpecError(f"{path} must be a number in (0.0, 2592000.0], got {value!r}", path) from None
        raise SpecError(f"{path} must be in (0.0, 2592000.0], got {_got(value, True)}", path) from None


def quorum(config: Mapping[str, Any]) -> int:
    """Accepted updates a round needs to close at its timeout: the larger of ``min_fit_clients``
    and ``min_fit_fraction`` of the shards (rounded up), at most every shard."""
    shards = int(config.get("num_shards", 1))
    by_fraction = math.ceil(float(config.get("min_fit_fraction", 1.0)) * shards - 1e-9)
    return max(1, min(shards, max(int(config.get("min_fit_clients", 1)), by_fraction)))


@functools.cache
def _schema(ref_template: str) -> dict[str, Any]:
    schema = FederatedConfig.model_json_schema(ref_template=ref_template)
    _strategy_params_by_strategy(schema, ref_template)
    schema.setdefault("$defs", {}).update(strategy_params_defs(ref_template))
    return schema


def federated_config_schema(ref_template: str = REF_TEMPLATE) -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of a ``federated_training`` task's ``config``, with every
    strategy's parameters under ``$defs``; references are written with ``ref_template``
    (``#/$defs/<name>``; an OpenAPI document may pass ``"#/components/schemas/{model}"`` and move
    the ``$defs`` there). What it cannot say: ``min_fit_clients`` is at most ``num_shards``, and
    the strategy needs enough updates (``num_shards``, or the quorum when it is smaller)."""
    return copy.deepcopy(_schema(ref_template))
