"""A tiny generated dataset for fast tests: 500 noisy copies of 10 fixed 8x8 patterns.

Generated from a fixed seed, so it is the same everywhere; the task's ``seed`` only decides the
train/test split and the shards, as for every other dataset.
"""

from __future__ import annotations

import numpy as np

INPUT_SHAPE = (1, 8, 8)
NUM_CLASSES = 10
NUM_SAMPLES = 500
GENERATOR_SEED = 20240601
NOISE = 0.5


def load() -> tuple[np.ndarray, np.ndarray]:
    """Return ``x`` float32 ``(500, 1, 8, 8)`` in ``[0, 1]`` and ``y`` int64, 50 samples per class."""
    rng = np.random.default_rng(GENERATOR_SEED)
    prototypes = (rng.random((NUM_CLASSES, *INPUT_SHAPE)) > 0.5).astype(np.float32)
    y = np.arange(NUM_SAMPLES, dtype=np.int64) % NUM_CLASSES
    noise = rng.normal(0.0, NOISE, size=(NUM_SAMPLES, *INPUT_SHAPE)).astype(np.float32)
    x = np.clip(prototypes[y] + noise, 0.0, 1.0).astype(np.float32)
    return x, y
