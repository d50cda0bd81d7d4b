"""What a round decides once, globally, before its apply phase (torch-free).

Small pure functions over plain numbers (clip factors, the adaptive clip norm, Krum/Bulyan
selection, mean weights, the noise scale), and :func:`decide_round`, which applies them to
a plan. The formulas and their sources are in ``docs/aggregation.md``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from ..seeds import noise_seed
from ..selection import bulyan_select, krum_select
from ..spec import DISTANCE_RULES, MEAN_STRATEGIES, SERVER_OPTIMIZERS, trim_count

if TYPE_CHECKING:
    from .plan import Plan

#: Rules that aggregate with a weighted mean of the (clipped) deltas: Krum and Multi-Krum
#: average the updates they select.
WEIGHTED_MEAN_RULES = MEAN_STRATEGIES | {"krum", "multi_krum"}


@dataclass(kw_only=True)
class Decisions:
    """What the apply phase of a round does (the field order is the JSON key order).

    ``kind``: ``"mean"`` (``coefs``: per used update, share x clip factor) or ``"coord"``
    (order statistics; ``scales``: the clip factors when clipping). ``used``: update
    indices aggregated, ascending. ``clip_factors``: per accepted update.
    ``track_norms``: no stats pass ran, so apply measures the norms.
    """

    kind: str
    used: list[int]
    coefs: list[float] | None = None
    coef_sum: float | None = None
    shares: list[float] | None = None
    scales: list[float] | None = None
    rule: str
    trim_k: int = 0
    bulyan_beta: int = 0
    selected: list[int] | None = None
    clip_norm: float | None
    clip_norm_next: float | None
    clip_factors: dict[int, float]
    noise_multiplier: float
    noise_std: float = 0.0
    optimizer: str | None
    track_norms: bool

    def to_json(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        return {**data, "clip_factors": {str(i): factor for i, factor in self.clip_factors.items()}}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Decisions:
        factors = {int(i): factor for i, factor in data["clip_factors"].items()}
        return cls(**{**data, "clip_factors": factors})


@dataclass(frozen=True)
class Clipping:
    """This round's clip norm (None: no clipping), the next round's (adaptive only), and
    the noise multiplier the noise is calibrated with (0 without clipping)."""

    norm: float | None = None
    next_norm: float | None = None
    noise_multiplier: float = 0.0


def example_shares(examples: Sequence[int], weighting: str) -> list[float]:
    """Each update's share of a mean: by its (clamped) example count, or equal shares when
    ``weighting`` is ``"uniform"``; the shares sum to 1."""
    raw = [1.0] * len(examples) if weighting == "uniform" else [float(e) for e in examples]
    total = math.fsum(raw)
    return [w / total for w in raw]


def clip_factor(norm: float | None, clip_norm: float | None) -> float:
    """``min(1, clip_norm / norm)``; 1 without clipping or when the norm is unknown."""
    if clip_norm is None or norm is None or norm <= clip_norm:
        return 1.0
    return clip_norm / norm


def next_clip_norm(
    clip_norm: float,
    norms: Sequence[float | None],
    *,
    quantile: float,
    lr: float,
    count_stddev: float,
    seed: int,
    round_seed: int,
) -> float:
    """Adaptive clipping (Andrew et al. 2021): ``C * exp(-lr * (b - quantile))`` with ``b`` the
    noised fraction of norms at most ``C`` (an unknown norm counts as 0)."""
    below = sum(1 for norm in norms if (norm or 0.0) <= clip_norm)
    rng = random.Random(noise_seed(seed, round_seed, "\x00clip_count", 0))
    noisy = below + (rng.gauss(0.0, count_stddev) if count_stddev > 0 else 0.0)
    fraction = noisy / len(norms)
    return clip_norm * math.exp(-lr * (fraction - quantile))


def effective_noise_multiplier(noise_multiplier: float, count_stddev: float) -> float:
    """The multiplier left for the aggregate when the clipped count takes part of the privacy
    budget (adaptive clipping): ``(z^-2 - (2 sigma_b)^-2)^-1/2``; ``z`` itself when 0."""
    if noise_multiplier > 0:
        return float((noise_multiplier**-2 - (2 * count_stddev) ** -2) ** -0.5)
    return noise_multiplier


def decide_clipping(
    params: Mapping[str, Any], stored_norm: float | None, norms: Sequence[float | None], round_seed: int
) -> Clipping:
    """The clipping of a round from the strategy params (``clip_mode`` ...), the adaptive clip
    norm kept in the state file (None: start from ``clip_norm``) and the accepted norms."""
    multiplier = float(params["noise_multiplier"])
    mode = params["clip_mode"]
    if mode == "fixed":
        return Clipping(float(params["clip_norm"]), None, multiplier)
    if mode != "adaptive":
        return Clipping()
    clip_norm = stored_norm if stored_norm is not None else float(params["clip_norm"])
    count_stddev = float(params["clip_count_stddev"])
    following = next_clip_norm(
        clip_norm,
        norms,
        quantile=float(params["clip_quantile"]),
        lr=float(params["clip_lr"]),
        count_stddev=count_stddev,
        seed=int(params["seed"]),
        round_seed=round_seed,
    )
    return Clipping(clip_norm, following, effective_noise_multiplier(multiplier, count_stddev))


def pairwise_distances(gram: Sequence[Sequence[float]], factors: Sequence[float]) -> list[list[float]]:
    """Squared distances between the clipped deltas ``s_a d_a`` from their Gram matrix
    (upper triangle only, so the matrix is exactly symmetric)."""
    n = len(factors)

    def distance(a: int, b: int) -> float:
        if a == b:
            return 0.0
        lo, hi = min(a, b), max(a, b)
        s_lo, s_hi = factors[lo], factors[hi]
        return max(
            0.0, s_lo * s_lo * gram[lo][lo] + s_hi * s_hi * gram[hi][hi] - 2 * s_lo * s_hi * gram[lo][hi]
        )

    return [[distance(a, b) for b in range(n)] for a in range(n)]


def select_updates(
    rule: str, gram: Sequence[Sequence[float]], factors: Sequence[float], f: int, m: int | None
) -> list[int]:
    """Positions (rows of ``gram``) that Krum, Multi-Krum (``m`` best; None: n - f) or
    Bulyan's first stage keep, ascending."""
    distances = pairwise_distances(gram, factors)
    members = list(range(len(factors)))
    if rule == "bulyan":
        return bulyan_select(distances, members, f)
    keep = 1 if rule == "krum" else (m if m is not None else len(members) - f)
    return sorted(krum_select(distances, members, f, int(keep)))


def mean_coefficients(shares: Sequence[float], factors: Sequence[float]) -> list[float]:
    """Each used update's coefficient in the mean: its share times its clip factor."""
    return [share * factor for share, factor in zip(shares, factors, strict=True)]


def noise_std(noise_multiplier: float, clip_norm: float | None, sensitivity: float) -> float:
    """The DP noise's standard deviation: ``z * C * sensitivity``; 0 without clipping."""
    if clip_norm is None or not noise_multiplier > 0:
        return 0.0
    return noise_multiplier * clip_norm * sensitivity


def decide_round(plan: Plan, gram: list[list[float]] | None) -> Decisions:
    """Everything global of a round from its reduced stats: clipping, selection, weights and
    noise. ``gram``: over the accepted updates (Krum, Multi-Krum, Bulyan). The caller has
    checked that enough updates are accepted."""
    params = plan.params
    accepted = plan.accepted()
    norms = [plan.norms.get(i) for i in accepted]
    clipping = decide_clipping(params, plan.clip_norm_state, norms, plan.round_seed)
    factors = {i: clip_factor(norm, clipping.norm) for i, norm in zip(accepted, norms, strict=True)}
    used, selected = accepted, None
    if plan.strategy in DISTANCE_RULES:
        assert gram is not None
        positions = select_updates(
            plan.strategy, gram, list(factors.values()), int(params["f"]), params.get("m")
        )
        used = selected = [accepted[p] for p in positions]
    decisions = Decisions(
        kind="mean",
        used=used,
        rule=plan.strategy,
        clip_norm=clipping.norm,
        clip_norm_next=clipping.next_norm,
        clip_factors=factors,
        noise_multiplier=clipping.noise_multiplier,
        optimizer=plan.strategy if plan.strategy in SERVER_OPTIMIZERS else None,
        track_norms=not plan.needs_stats,
        selected=selected,
    )
    if plan.strategy in WEIGHTED_MEAN_RULES:
        weighting = params.get("weighting", "examples")
        decisions.shares = example_shares([plan.updates[i].examples for i in used], weighting)
        decisions.coefs = mean_coefficients(decisions.shares, [factors[i] for i in used])
        decisions.coef_sum = math.fsum(decisions.coefs)
        sensitivity = max(decisions.shares)
    else:
        decisions.kind = "coord"
        decisions.scales = [factors[i] for i in used] if clipping.norm is not None else None
        if plan.strategy == "trimmed_mean":
            decisions.trim_k = trim_count(float(params["beta"]), len(used))
        if plan.strategy == "bulyan":
            decisions.bulyan_beta = len(used) - 2 * int(params["f"])
        sensitivity = 1.0 / len(used)
    decisions.noise_std = noise_std(clipping.noise_multiplier, clipping.norm, sensitivity)
    return decisions
