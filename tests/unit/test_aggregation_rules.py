"""The rules on small literal examples worked out by hand, and their properties.

Through the functional ``aggregation.aggregate`` (models in, model out, like Flower's
``aggregate``), which runs the same window kernels as a round (fedavg over float models:
one weighted pass, equal up to rounding).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from aggregation import NotEnoughUpdates, aggregate
from aggregation import _kernels as K
from aggregation.selection import bulyan_select, krum_scores, krum_select

T = torch.tensor


def sd(*values: float, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    return {"w": torch.tensor(values, dtype=dtype)}


# ------------------------------------------------------------------------- literal examples


def test_fedavg_weights_by_example_count() -> None:
    out = aggregate("fedavg", [(sd(1, 2), 1), (sd(3, 6), 3)])
    assert torch.equal(out["w"], T([2.5, 5.0]))  # (1*1 + 3*3)/4, (1*2 + 3*6)/4


def test_fedavg_uniform_weighting() -> None:
    out = aggregate("fedavg", [(sd(1, 2), 1), (sd(3, 6), 3)], weighting="uniform")
    assert torch.equal(out["w"], T([2.0, 4.0]))


def test_median_odd_and_even() -> None:
    ups = [sd(1, 50, -3), sd(4, 2, -1), sd(2, 7, 100)]
    assert torch.equal(aggregate("median", [(u, 1) for u in ups])["w"], T([2.0, 7.0, -1.0]))
    ups.append(sd(3, 1, 0))  # sorted columns: 1 2 3 4 | 1 2 7 50 | -3 -1 0 100
    assert torch.equal(aggregate("median", [(u, 1) for u in ups])["w"], T([2.5, 4.5, -0.5]))


def test_median_ignores_example_counts() -> None:
    ups = [(sd(1.0), 1000), (sd(2.0), 1), (sd(3.0), 1)]
    assert torch.equal(aggregate("median", ups)["w"], T([2.0]))


def test_trimmed_mean_drops_k_from_each_end() -> None:
    # beta 0.2 of 5 updates trims 1 from each end of every coordinate
    ups = [sd(1, -1000, 2), sd(2, 5, 2), sd(3, 6, 2), sd(4, 7, 2), sd(1000, 8, 2)]
    out = aggregate("trimmed_mean", [(u, 1) for u in ups], beta=0.2)
    assert torch.equal(out["w"], T([3.0, 6.0, 2.0]))  # mean(2,3,4), mean(5,6,7), 2
    plain = aggregate("trimmed_mean", [(u, 1) for u in ups], beta=0.0)
    assert torch.allclose(plain["w"], T([202.0, -194.8, 2.0]))  # beta 0 is the mean


def krum_points() -> list[dict[str, torch.Tensor]]:
    # index: 0 attacker far away, 1 (1,0), 2 centre (0.5,0.5), 3 (0,0), 4 (0,1)
    return [sd(100, 100), sd(1, 0), sd(0.5, 0.5), sd(0, 0), sd(0, 1)]


def test_krum_scores_by_hand() -> None:
    pts = [u["w"].double() for u in krum_points()]
    dist = [[float(((a - b) ** 2).sum()) for b in pts] for a in pts]
    scores = krum_scores(dist, range(5), 1)  # n - f - 2 = 2 nearest
    assert scores[2] == 1.0  # 0.5 + 0.5
    assert scores[1] == scores[3] == scores[4] == 1.5  # 0.5 (centre) + 1
    assert scores[0] == 99.5**2 * 2 + 99**2 + 100**2  # centre, then (1,0)
    assert krum_select(dist, range(5), 1) == [2]
    # tie at 1.5 between 1, 3 and 4: broken by the sum of all distances (1 and 4 have 102.5
    # to the attacker, 3 has 100**2 * 2 = 20000), then by the lower index
    assert krum_select(dist, range(5), 1, 2) == [2, 1]


def test_krum_returns_the_central_update_itself() -> None:
    out = aggregate("krum", [(u, 1) for u in krum_points()], f=1)
    assert torch.equal(out["w"], T([0.5, 0.5]))


def test_multi_krum_averages_the_m_best_by_examples() -> None:
    counts = [1, 10, 30, 1, 1]
    out = aggregate("multi_krum", list(zip(krum_points(), counts, strict=True)), f=1, m=2)
    assert torch.equal(out["w"], T([0.625, 0.375]))  # (10*(1,0) + 30*(.5,.5)) / 40


def bulyan_points() -> list[dict[str, torch.Tensor]]:
    # on a line: w = (x, -2x) for x = 0, 1, 2, 3, 4, 5 and an attacker at x = 100
    return [sd(x, -2 * x) for x in (0, 1, 2, 3, 4, 5, 100)]


def test_bulyan_selection_by_hand() -> None:
    xs = [0, 1, 2, 3, 4, 5, 100]
    dist = [[5.0 * (a - b) ** 2 for b in xs] for a in xs]
    # Krum with n' - f - 2 nearest (at least 1), ties broken by the sum of all distances:
    # n'=7: x=2 and x=3 score 10; 3 has the smaller sum (nearer the attacker)  -> 3
    # n'=6: scores 0:21 1:11 2:9 4:14 5:26                                    -> 2
    # n'=5: 1 and 4 score 10; sums 9827 vs 9242                               -> 4
    # n'=4: one neighbour: 0 and 1 score 1; sums 10026 vs 9818                -> 1
    # n'=3: 0 and 5 score 25; sums 10025 vs 9050                              -> 5
    assert bulyan_select(dist, range(7), 1) == [1, 2, 3, 4, 5]


def test_bulyan_by_hand() -> None:
    out = aggregate("bulyan", [(u, 1) for u in bulyan_points()], f=1)
    # selected x = 1..5; per coordinate the beta = 5 - 2 = 3 values closest to the median:
    # x: median 3 -> {2, 3, 4} -> 3;  -2x: median -6 -> {-4, -6, -8} -> -6
    assert torch.equal(out["w"], T([3.0, -6.0]))


def test_bulyan_coordinate_stage_by_hand() -> None:
    x = torch.tensor([[0.0, 0.0], [1.0, 3.0], [2.0, 4.0], [10.0, 5.0], [11.0, 100.0], [0.0, 0.0]])
    rows = K.sort_columns(x, 5)
    out = K.bulyan_of(x, rows, 5, 3, torch.empty(2))
    # column 0: median 2, closest three 2, 1, 0 -> 1; column 1: median 4, closest 4, 3, 5 -> 4
    assert torch.equal(out, T([1.0, 4.0]))
    line = torch.tensor([[4.0], [1.0], [3.0], [0.0], [2.0], [0.0]])
    rows = K.sort_columns(line, 5)
    # median 2; {1,2,3} is strictly closest (max distance 1): 2
    assert torch.equal(K.bulyan_of(line, rows, 5, 3, torch.empty(1)), T([2.0]))
    four = torch.tensor([[3.0], [0.0], [2.0], [1.0], [0.0]])
    rows = K.sort_columns(four, 4)  # values 0 1 2 3, median 1.5, beta 2: {1, 2}
    assert torch.equal(K.bulyan_of(four, rows, 4, 2, torch.empty(1)), T([1.5]))
    ties = torch.tensor([[0.0], [2.0], [4.0], [0.0]])
    rows = K.sort_columns(ties, 3)  # median 2, beta 2: 0 and 4 are equally far: left wins
    assert torch.equal(K.bulyan_of(ties, rows, 3, 2, torch.empty(1)), T([1.0]))


def test_integer_tensors_take_the_lower_median() -> None:
    ups = [{"n": T([5, 1]), "w": T([1.0])}, {"n": T([9, 2]), "w": T([2.0])}]
    ups += [{"n": T([7, 3]), "w": T([3.0])}, {"n": T([6, 4]), "w": T([4.0])}]
    out = aggregate("fedavg", [(u, 1) for u in ups])
    assert out["n"].dtype == torch.int64
    assert torch.equal(out["n"], T([6, 2]))  # lower median of 5 6 7 9 and 1 2 3 4
    flags = [{"m": T([True, False])}, {"m": T([True, True])}, {"m": T([False, True])}]
    assert torch.equal(aggregate("median", [(u, 1) for u in flags])["m"], T([True, True]))


# ------------------------------------------------------------------------- sorting network


@pytest.mark.parametrize("n", [*range(1, 34), 64, 100, 101])
def test_sorting_network_sorts_like_torch_sort(n: int) -> None:
    gen = torch.Generator().manual_seed(n)
    x = torch.randint(-5, 6, (n + 1, 257), generator=gen).float()  # many ties
    x[: n // 3] = torch.randn(n // 3, 257, generator=gen)
    want = torch.sort(x[:n], dim=0).values
    rows = K.sort_columns(x, n)
    assert sorted(rows) != list(range(n + 1))  # one row is the spare
    assert torch.equal(x[rows], want)


@pytest.mark.parametrize("n", [2, 5, 10, 31, 100])
def test_pruned_networks_give_the_requested_order_statistics(n: int) -> None:
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(n + 1, 300, generator=gen)
    want = torch.sort(x[:n], dim=0).values
    for outputs in (K.median_outputs(n), K.trimmed_outputs(n, n // 5)):
        y = x.clone()
        rows = K.sort_columns(y, n, outputs)
        for w in outputs:
            assert torch.equal(y[rows[w]], want[w])
        # every column still holds its values
        assert torch.equal(torch.sort(y[rows], dim=0).values, want)
    assert len(K.pruned_network(n, K.median_outputs(n))) <= len(K.sorting_network(n))


# ------------------------------------------------------------------------- properties


def random_updates(n: int, seed: int, shape: tuple[int, ...] = (7, 5)) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [{"w": torch.randn(shape, generator=gen), "b": torch.randn(3, generator=gen)} for _ in range(n)]


RULES: list[tuple[str, dict[str, object]]] = [
    ("fedavg", {}),
    ("median", {}),
    ("trimmed_mean", {"beta": 0.2}),
    ("krum", {"f": 1}),
    ("multi_krum", {"f": 1, "m": 3}),
    ("bulyan", {"f": 1}),
]


@pytest.mark.parametrize(("rule", "params"), RULES)
def test_permutation_invariance(rule: str, params: dict[str, object]) -> None:
    ups = random_updates(8, 1)
    counts = [3, 1, 4, 1, 5, 9, 2, 6]
    base = aggregate(rule, list(zip(ups, counts, strict=True)), **params)
    for perm in ([7, 6, 5, 4, 3, 2, 1, 0], [2, 0, 7, 1, 6, 3, 5, 4]):
        other = aggregate(rule, [(ups[i], counts[i]) for i in perm], **params)
        for k in base:
            if rule in ("median", "krum", "bulyan"):
                assert torch.equal(base[k], other[k]), (rule, k)
            else:  # sums in another order: equal up to rounding
                assert torch.allclose(base[k], other[k], atol=1e-6), (rule, k)


@pytest.mark.parametrize(("rule", "params"), RULES)
def test_identical_updates_return_that_update(rule: str, params: dict[str, object]) -> None:
    one = random_updates(1, 2)[0]
    out = aggregate(rule, [(one, c) for c in (1, 2, 3, 4, 5, 6, 7)], **params)
    for k in one:
        if rule in ("median", "krum"):
            assert torch.equal(out[k], one[k])
        else:
            assert torch.allclose(out[k], one[k], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("rule", "params"), [("median", {}), ("trimmed_mean", {"beta": 0.1}), ("bulyan", {"f": 2})]
)
def test_order_statistics_stay_within_the_coordinate_range(rule: str, params: dict[str, object]) -> None:
    ups = random_updates(11, 3)
    ups[4]["w"] *= 1e6
    out = aggregate(rule, [(u, 1) for u in ups], **params)
    for k in out:
        stack = torch.stack([u[k] for u in ups])
        assert bool((out[k] >= stack.min(0).values).all()) and bool((out[k] <= stack.max(0).values).all())


@pytest.mark.parametrize("seed", range(5))
def test_krum_picks_an_honest_update_when_attackers_are_far(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    honest = [{"w": torch.randn(50, generator=gen) * 0.1} for _ in range(7)]
    f = 2
    attackers = [{"w": torch.randn(50, generator=gen) + 50.0} for _ in range(f)]
    ups = attackers[:1] + honest[:4] + attackers[1:] + honest[4:]
    out = aggregate("krum", [(u, 1) for u in ups], f=f)
    assert any(torch.equal(out["w"], h["w"]) for h in honest)
    multi = aggregate("multi_krum", [(u, 1) for u in ups], f=f)
    assert float(multi["w"].abs().max()) < 1.0  # m = n - f: no attacker among them
    bul = aggregate("bulyan", [(u, 1) for u in ups + honest[:3]], f=f)
    assert float(bul["w"].abs().max()) < 1.0


def test_robust_rules_resist_one_huge_attacker() -> None:
    ups = random_updates(7, 5)
    ups[3] = {k: v * 0 + 1e15 for k, v in ups[3].items()}
    for rule, params in RULES[1:]:
        out = aggregate(rule, [(u, 1) for u in ups], **params)
        assert all(float(v.abs().max()) < 10 for v in out.values()), rule


# ------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("rule", "params"), RULES)
def test_half_precision_is_computed_in_float32(
    rule: str, params: dict[str, object], dtype: torch.dtype
) -> None:
    ups = random_updates(7, 6)
    half = [{k: v.to(dtype) for k, v in u.items()} for u in ups]
    wide = [{k: v.float() for k, v in u.items()} for u in half]
    counts = [1, 2, 3, 4, 5, 6, 7]
    got = aggregate(rule, list(zip(half, counts, strict=True)), **params)
    want = aggregate(rule, list(zip(wide, counts, strict=True)), **params)
    for k in got:
        assert got[k].dtype == dtype
        assert torch.equal(got[k], want[k].to(dtype)), (rule, k)


def test_float64_stays_float64() -> None:
    a = {"w": torch.tensor([1.0, 1e-17], dtype=torch.float64)}
    b = {"w": torch.tensor([3.0, 3e-17], dtype=torch.float64)}
    out = aggregate("fedavg", [(a, 1), (b, 1)])
    assert out["w"].dtype == torch.float64
    assert torch.allclose(out["w"], torch.tensor([2.0, 2e-17], dtype=torch.float64), rtol=1e-15, atol=0)


def test_fedavg_over_several_windows_is_the_example_weighted_sum() -> None:
    """fedavg's one-pass path: tensors longer than a window, a non-contiguous input,
    float32 and float64; checked against the weighted sum done in float64 by hand."""
    from aggregation.rounds import MEAN_WINDOW

    gen = torch.Generator().manual_seed(11)
    counts = [1, 2, 5]
    for dtype, tol in ((torch.float32, 1e-6), (torch.float64, 1e-13)):
        ups = [
            {
                "w": torch.randn(MEAN_WINDOW + 3, generator=gen, dtype=dtype),
                "t": torch.randn(3, 5, generator=gen, dtype=dtype).t(),  # not contiguous
            }
            for _ in counts
        ]
        before = [{k: v.clone() for k, v in u.items()} for u in ups]
        out = aggregate("fedavg", list(zip(ups, counts, strict=True)))
        for k in ("w", "t"):
            want = sum(c * u[k].double() for u, c in zip(ups, counts, strict=True)) / sum(counts)
            assert out[k].dtype == dtype and out[k].shape == ups[0][k].shape
            assert torch.allclose(out[k].double(), want, rtol=0, atol=tol), (dtype, k)
        assert all(torch.equal(u[k], b[k]) for u, b in zip(ups, before, strict=True) for k in u)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_fedavg_names_the_update_with_non_finite_values(value: float) -> None:
    ups = random_updates(3, 5)
    bad = {k: v.clone() for k, v in ups[2].items()}
    bad["b"][1] = value
    with pytest.raises(ValueError, match=r"updates\[2\]: non-finite values \(NaN or Inf\) in tensor 'b'"):
        aggregate("fedavg", [(ups[0], 1), (ups[1], 4), (bad, 2)])


@pytest.mark.parametrize(("rule", "params"), [("fedavg", {}), ("median", {}), ("krum", {"f": 1})])
def test_out_buffers_are_overwritten_with_the_same_result(rule: str, params: dict[str, object]) -> None:
    ups = list(zip(random_updates(5, 9), [3, 1, 4, 1, 5], strict=True))
    fresh = aggregate(rule, ups, **params)
    out = {"w": torch.full((7, 5), 99.0), "b": torch.empty(4)}  # "b" has the wrong shape
    w_ptr = out["w"].data_ptr()
    got = aggregate(rule, ups, out=out, **params)
    assert got["w"].data_ptr() == w_ptr and got["b"].shape == (3,)
    assert all(torch.equal(got[k], fresh[k]) for k in fresh)


def test_out_must_not_share_memory_with_an_update() -> None:
    ups = random_updates(3, 10)
    with pytest.raises(ValueError, match=r"out shares memory with updates\[1\]\['w'\]"):
        aggregate("fedavg", [(u, 1) for u in ups], out={"w": ups[1]["w"]})
    with pytest.raises(ValueError, match="out shares memory"):
        aggregate("median", [(u, 1) for u in ups], out={"w": ups[2]["w"]})


# ------------------------------------------------------------------------- refusals


def test_functional_refusals() -> None:
    ups = random_updates(4, 7)
    with pytest.raises(NotEnoughUpdates, match="more than 2f \\+ 2"):
        aggregate("krum", [(u, 1) for u in ups], f=1)
    with pytest.raises(NotEnoughUpdates):
        aggregate("median", [])
    with pytest.raises(ValueError, match="unknown rule"):
        aggregate("fedadam", [(u, 1) for u in ups])
    with pytest.raises(ValueError, match="no clipping or noise"):
        aggregate("fedavg", [(u, 1) for u in ups], clip_norm=1.0)
    with pytest.raises(ValueError, match="num_examples must be a positive integer"):
        aggregate("fedavg", [(ups[0], 1), (ups[1], 0)])
    with pytest.raises(ValueError, match="different tensor names"):
        aggregate("fedavg", [(ups[0], 1), ({"w": ups[1]["w"]}, 1)])
    with pytest.raises(ValueError, match="expected"):
        aggregate("fedavg", [(ups[0], 1), ({"w": ups[1]["w"].double(), "b": ups[1]["b"]}, 1)])
    bad = {"w": ups[1]["w"].clone(), "b": ups[1]["b"].clone()}
    bad["w"][2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"updates\[1\]: non-finite values \(NaN or Inf\) in tensor 'w'"):
        aggregate("median", [(ups[0], 1), (bad, 1), (ups[2], 1)])


def test_all_permutations_of_three_give_the_same_median() -> None:
    ups = random_updates(3, 8)
    outs = [aggregate("median", [(ups[i], 1) for i in p])["w"] for p in itertools.permutations(range(3))]
    assert all(torch.equal(o, outs[0]) for o in outs)
