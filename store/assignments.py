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

from sqlalchemy import case, select, type_coerce, update
from sqlalchemy.orm import Session

from store import reliability
from store.db import affected
from store.models import FEDERATED, Task, TaskAssignment, TaskShard
from store.states import OPEN_ASSIGNMENT, UNSETTLED_SHARD, AssignmentState, ShardState, TaskState


class NotAssigned(Exception):
    """The client does not hold that task (or that round of it)."""


class UnknownTask(Exception):
    pass


class UploadRequired(Exception):
    """A federated round reported completed before its update was uploaded."""


class Superseded(Exception):
    """Another copy of the shard (reissued after a timeout, or the late original) was accepted."""


class TimedOut(Exception):
    """The assignment timed out and a late report of it would change nothing (a failure)."""


def requeue_status(task_status: str | None) -> str:
    """Where a freed shard goes, given its task's status."""
    if task_status == TaskState.PAUSED:
        return ShardState.PAUSED
    if task_status in (TaskState.PENDING, TaskState.RUNNING):
        return ShardState.QUEUED
    return ShardState.CANCELLED


def end_assignment(
    s: Session,
    assignment_id: int,
    status: str,
    now: datetime,
    *,
    max_attempts: int,
    error: str | None = None,
    metrics: dict[str, Any] | None = None,
    progress: float | None = None,
) -> TaskShard | None:
    """Move an open assignment to ``status`` (completed, failed, released or timed_out) and
    settle its shard.

    Returns the shard when this call ended the assignment, None when it was no longer open.
    ``failed`` and ``timed_out`` count an attempt against the shard; ``released`` (the client
    went away) does not.
    """
    values: dict[str, Any] = {"status": status, "updated_at": now}
    if error is not None:
        values["error"] = error[:10_000]
    if metrics is not None:
        values["metrics"] = metrics
    if progress is not None:
        values["progress"] = progress
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
    if shard.assignment_id != assignment_id or shard.status != ShardState.ASSIGNED:
        return shard  # the shard moved on already (task stopped); nothing more to settle
    shard.updated_at = now
    if status == AssignmentState.COMPLETED:
        shard.status = ShardState.DONE
        return shard
    shard.assignment_id = None
    task_status = s.execute(select(Task.status).where(Task.id == shard.task_id)).scalar_one_or_none()
    if status in (AssignmentState.FAILED, AssignmentState.TIMED_OUT):
        shard.attempts += 1
        shard.status = ShardState.FAILED if shard.attempts >= max_attempts else requeue_status(task_status)
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
        if end_assignment(s, aid, AssignmentState.RELEASED, now, max_attempts=max_attempts) is not None:
            touched.append(task_id)
    return touched


@dataclass(frozen=True)
class Made:
    """A new assignment as the scheduler publishes it with its doorbell ring, so the web
    process that holds the client pushes the ``task`` without reading it back: an
    :class:`Open` without the task's state (running: a shard of it was just handed out) and
    its spec (config and requirements, which never change once submitted: the web process
    caches them, and reads the database when it has not)."""

    assignment_id: int
    client_id: str
    task_id: int
    round: int
    rank: int
    task_type: str
    num_shards: int

    def as_open(self, spec: tuple[dict[str, Any], dict[str, Any]]) -> Open:
        config, requirements = spec
        return Open(**vars(self), task_status=TaskState.RUNNING, config=config, requirements=requirements)


@dataclass(frozen=True)
class Open(Made):
    """An open assignment as the web tier delivers it: what the ring carries, with its task's
    state and spec, read from the database."""

    task_status: str
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
    """The assignment a client's report of a task (and round) refers to, or why there is none.

    That is its open assignment, or one that timed out while its shard is still unsettled (a
    late result may still win). Raises Superseded when another copy's result was accepted,
    UnknownTask or NotAssigned.
    """
    query = select(TaskAssignment).where(
        TaskAssignment.client_id == client_id, TaskAssignment.task_id == task_id
    )
    if round_no is not None:
        query = query.where(TaskAssignment.round == round_no)
    latest = s.execute(query.order_by(TaskAssignment.id.desc()).limit(1)).scalar_one_or_none()
    if latest is not None and latest.status in OPEN_ASSIGNMENT:
        return latest
    if latest is not None and latest.status in (AssignmentState.TIMED_OUT, AssignmentState.RELEASED):
        shard = s.get(TaskShard, latest.shard_id)
        if shard is not None and shard.status == ShardState.DONE and shard.assignment_id != latest.id:
            raise Superseded(f"another client's result for rank {latest.rank} of task {task_id} was accepted")
        if (
            latest.status == AssignmentState.TIMED_OUT
            and shard is not None
            and shard.status in UNSETTLED_SHARD
        ):
            return latest
    if s.get(Task, task_id) is None:
        raise UnknownTask(task_id)
    raise NotAssigned(task_id)


def reported(
    s: Session, client_id: str, task_id: int, round_no: int | None, status: str
) -> TaskAssignment | None:
    """The assignment a repeated ``task_result`` refers to, when that result was recorded already.

    That is the client's latest assignment of the task (and round) when it ended with the
    reported ``status`` (``completed`` or ``failed``); None otherwise. A client that missed the
    acknowledgement of its result sends it again, and is acknowledged again."""
    query = select(TaskAssignment).where(
        TaskAssignment.client_id == client_id, TaskAssignment.task_id == task_id
    )
    if round_no is not None:
        query = query.where(TaskAssignment.round == round_no)
    latest = s.execute(query.order_by(TaskAssignment.id.desc()).limit(1)).scalar_one_or_none()
    if latest is None or status not in (AssignmentState.COMPLETED, AssignmentState.FAILED):
        return None
    return latest if latest.status == status else None


def accept_late(s: Session, late: TaskAssignment, now: datetime, metrics: dict[str, Any]) -> TaskShard:
    """First valid result wins: a timed-out assignment's result, when its shard is still
    unsettled, completes the shard; the reissued copy (if any) is released and told to stop."""
    shard = s.execute(select(TaskShard).where(TaskShard.id == late.shard_id).with_for_update()).scalar_one()
    if shard.status not in UNSETTLED_SHARD:
        raise Superseded(f"rank {late.rank} of task {late.task_id} is settled already")
    # The late copy's own compare-and-set first: a refusal comes before any write (the web
    # tier writes a batch of results in one transaction, without a savepoint each)
    won = affected(
        s.execute(
            update(TaskAssignment)
            .where(TaskAssignment.id == late.id, TaskAssignment.status == AssignmentState.TIMED_OUT)
            .values(
                status=AssignmentState.COMPLETED,
                updated_at=now,
                progress=100.0,
                metrics=metrics or late.metrics,
            )
            .execution_options(synchronize_session=False)
        )
    )
    if won != 1:
        raise Superseded(f"rank {late.rank} of task {late.task_id} is settled already")
    if shard.assignment_id is not None and shard.assignment_id != late.id:
        s.execute(
            update(TaskAssignment)
            .where(TaskAssignment.id == shard.assignment_id, TaskAssignment.status.in_(OPEN_ASSIGNMENT))
            .values(
                status=AssignmentState.RELEASED,
                updated_at=now,
                error=f"superseded by the late result of assignment {late.id}",
            )
            .execution_options(synchronize_session=False)
        )
    shard.status = ShardState.DONE
    shard.assignment_id = late.id
    shard.updated_at = now
    return shard


def expire_deadlines(
    s: Session, now: datetime, *, limit: int, max_attempts: int, max_tasks: int
) -> list[tuple[str, int]]:
    """The deadline sweep: open assignments past ``deadline_at`` are timed out and their shards
    reissued (or failed, out of attempts). Returns (client id, task id) per assignment timed out."""
    overdue = s.execute(
        select(
            TaskAssignment.id, TaskAssignment.client_id, TaskAssignment.task_id, TaskAssignment.deadline_at
        )
        .where(TaskAssignment.status.in_(OPEN_ASSIGNMENT), TaskAssignment.deadline_at < now)
        .order_by(TaskAssignment.deadline_at)
        .limit(limit)
    ).all()
    ended = []
    for aid, client_id, task_id, deadline in overdue:
        why = f"no result by the deadline ({deadline:%Y-%m-%dT%H:%M:%S}Z); reissued"
        if (
            end_assignment(s, aid, AssignmentState.TIMED_OUT, now, max_attempts=max_attempts, error=why)
            is not None
        ):
            reliability.note(s, client_id, "timeout", max_tasks=max_tasks)
            ended.append((client_id, task_id))
    return ended


def record_progress(s: Session, updates: Sequence[tuple[int, float, dict[str, Any]]], now: datetime) -> None:
    """Store the latest progress of open assignments (batched by the web tier): one statement
    for all of them, the values chosen by id (one UPDATE per row was one round trip each)."""
    if not updates:
        return
    ids = sorted({aid for aid, _, _ in updates})
    progress = {aid: value for aid, value, _ in updates}
    metrics = {aid: type_coerce(m, TaskAssignment.metrics.type) for aid, _, m in updates}
    s.execute(
        update(TaskAssignment)
        .where(TaskAssignment.id.in_(ids), TaskAssignment.status.in_(OPEN_ASSIGNMENT))
        .values(
            status=AssignmentState.TRAINING,
            progress=case(progress, value=TaskAssignment.id),
            metrics=case(metrics, value=TaskAssignment.id),
            updated_at=now,
        )
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
    max_tasks: int = 3,
    specs: dict[int, tuple[str, dict[str, Any]]] | None = None,
) -> tuple[TaskAssignment, TaskShard | None]:
    """Record a client's ``task_result``. Raises NotAssigned, UnknownTask, UploadRequired,
    Superseded or TimedOut, always before writing anything (so a batch of results needs no
    savepoint per result).

    A federated round counts as completed only once its update was uploaded. A late result
    (the assignment timed out) is accepted when its shard is still unsettled. ``specs``: the
    tasks' (type, config) read so far in this transaction (they never change), filled here.
    """
    a = find_open(s, client_id, task_id, round_no)
    specs = {} if specs is None else specs
    if task_id not in specs:
        row = s.execute(select(Task.type, Task.config).where(Task.id == task_id)).one()
        specs[task_id] = (row.type, row.config or {})
    task_type, task_config = specs[task_id]
    if status == AssignmentState.COMPLETED and a.checkpoint_path is None and task_type == FEDERATED:
        raise UploadRequired(task_id)
    if a.status == AssignmentState.TIMED_OUT:
        if status != AssignmentState.COMPLETED:
            raise TimedOut(f"your assignment of task {task_id} timed out and was reissued")
        shard: TaskShard | None = accept_late(s, a, now, metrics)
    else:
        shard = end_assignment(
            s, a.id, status, now, max_attempts=max_attempts, error=error, metrics=metrics or a.metrics,
            progress=100.0 if status == AssignmentState.COMPLETED else None,
        )  # fmt: skip
    if shard is not None:
        turnaround = (now - a.assigned_at).total_seconds()
        if status == AssignmentState.COMPLETED:
            rate = None
            if task_type == FEDERATED and a.num_examples and turnaround > 0:
                rate = a.num_examples * int(task_config.get("local_epochs", 1)) / turnaround
            reliability.note(
                s, client_id, "valid", max_tasks=max_tasks, turnaround_s=turnaround, examples_per_s=rate
            )
        else:
            reliability.note(s, client_id, "error", max_tasks=max_tasks)
    return a, shard
