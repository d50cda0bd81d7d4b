"""Model registry: every model is a small module with a ``build(input_shape, num_classes)``.

Models must keep their whole state in float32 parameters (no BatchNorm, no integer buffers):
the server averages every state-dict entry and checks uploads tensor by tensor.

To add a model, write ``training/models/<name>.py`` with ``build(input_shape, num_classes) ->
nn.Module`` and add one line to :data:`MODELS` below (and its name to ``training/spec.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from training.datasets import get_dataset
from training.models import cnn, mlp
from training.task_config import resolve

ModelBuilder = Callable[[tuple[int, ...], int], nn.Module]

MODELS: dict[str, ModelBuilder] = {
    "mlp": mlp.build,
    "cnn": cnn.build,
}


def get_model(name: str) -> ModelBuilder:
    """Return the registered model builder ``name`` or raise ``ValueError`` naming the known ones."""
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(sorted(MODELS))}") from None


def build_model(config: Mapping[str, Any]) -> nn.Module:
    """The task's model for its dataset, initialised deterministically from ``config["seed"]``.

    The global torch RNG is left as it was: initialisation runs under a forked RNG.
    """
    cfg = resolve(config)
    builder = get_model(str(cfg["model"]))
    info = get_dataset(str(cfg["dataset"]))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(cfg["seed"]))
        model = builder(info.input_shape, info.num_classes)
    for name, tensor in model.state_dict().items():
        if tensor.dtype != torch.float32:
            raise TypeError(f"model {cfg['model']!r}: state entry {name!r} is {tensor.dtype}, not float32")
    return model
