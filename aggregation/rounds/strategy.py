"""Running rounds: :class:`Strategy` (one round in this process), :func:`run_plan`, and
:func:`run_slice`, the one task body of a sliced round."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, Unpack

from ..spec import normalize_without_clients
from .apply import MemorySink, apply_slice, slice_apply
from .inputs import Inputs, MemoryModels
from .plan import OptionKeywords, Plan, RoundOptions, UpdateFile, plan_files, plan_round
from .reduce import advance
from .result import RoundResult, allocate_outputs, finish
from .stats import slice_stats, stats_slice


class Strategy:
    """A configured aggregation strategy. Build with :func:`build_strategy`."""

    def __init__(self, name: str, params: Mapping[str, Any] | None = None) -> None:
        self.name = name
        self.params = normalize_without_clients(name, params or {})

    def __repr__(self) -> str:
        return f"Strategy({self.name!r}, {self.params!r})"

    def plan_round(
        self,
        global_path: str | os.PathLike[str],
        updates: Sequence[UpdateFile | Mapping[str, Any]],
        state_path: str | os.PathLike[str] | None = None,
        **options: Unpack[OptionKeywords],
    ) -> dict[str, Any]:
        """The JSON-able plan for driving the round slice by slice (see :func:`plan_round`)."""
        return plan_round(self.name, self.params, global_path, updates, state_path, **options)

    def run_round(
        self,
        global_path: str | os.PathLike[str],
        updates: Sequence[UpdateFile | Mapping[str, Any]],
        state_path: str | os.PathLike[str] | None = None,
        *,
        reuse: RoundResult | None = None,
        **options: Unpack[OptionKeywords],
    ) -> RoundResult:
        """Aggregate one round in this process: the same phases over the same slices as a
        sliced run with the same ``max_slice_bytes``, so the same bits.

        ``options``: see :class:`RoundOptions`. ``reuse``: a previous result whose tensors
        may be overwritten as output buffers (saves page faults).
        """
        plan = plan_files(self.name, self.params, global_path, updates, state_path, RoundOptions(**options))
        return run_plan(plan, reuse=reuse)


def build_strategy(name: str, params: Mapping[str, Any] | None = None) -> Strategy:
    """A :class:`Strategy` from ``config["strategy"]`` and ``config["strategy_params"]``.

    Raises ``ValueError`` like :func:`aggregation.spec.normalize_strategy` (without the
    checks that need the number of clients; a round with too few valid updates reports
    that in its result instead).
    """
    return Strategy(name, params)


def run_plan(
    plan: Plan, *, memory: MemoryModels | None = None, reuse: RoundResult | None = None
) -> RoundResult:
    """Run a plan to its end in this process, phase by phase over every slice in order,
    as the sliced path does across jobs. Updates ``plan`` in place. ``memory``: the models
    when they are in memory, not in the plan's files; ``reuse``: see :meth:`Strategy.run_round`."""
    params, state = allocate_outputs(plan, reuse) if plan.phase != "failed" else ({}, {})
    sink = MemorySink(params, state)
    while plan.phase in ("stats", "apply"):
        inputs = Inputs(plan, memory)
        try:
            if plan.phase == "stats":
                parts = [slice_stats(plan, k, inputs) for k in range(len(plan.slices))]
            else:
                parts = [slice_apply(plan, k, sink, inputs) for k in range(len(plan.slices))]
        finally:
            inputs.close()
        advance(plan, parts)
    return finish(plan, params, state)


def run_slice(plan: Mapping[str, Any], index: int, out_path: str | os.PathLike[str]) -> dict[str, Any]:
    """The one task body of a chord: runs the phase the plan is in on slice ``index``.

    ``out_path`` receives the slice's tensors in the apply phase (unused in stats).
    Returns JSON-able partial results; pass the list, in slice order, to
    :func:`advance_round`.
    """
    if plan["phase"] == "stats":
        return stats_slice(plan, index)
    return apply_slice(plan, index, out_path)
