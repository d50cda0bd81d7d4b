"""Names and parameters of the aggregation strategies, checked without importing torch.

The web tier validates a task's ``config.strategy`` and ``config.strategy_params`` here at
submit time, so a strategy that cannot work is a 400, not an exception in a worker.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

STRATEGIES: tuple[str, ...] = ("fedavg",)


def normalize_strategy(name: str, params: Mapping[str, Any], num_clients: int) -> dict[str, Any]:
    """Return the strategy's parameters with defaults filled in.

    ``num_clients`` is the number of updates each round aggregates (the task's ``num_shards``).
    Raises ``ValueError`` with a reason a user can act on.
    """
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; known: {', '.join(STRATEGIES)}")
    if not isinstance(params, Mapping):
        raise ValueError("strategy_params must be an object")
    if params:
        raise ValueError(f"strategy {name!r} takes no parameters, got {sorted(params)}")
    return {}
