"""A task's life after submit: shards are created, ranks finish, the task completes or fails,
and the sweep re-drives anything a lost message left behind. Plain functions over a session.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime, timedelta
from statistics import fmean
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from store import reliability
from store.assignments import end_assignment, requeue_status
from store.models import FEDERATED, Client, Task, TaskAssignment, TaskRound, TaskShard
from store.states import (
    LIVE_TASK,
    OPEN_ASSIGNMENT,
    UNSETTLED_SHARD,
    AssignmentState,
    ClientState,
    RoundState,
    ShardState,
    TaskState,
)
from training.spec import quorum

log = logging.getLogger(__name__)


def create_shards(s: Session, task: Task, round_no: int, now: datetime) -> int:
    """Queue ranks 0..num_shards-1 of a round (paused if the task is paused)."""
    req = task.requirements or {}
    status = requeue_status(task.status)
    for rank in range(task.num_shards):
        s.add(
            TaskShard(
                task_id=task.id,
                round=round_no,
                rank=rank,
                status=status,
                priority=task.priority or 0,
                task_type=task.type,
                req_cpu_cores=int(req.get("cpu_cores", 0)),
                req_ram_gb=float(req.get("ram_gb", 0)),
                req_gpu_count=int(req.get("gpu_count", 0)),
                req_gpu_memory_gb=float(req.get("gpu_memory_gb", 0)),
                attempts=0,
                created_at=now,
                updated_at=now,
            )
        )
    return task.num_shards


def has_shards(s: Session, task_id: int, round_no: int) -> bool:
    found = s.execute(
        select(TaskShard.id).where(TaskShard.task_id == task_id, TaskShard.round == round_no).limit(1)
    ).first()
    return found is not None


def prepare_generic(s: Session, task_id: int, now: datetime) -> bool:
    """Queue the shards of a single-round task. Idempotent: False when already done."""
    task = s.execute(select(Task).where(Task.id == task_id).with_for_update()).scalar_one_or_none()
    if task is None or task.status not in LIVE_TASK or has_shards(s, task_id, 0):
        return False
    create_shards(s, task, 0, now)
    task.status_reason = "waiting for a fitting client"
    task.updated_at = now
    return True


def combine_metrics(per_rank: dict[str, dict[str, Any]]) -> dict[str, float]:
    """The mean of every numeric metric over the ranks that report it."""
    keys: dict[str, list[float]] = {}
    for metrics in per_rank.values():
        for key, value in (metrics or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                keys.setdefault(key, []).append(float(value))
    return {key: fmean(values) for key, values in sorted(keys.items())}


def round_results(s: Session, task_id: int, round_no: int) -> dict[str, dict[str, Any]]:
    rows = s.execute(
        select(TaskAssignment.rank, TaskAssignment.metrics)
        .where(
            TaskAssignment.task_id == task_id,
            TaskAssignment.round == round_no,
            TaskAssignment.status == AssignmentState.COMPLETED,
        )
        .order_by(TaskAssignment.id)
    ).all()
    return {str(rank): metrics or {} for rank, metrics in rows}


def fail_task(s: Session, task: Task, now: datetime, error_log: str) -> list[str]:
    """Mark a task failed, cancel its shards, release its holders; returns clients to notify."""
    holders = list(
        s.execute(
            select(TaskAssignment.client_id)
            .where(TaskAssignment.task_id == task.id, TaskAssignment.status.in_(OPEN_ASSIGNMENT))
            .distinct()
        ).scalars()
    )
    s.execute(
        update(TaskShard)
        .where(TaskShard.task_id == task.id, TaskShard.status.in_(UNSETTLED_SHARD))
        .values(status=ShardState.CANCELLED, updated_at=now)
    )
    s.execute(
        update(TaskAssignment)
        .where(TaskAssignment.task_id == task.id, TaskAssignment.status.in_(OPEN_ASSIGNMENT))
        .values(status=AssignmentState.RELEASED, updated_at=now)
    )
    task.status = TaskState.FAILED
    task.error_log = error_log
    task.status_reason = None
    task.updated_at = now
    return holders


def advance(s: Session, task_id: int, now: datetime) -> tuple[str, list[str]]:
    """Look at the current round of a task and move it on.

    Returns (outcome, clients to notify); outcome is one of ``noop``, ``completed``,
    ``failed`` or ``aggregate`` (a federated round is complete and must be aggregated).
    """
    task = s.execute(select(Task).where(Task.id == task_id).with_for_update()).scalar_one_or_none()
    if task is None or task.status not in LIVE_TASK:
        return "noop", []
    counts = dict(
        s.execute(
            select(TaskShard.status, func.count())
            .where(TaskShard.task_id == task_id, TaskShard.round == task.current_round)
            .group_by(TaskShard.status)
        ).all()
    )
    if not counts:
        return "noop", []
    if counts.get(ShardState.FAILED) and not _quorum_reachable(task, counts):
        errors = s.execute(
            select(TaskAssignment.rank, TaskAssignment.client_id, TaskAssignment.error)
            .where(
                TaskAssignment.task_id == task_id,
                TaskAssignment.round == task.current_round,
                TaskAssignment.status == AssignmentState.FAILED,
            )
            .order_by(TaskAssignment.id)
        ).all()
        lines = [f"rank {rank} on {client}: {error or 'failed'}" for rank, client, error in errors]
        summary = f"a shard failed {counts['failed']} time(s) too many; attempts:\n" + "\n".join(lines)
        log.info("event=task_failed task=%d round=%d", task_id, task.current_round)
        return "failed", fail_task(s, task, now, summary)
    if task.type == FEDERATED and counts.get(ShardState.DONE, 0) >= quorum(task.config or {}):
        unsettled = sum(counts.get(status, 0) for status in UNSETTLED_SHARD)
        if not unsettled:  # every rank done, or failed for good with a quorum done
            return "aggregate", []
    if counts.get(ShardState.DONE, 0) < task.num_shards:
        return "noop", []
    per_rank = round_results(s, task_id, task.current_round)
    task.result = {"ranks": per_rank, "metrics": combine_metrics(per_rank)}
    task.status = TaskState.COMPLETED
    task.status_reason = None
    task.updated_at = now
    log.info("event=task_completed task=%d round=%d ranks=%d", task_id, task.current_round, len(per_rank))
    return "completed", []


def _quorum_reachable(task: Task, counts: dict[str, int]) -> bool:
    """A federated round with a timeout can lose ranks for good and still close on its quorum."""
    cfg = task.config or {}
    if task.type != FEDERATED or cfg.get("round_timeout_s") is None:
        return False
    return task.num_shards - counts.get(ShardState.FAILED, 0) >= quorum(cfg)


def round_deadline(task_config: dict[str, Any], now: datetime) -> datetime | None:
    """When a round opened now times out (``round_timeout_s``), or None."""
    timeout = task_config.get("round_timeout_s")
    return None if timeout is None else now + timedelta(seconds=float(timeout))


def overdue_rounds(s: Session, now: datetime, *, limit: int) -> list[tuple[int, int]]:
    """(task id, round) of running federated rounds past their timeout and not aggregating."""
    rows = s.execute(
        select(TaskRound.task_id, TaskRound.round)
        .join(Task, Task.id == TaskRound.task_id)
        .where(
            Task.status == TaskState.RUNNING,
            Task.current_round == TaskRound.round,
            TaskRound.status == RoundState.TRAINING,
            TaskRound.deadline_at < now,
            TaskRound.aggregating_since.is_(None),
        )
        .order_by(TaskRound.deadline_at)
        .limit(limit)
    ).all()
    return [(task_id, round_no) for task_id, round_no in rows]


def close_round(
    s: Session, task_id: int, round_no: int, now: datetime, *, max_attempts: int, max_tasks: int
) -> tuple[str, list[str]]:
    """A round reached its timeout: ``aggregate`` it on a quorum of accepted updates, or
    ``retry`` (time out the holders of the missing ranks and reissue them, the timeout
    restarted), or, out of retries, fail the task (``failed``). Returns (outcome, clients to
    notify); ``noop`` when the round moved on already."""
    task = s.execute(select(Task).where(Task.id == task_id).with_for_update()).scalar_one_or_none()
    if task is None or task.status != TaskState.RUNNING or task.current_round != round_no:
        return "noop", []
    rnd = s.execute(
        select(TaskRound).where(TaskRound.task_id == task_id, TaskRound.round == round_no).with_for_update()
    ).scalar_one()
    if rnd.status != RoundState.TRAINING or rnd.deadline_at is None or rnd.deadline_at >= now:
        return "noop", []
    cfg = task.config or {}
    accepted = accepted_ranks(s, task_id, round_no)
    needed = quorum(cfg)
    if len(accepted) >= needed:
        return "aggregate", []
    holders = s.execute(
        select(TaskAssignment.id, TaskAssignment.client_id).where(
            TaskAssignment.task_id == task_id,
            TaskAssignment.round == round_no,
            TaskAssignment.status.in_(OPEN_ASSIGNMENT),
        )
    ).all()
    if rnd.retries >= int(cfg.get("max_round_retries", 0)):
        reason = (
            f"round {round_no} timed out {rnd.retries + 1} time(s) with {len(accepted)} of "
            f"{task.num_shards} updates; its quorum is {needed}"
        )
        log.info("event=task_failed task=%d round=%d reason=round_timeout", task_id, round_no)
        return "failed", fail_task(s, task, now, reason)
    rnd.retries += 1
    rnd.deadline_at = round_deadline(cfg, now)
    why = f"round {round_no} timed out with {len(accepted)} of {task.num_shards} updates; reissued"
    for aid, client_id in holders:
        if (
            end_assignment(s, aid, AssignmentState.TIMED_OUT, now, max_attempts=max_attempts, error=why)
            is not None
        ):
            reliability.note(s, client_id, "timeout", max_tasks=max_tasks)
    log.info(
        "event=round_retry task=%d round=%d retry=%d accepted=%d",
        task_id,
        round_no,
        rnd.retries,
        len(accepted),
    )
    return "retry", sorted({client_id for _, client_id in holders})


def accepted_ranks(s: Session, task_id: int, round_no: int) -> set[int]:
    return set(
        s.execute(
            select(TaskAssignment.rank).where(
                TaskAssignment.task_id == task_id,
                TaskAssignment.round == round_no,
                TaskAssignment.status == AssignmentState.COMPLETED,
            )
        ).scalars()
    )


def stalled(
    s: Session, now: datetime, *, limit: int, lease_s: float | None = None
) -> tuple[list[int], list[int]]:
    """Tasks a lost message may have left behind: (to prepare, to advance). With ``lease_s``
    (AGGREGATION_LEASE), a round whose aggregation holds a live lease is left to it."""
    settle = now - timedelta(seconds=5)
    aggregating = (
        select(TaskRound.id)
        .where(
            TaskRound.task_id == Task.id,
            TaskRound.round == Task.current_round,
            TaskRound.aggregating_since > now - timedelta(seconds=lease_s or 0),
        )
        .exists()
    )
    unprepared = s.execute(
        select(Task.id)
        .where(
            Task.status == TaskState.PENDING,
            Task.created_at < settle,
            ~select(TaskShard.id).where(TaskShard.task_id == Task.id).exists(),
        )
        .order_by(Task.id)
        .limit(limit)
    ).scalars()
    finished_rounds = s.execute(
        select(Task.id)
        .where(
            Task.status.in_((TaskState.RUNNING, TaskState.PAUSED)),
            ~select(TaskShard.id)
            .where(
                TaskShard.task_id == Task.id,
                TaskShard.round == Task.current_round,
                TaskShard.status.in_(UNSETTLED_SHARD),
            )
            .exists(),
            Task.updated_at < settle,
            *([~aggregating] if lease_s else []),
        )
        .order_by(Task.id)
        .limit(limit)
    ).scalars()
    return list(unprepared), list(finished_rounds)


def fitting_clients(s: Session, requirements: dict[str, Any]) -> int:
    gpus = int(requirements.get("gpu_count", 0))
    query = (
        select(func.count())
        .select_from(Client)
        .where(
            Client.status == ClientState.ACTIVE,
            Client.conn_id.is_not(None),
            Client.disabled.is_(False),
            Client.cpu_cores >= int(requirements.get("cpu_cores", 0)),
            Client.ram_gb >= float(requirements.get("ram_gb", 0)),
            Client.gpu_count >= gpus,
        )
    )
    if gpus:
        query = query.where(Client.gpu_memory_gb >= float(requirements.get("gpu_memory_gb", 0)))
    return int(s.execute(query).scalar_one())


def explain_waiting(s: Session, now: datetime, *, limit: int) -> int:
    """Write, for every pending or running task, why it is where it is (visible in the API)."""
    tasks = (
        s.execute(
            select(Task)
            .where(Task.status.in_((TaskState.PENDING, TaskState.RUNNING)))
            .order_by(Task.id)
            .limit(limit)
        )
        .scalars()
        .all()
    )
    for task in tasks:
        if not has_shards(s, task.id, task.current_round):
            continue  # not prepared yet: the submit's reason still holds
        reason = explain(s, task, now)[:255]
        if reason != task.status_reason:
            task.status_reason = reason
    return len(tasks)


def explain_task(s: Session, task_id: int, now: datetime) -> None:
    """Refresh one task's ``status_reason`` (after a result that did not move it on)."""
    task = s.get(Task, task_id)
    if (
        task is not None
        and task.status in (TaskState.PENDING, TaskState.RUNNING)
        and has_shards(s, task_id, task.current_round)
    ):
        task.status_reason = explain(s, task, now)[:255]


def explain(s: Session, task: Task, now: datetime) -> str:
    """Why a task waits, in words an admin can act on: what the current round has, who holds
    the rest and until when, and whether any connected client fits what is queued."""
    shards = s.execute(
        select(TaskShard.rank, TaskShard.status, TaskShard.assignment_id).where(
            TaskShard.task_id == task.id, TaskShard.round == task.current_round
        )
    ).all()
    done = sum(1 for shard in shards if shard.status == ShardState.DONE)
    what = "updates" if task.type == FEDERATED else "ranks done"
    parts = [f"round {task.current_round}: {done} of {task.num_shards} {what}"]
    held = s.execute(
        select(TaskAssignment.rank, TaskAssignment.client_id, TaskAssignment.deadline_at)
        .where(
            TaskAssignment.task_id == task.id,
            TaskAssignment.round == task.current_round,
            TaskAssignment.status.in_(OPEN_ASSIGNMENT),
        )
        .order_by(TaskAssignment.rank)
    ).all()
    if held:
        ranks = ", ".join(str(a.rank) for a in held)
        holders = _and([a.client_id for a in held])
        deadlines = [a.deadline_at for a in held if a.deadline_at is not None]
        due = f", deadline in {max(0, round((min(deadlines) - now).total_seconds()))} s" if deadlines else ""
        parts.append(f"rank{'s' if len(held) > 1 else ''} {ranks} held by {holders}{due}")
    queued = sum(1 for shard in shards if shard.status == ShardState.QUEUED)
    if queued:
        parts.append(f"{queued} shard(s) queued; {_who_fits(s, task.requirements or {})}")
    if done == task.num_shards and task.type == FEDERATED:
        parts.append("aggregating")
    return "; ".join(parts)


def _and(names: list[str]) -> str:
    names = names[:3] + ([f"{len(names) - 3} more"] if len(names) > 3 else [])
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


REQUIREMENT_COLUMNS = {
    "cpu_cores": Client.cpu_cores,
    "ram_gb": Client.ram_gb,
    "gpu_count": Client.gpu_count,
    "gpu_memory_gb": Client.gpu_memory_gb,
}


def _who_fits(s: Session, requirements: dict[str, Any]) -> str:
    fit = fitting_clients(s, requirements)
    if fit:
        return f"{fit} connected client(s) fit the requirements"
    connected = (Client.status == ClientState.ACTIVE, Client.conn_id.is_not(None), Client.disabled.is_(False))
    largest = s.execute(select(*(func.max(c) for c in REQUIREMENT_COLUMNS.values())).where(*connected)).one()
    short = [
        f"{key}>={need:g} (largest has {have or 0:g})"
        for (key, need), have in zip(
            ((k, float(requirements.get(k, 0))) for k in REQUIREMENT_COLUMNS), largest, strict=True
        )
        if need > float(have or 0)
    ]
    if not short:
        return "no connected client fits (none connected, or none runs this task type)"
    return "no connected client fits: needs " + ", ".join(short)


def expired_cutoff(now: datetime, timeout_s: float) -> datetime:
    return now - timedelta(seconds=timeout_s)


def ids(values: Sequence[Any]) -> str:
    return ",".join(str(v) for v in values[:20]) + ("..." if len(values) > 20 else "")
