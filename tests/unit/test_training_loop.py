"""Local training, evaluation, serialization: hooks, determinism, FedProx, safetensors on the wire."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from training.data import shard_size
from training.datasets import DATASETS
from training.loop import TrainingStopped, evaluate, fedprox_mu, resolve_device, train_local
from training.models import build_model
from training.serialize import state_from_bytes, state_to_bytes

ROOT = Path(__file__).resolve().parents[2]

BASE: dict[str, Any] = {
    "model": "mlp",
    "dataset": "synthetic",
    "num_shards": 2,
    "local_epochs": 2,
    "batch_size": 16,
    "lr": 0.05,
    "momentum": 0.0,
    "partition": "iid",
    "seed": 4,
    "strategy": "fedavg",
    "strategy_params": {},
}


def states_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return float(sum(((a[k] - b[k]) ** 2).sum() for k in a)) ** 0.5


def test_state_bytes_are_safetensors_and_round_trip() -> None:
    state = build_model({"model": "cnn", "seed": 1}).state_dict()
    data = state_to_bytes(state)
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_len])
    assert set(header) - {"__metadata__"} == set(state)
    assert all(header[k]["dtype"] == "F32" for k in state)
    back = state_from_bytes(data)
    assert states_equal(back, state)


def test_state_from_bytes_refuses_garbage() -> None:
    with pytest.raises(ValueError, match="safetensors"):
        state_from_bytes(b"\x80\x04not a safetensors file")
    data = state_to_bytes(build_model({"seed": 1}).state_dict())
    with pytest.raises(ValueError):
        state_from_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
def test_training_learns_and_reports_its_shard_size(model_name: str) -> None:
    config = {**BASE, "model": model_name}
    model = build_model(config)
    before = evaluate(model, config)
    metrics = train_local(model, {**config, "local_epochs": 5}, 0)
    after = evaluate(model, config)
    assert metrics["num_examples"] == shard_size(config, 0)
    assert set(metrics) == {"train_loss", "train_accuracy", "num_examples"}
    assert after["test_accuracy"] > 0.8 > before["test_accuracy"]
    assert after["test_loss"] < before["test_loss"]
    assert after["num_examples"] == 100


def test_training_is_deterministic_per_seed_rank_and_round() -> None:
    start = build_model(BASE).state_dict()

    def run(rank: int, round_num: int) -> dict[str, torch.Tensor]:
        model = build_model(BASE)
        train_local(model, BASE, rank, round_num=round_num, global_state=start)
        return model.state_dict()

    first = run(0, 3)
    assert states_equal(first, run(0, 3))
    assert not states_equal(first, run(0, 4))  # the shuffling changes with the round
    assert not states_equal(first, run(1, 3))  # and with the rank (another shard, too)


def test_global_state_is_loaded_before_training() -> None:
    global_model = build_model({**BASE, "seed": 99})
    global_state = {k: v.clone() for k, v in global_model.state_dict().items()}
    a = build_model(BASE)
    train_local(a, BASE, 0, global_state=global_state)
    b = build_model({**BASE, "seed": 99})
    train_local(b, BASE, 0)
    assert states_equal(a.state_dict(), b.state_dict())


def test_global_state_with_wrong_tensors_is_refused() -> None:
    cnn_state = build_model({**BASE, "model": "cnn"}).state_dict()
    with pytest.raises(RuntimeError):
        train_local(build_model(BASE), BASE, 0, global_state=cnn_state)


def test_progress_every_epoch_with_loss_accuracy_epoch() -> None:
    reports: list[tuple[float, dict[str, float]]] = []
    train_local(
        build_model(BASE), {**BASE, "local_epochs": 3}, 1, on_progress=lambda p, m: reports.append((p, m))
    )
    assert [m["epoch"] for _, m in reports] == [1, 2, 3]
    assert reports[-1][0] == pytest.approx(100.0)
    progress = [p for p, _ in reports]
    assert progress == sorted(progress) and all(0 < p <= 100 for p in progress)
    assert all(set(m) == {"loss", "accuracy", "epoch"} for _, m in reports)
    assert all(0.0 <= m["accuracy"] <= 1.0 and m["loss"] > 0 for _, m in reports)


def test_progress_between_epochs_when_time_passes() -> None:
    ticks = iter(range(10_000))
    reports: list[float] = []
    config = {**BASE, "local_epochs": 1, "batch_size": 10}  # 20 batches in the epoch
    train_local(
        build_model(config),
        config,
        0,
        on_progress=lambda p, m: reports.append(p),
        progress_interval=2.0,
        clock=lambda: float(next(ticks)),  # one "second" per batch
    )
    assert len(reports) >= 10  # every other batch, plus the end of the epoch
    assert reports[-1] == pytest.approx(100.0)


def test_should_stop_abandons_training() -> None:
    calls = 0

    def stop_after_three() -> bool:
        nonlocal calls
        calls += 1
        return calls > 3

    model = build_model(BASE)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TrainingStopped):
        train_local(model, BASE, 0, should_stop=stop_after_three)
    assert calls == 4
    assert not states_equal(before, model.state_dict())  # three batches ran, no more


def test_should_pause_waits_until_released() -> None:
    paused = threading.Event()
    paused.set()
    waiting = threading.Event()
    batches_while_paused: list[int] = []
    reports: list[float] = []

    def should_pause() -> bool:
        if paused.is_set():
            waiting.set()
            batches_while_paused.append(len(reports))
            return True
        return False

    result: dict[str, Any] = {}

    def work() -> None:
        result["metrics"] = train_local(
            build_model(BASE), BASE, 0, should_pause=should_pause, on_progress=lambda p, m: reports.append(p)
        )

    worker = threading.Thread(target=work)
    worker.start()
    assert waiting.wait(timeout=60)
    assert reports == []  # held before the first batch
    assert worker.is_alive()
    paused.clear()
    worker.join(timeout=60)
    assert not worker.is_alive()
    assert result["metrics"]["num_examples"] == shard_size(BASE, 0)
    assert set(batches_while_paused) == {0}


def test_stop_while_paused() -> None:
    with pytest.raises(TrainingStopped):
        train_local(
            build_model(BASE),
            BASE,
            0,
            should_pause=lambda: True,
            should_stop=iter([False, False, True]).__next__,
        )


def test_fedprox_pulls_towards_the_global_weights() -> None:
    config = {**BASE, "local_epochs": 5, "lr": 0.1}
    start = build_model(config).state_dict()

    def train(**extra: Any) -> dict[str, torch.Tensor]:
        model = build_model(config)
        train_local(model, {**config, **extra}, 0, global_state=start)
        return model.state_dict()

    plain = train()
    prox_zero = train(strategy="fedprox", strategy_params={"mu": 0.0})
    prox = train(strategy="fedprox", strategy_params={"mu": 5.0})
    assert states_equal(plain, prox_zero)
    assert distance(prox, start) < 0.5 * distance(plain, start)


def test_fedprox_mu_from_a_normalized_config() -> None:
    from training.spec import normalize_federated_config

    config = normalize_federated_config(
        {"strategy": "fedprox", "strategy_params": {"mu": 0.5}}, default_batch_size=32, default_epochs=1
    )
    assert fedprox_mu(config) == 0.5
    plain = normalize_federated_config({}, default_batch_size=32, default_epochs=1)
    assert fedprox_mu(plain) == 0.0


def test_fedprox_mu_is_read_only_for_fedprox() -> None:
    assert fedprox_mu({"strategy": "fedavg", "strategy_params": {"mu": 1.0}}) == 0.0
    assert fedprox_mu({"strategy": "fedprox", "strategy_params": {"mu": 0.25}}) == 0.25
    with pytest.raises(ValueError, match="mu"):
        fedprox_mu({"strategy": "fedprox", "strategy_params": {"mu": -1}})


def test_divergence_is_an_error_not_a_nan_upload() -> None:
    model = build_model(BASE)
    with torch.no_grad():
        next(iter(model.parameters())).fill_(float("nan"))
    with pytest.raises(ValueError, match="diverged"):
        train_local(model, BASE, 0)


def test_evaluate_accepts_a_model_or_a_state_dict() -> None:
    model = build_model(BASE)
    train_local(model, BASE, 0)
    from_model = evaluate(model, BASE)
    from_state = evaluate(state_from_bytes(state_to_bytes(model.state_dict())), BASE)
    assert from_model == pytest.approx(from_state)
    assert set(from_model) == {"test_loss", "test_accuracy", "num_examples"}
    assert model.training  # evaluate restored the mode


def test_resolve_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            resolve_device("cuda")


def test_warm_up_loads_the_datasets_and_steps_an_optimizer() -> None:
    """In a fresh process: after warm_up the first shard pays no import (the client calls it
    before it registers)."""
    code = (
        "import sys\nfrom training import warm_up\nfrom training.data import _dataset_arrays\n"
        "warm_up('cpu')\nprint(_dataset_arrays.cache_info().currsize, 'torch._dynamo' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split() == [str(len(DATASETS)), "True"]
