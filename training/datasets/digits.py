"""scikit-learn's bundled handwritten digits: 1797 grey 8x8 images, 10 classes. No download."""

from __future__ import annotations

import numpy as np

INPUT_SHAPE = (1, 8, 8)
NUM_CLASSES = 10


def load() -> tuple[np.ndarray, np.ndarray]:
    """Return ``x`` float32 ``(1797, 1, 8, 8)`` scaled from 0..16 to ``[0, 1]`` and ``y`` int64."""
    from sklearn.datasets import load_digits  # bundled with scikit-learn: reads a local file

    bunch = load_digits()
    x = (np.asarray(bunch.data, dtype=np.float32) / 16.0).reshape(-1, *INPUT_SHAPE)
    y = np.asarray(bunch.target, dtype=np.int64)
    return x, y
