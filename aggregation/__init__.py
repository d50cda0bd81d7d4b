"""Pure torch aggregation strategies over plain state dicts. No Flask, Celery or SQL.

``import aggregation`` and ``import aggregation.spec`` do not import torch: the web tier
validates configs with :func:`aggregation.spec.normalize_strategy`. Everything that needs
torch is loaded on first attribute access (module ``__getattr__``).

Public API (see ``docs/aggregation.md``):

- :func:`build_strategy` -> :class:`Strategy` with ``run_round(...)`` -> :class:`RoundResult`;
  :class:`UpdateFile` describes one client upload; :class:`RoundOptions` the keyword options.
- Scale-out: :func:`plan_round`, :func:`run_slice` (or :func:`stats_slice` /
  :func:`apply_slice`), :func:`advance_round`, :func:`finish_round`; :func:`plan_slices`
  and :func:`read_meta` (torch-free).
- :func:`aggregate`: the stateless rules over in-memory models.
- :func:`save_state` / :func:`load_state`; :func:`release_buffers`.
- Errors: :class:`AggregationError`, :class:`InvalidFile`, :class:`NotEnoughUpdates`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._sources import release_buffers
    from .errors import AggregationError, InvalidFile, NotEnoughUpdates
    from .functional import aggregate
    from .meta import FileMeta, TensorMeta, read_meta
    from .rounds import (
        DEFAULT_CHUNK_BYTES,
        DEFAULT_MAX_SLICE_BYTES,
        RoundOptions,
        RoundResult,
        Strategy,
        UpdateFile,
        advance_round,
        apply_slice,
        build_strategy,
        finish_round,
        plan_round,
        run_slice,
        stats_slice,
    )
    from .slicing import BLOCK, Piece, Slice, plan_slices
    from .spec import STRATEGIES, normalize_strategy
    from .state import load_state, save_state

_EXPORTS: dict[str, str] = {
    "AggregationError": "errors",
    "InvalidFile": "errors",
    "NotEnoughUpdates": "errors",
    "FileMeta": "meta",
    "TensorMeta": "meta",
    "read_meta": "meta",
    "BLOCK": "slicing",
    "Piece": "slicing",
    "Slice": "slicing",
    "plan_slices": "slicing",
    "STRATEGIES": "spec",
    "normalize_strategy": "spec",
    "aggregate": "functional",
    "release_buffers": "_sources",
    "load_state": "state",
    "save_state": "state",
    "DEFAULT_CHUNK_BYTES": "rounds",
    "DEFAULT_MAX_SLICE_BYTES": "rounds",
    "RoundOptions": "rounds",
    "RoundResult": "rounds",
    "Strategy": "rounds",
    "UpdateFile": "rounds",
    "advance_round": "rounds",
    "apply_slice": "rounds",
    "build_strategy": "rounds",
    "finish_round": "rounds",
    "plan_round": "rounds",
    "run_slice": "rounds",
    "stats_slice": "rounds",
}

__all__ = [
    "BLOCK",
    "DEFAULT_CHUNK_BYTES",
    "DEFAULT_MAX_SLICE_BYTES",
    "STRATEGIES",
    "AggregationError",
    "FileMeta",
    "InvalidFile",
    "NotEnoughUpdates",
    "Piece",
    "RoundOptions",
    "RoundResult",
    "Slice",
    "Strategy",
    "TensorMeta",
    "UpdateFile",
    "advance_round",
    "aggregate",
    "apply_slice",
    "build_strategy",
    "finish_round",
    "load_state",
    "normalize_strategy",
    "plan_round",
    "plan_slices",
    "read_meta",
    "release_buffers",
    "run_slice",
    "save_state",
    "stats_slice",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'aggregation' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
