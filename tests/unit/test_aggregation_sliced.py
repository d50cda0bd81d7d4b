"""Scale-out: slices run as separate jobs (plans and results through JSON, tensors through
slice files) equal the single-worker round bit for bit, for every rule, with clipping,
DP noise, and server-optimizer state."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from aggregation import (
    RoundResult,
    UpdateFile,
    advance_round,
    build_strategy,
    finish_round,
    plan_round,
    plan_slices,
    read_meta,
    run_slice,
    save_state,
)

Model = dict[str, torch.Tensor]
MAX_SLICE = 40_000  # bytes: splits a.weight and z.big across slices, several slices in all


def model(seed: int, base: Model | None = None, scale: float = 0.05) -> Model:
    gen = torch.Generator().manual_seed(seed)
    if base is None:
        return {
            "a.weight": torch.randn(40, 300, generator=gen),
            "a.bias": torch.randn(40, generator=gen),
            "b.half": torch.randn(9000, generator=gen).to(torch.bfloat16),
            "c.double": torch.randn(5000, generator=gen, dtype=torch.float64),
            "count": torch.tensor(7),
            "empty": torch.zeros(0, 3),
            "z.big": torch.randn(30_000, generator=gen),
        }
    out: Model = {}
    for k, v in base.items():
        if v.is_floating_point():
            noise = torch.randn(v.shape, generator=gen, dtype=torch.float64) * scale * (1 + seed % 3)
            out[k] = (v.double() + noise).to(v.dtype)
        else:
            out[k] = v + seed
    return out


def write(path: Path, m: Model) -> Path:
    save_file(m, path)
    return path


@pytest.fixture(scope="module")
def round_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[UpdateFile], Path]:
    d = tmp_path_factory.mktemp("round")
    g = model(0)
    gpath = write(d / "global.safetensors", g)
    ups = [
        UpdateFile(write(d / f"u{i}.safetensors", model(i + 1, g)), 5 + 3 * i, 20, f"k{i}") for i in range(9)
    ]
    gen = torch.Generator().manual_seed(42)
    state: Model = {"clip_norm": torch.tensor(0.4, dtype=torch.float64)}
    for k, v in g.items():
        if v.is_floating_point():
            dt = torch.float64 if v.dtype == torch.float64 else torch.float32
            state[f"m/{k}"] = torch.randn(v.shape, generator=gen, dtype=dt) * 0.01
            state[f"v/{k}"] = torch.rand(v.shape, generator=gen, dtype=dt) * 1e-4
    save_state(d / "state.safetensors", state)
    return gpath, ups, d / "state.safetensors"


def through_json(x: Any) -> Any:
    return json.loads(json.dumps(x, allow_nan=False))


def chord(
    tmp: Path,
    name: str,
    params: dict[str, Any],
    gpath: Path,
    ups: list[UpdateFile],
    state: Path | None,
    **kw: Any,
) -> RoundResult:
    """What the Celery chord does: plan; per phase run every slice as its own job (here in
    reverse order, as parallel jobs may finish), reduce in slice order; assemble."""
    plan = through_json(plan_round(name, params, gpath, ups, state, **kw))
    paths = [tmp / f"slice-{k}.safetensors" for k in range(len(plan["slices"]))]
    while plan["phase"] in ("stats", "apply"):
        parts: list[Any] = [None] * len(paths)
        for k in reversed(range(len(paths))):
            parts[k] = through_json(run_slice(through_json(plan), k, paths[k]))
        plan = through_json(advance_round(plan, parts))
    return finish_round(plan, paths)


def assert_same(a: RoundResult, b: RoundResult) -> None:
    assert a.reason == b.reason
    assert a.report == b.report
    assert a.params is not None and b.params is not None
    assert set(a.params) == set(b.params) and set(a.state) == set(b.state)
    for k in a.params:
        assert a.params[k].dtype == b.params[k].dtype and a.params[k].shape == b.params[k].shape
        assert torch.equal(a.params[k], b.params[k]), k
    for k in a.state:
        assert torch.equal(a.state[k], b.state[k]), k


RULES: list[tuple[str, dict[str, Any]]] = [
    ("fedavg", {}),
    ("fedprox", {"mu": 0.1}),
    ("fedavgm", {}),
    ("fedadam", {}),
    ("fedyogi", {}),
    ("fedadagrad", {}),
    ("median", {}),
    ("trimmed_mean", {"beta": 0.2}),
    ("krum", {"f": 2}),
    ("multi_krum", {"f": 2, "m": 4}),
    ("bulyan", {"f": 1}),
]
CLIPPING: dict[str, dict[str, Any]] = {
    "plain": {},
    "fixed+noise": {"clip_norm": 3.0, "noise_multiplier": 0.7, "seed": 5},
    "adaptive+noise": {
        "clip_mode": "adaptive",
        "clip_norm": 3.0,
        "noise_multiplier": 0.5,
        "clip_count_stddev": 1.0,
    },
}


def test_the_test_model_is_really_sliced(round_files: tuple[Path, list[UpdateFile], Path]) -> None:
    gpath, _, _ = round_files
    slices = plan_slices(read_meta(gpath), MAX_SLICE)
    names = [p.name for s in slices for p in s.pieces]
    assert len(slices) >= 5
    assert names.count("a.weight") == 2 and names.count("z.big") >= 3


@pytest.mark.parametrize("clip", sorted(CLIPPING))
@pytest.mark.parametrize(("name", "params"), RULES)
def test_sliced_round_equals_single_worker_bit_for_bit(
    tmp_path: Path,
    round_files: tuple[Path, list[UpdateFile], Path],
    name: str,
    params: dict[str, Any],
    clip: str,
) -> None:
    gpath, ups, state = round_files
    full = {**params, **CLIPPING[clip]}
    single = build_strategy(name, full).run_round(
        gpath, ups, state, round_seed=123, max_slice_bytes=MAX_SLICE
    )
    assert single.ok, single.reason
    if clip != "plain":
        assert any(u["clipped"] for u in single.report["updates"].values())
        assert single.report["noise_std"] > 0
    sliced = chord(tmp_path, name, full, gpath, ups, state, round_seed=123, max_slice_bytes=MAX_SLICE)
    assert sliced.report["num_slices"] >= 5
    assert_same(single, sliced)


@pytest.mark.parametrize(("name", "params"), [("fedavg", {}), ("median", {}), ("fedadam", {})])
def test_sliced_redo_after_a_non_finite_update_equals_single_worker(
    tmp_path: Path, round_files: tuple[Path, list[UpdateFile], Path], name: str, params: dict[str, Any]
) -> None:
    gpath, ups, state = round_files
    bad = model(77, model(0))
    bad["z.big"][29_999] = float("nan")  # in the last slice only
    ups = [*ups[:4], UpdateFile(write(tmp_path / "bad.safetensors", bad), 10, 20, "bad"), *ups[4:]]
    single = build_strategy(name, params).run_round(gpath, ups, state, max_slice_bytes=MAX_SLICE)
    sliced = chord(tmp_path, name, params, gpath, ups, state, max_slice_bytes=MAX_SLICE)
    assert single.report["attempts"] == 2
    assert single.report["updates"]["bad"]["reason"] == "non-finite values (NaN or Inf) in tensor 'z.big'"
    assert_same(single, sliced)


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("fedavg", {}),
        ("fedadam", {}),
        ("median", {}),
        ("trimmed_mean", {"beta": 0.2}),
        ("bulyan", {"f": 1}),
        ("krum", {"f": 2}),
        # noise without any update clipped: per-block seeds make it independent of the split
        ("fedavg", {"clip_norm": 1e6, "noise_multiplier": 1e-3}),
    ],
)
def test_elementwise_results_do_not_depend_on_the_split(
    round_files: tuple[Path, list[UpdateFile], Path], name: str, params: dict[str, Any]
) -> None:
    gpath, ups, state = round_files
    s = build_strategy(name, params)
    results = [
        s.run_round(gpath, ups, state, round_seed=9, max_slice_bytes=m) for m in (MAX_SLICE, 100_000, 1 << 30)
    ]
    assert [r.report["num_slices"] for r in results] != [1, 1, 1]
    for other in results[1:]:
        for k in results[0].params:  # type: ignore[union-attr]
            assert torch.equal(results[0].params[k], other.params[k]), (name, k)  # type: ignore[index]


def test_chunk_size_does_not_change_order_statistics(
    round_files: tuple[Path, list[UpdateFile], Path],
) -> None:
    gpath, ups, _ = round_files
    s = build_strategy("bulyan", {"f": 1})
    small = s.run_round(gpath, ups, chunk_bytes=1)  # the smallest window: one block per update
    big = s.run_round(gpath, ups)
    for k in big.params:  # type: ignore[union-attr]
        assert torch.equal(small.params[k], big.params[k]), k  # type: ignore[index]


def test_plan_is_plain_json_and_phases_are_checked(
    tmp_path: Path, round_files: tuple[Path, list[UpdateFile], Path]
) -> None:
    gpath, ups, state = round_files
    plan = plan_round("krum", {"f": 2}, gpath, ups, state, max_slice_bytes=MAX_SLICE)
    assert through_json(plan) == plan
    assert plan["phase"] == "stats" and plan["needs_stats"]
    assert plan_round("fedavg", {}, gpath, ups)["phase"] == "apply"
    with pytest.raises(ValueError, match="expected"):
        advance_round(plan, [])
    with pytest.raises(ValueError, match="not finished"):
        finish_round(plan, [])
