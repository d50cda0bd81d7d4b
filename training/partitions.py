"""Partition registry: how the train split is cut into ``num_shards`` disjoint, non-empty shards.

A partition function takes the train split's labels, the number of shards, the task's
``alpha`` and a seeded numpy generator, and returns one array of positions (into the train
split) per shard. The shards must be disjoint, cover the whole train split and be non-empty;
:func:`training.data.partition` checks that for every function registered here.

To add a partition: write the function here (or in its own module) and add one line to
:data:`PARTITIONS` (and its name to ``training/spec.py``).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

PartitionFn = Callable[[np.ndarray, int, float, np.random.Generator], list[np.ndarray]]


def iid(labels: np.ndarray, num_shards: int, alpha: float, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffle, then cut into ``num_shards`` nearly equal shards (sizes differ by at most one)."""
    del alpha  # label skew does not apply
    order = rng.permutation(len(labels))
    return [np.sort(part) for part in np.array_split(order, num_shards)]


def dirichlet(
    labels: np.ndarray, num_shards: int, alpha: float, rng: np.random.Generator
) -> list[np.ndarray]:
    """Label skew: each class is spread over the shards with proportions drawn from Dir(alpha).

    Small ``alpha`` (0.1) gives each shard few classes; large ``alpha`` (100) is close to iid.
    A shard left empty by the draw takes one example from the largest shard, so every shard is
    non-empty whenever ``num_shards <= len(labels)``.
    """
    shards: list[list[int]] = [[] for _ in range(num_shards)]
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        proportions = rng.dirichlet(np.full(num_shards, alpha))
        if not np.all(np.isfinite(proportions)) or proportions.sum() <= 0:
            # Degenerate draw (extremely small alpha): give the whole class to one shard.
            proportions = np.zeros(num_shards)
            proportions[rng.integers(num_shards)] = 1.0
        cuts = np.floor(np.cumsum(proportions)[:-1] * len(members)).astype(np.int64)
        for shard, part in zip(shards, np.split(members, cuts), strict=True):
            shard.extend(int(i) for i in part)
    for empty in [i for i, shard in enumerate(shards) if not shard]:
        donor = max(range(num_shards), key=lambda i: (len(shards[i]), -i))
        if len(shards[donor]) < 2:
            raise ValueError(f"cannot fill {num_shards} shards from {len(labels)} examples")
        shards[empty].append(shards[donor].pop())
    return [np.sort(np.asarray(shard, dtype=np.int64)) for shard in shards]


PARTITIONS: dict[str, PartitionFn] = {
    "iid": iid,
    "dirichlet": dirichlet,
}


def get_partition(name: str) -> PartitionFn:
    """Return the registered partition ``name`` or raise ``ValueError`` naming the known ones."""
    try:
        return PARTITIONS[name]
    except KeyError:
        raise ValueError(f"unknown partition {name!r}; known: {', '.join(sorted(PARTITIONS))}") from None
