"""Rounds: validate updates, then aggregate slice by slice in phases (stats, apply).

A round is a small state machine over a JSON-able plan::

    plan = plan_round(...)                       # headers checked, slices planned
    while plan["phase"] in ("stats", "apply"):
        parts = [run_slice(plan, k, path_k) for k in range(len(plan["slices"]))]  # parallel
        plan = advance_round(plan, parts)        # reduce, in slice order
    result = finish_round(plan, [path_k ...])    # assemble the slice files

:meth:`Strategy.run_round` runs the same functions in sequence over the same slices, so a
sliced round equals the single-worker round bit for bit. One file per step:

- ``plan.py``: :class:`Plan` and its JSON form, :func:`plan_round`;
- ``stats.py``: the stats phase (norms, Gram matrix);
- ``decide.py``: clipping, selection, weights, noise (torch-free);
- ``apply.py`` and ``optimizer.py``: the apply phase;
- ``reduce.py``: :func:`advance_round`; ``report.py``: the report;
- ``result.py``: :func:`finish_round`, :class:`RoundResult`;
- ``inputs.py``: sources, windows, row norms; ``strategy.py``: :class:`Strategy`,
  :func:`run_plan`, :func:`run_slice`.

The design notes are in ``docs/aggregation.md``.
"""

from __future__ import annotations

from .apply import apply_slice
from .decide import Decisions, example_shares
from .inputs import MEAN_WINDOW, MemoryModels
from .plan import (
    DEFAULT_CHUNK_BYTES,
    DEFAULT_MAX_SLICE_BYTES,
    OptionKeywords,
    Plan,
    RoundOptions,
    UpdateEntry,
    UpdateFile,
    new_plan,
    plan_round,
)
from .reduce import advance_round
from .result import RoundResult, finish_round
from .stats import stats_slice
from .strategy import Strategy, build_strategy, run_plan, run_slice

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "DEFAULT_MAX_SLICE_BYTES",
    "MEAN_WINDOW",
    "Decisions",
    "MemoryModels",
    "OptionKeywords",
    "Plan",
    "RoundOptions",
    "RoundResult",
    "Strategy",
    "UpdateEntry",
    "UpdateFile",
    "advance_round",
    "apply_slice",
    "build_strategy",
    "example_shares",
    "finish_round",
    "new_plan",
    "plan_round",
    "run_plan",
    "run_slice",
    "stats_slice",
]
