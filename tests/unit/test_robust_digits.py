"""Two malicious clients in ten against the digits task: robust rules hold, plain FedAvg degrades.

A faithful in-process simulation of the federated rounds: ten clients train their real digits
shards with the real training loop each round; two of them send a poisoned model instead.
The server side is the real aggregation library.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from aggregation import aggregate
from training import build_model, evaluate, shard_size, train_local
from training.spec import normalize_federated_config

State = dict[str, torch.Tensor]
CONFIG = normalize_federated_config(
    {"model": "mlp", "dataset": "digits", "rounds": 8, "num_shards": 10, "local_epochs": 1, "lr": 0.05},
    default_batch_size=32,
    default_epochs=1,
)
MALICIOUS = (3, 7)  # ranks


def sign_flip(global_state: State, trained: State) -> State:
    """Push the model the opposite way, hard: global - 4 * (trained - global)."""
    return {k: global_state[k] - 4.0 * (trained[k] - global_state[k]) for k in global_state}


def scaled(global_state: State, trained: State) -> State:
    """A model-replacement style attack: a random direction blown up to 50x a normal step."""
    gen = torch.Generator().manual_seed(1)
    out = {}
    for k, v in global_state.items():
        step = (trained[k] - v).norm() / max(1.0, v.numel() ** 0.5)
        out[k] = v + 50.0 * step * torch.randn(v.shape, generator=gen)
    return out


def federate(rule: str, attack: Callable[[State, State], State] | None, **params: object) -> float:
    torch.manual_seed(0)
    global_state = {k: v.clone() for k, v in build_model(CONFIG).state_dict().items()}
    for round_no in range(CONFIG["rounds"]):
        updates = []
        for rank in range(CONFIG["num_shards"]):
            model = build_model(CONFIG)
            model.load_state_dict(global_state)
            train_local(model, CONFIG, rank, round_num=round_no, global_state=global_state)
            trained = {k: v.detach().clone() for k, v in model.state_dict().items()}
            if attack is not None and rank in MALICIOUS:
                trained = attack(global_state, trained)
            updates.append((trained, shard_size(CONFIG, rank)))
        global_state = aggregate(rule, updates, **params)
    return float(evaluate(global_state, CONFIG)["test_accuracy"])


@pytest.fixture(scope="module")
def honest_fedavg() -> float:
    return federate("fedavg", None)


@pytest.mark.parametrize("attack", [sign_flip, scaled], ids=["sign_flip", "scaled"])
@pytest.mark.parametrize(
    ("rule", "params"),
    [("median", {}), ("trimmed_mean", {"beta": 0.2}), ("krum", {"f": 2}), ("multi_krum", {"f": 2, "m": 6})],
)
def test_robust_rules_keep_the_accuracy_under_attack(
    honest_fedavg: float, rule: str, params: dict, attack: Callable[[State, State], State]
) -> None:
    accuracy = federate(rule, attack, **params)
    assert accuracy >= 0.85, f"{rule} under {attack.__name__}: {accuracy:.3f} (honest: {honest_fedavg:.3f})"
    assert accuracy >= honest_fedavg - 0.1


@pytest.mark.parametrize("attack", [sign_flip, scaled], ids=["sign_flip", "scaled"])
def test_plain_fedavg_visibly_degrades_under_the_same_attack(
    honest_fedavg: float, attack: Callable[[State, State], State]
) -> None:
    attacked = federate("fedavg", attack)
    assert honest_fedavg >= 0.9
    assert attacked < honest_fedavg - 0.2, f"under {attack.__name__}: {attacked:.3f} vs {honest_fedavg:.3f}"
