"""The batch matcher on literal rows: who gets which shard, without a database."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from workers.scheduling import match


def client(
    cid: str,
    *,
    wants: int = 1,
    cores: int = 4,
    ram: float = 8,
    gpus: int = 0,
    types: Any = None,
    quota: int | None = None,
    valid: int = 0,
    errors: int = 0,
    timeouts: int = 0,
) -> Any:
    return SimpleNamespace(
        id=cid,
        pending_requests=wants,
        cpu_cores=cores,
        ram_gb=ram,
        gpu_count=gpus,
        gpu_memory_gb=8.0 * gpus,
        task_types=types,
        task_quota=quota,
        valid_results=valid,
        error_results=errors,
        timeouts=timeouts,
    )


def shard(
    sid: int,
    task: int,
    *,
    cores: int = 0,
    ram: float = 0,
    gpus: int = 0,
    kind: str = "echo",
    attempts: int = 0,
) -> Any:
    return SimpleNamespace(
        attempts=attempts,
        id=sid,
        task_id=task,
        round=0,
        rank=sid,
        task_type=kind,
        req_cpu_cores=cores,
        req_ram_gb=ram,
        req_gpu_count=gpus,
        req_gpu_memory_gb=0.0,
    )


def pairs(matched: Any) -> list[tuple[str, int]]:
    return [(c.id, s.id) for c, s in matched.pairs]


def test_clients_in_order_take_shards_in_order() -> None:
    matched = match([client("a"), client("b")], [shard(1, 10), shard(2, 11), shard(3, 12)], {}, 3)
    assert pairs(matched) == [("a", 1), ("b", 2)]
    assert matched.unserved == []


def test_one_rank_of_a_task_per_client_and_no_more_than_asked() -> None:
    matched = match([client("a", wants=3)], [shard(1, 10), shard(2, 10), shard(3, 11)], {}, 3)
    assert pairs(matched) == [("a", 1), ("a", 3)]


def test_a_client_holding_the_task_gets_another_task() -> None:
    matched = match([client("a")], [shard(1, 10), shard(2, 11)], {"a": {10}}, 3)
    assert pairs(matched) == [("a", 2)]


def test_max_tasks_bounds_what_a_client_holds() -> None:
    matched = match([client("a", wants=3)], [shard(1, 10), shard(2, 11)], {"a": {7, 8}}, 3)
    assert pairs(matched) == [("a", 1)]
    full = match([client("a")], [shard(1, 10)], {"a": {7, 8, 9}}, 3)
    assert pairs(full) == [] and full.unserved == []  # no free slot: not "unserved"


def test_hardware_and_task_types_must_fit() -> None:
    small, typed = client("small", ram=2), client("typed", types=["train"])
    matched = match([small, typed], [shard(1, 10, ram=4), shard(2, 11, kind="echo")], {}, 3)
    assert pairs(matched) == [("small", 2)]  # not shard 1: it needs 4 GB
    assert matched.unserved == ["typed"]  # runs only "train" tasks
    gpu = match([client("g", gpus=1)], [shard(1, 10, gpus=1)], {}, 3)
    assert pairs(gpu) == [("g", 1)]


def test_held_is_not_modified() -> None:
    held = {"a": {7}}
    match([client("a")], [shard(1, 10)], held, 3)
    assert held == {"a": {7}}


def test_a_reissued_shard_goes_to_the_most_reliable_client_first() -> None:
    flaky = client("flaky", valid=9, timeouts=9)  # waited longest, but half its work timed out
    steady = client("steady", valid=5)
    fresh = client("fresh")
    matched = match([flaky, steady, fresh], [shard(1, 10), shard(2, 11, attempts=1)], {}, 3)
    assert pairs(matched) == [("steady", 2), ("flaky", 1)]  # then longest waiting first, as always


def test_a_client_never_gets_back_a_shard_it_timed_out_on() -> None:
    matched = match([client("slow"), client("other")], [shard(1, 10, attempts=1)], {}, 3, {("slow", 1)})
    assert pairs(matched) == [("other", 1)]
    alone = match([client("slow")], [shard(1, 10, attempts=1)], {}, 3, {("slow", 1)})
    assert pairs(alone) == [] and alone.unserved == ["slow"]


def test_a_halved_quota_bounds_what_a_client_holds() -> None:
    matched = match([client("a", wants=3, quota=1)], [shard(1, 10), shard(2, 11)], {}, 3)
    assert pairs(matched) == [("a", 1)]
    holding = match([client("a", wants=3, quota=1)], [shard(2, 11)], {"a": {10}}, 3)
    assert pairs(holding) == []
