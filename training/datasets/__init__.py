"""Dataset registry: every dataset is a small module with a ``load()`` returning numpy arrays.

Torch-free on purpose: the split and the shards are plain index arithmetic, so anything that
only needs shard sizes (the server's worker clamping a claimed example count) stays cheap.

To add a dataset, write ``training/datasets/<name>.py`` with a ``load() -> (x, y)`` function
(``x``: float32 ``(N, 1, 8, 8)`` in ``[0, 1]``, ``y``: int64 ``(N,)`` in ``0..9``) and add one
line to :data:`DATASETS` below (and its name and train size to ``training/spec.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from training.datasets import digits, synthetic

Arrays = tuple[np.ndarray, np.ndarray]


@dataclass(frozen=True)
class DatasetInfo:
    """What the models need to know about a dataset, and how to load it."""

    name: str
    load: Callable[[], Arrays]
    input_shape: tuple[int, ...]
    num_classes: int


DATASETS: dict[str, DatasetInfo] = {
    "digits": DatasetInfo("digits", digits.load, digits.INPUT_SHAPE, digits.NUM_CLASSES),
    "synthetic": DatasetInfo("synthetic", synthetic.load, synthetic.INPUT_SHAPE, synthetic.NUM_CLASSES),
}


def get_dataset(name: str) -> DatasetInfo:
    """Return the registered dataset ``name`` or raise ``ValueError`` naming the known ones."""
    try:
        return DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(sorted(DATASETS))}") from None
