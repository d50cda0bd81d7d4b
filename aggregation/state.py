"""Persisting strategy state (server optimizer moments, adaptive clip norm) as safetensors."""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from safetensors.torch import load_file, save_file


def save_state(
    path: str | os.PathLike[str], state: Mapping[str, torch.Tensor], *, strategy: str | None = None
) -> None:
    """Write ``RoundResult.state`` to ``path`` (atomically: a temp file, then rename)."""
    spath = os.fspath(path)
    tmp = f"{spath}.tmp{os.getpid()}"
    metadata = {"aggregation.strategy": strategy} if strategy else None
    save_file({k: v.contiguous() for k, v in state.items()}, tmp, metadata=metadata)
    os.replace(tmp, spath)


def load_state(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a state file written by :func:`save_state` (never pickle)."""
    return load_file(os.fspath(path))
