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

from store.assignments import requeue_status
from store.models import FEDERATED, OPEN_ASSIGNMENT, Client, Task, TaskAssignment, TaskShard

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
    if task is None or task.status not in ("pending", "running", "paused") or has_shards(s, task_id, 0):
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
            TaskAssignment.status == "completed",
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
        .where(TaskShard.task_id == task.id, TaskShard.status.in_(("queued", "paused", "assigned")))
        .values(status="cancelled", updated_at=now)
    )
    s.execute(
        update(TaskAssignment)
        .where(TaskAssignment.task_id == task.id, TaskAssignment.status.in_(OPEN_ASSIGNMENT))
        .values(status="released", updated_at=now)
    )
    task.status = "failed"
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
    if task is None or task.status not in ("pending", "running", "paused"):
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
    if counts.get("failed"):
        errors = s.execute(
            select(TaskAssignment.rank, TaskAssignment.client_id, TaskAssignment.error)
            .where(
                TaskAssignment.task_id == task_id,
                TaskAssignment.round == task.current_round,
                TaskAssignment.status == "failed",
            )
            .order_by(TaskAssignment.id)
        ).all()
        lines = [f"rank {rank} on {client}: {error or 'failed'}" for rank, client, error in errors]
        summary = f"a shard failed {counts['failed']} time(s) too many; attempts:\n" + "\n".join(lines)
        log.info("event=task_failed task=%d round=%d", task_id, task.current_round)
        return "failed", fail_task(s, task, now, summary)
    if counts.get("done", 0) < task.num_shards:
        return "noop", []
    if task.type == FEDERATED:
        return "aggregate", []
    per_rank = round_results(s, task_id, task.current_round)
    task.result = {"ranks": per_rank, "metrics": combine_metrics(per_rank)}
    task.status = "completed"
    task.status_reason = None
    task.updated_at = now
    log.info("event=task_completed task=%d ranks=%d", task_id, len(per_rank))
    return "completed", []


def stalled(s: Session, now: datetime, *, limit: int) -> tuple[list[int], list[int]]:
    """Tasks a lost message may have left behind: (to prepare, to advance)."""
    settle = now - timedelta(seconds=5)
    unprepared = s.execute(
        select(Task.id)
        .where(
            Task.status == "pending",
            Task.created_at < settle,
            ~select(TaskShard.id).where(TaskShard.task_id == Task.id).exists(),
        )
        .order_by(Task.id)
        .limit(limit)
    ).scalars()
    finished_rounds = s.execute(
        select(Task.id)
        .where(
            Task.status.in_(("running", "paused")),
            ~select(TaskShard.id)
            .where(
                TaskShard.task_id == Task.id,
                TaskShard.round == Task.current_round,
                TaskShard.status.in_(("queued", "assigned", "paused")),
            )
            .exists(),
            Task.updated_at < settle,
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
            Client.status == "active",
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
    """Write, for tasks with queued shards, why they wait (visible in the API)."""
    rows = s.execute(
        select(Task.id, Task.requirements, func.count(TaskShard.id))
        .join(TaskShard, TaskShard.task_id == Task.id)
        .where(Task.status.in_(("pending", "running")), TaskShard.status == "queued")
        .group_by(Task.id, Task.requirements)
        .order_by(Task.id)
        .limit(limit)
    ).all()
    for task_id, requirements, queued in rows:
        fit = fitting_clients(s, requirements or {})
        if fit:
            reason = f"waiting: {queued} shard(s) queued; {fit} connected client(s) fit the requirements"
        else:
            needs = ", ".join(f"{k}>={v}" for k, v in sorted((requirements or {}).items())) or "none"
            reason = f"waiting: {queued} shard(s) queued; no connected client fits (requirements: {needs})"
        s.execute(update(Task).where(Task.id == task_id).values(status_reason=reason[:255]))
    return len(rows)


def expired_cutoff(now: datetime, timeout_s: float) -> datetime:
    return now - timedelta(seconds=timeout_s)


def ids(values: Sequence[Any]) -> str:
    return ",".join(str(v) for v in values[:20]) + ("..." if len(values) > 20 else "")
