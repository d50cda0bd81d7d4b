"""Advancing a round: reduce the slice results of a phase, in slice order, into the next plan."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from .. import _kernels as K
from ..errors import AggregationError
from ..spec import DISTANCE_RULES
from .plan import Plan
from .report import build_report


def advance_round(plan: Mapping[str, Any], parts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Reduce the slice results of the current phase (in slice order) and return the next
    plan: phase ``apply`` (again, if an update was found non-finite during a stats-less
    apply), ``done`` or ``failed``. Pure: the input plan is not modified."""
    typed = Plan.from_json(plan)
    advance(typed, parts)
    return typed.to_json()


def advance(plan: Plan, parts: Sequence[Mapping[str, Any]]) -> None:
    """:func:`advance_round` on a typed plan, in place."""
    if len(parts) != len(plan.slices):
        raise AggregationError(f"expected {len(plan.slices)} slice results, got {len(parts)}")
    if plan.phase == "stats":
        _reduce_stats(plan, parts)
    elif plan.phase == "apply":
        _reduce_apply(plan, parts)
    else:
        raise AggregationError(f"nothing to advance: the plan is {plan.phase!r}")


def _reduce_stats(plan: Plan, parts: Sequence[Mapping[str, Any]]) -> None:
    members = plan.accepted()
    for part in parts:
        if list(part["members"]) != members:
            raise AggregationError("slice results were computed for a different plan")
    kept = _reduce_norms(plan, parts, members)
    gram: list[list[float]] | None = None
    if plan.strategy in DISTANCE_RULES:
        gram = [[K.fsum([float(part["gram"][a][b]) for part in parts]) for b in kept] for a in kept]
    plan.stats_members = members
    plan.decide(gram)


def _reduce_apply(plan: Plan, parts: Sequence[Mapping[str, Any]]) -> None:
    decisions = plan.decided()
    if decisions.track_norms:
        kept = _reduce_norms(plan, parts, decisions.used)
        if len(kept) < len(decisions.used):  # refused one: apply again without it
            plan.attempt += 1
            plan.decide(None)
            return
    plan.phase = "done"
    plan.report = build_report(plan)


def _reduce_norms(plan: Plan, parts: Sequence[Mapping[str, Any]], members: Sequence[int]) -> list[int]:
    """Refuse each member a slice found non-finite and set the others' norms (summed over
    the slices exactly); returns the positions of the members kept."""
    kept: list[int] = []
    for k, i in enumerate(members):
        why = next((part["bad"][k] for part in parts if part["bad"][k]), None)
        if why:
            plan.refuse(i, why)
            continue
        plan.norms[i] = math.sqrt(K.fsum([float(part["sumsq"][k]) for part in parts]))
        kept.append(k)
    return kept
