"""Deadlines, reliability scores, quotas and quorums: the pure rules, on literal inputs."""

from __future__ import annotations

import pytest

import server_settings
from store.reliability import quota, quota_after, score
from training.spec import SpecError, normalize_federated_config, quorum
from workers.deadlines import deadline_seconds

SETTINGS = server_settings.Settings(
    DEADLINE_DEFAULT=3600, DEADLINE_MIN=60, DEADLINE_MAX=7200, DEADLINE_RATE=50, DEADLINE_SLACK=4
)
DIGITS = {"dataset": "digits", "num_shards": 4, "local_epochs": 5}  # 1438 / 4 = 359.5 examples a shard


def test_a_task_deadline_wins_over_every_default() -> None:
    assert deadline_seconds("echo", {"deadline_s": 12.5}, None, SETTINGS) == 12.5
    assert deadline_seconds("federated_training", {**DIGITS, "deadline_s": 3}, 1000.0, SETTINGS) == 3


def test_other_tasks_get_the_default() -> None:
    assert deadline_seconds("echo", {}, None, SETTINGS) == 3600
    assert deadline_seconds("echo", {"deadline_s": None}, 10.0, SETTINGS) == 3600


def test_a_federated_deadline_follows_the_work_and_the_measured_throughput() -> None:
    # unmeasured: 4 x 359.5 x 5 / 50 = 143.8 s
    assert deadline_seconds("federated_training", DIGITS, None, SETTINGS) == pytest.approx(143.8)
    # a slow client (5 examples/s) gets ten times that, a fast one the floor
    assert deadline_seconds("federated_training", DIGITS, 5.0, SETTINGS) == pytest.approx(1438)
    assert deadline_seconds("federated_training", DIGITS, 10_000.0, SETTINGS) == 60
    # a very slow one the ceiling
    assert deadline_seconds("federated_training", DIGITS, 0.1, SETTINGS) == 7200


def test_the_score_rewards_valid_results_and_punishes_timeouts() -> None:
    assert score(0, 0, 0) == 0.5
    assert score(9, 0, 0) > score(1, 0, 0) > score(0, 0, 0) > score(0, 0, 1)
    assert score(5, 5, 0) == score(5, 0, 5) == 0.5


def test_a_timeout_halves_the_quota_and_valid_results_restore_it() -> None:
    assert quota(None, 8) == 8
    q = quota_after(None, "timeout", 8)
    assert q == 4
    q = quota_after(q, "error", 8)
    assert q == 2
    assert quota_after(quota_after(quota_after(1, "timeout", 8), "timeout", 8), "error", 8) == 1  # never 0
    assert quota_after(2, "valid", 8) == 4
    assert quota_after(4, "valid", 8) is None  # back to MAX_TASKS_PER_CLIENT
    assert quota_after(2, "refused", 8) == 2  # a refused update is counted, the quota kept


def test_the_quorum_is_the_larger_of_the_fraction_and_the_count() -> None:
    assert quorum({"num_shards": 4}) == 4
    assert quorum({"num_shards": 4, "min_fit_fraction": 0.5}) == 2
    assert quorum({"num_shards": 4, "min_fit_fraction": 0.6}) == 3  # rounded up
    assert quorum({"num_shards": 4, "min_fit_fraction": 0.25, "min_fit_clients": 3}) == 3
    assert quorum({"num_shards": 10, "min_fit_fraction": 0.7}) == 7


def normalize(**raw: object) -> dict[str, object]:
    return normalize_federated_config(raw, default_batch_size=32, default_epochs=1)


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        ({"deadline_s": 0}, "config.deadline_s must be in (0.0, 2592000.0], got 0.0"),
        ({"deadline_s": -5}, "config.deadline_s must be in (0.0"),
        ({"deadline_s": "soon"}, "config.deadline_s must be a number"),
        ({"round_timeout_s": 0}, "config.round_timeout_s must be in (0.0"),
        ({"min_fit_fraction": 0}, "config.min_fit_fraction must be in (0.0, 1.0], got 0.0"),
        ({"min_fit_fraction": 1.5}, "config.min_fit_fraction must be in (0.0, 1.0]"),
        ({"min_fit_clients": 0}, "config.min_fit_clients must be in 1..1000, got 0"),
        ({"num_shards": 4, "min_fit_clients": 5}, "min_fit_clients=5 is more than num_shards=4"),
        ({"max_round_retries": -1}, "config.max_round_retries must be in 0..100, got -1"),
        (
            {"num_shards": 8, "strategy": "krum", "strategy_params": {"f": 1}, "min_fit_fraction": 0.5},
            "with a quorum of 4 of 8 updates, krum",
        ),
    ],
)
def test_settings_that_cannot_work_are_refused(raw: dict[str, object], says: str) -> None:
    with pytest.raises(SpecError) as refused:
        normalize(**raw)
    assert says in str(refused.value)


def test_defaults_keep_every_round_waiting_for_every_rank() -> None:
    cfg = normalize(num_shards=4)
    assert (cfg["deadline_s"], cfg["round_timeout_s"], cfg["min_fit_fraction"]) == (None, None, 1.0)
    assert (cfg["min_fit_clients"], cfg["max_round_retries"]) == (1, 2)
    assert quorum(cfg) == 4
