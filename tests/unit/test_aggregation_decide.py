"""The pure decisions of a round (aggregation.rounds.decide, .report) on literal inputs."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from aggregation.meta import TensorMeta
from aggregation.rounds import UpdateEntry, new_plan
from aggregation.rounds.decide import (
    Clipping,
    clip_factor,
    decide_clipping,
    effective_noise_multiplier,
    example_shares,
    mean_coefficients,
    next_clip_norm,
    noise_std,
    pairwise_distances,
    select_updates,
)
from aggregation.rounds.report import norm_spread, outlier_score
from aggregation.spec import normalize_without_clients
from tests.helpers import ROOT


def gram_of(points: list[list[float]]) -> list[list[float]]:
    return [[math.fsum(a * b for a, b in zip(p, q, strict=True)) for q in points] for p in points]


def test_the_decisions_module_does_not_import_torch() -> None:
    code = (
        "import sys, types, aggregation\n"
        "package = types.ModuleType('aggregation.rounds')\n"
        "package.__path__ = [aggregation.__path__[0] + '/rounds']\n"
        "sys.modules['aggregation.rounds'] = package\n"
        "import aggregation.rounds.decide, aggregation.rounds.report\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_example_shares() -> None:
    assert example_shares([10, 30], "examples") == [0.25, 0.75]
    assert example_shares([10, 30, 60], "uniform") == [1 / 3, 1 / 3, 1 / 3]


@pytest.mark.parametrize(
    ("norm", "clip", "factor"),
    [(4.0, None, 1.0), (None, 2.0, 1.0), (1.5, 2.0, 1.0), (2.0, 2.0, 1.0), (4.0, 2.0, 0.5)],
)
def test_clip_factor(norm: float | None, clip: float | None, factor: float) -> None:
    assert clip_factor(norm, clip) == factor


def test_next_clip_norm_moves_towards_the_quantile() -> None:
    kw = {"lr": 0.2, "count_stddev": 0.0, "seed": 0, "round_seed": 0}
    # half the norms are at most C: at the target quantile, C stays
    assert next_clip_norm(2.5, [1.0, 2.0, 3.0, 4.0], quantile=0.5, **kw) == 2.5
    # all below: C shrinks by exp(-lr * (1 - 0.5)); none below: it grows by exp(lr * 0.5)
    assert next_clip_norm(10.0, [1.0, 2.0], quantile=0.5, **kw) == 10.0 * math.exp(-0.1)
    assert next_clip_norm(0.5, [1.0, 2.0], quantile=0.5, **kw) == 0.5 * math.exp(0.1)
    # an unknown norm counts as 0 (below)
    assert next_clip_norm(0.5, [None, 2.0], quantile=0.5, **kw) == 0.5


def test_next_clip_norm_noise_is_seeded() -> None:
    kw = {"quantile": 0.5, "lr": 0.2, "count_stddev": 1.0}
    a = next_clip_norm(2.5, [1.0, 2.0, 3.0, 4.0], seed=1, round_seed=2, **kw)
    assert a == next_clip_norm(2.5, [1.0, 2.0, 3.0, 4.0], seed=1, round_seed=2, **kw)
    assert a != next_clip_norm(2.5, [1.0, 2.0, 3.0, 4.0], seed=1, round_seed=3, **kw)
    assert a != 2.5


def test_effective_noise_multiplier() -> None:
    assert effective_noise_multiplier(1.0, 1.0) == pytest.approx(1 / math.sqrt(0.75))
    assert effective_noise_multiplier(0.0, 1.0) == 0.0


def test_decide_clipping_per_mode() -> None:
    none = normalize_without_clients("fedavg", {})
    fixed = normalize_without_clients("fedavg", {"clip_norm": 2.0, "noise_multiplier": 0.5})
    adaptive = normalize_without_clients(
        "fedavg",
        {"clip_mode": "adaptive", "clip_norm": 2.0, "noise_multiplier": 1.0, "clip_count_stddev": 1.0},
    )
    norms = [1.0, 3.0]
    assert decide_clipping(none, None, norms, 0) == Clipping(None, None, 0.0)
    assert decide_clipping(fixed, None, norms, 0) == Clipping(2.0, None, 0.5)
    from_state = decide_clipping(adaptive, 4.0, norms, 0)  # the stored norm wins over clip_norm
    assert from_state.norm == 4.0
    assert from_state.next_norm == next_clip_norm(
        4.0, norms, quantile=0.5, lr=0.2, count_stddev=1.0, seed=0, round_seed=0
    )
    assert from_state.noise_multiplier == effective_noise_multiplier(1.0, 1.0)
    assert decide_clipping(adaptive, None, norms, 0).norm == 2.0


def test_pairwise_distances_of_clipped_deltas() -> None:
    gram = gram_of([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]])
    assert pairwise_distances(gram, [1.0, 1.0, 1.0]) == [[0.0, 2.0, 5.0], [2.0, 0.0, 5.0], [5.0, 5.0, 0.0]]
    # the third scaled by 0.5 is (1, 1)
    assert pairwise_distances(gram, [1.0, 1.0, 0.5]) == [[0.0, 2.0, 1.0], [2.0, 0.0, 1.0], [1.0, 1.0, 0.0]]


def test_krum_and_multi_krum_keep_the_cluster() -> None:
    gram = gram_of([[0.0], [1.0], [2.0], [3.0], [100.0]])
    ones = [1.0] * 5
    # scores (2 nearest): 5, 2, 2, 5, huge; 1 and 2 tie, 2 has the smaller sum of distances
    assert select_updates("krum", gram, ones, 1, None) == [2]
    assert select_updates("multi_krum", gram, ones, 1, None) == [0, 1, 2, 3]  # m = n - f
    assert select_updates("multi_krum", gram, ones, 1, 2) == [1, 2]


def test_bulyan_selects_n_minus_2f_without_the_outlier() -> None:
    gram = gram_of([[0.0], [1.0], [2.0], [3.0], [4.0], [5.0], [100.0]])
    chosen = select_updates("bulyan", gram, [1.0] * 7, 1, None)
    assert chosen == [1, 2, 3, 4, 5]  # 3, 2, 4, 1, then 5 (ties broken by the sum of distances)


def test_mean_coefficients_and_noise_std() -> None:
    assert mean_coefficients([0.25, 0.75], [1.0, 0.5]) == [0.25, 0.375]
    assert noise_std(2.0, 3.0, 0.25) == 1.5
    assert noise_std(2.0, None, 0.25) == 0.0
    assert noise_std(0.0, 3.0, 0.25) == 0.0


def test_norm_spread_and_outlier_score() -> None:
    assert norm_spread([]) == (0.0, 0.0)
    assert norm_spread([1.0, 2.0, 10.0]) == (2.0, 1.0)
    assert outlier_score(10.0, 2.0, 1.0) == pytest.approx(8 / 1.4826)
    assert outlier_score(2.0, 2.0, 0.0) == 0.0
    assert outlier_score(3.0, 2.0, 0.0) is None


def entry(key: str, examples: int) -> UpdateEntry:
    return UpdateEntry(key, None, examples, examples, examples)


def test_a_plan_decides_weights_clip_factors_and_noise() -> None:
    params = normalize_without_clients("fedavg", {"clip_norm": 2.0, "noise_multiplier": 0.5})
    model = {"w": TensorMeta("F32", (4,), 0, 0)}
    plan = new_plan("fedavg", params, model, [entry("a", 10), entry("b", 30), entry("c", 60)])
    assert plan.phase == "stats"
    plan.refuse(2, "non-finite values")
    plan.norms = {0: 1.0, 1: 4.0}
    plan.decide(None)
    decisions = plan.decided()
    assert plan.phase == "apply"
    assert decisions.used == [0, 1] and decisions.shares == [0.25, 0.75]
    assert decisions.clip_factors == {0: 1.0, 1: 0.5}
    assert decisions.coefs == [0.25, 0.375] and decisions.coef_sum == 0.625
    assert decisions.noise_std == 0.5 * 2.0 * 0.75


def test_a_plan_fails_when_too_few_updates_remain() -> None:
    params = normalize_without_clients("krum", {"f": 1})
    plan = new_plan("krum", params, {"w": TensorMeta("F32", (4,), 0, 0)}, [entry(k, 1) for k in "abcde"])
    plan.refuse(0, "bad")
    plan.decide(None)
    assert plan.phase == "failed" and plan.decisions is None
    assert plan.reason == "not enough valid updates: krum with f=1 needs more than 2f + 2 = 4 updates, got 4"
    assert plan.report is not None and plan.report["refused"] == 1


def test_the_plan_round_trips_through_json() -> None:
    params = normalize_without_clients("median", {})
    plan = new_plan("median", params, {"w": TensorMeta("F32", (4,), 0, 0)}, [entry("a", 1), entry("b", 2)])
    data = plan.to_json()
    assert plan.phase == "apply" and data["decisions"]["kind"] == "coord"
    assert type(plan).from_json(data).to_json() == data
