"""scikit-learn's bundled handwritten digits: 1797 grey 8x8 images, 10 classes. No download.

Read straight from the CSV file scikit-learn ships (``sklearn/datasets/data/digits.csv.gz``),
the way ``sklearn.datasets.load_digits`` reads it, but without importing scikit-learn: that
import costs a fresh process over a second of CPU, and a volunteer that restarts pays it
before it can take a shard. ``tests/unit/test_training_data.py`` checks the arrays against
``load_digits``.
"""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np

INPUT_SHAPE = (1, 8, 8)
NUM_CLASSES = 10


def data_file() -> Path:
    """Where scikit-learn keeps the digits (found without importing scikit-learn)."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the digits dataset needs scikit-learn installed (pip install scikit-learn)")
    return Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / "digits.csv.gz"


def load() -> tuple[np.ndarray, np.ndarray]:
    """Return ``x`` float32 ``(1797, 1, 8, 8)`` scaled from 0..16 to ``[0, 1]`` and ``y`` int64."""
    with gzip.open(data_file(), mode="rt", encoding="utf-8") as rows:
        data = np.loadtxt(rows, delimiter=",")
    x = (np.asarray(data[:, :-1], dtype=np.float32) / 16.0).reshape(-1, *INPUT_SHAPE)
    y = np.asarray(data[:, -1], dtype=np.int64)
    return x, y
