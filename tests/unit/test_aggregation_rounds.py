"""Rounds over files: validation and refusals, clipping, DP noise, server optimizers, state."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from aggregation import (
    AggregationError,
    InvalidFile,
    RoundResult,
    UpdateFile,
    aggregate,
    build_strategy,
    load_state,
    save_state,
)

Model = dict[str, torch.Tensor]


def base_model(seed: int = 0) -> Model:
    gen = torch.Generator().manual_seed(seed)
    return {
        "layer.weight": torch.randn(6, 5, generator=gen),
        "layer.bias": torch.randn(5, generator=gen),
        "steps": torch.tensor(10),
    }


def moved(g: Model, seed: int, scale: float = 0.1) -> Model:
    gen = torch.Generator().manual_seed(1000 + seed)
    out = {
        k: v + scale * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v + seed
        for k, v in g.items()
    }
    return out


def write(path: Path, model: Model) -> Path:
    save_file({k: v.contiguous() for k, v in model.items()}, path)
    return path


def setup(
    tmp_path: Path, models: list[Model], counts: list[int] | None = None, g: Model | None = None
) -> tuple[Path, list[UpdateFile]]:
    gpath = write(tmp_path / "global.safetensors", g if g is not None else base_model())
    counts = counts or [10 * (i + 1) for i in range(len(models))]
    ups = [
        UpdateFile(write(tmp_path / f"u{i}.safetensors", m), c, 1000, f"a{i}")
        for i, (m, c) in enumerate(zip(models, counts, strict=True))
    ]
    return gpath, ups


def run(tmp: Path, name: str, params: dict[str, Any], models: list[Model], **kw: Any) -> RoundResult:
    gpath, ups = setup(tmp, models, kw.pop("counts", None), kw.pop("g", None))
    return build_strategy(name, params).run_round(gpath, ups, **kw)


def json_ok(result: RoundResult) -> None:
    json.dumps(result.report, allow_nan=False)


# ----------------------------------------------------------------------- fedavg and report


def test_fedavg_round_is_the_example_weighted_mean(tmp_path: Path) -> None:
    g = base_model()
    models = [moved(g, i) for i in range(4)]
    res = run(tmp_path, "fedavg", {}, models, counts=[10, 20, 30, 40])
    assert res.ok and res.reason is None and res.state == {}
    for k in ("layer.weight", "layer.bias"):
        want = sum(c * m[k].double() for c, m in zip([10, 20, 30, 40], models, strict=True)) / 100
        assert torch.allclose(res.params[k].double(), want, atol=1e-6)  # type: ignore[index]
        assert res.params[k].dtype == torch.float32  # type: ignore[index]
    assert int(res.params["steps"]) == 11  # type: ignore[index]  # lower median of 10..13
    rep = res.report
    json_ok(res)
    assert rep["aggregated"] and rep["used"] == 4 and rep["refused"] == 0
    assert [rep["updates"][f"a{i}"]["weight"] for i in range(4)] == [0.1, 0.2, 0.3, 0.4]
    for i, m in enumerate(models):
        entry = rep["updates"][f"a{i}"]
        delta = torch.cat([(m[k] - g[k]).flatten() for k in ("layer.weight", "layer.bias")])
        assert math.isclose(entry["norm"], float(delta.double().norm()), rel_tol=1e-6)
        assert entry["accepted"] and entry["used"] and not entry["clipped"] and entry["reason"] is None


def test_example_counts_are_clamped_to_the_shard_size(tmp_path: Path) -> None:
    g = base_model()
    models = [moved(g, i) for i in range(2)]
    gpath = write(tmp_path / "g", g)
    ups = [
        UpdateFile(write(tmp_path / "u0", models[0]), 10**9, 30, "greedy"),
        UpdateFile(write(tmp_path / "u1", models[1]), 10, 1000, "honest"),
    ]
    res = build_strategy("fedavg", {}).run_round(gpath, ups)
    entry = res.report["updates"]["greedy"]
    assert entry["num_examples"] == 10**9 and entry["examples_counted"] == 30
    assert entry["weight"] == 0.75 and res.report["updates"]["honest"]["weight"] == 0.25


def test_outlier_score_flags_the_far_update(tmp_path: Path) -> None:
    g = base_model()
    models = [moved(g, i, 0.1) for i in range(9)] + [moved(g, 9, 2.0)]
    res = run(tmp_path, "median", {}, models)
    scores = {k: v["outlier_score"] for k, v in res.report["updates"].items()}
    assert scores["a9"] > 5
    assert all(abs(s) < 3 for k, s in scores.items() if k != "a9")
    assert res.report["norm_median"] > 0 and res.report["norm_mad"] > 0


# ----------------------------------------------------------------------- refusals


def test_each_refusal_has_a_reason_and_the_round_uses_the_rest(tmp_path: Path) -> None:
    g = base_model()
    good = [moved(g, i) for i in range(3)]
    gpath = write(tmp_path / "g", g)
    missing = {k: v for k, v in moved(g, 5).items() if k != "layer.bias"}
    extra = {**moved(g, 6), "surprise": torch.zeros(2)}
    shape = {**moved(g, 7), "layer.bias": torch.zeros(6)}
    dtype = {**moved(g, 8), "layer.bias": torch.zeros(5, dtype=torch.float64)}
    (tmp_path / "garbage").write_bytes(b"\x00" * 3 + b"not a safetensors file at all")
    write(tmp_path / "trunc", moved(g, 9))
    (tmp_path / "trunc").write_bytes((tmp_path / "trunc").read_bytes()[:-7])
    ups = [UpdateFile(write(tmp_path / f"ok{i}", m), 10, 100, f"ok{i}") for i, m in enumerate(good)]
    ups += [
        UpdateFile(write(tmp_path / "missing", missing), 10, 100, "missing"),
        UpdateFile(write(tmp_path / "extra", extra), 10, 100, "extra"),
        UpdateFile(write(tmp_path / "shape", shape), 10, 100, "shape"),
        UpdateFile(write(tmp_path / "dtype", dtype), 10, 100, "dtype"),
        UpdateFile(tmp_path / "garbage", 10, 100, "garbage"),
        UpdateFile(tmp_path / "trunc", 10, 100, "trunc"),
        UpdateFile(write(tmp_path / "zero", moved(g, 10)), 0, 100, "zero"),
        UpdateFile(write(tmp_path / "neg", moved(g, 11)), -5, 100, "neg"),
    ]
    res = build_strategy("fedavg", {}).run_round(gpath, ups)
    reasons = {k: v["reason"] for k, v in res.report["updates"].items() if not v["accepted"]}
    assert reasons == {
        "missing": "missing tensors: layer.bias",
        "extra": "unexpected tensors: surprise",
        "shape": "tensor 'layer.bias' has shape [6], expected [5]",
        "dtype": "tensor 'layer.bias' has dtype F64, expected F32",
        "garbage": reasons["garbage"],
        "trunc": reasons["trunc"],
        "zero": "non-positive example count 0",
        "neg": "non-positive example count -5",
    }
    assert reasons["garbage"].startswith("unreadable safetensors file")
    assert "outside the file" in reasons["trunc"]
    assert res.report["used"] == 3 and res.report["refused"] == 8
    clean = build_strategy("fedavg", {}).run_round(gpath, ups[:3])
    assert all(torch.equal(res.params[k], clean.params[k]) for k in g)  # type: ignore[index]


@pytest.mark.parametrize(("strategy", "params"), [("fedavg", {}), ("median", {}), ("krum", {"f": 1})])
@pytest.mark.parametrize("poison", ["nan", "inf", "huge"])
def test_non_finite_updates_are_refused(
    tmp_path: Path, strategy: str, params: dict[str, Any], poison: str
) -> None:
    g = base_model()
    models = [moved(g, i) for i in range(6)]
    bad = moved(g, 99)
    bad["layer.weight"][2, 3] = {"nan": float("nan"), "inf": float("-inf"), "huge": 1e30}[poison]
    gpath, ups = setup(tmp_path, [*models[:2], bad, *models[2:]])
    res = build_strategy(strategy, params).run_round(gpath, ups)
    entry = res.report["updates"]["a2"]
    assert not entry["accepted"] and entry["norm"] is None and entry["outlier_score"] is None
    if poison == "huge":
        assert (
            entry["reason"]
            == "values too large: the norm of the change to tensor 'layer.weight' overflows F32"
        )
    else:
        assert entry["reason"] == "non-finite values (NaN or Inf) in tensor 'layer.weight'"
    # fedavg and median find it while aggregating and run again without it; krum in its stats pass
    assert res.report["attempts"] == (1 if strategy == "krum" else 2)
    json_ok(res)
    clean = build_strategy(strategy, params).run_round(gpath, [u for u in ups if u.key != "a2"])
    assert all(torch.equal(res.params[k], clean.params[k]) for k in g)  # type: ignore[index]


def test_not_enough_valid_updates_says_so_and_keeps_the_state(tmp_path: Path) -> None:
    g = base_model()
    models = [moved(g, i) for i in range(5)]
    models[1]["layer.bias"][0] = float("nan")
    gpath, ups = setup(tmp_path, models)
    res = build_strategy("krum", {"f": 1}).run_round(gpath, ups)
    assert res.params is None and not res.ok
    assert res.reason == "not enough valid updates: krum with f=1 needs more than 2f + 2 = 4 updates, got 4"
    assert res.report["aggregated"] is False and res.report["reason"] == res.reason
    assert res.report["updates"]["a1"]["reason"].startswith("non-finite")
    # the header-level shortfall fails before reading any data
    early = build_strategy("bulyan", {"f": 1}).run_round(gpath, ups)
    assert early.params is None and "4f + 3 = 7" in str(early.reason)
    # a server optimizer keeps its previous state when the round cannot aggregate
    state = {"m/layer.weight": torch.ones(6, 5), "m/layer.bias": torch.ones(5)}
    save_state(tmp_path / "state", state)
    zero = [UpdateFile(u.path, 0, 10, u.key) for u in ups]
    failed = build_strategy("fedavgm", {}).run_round(gpath, zero, tmp_path / "state")
    assert failed.params is None and set(failed.state) == set(state)
    assert all(torch.equal(failed.state[k], state[k]) for k in state)
    json_ok(failed)


def test_a_round_without_updates_fails_with_a_reason(tmp_path: Path) -> None:
    gpath = write(tmp_path / "g", base_model())
    res = build_strategy("fedavg", {}).run_round(gpath, [])
    assert (
        res.params is None and res.reason == "not enough valid updates: fedavg needs at least 1 update, got 0"
    )
    assert res.report["used"] == 0 and res.report["updates"] == {}


def test_caller_errors_raise(tmp_path: Path) -> None:
    g = base_model()
    gpath, ups = setup(tmp_path, [moved(g, 0), moved(g, 1)])
    s = build_strategy("fedavg", {})
    with pytest.raises(AggregationError, match="duplicate update key"):
        s.run_round(gpath, [ups[0], ups[0]])
    with pytest.raises(AggregationError, match="max_examples must be a positive integer"):
        s.run_round(gpath, [UpdateFile(ups[0].path, 3, 0, "x")])
    with pytest.raises(AggregationError, match="num_examples must be an integer"):
        s.run_round(gpath, [UpdateFile(ups[0].path, "3", 10, "x")])  # type: ignore[arg-type]
    with pytest.raises(InvalidFile):
        s.run_round(tmp_path / "nope", ups)
    with pytest.raises(AggregationError, match="round_seed"):
        s.run_round(gpath, ups, round_seed=-1)
    with pytest.raises(ValueError, match="unknown strategy"):
        build_strategy("fedsgd", {})


# ----------------------------------------------------------------------- clipping and noise


def flat_delta(m: Model, g: Model) -> torch.Tensor:
    return torch.cat([(m[k] - g[k]).flatten().double() for k in ("layer.weight", "layer.bias")])


def test_fixed_clipping_by_hand(tmp_path: Path) -> None:
    g = base_model()
    big = {**g, "layer.bias": g["layer.bias"] + torch.tensor([3.0, 0, 0, 0, 0])}  # norm 3
    small = {**g, "layer.bias": g["layer.bias"] + torch.tensor([0, 0.5, 0, 0, 0])}  # norm 0.5
    res = run(tmp_path, "fedavg", {"clip_norm": 1.0}, [big, small], counts=[1, 1])
    rep = res.report["updates"]
    assert rep["a0"]["clipped"] and math.isclose(rep["a0"]["clip_factor"], 1 / 3, rel_tol=1e-6)
    assert not rep["a1"]["clipped"] and rep["a1"]["clip_factor"] == 1.0
    want = g["layer.bias"] + torch.tensor([0.5, 0.25, 0, 0, 0])  # (3 * 1/3 + 0) / 2, 0.5 / 2
    assert torch.allclose(res.params["layer.bias"], want, atol=1e-6)  # type: ignore[index]
    assert torch.allclose(res.params["layer.weight"], g["layer.weight"], atol=1e-6)  # type: ignore[index]
    assert res.report["clip_norm"] == 1.0 and res.report["noise_multiplier"] == 0.0


@pytest.mark.parametrize("strategy", ["median", "trimmed_mean", "bulyan", "krum"])
def test_clipping_composes_with_robust_rules(tmp_path: Path, strategy: str) -> None:
    g = base_model()
    models = [moved(g, i, 1.0) for i in range(7)]
    params: dict[str, Any] = {"clip_norm": 0.5} | ({"f": 1} if strategy in ("bulyan", "krum") else {})
    res = run(tmp_path, strategy, params, models)
    assert all(v["clipped"] for v in res.report["updates"].values())
    delta = flat_delta(res.params, g)  # type: ignore[arg-type]
    assert float(delta.norm()) <= 0.5 * (1 + 1e-5) * (1 if strategy == "krum" else math.sqrt(35))
    if strategy == "krum":  # the selected update, clipped to norm 0.5
        assert math.isclose(float(delta.norm()), 0.5, rel_tol=1e-5)


def test_adaptive_clipping_by_hand_and_its_state(tmp_path: Path) -> None:
    g = base_model()
    scales = [0.1, 0.2, 0.3, 5.0, 6.0]
    models = [{**g, "layer.bias": g["layer.bias"] + torch.tensor([s, 0, 0, 0, 0])} for s in scales]
    params = {"clip_mode": "adaptive", "clip_norm": 1.0, "clip_quantile": 0.5, "clip_lr": 0.2}
    res = run(tmp_path, "fedavg", params, models)
    # 3 of 5 norms are <= 1: C' = 1 * exp(-0.2 * (3/5 - 0.5))
    assert res.report["clip_norm"] == 1.0
    assert math.isclose(res.report["clip_norm_next"], math.exp(-0.02), rel_tol=1e-12)
    assert set(res.state) == {"clip_norm"} and res.state["clip_norm"].dtype == torch.float64
    save_state(tmp_path / "state", res.state)
    ups = [UpdateFile(tmp_path / f"u{i}.safetensors", 10, 100, f"a{i}") for i in range(5)]
    again = build_strategy("fedavg", params).run_round(
        tmp_path / "global.safetensors", ups, tmp_path / "state"
    )
    assert again.report["clip_norm"] == res.report["clip_norm_next"]


def test_dp_noise_is_seeded_calibrated_and_reported(tmp_path: Path) -> None:
    g = {"w": torch.zeros(200_000)}
    models = [{"w": torch.full((200_000,), 1e-4 * (i + 1))} for i in range(4)]
    params = {"clip_norm": 1.0, "noise_multiplier": 0.5, "weighting": "uniform"}
    a = run(tmp_path, "fedavg", params, models, g=g, round_seed=11)
    ups = [UpdateFile(tmp_path / f"u{i}.safetensors", 10, 100, f"a{i}") for i in range(4)]
    b = build_strategy("fedavg", params).run_round(tmp_path / "global.safetensors", ups, round_seed=11)
    c = build_strategy("fedavg", params).run_round(tmp_path / "global.safetensors", ups, round_seed=12)
    assert torch.equal(a.params["w"], b.params["w"])  # type: ignore[index]
    assert not torch.equal(a.params["w"], c.params["w"])  # type: ignore[index]
    sigma = 0.5 * 1.0 / 4  # z * C * max share (uniform over 4)
    assert a.report["noise_std"] == sigma and a.report["noise_multiplier"] == 0.5
    noise = a.params["w"].double() - 2.5e-4  # type: ignore[index]
    assert abs(float(noise.std()) / sigma - 1) < 0.02 and abs(float(noise.mean())) < 0.01 * sigma


def test_adaptive_clipping_with_noise_reports_the_effective_multiplier(tmp_path: Path) -> None:
    g = base_model()
    params = {"clip_mode": "adaptive", "noise_multiplier": 1.0, "clip_count_stddev": 1.0}
    res = run(tmp_path, "fedavg", params, [moved(g, i) for i in range(5)])
    # Andrew et al.: z_delta = (z^-2 - (2 sigma_b)^-2)^(-1/2) = (1 - 1/4)^(-1/2)
    assert math.isclose(res.report["noise_multiplier"], (1 - 0.25) ** -0.5)
    assert math.isclose(
        res.report["noise_std"],
        res.report["noise_multiplier"] * 0.1 * max(v["weight"] for v in res.report["updates"].values()),
    )


# ----------------------------------------------------------------------- server optimizers


def optimizer_case(tmp_path: Path) -> tuple[Model, list[Model], torch.Tensor]:
    g = {"w": torch.tensor([0.5, -1.0, 2.0, 0.0])}
    models = [
        {"w": g["w"] + torch.tensor([0.2, 0.1, -0.3, 1e-4])},
        {"w": g["w"] + torch.tensor([0.4, -0.1, -0.1, 3e-4])},
    ]
    delta = (models[0]["w"].double() + models[1]["w"].double()) / 2 - g["w"].double()
    return g, models, delta


def expected_step(
    name: str,
    p: dict[str, Any],
    g: torch.Tensor,
    delta: torch.Tensor,
    m: torch.Tensor | None,
    v: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    g = g.double()
    if name == "fedavgm":
        m_new = delta if m is None else p["momentum"] * m + delta
        return g + p["server_lr"] * m_new, m_new, None
    tau = p["tau"]
    m_new = (1 - p["beta1"]) * delta if m is None else p["beta1"] * m + (1 - p["beta1"]) * delta
    v_prev = torch.full_like(delta, tau * tau) if v is None else v
    d2 = delta * delta
    if name == "fedadam":
        v_new = p["beta2"] * v_prev + (1 - p["beta2"]) * d2
    elif name == "fedyogi":
        v_new = v_prev - (1 - p["beta2"]) * d2 * torch.sign(v_prev - d2)
    else:
        v_new = v_prev + d2
    return g + p["server_lr"] * m_new / (v_new.sqrt() + tau), m_new, v_new


@pytest.mark.parametrize("name", ["fedavgm", "fedadam", "fedyogi", "fedadagrad"])
def test_server_optimizers_by_hand_over_two_rounds(tmp_path: Path, name: str) -> None:
    g, models, delta = optimizer_case(tmp_path)
    strategy = build_strategy(name, {"weighting": "uniform"})
    p = strategy.params
    r1 = run(tmp_path, name, {"weighting": "uniform"}, models, g=g)
    want, m, v = expected_step(name, p, g["w"], delta, None, None)
    assert torch.allclose(r1.params["w"].double(), want, rtol=1e-5, atol=1e-6)  # type: ignore[index]
    assert torch.allclose(r1.state["m/w"].double(), m, rtol=1e-5, atol=1e-9)
    if v is not None:
        assert torch.allclose(r1.state["v/w"].double(), v, rtol=1e-5, atol=1e-12)
    else:
        assert "v/w" not in r1.state
    # round 2 from the new global, with the state persisted through safetensors
    save_state(tmp_path / "state.safetensors", r1.state, strategy=name)
    loaded = load_state(tmp_path / "state.safetensors")
    assert all(torch.equal(loaded[k], r1.state[k]) for k in r1.state)
    g2 = {"w": r1.params["w"]}  # type: ignore[index]
    models2 = [
        {"w": g2["w"] + d} for d in (torch.tensor([0.1, 0.0, 0.1, 0.0]), torch.tensor([0.3, 0.2, -0.1, 0.0]))
    ]
    delta2 = (models2[0]["w"].double() + models2[1]["w"].double()) / 2 - g2["w"].double()
    sub = tmp_path / "r2"
    sub.mkdir()
    gpath, ups = setup(sub, models2, g=g2)
    r2 = strategy.run_round(gpath, ups, tmp_path / "state.safetensors")
    want2, m2, v2 = expected_step(name, p, g2["w"], delta2, m, v)
    assert torch.allclose(r2.params["w"].double(), want2, rtol=1e-5, atol=1e-6)  # type: ignore[index]
    assert torch.allclose(r2.state["m/w"].double(), m2, rtol=1e-5, atol=1e-9)
    if v2 is not None:
        assert torch.allclose(r2.state["v/w"].double(), v2, rtol=1e-5, atol=1e-12)


def test_state_that_does_not_match_the_model_is_refused(tmp_path: Path) -> None:
    g = base_model()
    gpath, ups = setup(tmp_path, [moved(g, 0)])
    save_state(tmp_path / "wrong", {"m/layer.weight": torch.zeros(5, 6), "m/layer.bias": torch.zeros(5)})
    save_state(tmp_path / "partial", {"m/layer.weight": torch.zeros(6, 5)})
    with pytest.raises(AggregationError, match="does not match the model"):
        build_strategy("fedavgm", {}).run_round(gpath, ups, tmp_path / "wrong")
    with pytest.raises(AggregationError, match="incomplete"):
        build_strategy("fedavgm", {}).run_round(gpath, ups, tmp_path / "partial")
    # a state without this strategy's keys starts fresh (e.g. switching from fedavg)
    save_state(tmp_path / "other", {"clip_norm": torch.tensor(1.0, dtype=torch.float64)})
    assert build_strategy("fedavgm", {}).run_round(gpath, ups, tmp_path / "other").ok


# ----------------------------------------------------------------------- dtypes, reuse, parity


def test_half_precision_models_keep_their_dtype(tmp_path: Path) -> None:
    g = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in base_model().items()}
    models = [
        {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in moved(base_model(), i).items()}
        for i in range(3)
    ]
    for name, params in (
        ("fedavg", {}),
        ("median", {}),
        ("fedadam", {}),
        ("fedavg", {"clip_norm": 0.1, "noise_multiplier": 0.1}),
    ):
        res = run(tmp_path, name, params, models, g=g)
        assert res.params["layer.weight"].dtype == torch.bfloat16  # type: ignore[index]
        for k, t in res.state.items():
            assert t.dtype == torch.float32, k


def test_reuse_overwrites_the_previous_buffers_with_equal_results(tmp_path: Path) -> None:
    g = base_model()
    gpath, ups = setup(tmp_path, [moved(g, i) for i in range(3)])
    s = build_strategy("fedadam", {})
    first = s.run_round(gpath, ups)
    fresh = {k: v.clone() for k, v in first.params.items()}  # type: ignore[union-attr]
    ptr = first.params["layer.weight"].data_ptr()  # type: ignore[index]
    second = s.run_round(gpath, ups, reuse=first)
    assert second.params["layer.weight"].data_ptr() == ptr  # type: ignore[index]
    assert all(torch.equal(second.params[k], fresh[k]) for k in fresh)  # type: ignore[index]


@pytest.mark.parametrize(
    ("rule", "params"),
    [("median", {}), ("trimmed_mean", {"beta": 0.2}), ("krum", {"f": 1}), ("bulyan", {"f": 1})],
)
def test_round_without_clipping_equals_the_functional_rule(
    tmp_path: Path, rule: str, params: dict[str, Any]
) -> None:
    g = base_model()
    models = [moved(g, i) for i in range(7)]
    res = run(tmp_path, rule, params, models)
    fun = aggregate(rule, [(m, 1) for m in models], **params)
    for k in g:
        assert torch.equal(res.params[k], fun[k]), (rule, k)  # type: ignore[index]


def test_header_with_unsupported_layout_is_refused_cleanly(tmp_path: Path) -> None:
    g = base_model()
    gpath, ups = setup(tmp_path, [moved(g, 0), moved(g, 1)])
    header = json.dumps(
        {"layer.weight": {"dtype": "F32", "shape": [6, 5], "data_offsets": [0, 120]}}
    ).encode()
    (tmp_path / "odd").write_bytes(struct.pack("<Q", len(header)) + header + bytes(120))
    res = build_strategy("fedavg", {}).run_round(gpath, [*ups, UpdateFile(tmp_path / "odd", 5, 5, "odd")])
    assert res.report["updates"]["odd"]["reason"] == "missing tensors: layer.bias, steps"
