"""The trained model of a completed task, for use outside this project: where its exported
program lives, what it expects, and its model card.

Torch-free on purpose: the web tier serves the export and builds the card from the database
without loading torch. The program itself is built by :mod:`training.program` (torch) in the
Celery worker that completes the task. Format and use: docs/training.md, "Export".
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from training.datasets import get_dataset

FORMAT = "torch.export"
FILE_SUFFIX = ".pt2"
# The JSON metadata saved inside the .pt2 archive (torch.export.save's extra_files).
META_NAME = "aifarm.json"
LOAD_HINT = "torch.export.load(path).module()(x)"


def export_rel(task_id: int) -> str:
    """Where a completed task's program lives, relative to CHECKPOINT_DIR."""
    return f"tasks/{task_id}/export/model{FILE_SUFFIX}"


def download_name(task_id: int) -> str:
    return f"task{task_id}{FILE_SUFFIX}"


def io_spec(config: Mapping[str, Any]) -> dict[str, Any]:
    """What the exported program takes and returns, for the card and the predict server."""
    info = get_dataset(str(config.get("dataset", "digits")))
    shape = list(info.input_shape)
    return {
        "input": {
            "dtype": "float32",
            "shape": ["batch", *shape],
            "features": math.prod(shape),
            "range": [0.0, 1.0],
            "note": "raw pixel intensities in [0, 1] (digits: the 0..16 values / 16); the program "
            "standardizes them with the training split's per-pixel mean and std itself",
        },
        "output": {
            "dtype": "float32",
            "shape": ["batch", info.num_classes],
            "meaning": "logits; argmax is the predicted class, softmax the probabilities",
        },
        "classes": list(range(info.num_classes)),
    }


def metadata(task_id: int, config: Mapping[str, Any]) -> dict[str, Any]:
    """What the worker saves inside the archive: enough to use it without the server."""
    return {"task_id": task_id, "format": FORMAT, "config": dict(config), **io_spec(config)}


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat(timespec="seconds") + "Z"


def model_card(
    *,
    task_id: int,
    config: Mapping[str, Any],
    result: Mapping[str, Any],
    rounds: list[dict[str, Any]],
    created_at: datetime | None,
    completed_at: datetime | None,
    export_sha256: str | None,
    export_bytes: int | None,
) -> dict[str, Any]:
    """The model card of a completed federated task (JSON): config, data, per-round metrics,
    final accuracy, and how to load the export. ``rounds`` are the rounds' metrics in order."""
    dataset = str(config.get("dataset", "digits"))
    return {
        "task_id": task_id,
        "model": config.get("model"),
        "dataset": {
            "name": dataset,
            "split": "stratified 80 % train / 20 % test, seeded by config.seed",
            "partition": config.get("partition"),
            "num_shards": config.get("num_shards"),
        },
        "config": dict(config),
        "created_at": _iso(created_at),
        "completed_at": _iso(completed_at),
        "rounds": [{k: v for k, v in r.items() if k != "report"} for r in rounds],
        "final": dict(result.get("final") or {}),
        "weights_sha256": result.get("model_sha256"),
        "export": {
            "format": FORMAT,
            "file": download_name(task_id),
            "sha256": export_sha256,
            "bytes": export_bytes,
            "load": LOAD_HINT,
            **io_spec(config),
        },
    }
