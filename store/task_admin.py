"""Tasks as the admin API handles them: submit, list, pause/resume/stop, delete.

The Celery jobs that move tasks along live in ``workers/tasks.py``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from store.db import affected
from store.models import Task, TaskAssignment, TaskRound, TaskShard
from store.states import LIVE_TASK, OPEN_ASSIGNMENT, UNSETTLED_SHARD, AssignmentState, ShardState, TaskState

# target status -> statuses it may be reached from (admin transitions only)
TRANSITIONS: dict[str, tuple[str, ...]] = {
    TaskState.PAUSED: (TaskState.PENDING, TaskState.RUNNING),
    TaskState.RUNNING: (TaskState.PAUSED,),
    TaskState.STOPPED: LIVE_TASK,
}


class IllegalTransition(Exception):
    def __init__(self, current: str, target: str) -> None:
        super().__init__(f"cannot move a {current} task to {target}")
        self.current = current
        self.target = target


def create(
    s: Session,
    *,
    type: str,
    requirements: dict[str, Any],
    config: dict[str, Any],
    priority: int,
    num_shards: int,
    now: datetime,
) -> Task:
    task = Task(
        type=type,
        requirements=requirements,
        config=config,
        priority=priority,
        num_shards=num_shards,
        status=TaskState.PENDING,
        status_reason="queued: waiting for a worker to prepare it",
        created_at=now,
        updated_at=now,
        current_round=0,
    )
    s.add(task)
    s.flush()
    return task


def page(
    s: Session, *, status: str | None, type: str | None, page_no: int, per_page: int
) -> tuple[list[Task], int]:
    query = select(Task)
    count = select(func.count()).select_from(Task)
    if status:
        query = query.where(Task.status == status)
        count = count.where(Task.status == status)
    if type:
        query = query.where(Task.type == type)
        count = count.where(Task.type == type)
    total = s.execute(count).scalar_one()
    items = (
        s.execute(query.order_by(Task.id.desc()).offset((page_no - 1) * per_page).limit(per_page))
        .scalars()
        .all()
    )
    return list(items), total


def holders(s: Session, task_id: int) -> list[str]:
    return list(
        s.execute(
            select(TaskAssignment.client_id)
            .where(TaskAssignment.task_id == task_id, TaskAssignment.status.in_(OPEN_ASSIGNMENT))
            .distinct()
        ).scalars()
    )


def set_status(s: Session, task_id: int, target: str, now: datetime) -> tuple[Task, list[str]]:
    """Pause, resume or stop a task. Returns the task and the clients to notify.

    Raises KeyError for an unknown task and :class:`IllegalTransition` for a move the
    task's current status does not allow.
    """
    task = s.execute(select(Task).where(Task.id == task_id).with_for_update()).scalar_one_or_none()
    if task is None:
        raise KeyError(task_id)
    allowed = TRANSITIONS.get(target)
    if allowed is None or task.status not in allowed:
        raise IllegalTransition(task.status, target)
    notify = holders(s, task_id)
    shards = update(TaskShard).where(TaskShard.task_id == task_id)
    if target == TaskState.PAUSED:
        s.execute(
            shards.where(TaskShard.status == ShardState.QUEUED).values(
                status=ShardState.PAUSED, updated_at=now
            )
        )
        task.status_reason = "paused by an admin"
    elif target == TaskState.RUNNING:
        s.execute(
            shards.where(TaskShard.status == ShardState.PAUSED).values(
                status=ShardState.QUEUED, updated_at=now
            )
        )
        started = s.execute(
            select(TaskAssignment.id).where(TaskAssignment.task_id == task_id).limit(1)
        ).first()
        target = TaskState.RUNNING if started else TaskState.PENDING
        task.status_reason = None
    else:  # stopped: free everything; holders are told to stop by the web tier's reconcile
        s.execute(
            shards.where(TaskShard.status.in_(UNSETTLED_SHARD)).values(
                status=ShardState.CANCELLED, updated_at=now
            )
        )
        s.execute(
            update(TaskAssignment)
            .where(TaskAssignment.task_id == task_id, TaskAssignment.status.in_(OPEN_ASSIGNMENT))
            .values(status=AssignmentState.RELEASED, updated_at=now)
        )
        task.status_reason = "stopped by an admin"
    task.status = target
    task.updated_at = now
    return task, notify


def delete_task(s: Session, task_id: int) -> bool:
    """Delete a task and (by cascade) its rounds, shards and assignments."""
    s.execute(delete(TaskRound).where(TaskRound.task_id == task_id))
    s.execute(delete(TaskShard).where(TaskShard.task_id == task_id))
    s.execute(delete(TaskAssignment).where(TaskAssignment.task_id == task_id))
    return affected(s.execute(delete(Task).where(Task.id == task_id))) == 1


def open_counts(s: Session, task_id: int) -> dict[str, int]:
    rows = s.execute(
        select(TaskShard.status, func.count()).where(TaskShard.task_id == task_id).group_by(TaskShard.status)
    ).all()
    return {status: n for status, n in rows}
