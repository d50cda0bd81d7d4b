"""Local training (one client's shard for one round), evaluation and the centralized baseline."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from training.data import derive_seed, load_split, shard_data
from training.models import build_model
from training.task_config import resolve

ProgressFn = Callable[[float, dict[str, float]], None]
"""``on_progress(progress, metrics)``: progress in 0..100, metrics ``loss``, ``accuracy``, ``epoch``."""

PROGRESS_INTERVAL = 2.0
PAUSE_POLL = 0.05

_SHUFFLE = 3
_CENTRALIZED = 4


class TrainingStopped(Exception):
    """Raised by the training loop when ``should_stop()`` turned true; nothing is returned."""


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"``: CUDA when torch sees a GPU, else CPU. Raises ``ValueError`` for unusable devices."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but torch sees no CUDA GPU")
    return torch.device(device)


def _tensors(x: np.ndarray, y: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # np.array(..., copy) because the cached split arrays are read-only.
    return torch.tensor(np.array(x), device=device), torch.tensor(np.array(y), device=device)


def _fit(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    momentum: float,
    mu: float,
    shuffle_seed: int,
    on_progress: ProgressFn | None,
    should_pause: Callable[[], bool] | None,
    should_stop: Callable[[], bool] | None,
    progress_interval: float,
    clock: Callable[[], float],
) -> dict[str, float]:
    """SGD over ``(x, y)``; returns the data loss and accuracy of the last epoch."""
    n = len(y)
    if n == 0:
        raise ValueError("no training examples")
    device = x.device
    model.to(device)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    anchor = [p.detach().clone() for p in model.parameters()] if mu > 0 else []
    generator = torch.Generator().manual_seed(shuffle_seed)
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    batches_per_epoch = math.ceil(n / batch_size)
    total_steps = epochs * batches_per_epoch
    step = 0
    last_report = clock()
    epoch_loss = epoch_correct = 0.0
    seen = 0

    def metrics(epoch: int) -> dict[str, float]:
        return {"loss": epoch_loss / max(seen, 1), "accuracy": epoch_correct / max(seen, 1), "epoch": epoch}

    for epoch in range(1, epochs + 1):
        order = torch.randperm(n, generator=generator).to(device)
        epoch_loss = epoch_correct = 0.0
        seen = 0
        for start in range(0, n, batch_size):
            if should_stop is not None and should_stop():
                raise TrainingStopped()
            while should_pause is not None and should_pause():
                if should_stop is not None and should_stop():
                    raise TrainingStopped()
                time.sleep(PAUSE_POLL)
            batch = order[start : start + batch_size]
            inputs, targets = x[batch], y[batch]
            optimizer.zero_grad(set_to_none=True)
            logits = model(inputs)
            data_loss = loss_fn(logits, targets)
            loss = data_loss / len(batch)
            if anchor:
                prox = sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor, strict=True))
                loss = loss + (mu / 2.0) * prox
            loss.backward()
            optimizer.step()
            batch_loss = float(data_loss.item())
            if not math.isfinite(batch_loss):
                raise ValueError(f"training diverged: loss is {batch_loss} (epoch {epoch}); try a smaller lr")
            epoch_loss += batch_loss
            epoch_correct += float((logits.argmax(dim=1) == targets).sum().item())
            seen += len(batch)
            step += 1
            now = clock()
            end_of_epoch = start + batch_size >= n
            if on_progress is not None and (end_of_epoch or now - last_report >= progress_interval):
                on_progress(100.0 * step / total_steps, metrics(epoch))
                last_report = now
    return {"train_loss": epoch_loss / seen, "train_accuracy": epoch_correct / seen}


def fedprox_mu(config: Mapping[str, Any]) -> float:
    """The proximal weight ``mu`` when the strategy is ``fedprox``, else 0."""
    cfg = resolve(config)
    if cfg["strategy"] != "fedprox":
        return 0.0
    mu = float((cfg.get("strategy_params") or {}).get("mu", 0.0))
    if mu < 0 or not math.isfinite(mu):
        raise ValueError(f"strategy_params.mu must be a finite number >= 0, got {mu}")
    return mu


def warm_up(device: str | torch.device = "cpu") -> None:
    """Pay a process's one-time costs before it asks for work, not inside its first shard.

    A fresh process spends over a second on its first :func:`train_local` (on an idle machine
    here: 1.1 s importing scikit-learn for the digits, 1.0 s importing ``torch._dynamo`` on
    the first optimizer). A volunteer that restarts and takes a shard cold holds its round up
    for that long. This loads every registered dataset (cached for the process) and takes one
    optimizer step on ``device``.
    """
    from training.data import _dataset_arrays
    from training.datasets import DATASETS

    for name in DATASETS:
        _dataset_arrays(name)
    target = resolve_device(device)
    layer = nn.Linear(4, 2).to(target)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    loss = nn.functional.cross_entropy(
        layer(torch.zeros(2, 4, device=target)), torch.zeros(2, dtype=torch.long, device=target)
    )
    loss.backward()
    optimizer.step()


def train_local(
    model: nn.Module,
    config: Mapping[str, Any],
    rank: int,
    *,
    round_num: int = 0,
    global_state: Mapping[str, torch.Tensor] | None = None,
    on_progress: ProgressFn | None = None,
    should_pause: Callable[[], bool] | None = None,
    should_stop: Callable[[], bool] | None = None,
    device: str | torch.device = "cpu",
    progress_interval: float = PROGRESS_INTERVAL,
    clock: Callable[[], float] = time.monotonic,
) -> dict[str, float]:
    """Train ``model`` in place on shard ``rank`` for ``local_epochs`` epochs of SGD.

    ``global_state`` (optional) is loaded first (strictly). With ``strategy == "fedprox"`` the
    loss gets ``mu/2 * ||w - w_global||^2`` where ``w_global`` are the weights at the start.
    The shuffling is seeded from ``(seed, rank, round_num)``. ``on_progress`` is called at the
    end of every epoch and at least every ``progress_interval`` seconds in between;
    ``should_pause`` is polled between batches (training waits while it is true) and
    ``should_stop`` raises :class:`TrainingStopped`. Returns ``train_loss`` and
    ``train_accuracy`` of the last epoch (data loss, without the proximal term) and
    ``num_examples``, the shard's size. The model is left on ``device``.
    """
    cfg = resolve(config)
    dev = resolve_device(device)
    if global_state is not None:
        model.load_state_dict(dict(global_state), strict=True)
    shard = shard_data(cfg, rank)
    x, y = _tensors(shard.x, shard.y, dev)
    result = _fit(
        model,
        x,
        y,
        epochs=int(cfg["local_epochs"]),
        batch_size=int(cfg["batch_size"]),
        lr=float(cfg["lr"]),
        momentum=float(cfg["momentum"]),
        mu=fedprox_mu(cfg),
        shuffle_seed=derive_seed(int(cfg["seed"]), _SHUFFLE, rank, round_num),
        on_progress=on_progress,
        should_pause=should_pause,
        should_stop=should_stop,
        progress_interval=progress_interval,
        clock=clock,
    )
    return {**result, "num_examples": len(shard)}


def evaluate(
    model_or_state: nn.Module | Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
    *,
    device: str | torch.device = "cpu",
    batch_size: int = 1024,
) -> dict[str, float]:
    """Mean cross-entropy and accuracy on the task's held-out test split.

    Takes a model or a state dict (a model is then built from ``config`` and loaded strictly).
    """
    cfg = resolve(config)
    dev = resolve_device(device)
    if isinstance(model_or_state, nn.Module):
        model = model_or_state
    else:
        model = build_model(cfg)
        model.load_state_dict(dict(model_or_state), strict=True)
    was_training = model.training
    model.to(dev)
    model.eval()
    _, test = load_split(str(cfg["dataset"]), int(cfg["seed"]))
    x, y = _tensors(test.x, test.y, dev)
    total_loss = correct = 0.0
    with torch.no_grad():
        for start in range(0, len(y), batch_size):
            logits = model(x[start : start + batch_size])
            targets = y[start : start + batch_size]
            total_loss += float(nn.functional.cross_entropy(logits, targets, reduction="sum").item())
            correct += float((logits.argmax(dim=1) == targets).sum().item())
    model.train(was_training)
    n = len(y)
    return {"test_loss": total_loss / n, "test_accuracy": correct / n, "num_examples": n}


def train_centralized(
    config: Mapping[str, Any],
    *,
    device: str | torch.device = "cpu",
    on_progress: ProgressFn | None = None,
) -> dict[str, float]:
    """The baseline: the task's model trained on the whole train split for ``rounds * local_epochs``
    epochs with the same optimiser settings (no proximal term), then evaluated on the test split.

    Returns ``train_loss``, ``train_accuracy`` (last epoch), ``test_loss``, ``test_accuracy``,
    ``num_examples`` (train split size) and ``epochs``.
    """
    cfg = resolve(config)
    dev = resolve_device(device)
    model = build_model(cfg)
    train, _ = load_split(str(cfg["dataset"]), int(cfg["seed"]))
    x, y = _tensors(train.x, train.y, dev)
    epochs = int(cfg["rounds"]) * int(cfg["local_epochs"])
    result = _fit(
        model,
        x,
        y,
        epochs=epochs,
        batch_size=int(cfg["batch_size"]),
        lr=float(cfg["lr"]),
        momentum=float(cfg["momentum"]),
        mu=0.0,
        shuffle_seed=derive_seed(int(cfg["seed"]), _CENTRALIZED),
        on_progress=on_progress,
        should_pause=None,
        should_stop=None,
        progress_interval=PROGRESS_INTERVAL,
        clock=time.monotonic,
    )
    evaluation = evaluate(model, cfg, device=dev)
    return {
        **result,
        "test_loss": evaluation["test_loss"],
        "test_accuracy": evaluation["test_accuracy"],
        "num_examples": len(train),
        "epochs": epochs,
    }
