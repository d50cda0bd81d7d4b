"""The ``federated_training`` task config: names, defaults and limits, checked without torch.

The web tier calls :func:`normalize_federated_config` when a task is submitted and stores
the normalized config, so workers and clients read every field without defaults of their own.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from aggregation.spec import normalize_strategy

TASK_TYPE = "federated_training"

MODELS: tuple[str, ...] = ("mlp", "cnn")
DATASETS: tuple[str, ...] = ("digits", "synthetic")
PARTITIONS: tuple[str, ...] = ("iid", "dirichlet")

# Size of each dataset's train split (the same for every seed: the split is stratified), so a
# task with more shards than training examples is refused at submit time without loading data.
# tests/unit/test_training_registry.py checks these against ``training.data.load_split``.
TRAIN_SIZES: dict[str, int] = {"digits": 1438, "synthetic": 400}

DEFAULT_ROUNDS = 10
MAX_ROUNDS = 10_000
MAX_SHARDS = 1_000
MAX_LOCAL_EPOCHS = 1_000
MAX_BATCH_SIZE = 65_536

KNOWN_KEYS = frozenset(
    {
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
    }
)
MAX_DEADLINE_S = 30 * 86400.0  # an assignment's deadline, and a round's timeout, at most 30 days
MAX_ROUND_RETRIES = 100


class SpecError(ValueError):
    """A config that cannot run; the message says which field and why."""


def _int(raw: Mapping[str, Any], key: str, default: int, lo: int, hi: int) -> int:
    value = raw.get(key, default)
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # as JSON Schema says: 3.0 is the integer 3
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(f"config.{key} must be an integer")
    if not lo <= value <= hi:
        raise SpecError(f"config.{key} must be in {lo}..{hi}, got {value}")
    return value


def _float(raw: Mapping[str, Any], key: str, default: float, lo: float, hi: float, *, open_lo: bool) -> float:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SpecError(f"config.{key} must be a number")
    value = float(value)
    low_ok = value > lo if open_lo else value >= lo
    if not (low_ok and value <= hi):
        bracket = "(" if open_lo else "["
        raise SpecError(f"config.{key} must be in {bracket}{lo}, {hi}], got {value}")
    return value


def optional_seconds(raw: Mapping[str, Any], key: str) -> float | None:
    """An optional duration in seconds: absent or null, or a number in (0, 30 days]."""
    if raw.get(key) is None:
        return None
    return _float(raw, key, 0.0, 0.0, MAX_DEADLINE_S, open_lo=True)


def quorum(config: Mapping[str, Any]) -> int:
    """Accepted updates a round needs to close at its timeout: the larger of ``min_fit_clients``
    and ``min_fit_fraction`` of the shards (rounded up), at most every shard."""
    shards = int(config.get("num_shards", 1))
    by_fraction = math.ceil(float(config.get("min_fit_fraction", 1.0)) * shards - 1e-9)
    return max(1, min(shards, max(int(config.get("min_fit_clients", 1)), by_fraction)))


def _choice(raw: Mapping[str, Any], key: str, default: str, allowed: tuple[str, ...]) -> str:
    value = raw.get(key, default)
    if value not in allowed:
        raise SpecError(f"config.{key} must be one of {', '.join(allowed)}; got {value!r}")
    return str(value)


def normalize_federated_config(
    raw: Mapping[str, Any], *, default_batch_size: int, default_epochs: int
) -> dict[str, Any]:
    """Return the complete config of a ``federated_training`` task, or raise :class:`SpecError`.

    Unset fields take their defaults: ``batch_size`` from ``DEFAULT_BATCH_SIZE`` and
    ``local_epochs`` from ``DEFAULT_EPOCHS`` (the server's settings), the rest from this module.
    """
    if not isinstance(raw, Mapping):
        raise SpecError("config must be an object")
    unknown = sorted(set(raw) - KNOWN_KEYS)
    if unknown:
        raise SpecError(f"unknown config field(s): {', '.join(unknown)}")
    num_shards = _int(raw, "num_shards", 1, 1, MAX_SHARDS)
    strategy = raw.get("strategy", "fedavg")
    if not isinstance(strategy, str):
        raise SpecError("config.strategy must be a string")
    params = raw.get("strategy_params", {})
    if not isinstance(params, Mapping):
        raise SpecError("config.strategy_params must be an object")
    try:
        strategy_params = normalize_strategy(strategy, params, num_shards)
    except ValueError as exc:
        raise SpecError(str(exc)) from exc
    partition = _choice(raw, "partition", "iid", PARTITIONS)
    model = _choice(raw, "model", "mlp", MODELS)
    dataset = _choice(raw, "dataset", "digits", DATASETS)
    if num_shards > TRAIN_SIZES[dataset]:
        raise SpecError(
            f"config.num_shards must be at most {TRAIN_SIZES[dataset]} for dataset {dataset!r} "
            f"(one training example per shard at least), got {num_shards}"
        )
    config: dict[str, Any] = {
        "model": model,
        "dataset": dataset,
        "rounds": _int(raw, "rounds", DEFAULT_ROUNDS, 1, MAX_ROUNDS),
        "num_shards": num_shards,
        "local_epochs": _int(raw, "local_epochs", default_epochs, 1, MAX_LOCAL_EPOCHS),
        "batch_size": _int(raw, "batch_size", default_batch_size, 1, MAX_BATCH_SIZE),
        "lr": _float(raw, "lr", 0.05, 0.0, 10.0, open_lo=True),
        "momentum": _float(raw, "momentum", 0.0, 0.0, 0.999, open_lo=False),
        "partition": partition,
        "alpha": _float(raw, "alpha", 0.5, 0.0, 1000.0, open_lo=True),
        "seed": _int(raw, "seed", 0, 0, 2**31 - 1),
        "strategy": strategy,
        "strategy_params": strategy_params,
        "deadline_s": optional_seconds(raw, "deadline_s"),
        "round_timeout_s": optional_seconds(raw, "round_timeout_s"),
        "min_fit_fraction": _float(raw, "min_fit_fraction", 1.0, 0.0, 1.0, open_lo=True),
        "min_fit_clients": _int(raw, "min_fit_clients", 1, 1, MAX_SHARDS),
        "max_round_retries": _int(raw, "max_round_retries", 2, 0, MAX_ROUND_RETRIES),
    }
    if config["min_fit_clients"] > num_shards:
        raise SpecError(
            f"config.min_fit_clients={config['min_fit_clients']} is more than num_shards={num_shards}: "
            "a round could never reach its quorum"
        )
    needed = quorum(config)
    if needed < num_shards:
        try:  # a round closed on its quorum aggregates that many updates: the rule must work on them
            normalize_strategy(strategy, params, needed)
        except ValueError as exc:
            raise SpecError(f"with a quorum of {needed} of {num_shards} updates, {exc}") from exc
    return config
