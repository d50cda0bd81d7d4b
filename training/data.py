"""Deterministic splits and shards: every process derives the same data from a task's ``seed``.

* :func:`load_split` cuts a dataset into a train split and a held-out test split (20 %, used by
  the server's evaluation) with a generator seeded from ``seed``.
* :func:`shard_indices` cuts the train split into ``num_shards`` shards with the task's
  partition, also seeded from ``seed``, so a client derives its shard from its rank alone.

Torch-free and cached per process: repeated calls are cheap and return read-only arrays.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from training.datasets import get_dataset
from training.partitions import get_partition
from training.task_config import resolve

TEST_FRACTION = 0.2
STD_FLOOR = 0.1

# Purposes mixed into the task seed so that the split, the partition and the shuffling of
# each (rank, round) (3 and 4, in training.loop) draw independent streams from one seed.
_SPLIT = 1
_PARTITION = 2


def derive_seed(seed: int, *parts: int) -> int:
    """A 63-bit seed derived from the task ``seed`` and ``parts`` (stable across processes)."""
    state = np.random.SeedSequence([int(seed), *(int(p) for p in parts)]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


@dataclass(frozen=True)
class Split:
    """One side of a train/test split: ``x`` float32 ``(n, C, H, W)``, ``y`` int64 ``(n,)``."""

    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return len(self.y)


def _read_only(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False
    return array


@functools.lru_cache(maxsize=4)
def _dataset_arrays(name: str) -> tuple[np.ndarray, np.ndarray]:
    x, y = get_dataset(name).load()
    return _read_only(np.ascontiguousarray(x, dtype=np.float32)), _read_only(np.asarray(y, dtype=np.int64))


@functools.lru_cache(maxsize=16)
def load_split(dataset: str, seed: int) -> tuple[Split, Split]:
    """Return ``(train, test)`` of ``dataset`` split with ``seed``.

    Stratified: 20 % of every class (rounded) goes to the test split, the rest to train.
    Both keep the dataset's order. Inputs are standardized per feature (pixel) with the
    train split's mean and standard deviation (at least ``STD_FLOOR``).
    """
    x, y = _dataset_arrays(dataset)
    rng = np.random.default_rng(derive_seed(seed, _SPLIT))
    test_parts = []
    for cls in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == cls))
        test_parts.append(members[: round(len(members) * TEST_FRACTION)])
    test_idx = np.sort(np.concatenate(test_parts))
    train_idx = np.setdiff1d(np.arange(len(y)), test_idx)
    # Standardize every input feature with the train split's statistics: plain SGD then
    # converges in the few steps a federated round allows. The floor keeps nearly constant
    # pixels (a corner lit in two images) from blowing up into huge values.
    mean = x[train_idx].mean(axis=0, keepdims=True)
    std = x[train_idx].std(axis=0, keepdims=True)
    std = np.maximum(std, STD_FLOOR).astype(np.float32)
    x_train = ((x[train_idx] - mean) / std).astype(np.float32)
    x_test = ((x[test_idx] - mean) / std).astype(np.float32)
    train = Split(_read_only(x_train), _read_only(y[train_idx]))
    test = Split(_read_only(x_test), _read_only(y[test_idx]))
    return train, test


@functools.lru_cache(maxsize=64)
def _partition(
    dataset: str, seed: int, partition: str, alpha: float, num_shards: int
) -> tuple[np.ndarray, ...]:
    train, _ = load_split(dataset, seed)
    if not 1 <= num_shards <= len(train):
        raise ValueError(
            f"num_shards must be in 1..{len(train)} for dataset {dataset!r} "
            f"({len(train)} training examples), got {num_shards}"
        )
    rng = np.random.default_rng(derive_seed(seed, _PARTITION))
    shards = get_partition(partition)(train.y, num_shards, alpha, rng)
    sizes = [len(s) for s in shards]
    if len(shards) != num_shards or min(sizes) == 0:
        raise ValueError(f"partition {partition!r} produced shard sizes {sizes}")
    joined = np.concatenate(shards)
    if len(joined) != len(train) or not np.array_equal(np.sort(joined), np.arange(len(train))):
        raise ValueError(f"partition {partition!r} is not a disjoint cover of the train split")
    return tuple(_read_only(np.asarray(s, dtype=np.int64)) for s in shards)


def partition(config: Mapping[str, Any]) -> tuple[np.ndarray, ...]:
    """All shards of the task: one sorted array of positions into the train split per rank."""
    cfg = resolve(config)
    return _partition(
        str(cfg["dataset"]),
        int(cfg["seed"]),
        str(cfg["partition"]),
        float(cfg["alpha"]),
        int(cfg["num_shards"]),
    )


def _check_rank(config: Mapping[str, Any], rank: int) -> int:
    num_shards = int(resolve(config)["num_shards"])
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < num_shards:
        raise ValueError(f"rank must be an integer in 0..{num_shards - 1}, got {rank!r}")
    return rank


def shard_indices(config: Mapping[str, Any], rank: int) -> np.ndarray:
    """Positions (into the train split of :func:`load_split`) of shard ``rank``; sorted, read-only."""
    return partition(config)[_check_rank(config, rank)]


def shard_size(config: Mapping[str, Any], rank: int) -> int:
    """Number of training examples in shard ``rank``: the most a client can claim for it."""
    return len(shard_indices(config, rank))


def shard_data(config: Mapping[str, Any], rank: int) -> Split:
    """The examples of shard ``rank``."""
    cfg = resolve(config)
    train, _ = load_split(str(cfg["dataset"]), int(cfg["seed"]))
    idx = shard_indices(cfg, rank)
    return Split(_read_only(train.x[idx]), _read_only(train.y[idx]))
