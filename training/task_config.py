"""Reading a task config inside ``training``: the normalized config, with spec defaults as fallback.

The web tier stores configs already normalized by :func:`training.spec.normalize_federated_config`,
so the defaults here only matter for callers (tests, benchmarks) that pass a partial config.
Nothing is validated here: a config the spec would refuse (an unknown strategy such as
``fedprox``) still trains, which lets the training loop support more than the server offers.
This module does not import ``training.spec`` (pydantic is the server's, not the client's);
tests/unit/test_spec_schema.py checks that these defaults are the spec's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

DEFAULTS: dict[str, Any] = {
    "model": "mlp",
    "dataset": "digits",
    "rounds": 10,
    "num_shards": 1,
    "local_epochs": 1,
    "batch_size": 32,
    "lr": 0.05,
    "momentum": 0.0,
    "partition": "iid",
    "alpha": 0.5,
    "seed": 0,
    "strategy": "fedavg",
    "strategy_params": {},
}


def resolve(config: Mapping[str, Any]) -> dict[str, Any]:
    """Return ``config`` with every field the training code reads, defaults filling the gaps."""
    return {**DEFAULTS, **config}
