"""Splits and shards: deterministic from the seed, disjoint, complete, non-empty; dirichlet skews labels."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from training import spec
from training.data import load_split, partition, shard_data, shard_indices, shard_size

ROOT = Path(__file__).resolve().parents[2]


def cfg(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"dataset": "digits", "seed": 0, "num_shards": 4, "partition": "iid", "alpha": 0.5}
    return {**base, **overrides}


def assert_disjoint_cover(shards: tuple[np.ndarray, ...], train_size: int) -> None:
    joined = np.concatenate(shards)
    assert len(joined) == train_size, "shards overlap or miss examples"
    assert np.array_equal(np.sort(joined), np.arange(train_size))
    assert all(len(s) > 0 for s in shards)


@pytest.mark.parametrize("dataset", ["digits", "synthetic"])
def test_split_is_disjoint_deterministic_and_seeded(dataset: str) -> None:
    train, test = load_split(dataset, 0)
    again, _ = load_split(dataset, 0)
    other, _ = load_split(dataset, 1)
    assert np.array_equal(train.x, again.x) and np.array_equal(train.y, again.y)
    assert not np.array_equal(train.x, other.x)
    # no test example also appears in train (rows compared exactly)
    train_rows = {row.tobytes() for row in train.x.reshape(len(train), -1)}
    test_rows = [row.tobytes() for row in test.x.reshape(len(test), -1)]
    assert sum(row in train_rows for row in test_rows) <= 2  # digits has a couple of duplicate images
    # stratified: every class is in the test split
    assert set(test.y.tolist()) == set(train.y.tolist())
    assert abs(len(test) / (len(train) + len(test)) - 0.2) < 0.01


def test_split_arrays_are_read_only_and_standardized() -> None:
    train, _ = load_split("digits", 0)
    assert not train.x.flags.writeable
    with pytest.raises(ValueError):
        train.x[0, 0, 0, 0] = 1.0
    means = train.x.reshape(len(train), -1).mean(axis=0)
    assert np.allclose(means, 0.0, atol=1e-4)


@pytest.mark.parametrize("part", ["iid", "dirichlet"])
@pytest.mark.parametrize("num_shards", [1, 2, 4, 7, 50])
def test_shards_are_disjoint_complete_and_non_empty(part: str, num_shards: int) -> None:
    config = cfg(partition=part, num_shards=num_shards)
    shards = partition(config)
    assert len(shards) == num_shards
    assert_disjoint_cover(shards, spec.TRAIN_SIZES["digits"])
    for rank in range(num_shards):
        assert np.array_equal(shard_indices(config, rank), shards[rank])
        assert shard_size(config, rank) == len(shards[rank])


def test_iid_shards_are_balanced() -> None:
    sizes = [shard_size(cfg(num_shards=4), r) for r in range(4)]
    assert max(sizes) - min(sizes) <= 1
    assert sum(sizes) == spec.TRAIN_SIZES["digits"]


@pytest.mark.parametrize("part", ["iid", "dirichlet"])
def test_as_many_shards_as_examples(part: str) -> None:
    size = spec.TRAIN_SIZES["synthetic"]
    config = cfg(dataset="synthetic", partition=part, num_shards=size, alpha=0.01)
    shards = partition(config)
    assert_disjoint_cover(shards, size)
    assert {len(s) for s in shards} == {1}


def test_extremely_small_alpha_still_fills_every_shard() -> None:
    config = cfg(partition="dirichlet", num_shards=30, alpha=1e-6)
    assert_disjoint_cover(partition(config), spec.TRAIN_SIZES["digits"])


def test_too_many_shards_is_a_clear_error() -> None:
    size = spec.TRAIN_SIZES["synthetic"]
    with pytest.raises(ValueError, match=r"num_shards must be in 1\.\.400"):
        partition(cfg(dataset="synthetic", num_shards=size + 1))


@pytest.mark.parametrize("rank", [-1, 4, "0", True])
def test_bad_rank_is_refused(rank: Any) -> None:
    with pytest.raises(ValueError, match="rank"):
        shard_indices(cfg(), rank)


def test_partition_depends_on_seed() -> None:
    assert not np.array_equal(shard_indices(cfg(seed=0), 0), shard_indices(cfg(seed=1), 0))
    dirichlet = cfg(partition="dirichlet")
    assert not np.array_equal(shard_indices(dirichlet, 0), shard_indices({**dirichlet, "seed": 1}, 0))


def _fingerprint_script() -> str:
    return (
        "import hashlib, numpy as np\n"
        "from training.data import partition, load_split\n"
        "h = hashlib.sha256()\n"
        "for part in ('iid', 'dirichlet'):\n"
        "    for s in partition({'dataset': 'digits', 'seed': 11, 'num_shards': 5, 'partition': part,"
        " 'alpha': 0.3}):\n"
        "        h.update(np.ascontiguousarray(s).tobytes())\n"
        "train, test = load_split('digits', 11)\n"
        "h.update(train.x.tobytes()); h.update(test.y.tobytes())\n"
        "print(h.hexdigest())\n"
    )


def test_partition_is_identical_in_another_process() -> None:
    def run() -> str:
        out = subprocess.run(
            [sys.executable, "-c", _fingerprint_script()],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        )
        return out.stdout.strip()

    first = run()
    assert len(first) == 64
    assert run() == first
    # and equal to this process's own computation
    import hashlib

    h = hashlib.sha256()
    for part in ("iid", "dirichlet"):
        for s in partition(
            {"dataset": "digits", "seed": 11, "num_shards": 5, "partition": part, "alpha": 0.3}
        ):
            h.update(np.ascontiguousarray(s).tobytes())
    train, test = load_split("digits", 11)
    h.update(train.x.tobytes())
    h.update(test.y.tobytes())
    assert h.hexdigest() == first


def _label_skew(alpha: float, seed: int) -> float:
    """Mean over shards of the share of the shard's most common label (0.1 = balanced, 1 = one label)."""
    config = cfg(partition="dirichlet", num_shards=10, alpha=alpha, seed=seed)
    shares = []
    for rank in range(10):
        labels = shard_data(config, rank).y
        shares.append(np.bincount(labels, minlength=10).max() / len(labels))
    return float(np.mean(shares))


def test_dirichlet_skews_labels_more_as_alpha_gets_small() -> None:
    for seed in (0, 1):
        very_skewed = _label_skew(0.05, seed)
        skewed = _label_skew(0.5, seed)
        nearly_iid = _label_skew(1000.0, seed)
        assert very_skewed > skewed > nearly_iid
        assert very_skewed > 0.6
        assert nearly_iid < 0.25
    iid_shares = []
    for rank in range(10):
        labels = shard_data(cfg(num_shards=10), rank).y
        iid_shares.append(np.bincount(labels, minlength=10).max() / len(labels))
    assert np.mean(iid_shares) < 0.25
