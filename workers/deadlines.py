"""When an assignment must be finished by: pure functions, no database.

A task's ``config.deadline_s`` wins. Otherwise a federated round's deadline is derived from
the work (the shard's examples times ``local_epochs``) and the client's measured throughput
(``DEADLINE_RATE`` until it has one), with ``DEADLINE_SLACK`` to spare, between
``DEADLINE_MIN`` and ``DEADLINE_MAX``; any other task gets ``DEADLINE_DEFAULT``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import server_settings
from store.models import FEDERATED
from training.spec import TRAIN_SIZES


def shard_examples(task_config: Mapping[str, Any]) -> float:
    """The mean number of training examples in one shard (a Dirichlet shard may hold more)."""
    total = TRAIN_SIZES.get(str(task_config.get("dataset")), 0)
    return total / max(1, int(task_config.get("num_shards", 1)))


def deadline_seconds(
    task_type: str,
    task_config: Mapping[str, Any],
    throughput: float | None,
    settings: server_settings.Settings,
) -> float:
    """Seconds a client has for one assignment of this task."""
    given = task_config.get("deadline_s")
    if isinstance(given, (int, float)) and not isinstance(given, bool) and given > 0:
        return float(given)
    if task_type != FEDERATED:
        return settings.DEADLINE_DEFAULT
    rate = throughput if throughput and throughput > 0 else settings.DEADLINE_RATE
    work = shard_examples(task_config) * int(task_config.get("local_epochs", 1))
    expected = settings.DEADLINE_SLACK * work / rate
    return min(settings.DEADLINE_MAX, max(settings.DEADLINE_MIN, expected))
