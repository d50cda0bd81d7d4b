"""Names and parameters of the aggregation strategies, checked without importing torch.

The web tier validates a task's ``config.strategy`` and ``config.strategy_params`` here at
submit time, so a strategy that cannot work is a 400, not an exception in a worker.

Every strategy accepts the common parameters (clipping, DP noise, seed); each strategy
adds its own. :func:`normalize_strategy` returns only the parameters that apply, with
defaults filled in, and is idempotent: normalizing its own output returns the same dict.
See ``docs/aggregation.md`` for what each parameter means.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

STRATEGIES: tuple[str, ...] = (
    "fedavg",
    "fedprox",
    "fedavgm",
    "fedadam",
    "fedyogi",
    "fedadagrad",
    "median",
    "trimmed_mean",
    "krum",
    "multi_krum",
    "bulyan",
)
#: Strategies that average the (clipped) deltas with example-count weights.
MEAN_STRATEGIES = frozenset({"fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad"})
#: Mean strategies with a server optimizer whose state persists across rounds.
SERVER_OPTIMIZERS = frozenset({"fedavgm", "fedadam", "fedyogi", "fedadagrad"})
#: Rules that need pairwise distances between updates (a stats pass before aggregating).
DISTANCE_RULES = frozenset({"krum", "multi_krum", "bulyan"})
#: Rules the functional :func:`aggregation.aggregate` accepts.
FUNCTIONAL_RULES: tuple[str, ...] = ("fedavg", "median", "trimmed_mean", "krum", "multi_krum", "bulyan")
CLIP_MODES: tuple[str, ...] = ("none", "fixed", "adaptive")
WEIGHTINGS: tuple[str, ...] = ("examples", "uniform")

_COMMON = ("clip_mode", "noise_multiplier", "seed")
_CLIP_FIXED = ("clip_norm",)
_CLIP_ADAPTIVE = ("clip_norm", "clip_quantile", "clip_lr", "clip_count_stddev")

_OWN: dict[str, dict[str, Any]] = {
    "fedavg": {"weighting": "examples"},
    "fedprox": {"mu": 0.01, "weighting": "examples"},
    "fedavgm": {"server_lr": 1.0, "momentum": 0.9, "weighting": "examples"},
    "fedadam": {"server_lr": 0.01, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3, "weighting": "examples"},
    "fedyogi": {"server_lr": 0.01, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3, "weighting": "examples"},
    "fedadagrad": {"server_lr": 0.1, "beta1": 0.9, "tau": 1e-3, "weighting": "examples"},
    "median": {},
    "trimmed_mean": {"beta": 0.1},
    "krum": {"f": 1},
    "multi_krum": {"f": 1, "m": None},
    "bulyan": {"f": 1},
}

MAX_SEED = 2**63 - 1


def _number(params: Mapping[str, Any], key: str, default: Any) -> float:
    value = params.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"strategy_params.{key} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"strategy_params.{key} must be finite")
    return value


def _integer(params: Mapping[str, Any], key: str, default: Any, lo: int, hi: int) -> int:
    value = params.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"strategy_params.{key} must be an integer, got {value!r}")
    if not lo <= value <= hi:
        raise ValueError(f"strategy_params.{key} must be in {lo}..{hi}, got {value}")
    return value


def _in(value: float, key: str, lo: float, hi: float, *, lo_open: bool, hi_open: bool) -> float:
    ok_lo = value > lo if lo_open else value >= lo
    ok_hi = value < hi if hi_open else value <= hi
    if not (ok_lo and ok_hi):
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        hi_text = "inf" if hi == math.inf else f"{hi:g}"
        raise ValueError(f"strategy_params.{key} must be in {left}{lo:g}, {hi_text}{right}, got {value:g}")
    return value


def _normalize(name: Any, params: Any, num_clients: int | None) -> dict[str, Any]:
    if not isinstance(name, str) or name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; known: {', '.join(STRATEGIES)}")
    if not isinstance(params, Mapping):
        raise ValueError("strategy_params must be an object")
    if num_clients is not None and (
        isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1
    ):
        raise ValueError(f"num_clients must be a positive integer, got {num_clients!r}")
    n = num_clients
    out: dict[str, Any] = {}

    # --- common: clipping, noise, seed ---------------------------------------------------
    default_mode = "fixed" if params.get("clip_norm") is not None else "none"
    mode = params.get("clip_mode", default_mode)
    if mode not in CLIP_MODES:
        raise ValueError(f"strategy_params.clip_mode must be one of {', '.join(CLIP_MODES)}; got {mode!r}")
    out["clip_mode"] = mode
    allowed = set(_COMMON) | set(_OWN[name])
    if mode == "fixed":
        allowed |= set(_CLIP_FIXED)
        if params.get("clip_norm") is None:
            raise ValueError("clip_mode 'fixed' needs strategy_params.clip_norm (a number > 0)")
        out["clip_norm"] = _in(
            _number(params, "clip_norm", None), "clip_norm", 0, math.inf, lo_open=True, hi_open=True
        )
    elif mode == "adaptive":
        allowed |= set(_CLIP_ADAPTIVE)
        out["clip_norm"] = _in(
            _number(params, "clip_norm", 0.1), "clip_norm", 0, math.inf, lo_open=True, hi_open=True
        )
        out["clip_quantile"] = _in(
            _number(params, "clip_quantile", 0.5), "clip_quantile", 0, 1, lo_open=True, hi_open=True
        )
        out["clip_lr"] = _in(_number(params, "clip_lr", 0.2), "clip_lr", 0, 10, lo_open=True, hi_open=False)
    unknown = sorted(set(params) - allowed)
    if unknown:
        hint = ""
        if set(unknown) & set(_CLIP_ADAPTIVE):
            hint = (
                " (clip_quantile, clip_lr and clip_count_stddev need clip_mode 'adaptive'; "
                "clip_norm needs 'fixed' or 'adaptive')"
            )
        raise ValueError(
            f"strategy {name!r} does not take parameter(s) {', '.join(unknown)}{hint}; "
            f"it takes: {', '.join(sorted(allowed))}"
        )
    z = _in(
        _number(params, "noise_multiplier", 0.0), "noise_multiplier", 0, 1e6, lo_open=False, hi_open=False
    )
    out["noise_multiplier"] = z
    if z > 0 and mode == "none":
        raise ValueError(
            "noise_multiplier > 0 needs clipping: set clip_norm (and clip_mode 'fixed' or 'adaptive')"
        )
    if mode == "adaptive":
        if "clip_count_stddev" in params:
            sigma_b = _in(
                _number(params, "clip_count_stddev", None),
                "clip_count_stddev",
                0,
                math.inf,
                lo_open=False,
                hi_open=True,
            )
        elif z == 0:
            sigma_b = 0.0
        elif n is None:
            raise ValueError(
                "strategy_params.clip_count_stddev must be given when the number of clients is unknown"
            )
        else:
            sigma_b = n / 20.0
        if z > 0 and not 2 * sigma_b > z:
            raise ValueError(
                f"adaptive clipping with noise_multiplier {z:g} needs clip_count_stddev > {z / 2:g} "
                f"(got {sigma_b:g}): the clipped-count noise takes part of the privacy budget "
                "(Andrew et al.); raise clip_count_stddev or lower noise_multiplier"
            )
        out["clip_count_stddev"] = sigma_b
    out["seed"] = _integer(params, "seed", 0, 0, MAX_SEED)

    # --- strategy's own -------------------------------------------------------------------
    own = _OWN[name]
    if "weighting" in own:
        weighting = params.get("weighting", own["weighting"])
        if weighting not in WEIGHTINGS:
            raise ValueError(
                f"strategy_params.weighting must be one of {', '.join(WEIGHTINGS)}; got {weighting!r}"
            )
        out["weighting"] = weighting
    if name == "fedprox":
        out["mu"] = _in(_number(params, "mu", own["mu"]), "mu", 0, 1e6, lo_open=False, hi_open=False)
    if "server_lr" in own:
        out["server_lr"] = _in(
            _number(params, "server_lr", own["server_lr"]), "server_lr", 0, 1e3, lo_open=True, hi_open=False
        )
    if name == "fedavgm":
        out["momentum"] = _in(
            _number(params, "momentum", own["momentum"]), "momentum", 0, 1, lo_open=False, hi_open=True
        )
    for key in ("beta1", "beta2"):
        if key in own:
            out[key] = _in(_number(params, key, own[key]), key, 0, 1, lo_open=False, hi_open=True)
    if "tau" in own:
        out["tau"] = _in(_number(params, "tau", own["tau"]), "tau", 0, 1e3, lo_open=True, hi_open=False)
    if name == "trimmed_mean":
        beta = _in(_number(params, "beta", own["beta"]), "beta", 0, 0.5, lo_open=False, hi_open=False)
        out["beta"] = beta
    if name in DISTANCE_RULES:
        out["f"] = _integer(params, "f", own["f"], 0, 10**6)
    if name == "multi_krum":
        m = params.get("m")
        out["m"] = None if m is None else _integer(params, "m", None, 1, 10**6)
    if n is not None:
        reason = shortfall(name, out, n)
        if reason:
            raise ValueError(f"{reason} (num_shards is {n})")
    return out


def normalize_strategy(name: str, params: Mapping[str, Any], num_clients: int) -> dict[str, Any]:
    """Return the strategy's parameters with defaults filled in.

    ``num_clients`` is the number of updates each round aggregates (the task's ``num_shards``).
    Raises ``ValueError`` with a reason a user can act on: unknown strategy or parameter,
    wrong type or range, or a combination that cannot work with ``num_clients`` updates
    (trimming away every update, Krum with n <= 2f + 2, Multi-Krum m > n - f, Bulyan
    n < 4f + 3, noise without clipping, ...).
    """
    return _normalize(name, params, num_clients)


def normalize_without_clients(name: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """Like :func:`normalize_strategy` when the number of clients is not known (a worker
    re-checking a stored config): the checks that need it are skipped."""
    return _normalize(name, params, None)


def trim_count(beta: float, n: int) -> int:
    """Updates trimmed from each end by ``trimmed_mean`` with ``n`` updates."""
    return math.floor(beta * n + 1e-9)


def shortfall(name: str, params: Mapping[str, Any], n: int) -> str | None:
    """Why ``n`` valid updates are not enough for the strategy, or None when they are."""
    if n < 1:
        return f"{name} needs at least 1 update, got 0"
    if name == "trimmed_mean":
        k = trim_count(float(params["beta"]), n)
        if n - 2 * k < 1:
            return f"trimmed_mean with beta={params['beta']:g} trims away all {n} updates ({k} from each end)"
    if name in ("krum", "multi_krum"):
        f = int(params["f"])
        if n <= 2 * f + 2:
            return f"{name} with f={f} needs more than 2f + 2 = {2 * f + 2} updates, got {n}"
        m = params.get("m")
        if name == "multi_krum" and m is not None and int(m) > n - f:
            return f"multi_krum with f={f} keeps at most n - f = {n - f} updates, but m={m}"
    if name == "bulyan":
        f = int(params["f"])
        if n < 4 * f + 3:
            return f"bulyan with f={f} needs at least 4f + 3 = {4 * f + 3} updates, got {n}"
    return None
