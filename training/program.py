"""The exported program of a trained model: a ``torch.export`` archive (``.pt2``) that runs with
plain torch, without this project's code.

The program takes raw inputs (float32 ``(batch, *input_shape)``, pixels in ``[0, 1]``), applies
the same per-pixel standardization as training (the train split's mean and std, baked in as
buffers), and returns logits. Load it with ``torch.export.load(path).module()``. docs/training.md,
"Export".
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from training.data import STD_FLOOR, load_split
from training.datasets import get_dataset
from training.export import META_NAME, metadata
from training.models import build_model
from training.task_config import resolve

MAX_BATCH = 1 << 20  # the export's dynamic batch dimension is bounded (torch.export wants a range)


class Standardized(nn.Module):
    """The task's model behind the training split's per-pixel standardization."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, model: nn.Module, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.mean) / self.std)


def standardization(dataset: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The per-pixel ``(mean, std)`` that :func:`training.data.load_split` applied, each shaped
    ``(1, *input_shape)``.

    ``load_split`` does not return them, so they are read back from its output: every row of
    both splits went through the same increasing affine map per pixel, so the map's two
    coefficients follow from the raw and standardized minimum and maximum of that pixel. A pixel
    constant over the whole dataset was standardized to 0 (its std floored at ``STD_FLOOR``).
    """
    raw = np.asarray(get_dataset(dataset).load()[0], dtype=np.float64)
    train, test = load_split(dataset, seed)
    scaled = np.concatenate([train.x, test.x]).astype(np.float64)
    raw_lo, raw_hi = raw.min(axis=0, keepdims=True), raw.max(axis=0, keepdims=True)
    lo, hi = scaled.min(axis=0, keepdims=True), scaled.max(axis=0, keepdims=True)
    varies = raw_hi > raw_lo
    std = np.where(varies, (raw_hi - raw_lo) / np.where(varies, hi - lo, 1.0), STD_FLOOR)
    mean = np.where(varies, raw_lo - std * lo, raw_lo)
    return mean.astype(np.float32), std.astype(np.float32)


def build(config: Mapping[str, Any], state: Mapping[str, torch.Tensor]) -> Standardized:
    """The task's model with ``state`` loaded (strictly), wrapped in its standardization, in eval mode."""
    cfg = resolve(config)
    model = build_model(cfg)
    model.load_state_dict(dict(state), strict=True)
    mean, std = standardization(str(cfg["dataset"]), int(cfg["seed"]))
    return Standardized(model, torch.from_numpy(mean), torch.from_numpy(std)).eval()


def program_bytes(task_id: int, config: Mapping[str, Any], state: Mapping[str, torch.Tensor]) -> bytes:
    """The ``.pt2`` archive of the task's final model, with :func:`training.export.metadata`
    saved inside it as ``aifarm.json``."""
    wrapped = build(config, state)
    shape = get_dataset(str(resolve(config)["dataset"])).input_shape
    example = torch.zeros(2, *shape)
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    with torch.no_grad():
        exported = torch.export.export(wrapped, (example,), dynamic_shapes={"x": {0: batch}})
    out = io.BytesIO()
    torch.export.save(exported, out, extra_files={META_NAME: json.dumps(metadata(task_id, config))})
    return out.getvalue()


def load(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Load an exported program: ``(module, metadata)``. The module maps raw inputs to logits."""
    extra = {META_NAME: ""}
    program = torch.export.load(str(path), extra_files=extra)
    meta = json.loads(extra[META_NAME] or "{}")
    return program.module(), meta
