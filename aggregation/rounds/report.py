"""The round's report: what happened to each update, and the spread of the norms (torch-free).

The report is strict JSON; its fields are described in ``docs/aggregation.md``.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .plan import Plan

#: Scales the median absolute deviation to a standard deviation for normal data.
OUTLIER_MAD_SCALE = 1.4826


def norm_spread(norms: Sequence[float]) -> tuple[float, float]:
    """Median and median absolute deviation of the norms (0, 0 when there are none)."""
    if not norms:
        return 0.0, 0.0
    median = statistics.median(norms)
    return median, statistics.median([abs(v - median) for v in norms])


def outlier_score(norm: float, median: float, mad: float) -> float | None:
    """``(norm - median) / (1.4826 MAD)``: about a z-score; None when the MAD is 0 and the
    norm is not the median."""
    if mad > 0:
        return (norm - median) / (OUTLIER_MAD_SCALE * mad)
    return 0.0 if norm == median else None


def build_report(plan: Plan) -> dict[str, Any]:
    """The report of a round that is done or failed."""
    decisions = plan.decisions
    finite = [v for i, v in plan.norms.items() if plan.updates[i].accepted]
    median, mad = norm_spread(finite)
    used = set(decisions.used) if decisions is not None and plan.phase == "done" else set()
    return {
        "strategy": plan.strategy,
        "aggregated": plan.phase == "done",
        "reason": plan.reason,
        "used": len(used),
        "refused": sum(1 for u in plan.updates if not u.accepted),
        "clip_mode": plan.params["clip_mode"],
        "clip_norm": decisions.clip_norm if decisions is not None else None,
        "clip_norm_next": decisions.clip_norm_next if decisions is not None else None,
        "noise_multiplier": decisions.noise_multiplier if decisions is not None else 0.0,
        "noise_std": decisions.noise_std if decisions is not None else 0.0,
        "norm_median": median if finite else None,
        "norm_mad": mad if finite else None,
        "num_slices": len(plan.slices),
        "attempts": plan.attempt,
        "updates": _per_update(plan, used, median, mad),
    }


def _per_update(plan: Plan, used: set[int], median: float, mad: float) -> dict[str, dict[str, Any]]:
    decisions = plan.decisions
    factors = decisions.clip_factors if decisions is not None else {}
    selected = decisions.selected if decisions is not None else None
    weights = None  # a weight per update in the mean rules; None for order statistics
    if decisions is not None and decisions.shares is not None:
        weights = dict(zip(decisions.used, decisions.shares, strict=False))
    rows: dict[str, dict[str, Any]] = {}
    for i, u in enumerate(plan.updates):
        norm = plan.norms.get(i)
        factor = factors.get(i)
        rows[u.key] = {
            "accepted": bool(u.accepted),
            "used": i in used,
            "reason": u.reason,
            "num_examples": u.num_examples,
            "examples_counted": u.examples,
            "norm": norm,
            "outlier_score": outlier_score(norm, median, mad) if norm is not None and u.accepted else None,
            "weight": weights.get(i, 0.0) if weights is not None and u.accepted else None,
            "clip_factor": factor,
            "clipped": bool(factor is not None and factor < 1.0),
            "selected": (i in selected) if selected is not None and u.accepted else None,
        }
    return rows
