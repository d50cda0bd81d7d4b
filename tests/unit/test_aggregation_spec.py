"""aggregation.spec: strategy names and parameters, checked without torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from aggregation.spec import (
    FUNCTIONAL_RULES,
    STRATEGIES,
    normalize_strategy,
    normalize_without_clients,
    shortfall,
    trim_count,
)

ROOT = Path(__file__).resolve().parents[2]


def test_importing_the_package_and_spec_does_not_import_torch() -> None:
    code = (
        "import sys; import aggregation, aggregation.spec; "
        "aggregation.spec.normalize_strategy('krum', {'f': 1}, 5); "
        "aggregation.read_meta; aggregation.plan_slices; aggregation.STRATEGIES; "
        "assert 'torch' not in sys.modules, 'torch was imported'; "
        "assert 'safetensors' not in sys.modules, 'safetensors was imported'"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_lazy_exports_resolve_to_torch_objects() -> None:
    code = (
        "import sys, aggregation; assert 'torch' not in sys.modules; "
        "s = aggregation.build_strategy('fedavg', {}); assert 'torch' in sys.modules; "
        "print(type(s).__name__, aggregation.UpdateFile.__name__, sorted(aggregation.__all__)[:2])"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[:2] == ["Strategy", "UpdateFile"]


def test_unknown_attribute_raises_attribute_error() -> None:
    import aggregation

    with pytest.raises(AttributeError):
        _ = aggregation.does_not_exist


@pytest.mark.parametrize("name", STRATEGIES)
def test_defaults_are_filled_and_normalizing_is_idempotent(name: str) -> None:
    out = normalize_strategy(name, {}, 20)
    assert out["clip_mode"] == "none"
    assert out["noise_multiplier"] == 0.0
    assert out["seed"] == 0
    assert normalize_strategy(name, out, 20) == out
    assert normalize_without_clients(name, out) == out


def test_strategy_specific_defaults() -> None:
    assert normalize_strategy("fedavg", {}, 3) == {
        "clip_mode": "none",
        "noise_multiplier": 0.0,
        "seed": 0,
        "weighting": "examples",
    }
    assert normalize_strategy("fedprox", {}, 3)["mu"] == 0.01
    assert normalize_strategy("fedprox", {"mu": 0}, 3)["mu"] == 0.0
    adam = normalize_strategy("fedadam", {}, 3)
    assert (adam["server_lr"], adam["beta1"], adam["beta2"], adam["tau"]) == (0.01, 0.9, 0.99, 1e-3)
    assert normalize_strategy("fedavgm", {}, 3)["momentum"] == 0.9
    assert normalize_strategy("trimmed_mean", {}, 3)["beta"] == 0.1
    assert normalize_strategy("multi_krum", {}, 5) | {} == {
        "clip_mode": "none",
        "noise_multiplier": 0.0,
        "seed": 0,
        "f": 1,
        "m": None,
    }


def test_clip_norm_alone_means_fixed_clipping() -> None:
    out = normalize_strategy("median", {"clip_norm": 2}, 5)
    assert out["clip_mode"] == "fixed"
    assert out["clip_norm"] == 2.0


def test_adaptive_clipping_defaults() -> None:
    out = normalize_strategy("fedavg", {"clip_mode": "adaptive"}, 40)
    assert out["clip_norm"] == 0.1
    assert out["clip_quantile"] == 0.5
    assert out["clip_lr"] == 0.2
    assert out["clip_count_stddev"] == 0.0
    noisy = normalize_strategy("fedavg", {"clip_mode": "adaptive", "noise_multiplier": 1.0}, 40)
    assert noisy["clip_count_stddev"] == 2.0  # num_clients / 20, as in Andrew et al.


@pytest.mark.parametrize(
    ("name", "params", "n", "fragment"),
    [
        ("nope", {}, 3, "unknown strategy"),
        ("fedavg", {"beta": 0.1}, 3, "does not take parameter(s) beta"),
        ("fedavg", {"clip_quantile": 0.5}, 3, "need clip_mode 'adaptive'"),
        ("fedavg", {"clip_mode": "fixed"}, 3, "needs strategy_params.clip_norm"),
        ("fedavg", {"clip_mode": "sometimes"}, 3, "clip_mode must be one of"),
        ("fedavg", {"clip_norm": 0}, 3, "clip_norm must be in (0"),
        ("fedavg", {"clip_norm": "1"}, 3, "must be a number"),
        ("fedavg", {"clip_norm": True}, 3, "must be a number"),
        ("fedavg", {"noise_multiplier": 1.0}, 3, "needs clipping"),
        ("fedavg", {"noise_multiplier": -1, "clip_norm": 1}, 3, "noise_multiplier must be in"),
        ("fedavg", {"seed": 1.5}, 3, "seed must be an integer"),
        ("fedavg", {"seed": -1}, 3, "seed must be in"),
        ("fedavg", {"weighting": "votes"}, 3, "weighting must be one of"),
        ("fedprox", {"mu": -0.1}, 3, "mu must be in"),
        ("fedprox", {"mu": float("nan")}, 3, "must be finite"),
        ("fedavgm", {"momentum": 1.0}, 3, "momentum must be in"),
        ("fedadam", {"beta2": 1.0}, 3, "beta2 must be in"),
        ("fedadam", {"tau": 0}, 3, "tau must be in"),
        ("fedyogi", {"server_lr": 0}, 3, "server_lr must be in"),
        ("trimmed_mean", {"beta": 0.6}, 3, "beta must be in"),
        ("trimmed_mean", {"beta": 0.5}, 4, "trims away all 4 updates"),
        ("krum", {"f": 1}, 4, "needs more than 2f + 2 = 4 updates, got 4"),
        ("krum", {"f": -1}, 9, "f must be in"),
        ("krum", {"f": 1.5}, 9, "f must be an integer in 0..1000000, got 1.5"),
        ("multi_krum", {"f": 1, "m": 5}, 5, "keeps at most n - f = 4 updates, but m=5"),
        ("multi_krum", {"f": 1, "m": 0}, 5, "m must be in"),
        ("bulyan", {"f": 1}, 6, "needs at least 4f + 3 = 7 updates, got 6"),
        ("bulyan", {"f": 2}, 10, "needs at least 4f + 3 = 11"),
        (
            "fedavg",
            {"clip_mode": "adaptive", "noise_multiplier": 1.0},
            10,
            "needs clip_count_stddev > 0.5",
        ),
    ],
)
def test_refusals_say_why(name: str, params: dict[str, Any], n: int, fragment: str) -> None:
    with pytest.raises(ValueError) as err:
        normalize_strategy(name, params, n)
    assert fragment in str(err.value)


def test_an_integral_number_is_an_integer() -> None:
    # As JSON Schema says: 2.0 is the integer 2 (and it is stored as one).
    out = normalize_strategy("multi_krum", {"f": 1.0, "m": 2.0, "seed": 7.0}, 5)
    assert (out["f"], out["m"], out["seed"]) == (1, 2, 7)
    assert all(type(out[key]) is int for key in ("f", "m", "seed"))


def test_boundaries_that_just_work() -> None:
    normalize_strategy("krum", {"f": 1}, 5)
    normalize_strategy("multi_krum", {"f": 1, "m": 4}, 5)
    normalize_strategy("bulyan", {"f": 1}, 7)
    normalize_strategy("trimmed_mean", {"beta": 0.5}, 5)  # keeps the middle one
    normalize_strategy(
        "fedavg", {"clip_mode": "adaptive", "noise_multiplier": 1.0, "clip_count_stddev": 0.6}, 2
    )


def test_non_mapping_params_and_bad_client_count() -> None:
    with pytest.raises(ValueError, match="must be an object"):
        normalize_strategy("fedavg", [], 3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_clients"):
        normalize_strategy("fedavg", {}, 0)


def test_without_clients_skips_count_checks_but_needs_count_stddev() -> None:
    assert normalize_without_clients("krum", {"f": 3})["f"] == 3
    with pytest.raises(ValueError, match="clip_count_stddev must be given"):
        normalize_without_clients("fedavg", {"clip_mode": "adaptive", "noise_multiplier": 1.0})


def test_shortfall_and_trim_count() -> None:
    assert trim_count(0.3, 10) == 3  # 0.3 * 10 is 2.9999999999999996 in floating point
    assert trim_count(0.1, 9) == 0
    assert shortfall("fedavg", {}, 1) is None
    assert shortfall("fedavg", {}, 0) is not None
    assert shortfall("krum", {"f": 1}, 5) is None
    assert shortfall("krum", {"f": 1}, 4) is not None
    assert shortfall("multi_krum", {"f": 1, "m": None}, 5) is None
    assert shortfall("bulyan", {"f": 0}, 3) is None


def test_functional_rules_are_strategies() -> None:
    assert set(FUNCTIONAL_RULES) <= set(STRATEGIES)
