"""Matching queued shards to waiting clients. Plain functions over a session; tasks.py wraps them.

The claim is the heart of it: a shard is given to at most one client, whatever the number of
schedulers running at once. On MySQL/MariaDB the claim is ``SELECT ... FOR UPDATE SKIP LOCKED``
in the order of the ``ix_task_shards_claim`` index; elsewhere (SQLite, embedded) it is a
compare-and-set ``UPDATE ... WHERE status = 'queued'`` whose row count says who won.
"""

from __future__ import annotations

import logging
from datetime import datetime

from sqlalchemy import Select, exists, or_, select, update
from sqlalchemy.orm import Session

from store.db import affected
from store.models import OPEN_ASSIGNMENT, Client, Task, TaskAssignment, TaskShard

log = logging.getLogger(__name__)


def _candidates(client: Client, exclude_tasks: set[int]) -> Select[TaskShard]:
    query = select(TaskShard).where(
        TaskShard.status == "queued",
        TaskShard.req_cpu_cores <= client.cpu_cores,
        TaskShard.req_ram_gb <= client.ram_gb,
        TaskShard.req_gpu_count <= client.gpu_count,
        or_(TaskShard.req_gpu_count == 0, TaskShard.req_gpu_memory_gb <= client.gpu_memory_gb),
    )
    if exclude_tasks:
        query = query.where(TaskShard.task_id.not_in(sorted(exclude_tasks)))
    if client.task_types is not None:
        query = query.where(TaskShard.task_type.in_(client.task_types))
    return query.order_by(TaskShard.priority.desc(), TaskShard.id)


def claim(s: Session, client: Client, exclude_tasks: set[int], *, skip_locked: bool) -> TaskShard | None:
    """Take the best queued shard that fits ``client``, or None. The shard comes back 'assigned'."""
    query = _candidates(client, exclude_tasks)
    if skip_locked:
        shard = s.execute(query.limit(1).with_for_update(skip_locked=True)).scalar_one_or_none()
        if shard is not None:
            shard.status = "assigned"
        return shard
    for shard_id in s.execute(query.with_only_columns(TaskShard.id).limit(8)).scalars().all():
        won = affected(
            s.execute(
                update(TaskShard)
                .where(TaskShard.id == shard_id, TaskShard.status == "queued")
                .values(status="assigned")
            )
        )
        if won == 1:
            return s.get(TaskShard, shard_id, populate_existing=True)
    return None


def fill_client(
    s: Session, client_id: str, now: datetime, *, max_tasks: int, skip_locked: bool
) -> list[TaskAssignment]:
    """Give a waiting client as much fitting work as it asked for and may hold.

    The client row is locked first, so two schedulers serving the same client cannot both
    fill its last slot, nor give it two ranks of one task.
    """
    client = s.execute(select(Client).where(Client.id == client_id).with_for_update()).scalar_one_or_none()
    if (
        client is None
        or client.status != "active"
        or client.conn_id is None
        or client.disabled
        or client.pending_requests <= 0
    ):
        return []
    held = set(
        s.execute(
            select(TaskAssignment.task_id).where(
                TaskAssignment.client_id == client_id, TaskAssignment.status.in_(OPEN_ASSIGNMENT)
            )
        ).scalars()
    )
    slots = min(client.pending_requests, max_tasks - len(held))
    created: list[TaskAssignment] = []
    while len(created) < slots:
        shard = claim(s, client, held, skip_locked=skip_locked)
        if shard is None:
            break
        assignment = TaskAssignment(
            task_id=shard.task_id,
            client_id=client_id,
            assigned_at=now,
            updated_at=now,
            status="assigned",
            rank=shard.rank,
            round=shard.round,
            shard_id=shard.id,
        )
        s.add(assignment)
        s.flush()
        shard.assignment_id = assignment.id
        shard.updated_at = now
        held.add(shard.task_id)
        created.append(assignment)
        # A plain read first: most claims find the task running already and take no task lock.
        task_status = s.execute(select(Task.status).where(Task.id == shard.task_id)).scalar_one()
        if task_status == "pending":
            s.execute(
                update(Task)
                .where(Task.id == shard.task_id, Task.status == "pending")
                .values(status="running", updated_at=now, status_reason=None)
            )
        if shard.rank == 0:
            s.execute(update(Task).where(Task.id == shard.task_id).values(client_id=client_id))
    if created:
        client.pending_requests -= len(created)
        if client.pending_requests <= 0:
            client.pending_requests = 0
            client.requested_at = None
    return created


def waiting_clients(s: Session, *, limit: int) -> list[str]:
    """Connected, enabled clients with outstanding requests, longest waiting first."""
    return list(
        s.execute(
            select(Client.id)
            .where(
                Client.pending_requests > 0,
                Client.status == "active",
                Client.conn_id.is_not(None),
                Client.disabled.is_(False),
            )
            .order_by(Client.requested_at)
            .limit(limit)
        ).scalars()
    )


def any_queued(s: Session) -> bool:
    return bool(s.execute(select(exists().where(TaskShard.status == "queued"))).scalar())
