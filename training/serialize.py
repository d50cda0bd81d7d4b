"""Model bytes on the wire and on disk: safetensors only, never pickle."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save

StateDict = dict[str, torch.Tensor]


def state_to_bytes(state: Mapping[str, torch.Tensor]) -> bytes:
    """Serialize a state dict (tensors copied to CPU, made contiguous and unshared) to safetensors."""
    tensors = {name: t.detach().to("cpu").contiguous().clone() for name, t in state.items()}
    return bytes(_st_save(tensors))


def state_from_bytes(data: bytes) -> StateDict:
    """Parse safetensors bytes into a state dict of CPU tensors. Raises ``ValueError`` if malformed."""
    try:
        return dict(_st_load(bytes(data)))
    except Exception as exc:  # safetensors raises its own SafetensorError for malformed input
        raise ValueError(f"not a valid safetensors state dict: {exc}") from exc
