"""Datasets, models, partitions and the local training loop, shared by the server's workers and the client.

``import training`` and ``import training.spec`` stay free of torch (the web tier imports them);
the names below are loaded on first use::

    from training import load_split, shard_indices, shard_size, build_model, train_local, evaluate

See docs/training.md.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "Split": "training.data",
    "derive_seed": "training.data",
    "load_split": "training.data",
    "partition": "training.data",
    "shard_data": "training.data",
    "shard_indices": "training.data",
    "shard_size": "training.data",
    "build_model": "training.models",
    "state_from_bytes": "training.serialize",
    "state_to_bytes": "training.serialize",
    "TrainingStopped": "training.loop",
    "evaluate": "training.loop",
    "resolve_device": "training.loop",
    "train_centralized": "training.loop",
    "warm_up": "training.loop",
    "train_local": "training.loop",
}

__all__ = [
    "Split",
    "TrainingStopped",
    "build_model",
    "derive_seed",
    "evaluate",
    "load_split",
    "partition",
    "resolve_device",
    "shard_data",
    "shard_indices",
    "shard_size",
    "state_from_bytes",
    "state_to_bytes",
    "train_centralized",
    "train_local",
    "warm_up",
]

if TYPE_CHECKING:
    from training.data import Split, derive_seed, load_split, partition, shard_data, shard_indices, shard_size
    from training.loop import (
        TrainingStopped,
        evaluate,
        resolve_device,
        train_centralized,
        train_local,
        warm_up,
    )
    from training.models import build_model
    from training.serialize import state_from_bytes, state_to_bytes


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'training' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
