"""The project's demo target, simulated in process: 10 rounds of FedAvg over 4 clients on digits.

FedAvg is written inline (a weighted mean of the clients' trained state dicts) so this test
checks the training package alone; the aggregation package has tests of its own.
"""

from __future__ import annotations

from typing import Any

import torch

from training.loop import evaluate, train_centralized, train_local
from training.models import build_model
from training.serialize import state_from_bytes, state_to_bytes

DEMO: dict[str, Any] = {
    "model": "mlp",
    "dataset": "digits",
    "rounds": 10,
    "num_shards": 4,
    "local_epochs": 1,
    "batch_size": 32,
    "lr": 0.05,
    "partition": "iid",
    "strategy": "fedavg",
}


def fedavg(updates: list[tuple[dict[str, torch.Tensor], int]]) -> dict[str, torch.Tensor]:
    total = sum(n for _, n in updates)
    averaged = {}
    for name in updates[0][0]:
        acc = torch.zeros_like(updates[0][0][name])
        for state, n in updates:
            acc += state[name] * (n / total)
        averaged[name] = acc
    return averaged


def simulate(config: dict[str, Any]) -> list[float]:
    """Accuracy of the global model after each round; updates travel as safetensors bytes."""
    global_bytes = state_to_bytes(build_model(config).state_dict())
    accuracies = []
    for round_num in range(config["rounds"]):
        updates = []
        for rank in range(config["num_shards"]):
            model = build_model(config)
            metrics = train_local(
                model, config, rank, round_num=round_num, global_state=state_from_bytes(global_bytes)
            )
            assert metrics["num_examples"] > 0
            updates.append(
                (state_from_bytes(state_to_bytes(model.state_dict())), int(metrics["num_examples"]))
            )
        global_state = fedavg(updates)
        global_bytes = state_to_bytes(global_state)
        accuracies.append(evaluate(global_state, config)["test_accuracy"])
    return accuracies


def test_demo_config_reaches_093_after_10_rounds() -> None:
    accuracies = simulate(DEMO)
    assert accuracies[-1] >= 0.93, accuracies
    assert accuracies[0] < accuracies[-1]


def test_demo_target_holds_for_other_seeds() -> None:
    for seed in (1, 2):
        assert simulate({**DEMO, "seed": seed})[-1] >= 0.93


def test_label_skewed_partition_still_learns() -> None:
    accuracies = simulate({**DEMO, "partition": "dirichlet", "alpha": 0.5})
    assert accuracies[-1] >= 0.85, accuracies


def test_centralized_baseline_reaches_similar_accuracy() -> None:
    metrics = train_centralized(DEMO)
    assert metrics["epochs"] == 10
    assert metrics["num_examples"] == 1438
    assert metrics["test_accuracy"] >= 0.93
    assert metrics["train_accuracy"] >= 0.95
