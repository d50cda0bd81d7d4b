"""Assignments: who holds which shard, and how a holding ends.

Every end of an assignment goes through :func:`end_assignment`, a compare-and-set on the
assignment's open status, so a result, a timeout sweep and an admin action racing for the
same assignment settle it exactly once, and its shard is freed exactly once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from store.db import affected
from store.models import FEDERATED, OPEN_ASSIGNMENT, Task, TaskAssignment, TaskShard


class NotAssigned(Exception):
    """The client does not hold that task (or that round of it)."""


class UnknownTask(Exception):
    pass


class UploadRequired(Exception):
    """A federated round reported completed before its update was uploaded."""


def requeue_status(task_status: str | None) -> str:
    """Where a freed shard goes, given its task's status."""
    if task_status == "paused":
        return "paused"
    if task_status in ("pending", "running"):
        return "queued"
    return "cancelled"


def end_assignment(
    s: Session,
    assignment_id: int,
    status: str,
    now: datetime,
    *,
    max_attempts: int,
    error: str | None = None,
    metrics: dict[str, Any] | None = None,
) -> TaskShard | None:
    """Move an open assignment to ``status`` (completed, failed or released) and settle its shard.

    Returns the shard when this call ended the assignment, None when it was no longer open.
    ``failed`` counts an attempt against the shard; ``released`` (the client went away) does not.
    """
    values: dict[str, Any] = {"status": status, "updated_at": now}
    if error is not None:
        values["error"] = error[:10_000]
    if metrics is not None:
        values["metrics"] = metrics
    ended = affected(
        s.execute(
            update(TaskAssignment)
            .where(TaskAssignment.id == assignment_id, TaskAssignment.status.in_(OPEN_ASSIGNMENT))
            .values(**values)
            .execution_options(synchronize_session=False)
        )
    )
    if ended != 1:
        return None
    a = s.get(TaskAssignment, assignment_id)
    assert a is not None
    shard = s.execute(select(TaskShard).where(TaskShard.id == a.shard_id).with_for_update()).scalar_one()
    if shard.assignment_id != assignment_id or shard.status != "assigned":
        return shard  # the shard moved on already (task stopped); nothing more to settle
    shard.updated_at = now
    if status == "completed":
        shard.status = "done"
        return shard
    shard.assignment_id = None
    task_status = s.execute(select(Task.status).where(Task.id == shard.task_id)).scalar_one_or_none()
    if status == "failed":
        shard.attempts += 1
        shard.status = "failed" if shard.attempts >= max_attempts else requeue_status(task_status)
    else:
        shard.status = requeue_status(task_status)
    return shard


def release_client(s: Session, client_id: str, now: datetime, *, max_attempts: int) -> list[int]:
    """Release every open assignment of a client; returns the ids of the tasks touched."""
    open_ids = s.execute(
        select(TaskAssignment.id, TaskAssignment.task_id).where(
            TaskAssignment.client_id == client_id, TaskAssignment.status.in_(OPEN_ASSIGNMENT)
        )
    ).all()
    touched = []
    for aid, task_id in open_ids:
        if end_assignment(s, aid, "released", now, max_attempts=max_attempts) is not None:
            touched.append(task_id)
    return touched


@dataclass(frozen=True)
class Open:
    """An open assignment as the web tier delivers it."""

    assignment_id: int
    client_id: str
    task_id: int
    round: int
    rank: int
    task_type: str
    task_status: str
    num_shards: int
    config: dict[str, Any]
    requirements: dict[str, Any]


def open_for_clients(
    s: Session, client_ids: Sequence[str], specs: dict[int, tuple[dict[str, Any], dict[str, Any]]]
) -> list[Open]:
    """Open assignments of these clients with what a ``task`` message needs.

    ``specs`` caches each task's (config, requirements), which never change after submit: it
    is read and filled here, so a task's JSON is decoded once per process, not once per row.
    """
    rows: list[Any] = []
    for start in range(0, len(client_ids), 500):
        rows.extend(
            s.execute(
                select(
                    TaskAssignment.id,
                    TaskAssignment.client_id,
                    TaskAssignment.task_id,
                    TaskAssignment.round,
                    TaskAssignment.rank,
                    Task.type,
                    Task.status,
                    Task.num_shards,
                )
                .join(Task, Task.id == TaskAssignment.task_id)
                .where(
                    TaskAssignment.client_id.in_(client_ids[start : start + 500]),
                    TaskAssignment.status.in_(OPEN_ASSIGNMENT),
                )
                .order_by(TaskAssignment.id)
            ).all()
        )
    missing = sorted({row[2] for row in rows} - specs.keys())
    if missing:
        for task_id, task_config, requirements in s.execute(
            select(Task.id, Task.config, Task.requirements).where(Task.id.in_(missing))
        ):
            specs[task_id] = (task_config or {}, requirements or {})
    return [
        Open(
            assignment_id=row[0],
            client_id=row[1],
            task_id=row[2],
            round=row[3],
            rank=row[4],
            task_type=row[5],
            task_status=row[6],
            num_shards=row[7],
            config=specs[row[2]][0],
            requirements=specs[row[2]][1],
        )
        for row in rows
    ]


def find_open(s: Session, client_id: str, task_id: int, round_no: int | None) -> TaskAssignment:
    """The client's open assignment of a task (and round), or why there is none."""
    query = select(TaskAssignment).where(
        TaskAssignment.client_id == client_id,
        TaskAssignment.task_id == task_id,
        TaskAssignment.status.in_(OPEN_ASSIGNMENT),
    )
    if round_no is not None:
        query = query.where(TaskAssignment.round == round_no)
    found = s.execute(query.order_by(TaskAssignment.id.desc()).limit(1)).scalar_one_or_none()
    if found is not None:
        return found
    if s.get(Task, task_id) is None:
        raise UnknownTask(task_id)
    raise NotAssigned(task_id)


def record_progress(s: Session, updates: Sequence[tuple[int, float, dict[str, Any]]], now: datetime) -> None:
    """Store the latest progress of open assignments (batched by the web tier)."""
    for aid, progress, metrics in updates:
        s.execute(
            update(TaskAssignment)
            .where(TaskAssignment.id == aid, TaskAssignment.status.in_(OPEN_ASSIGNMENT))
            .values(status="training", progress=progress, metrics=metrics, updated_at=now)
            .execution_options(synchronize_session=False)
        )


def finish(
    s: Session,
    client_id: str,
    task_id: int,
    round_no: int | None,
    status: str,
    metrics: dict[str, Any],
    error: str | None,
    now: datetime,
    *,
    max_attempts: int,
) -> tuple[TaskAssignment, TaskShard | None]:
    """Record a client's ``task_result``. Raises NotAssigned, UnknownTask or UploadRequired.

    A federated round counts as completed only once its update was uploaded.
    """
    a = find_open(s, client_id, task_id, round_no)
    if status == "completed" and a.checkpoint_path is None:
        task_type = s.execute(select(Task.type).where(Task.id == task_id)).scalar_one()
        if task_type == FEDERATED:
            raise UploadRequired(task_id)
    shard = end_assignment(
        s, a.id, status, now, max_attempts=max_attempts, error=error, metrics=metrics or a.metrics
    )
    if status == "completed":
        s.execute(update(TaskAssignment).where(TaskAssignment.id == a.id).values(progress=100.0))
    return a, shard
