"""Celery tasks: thin wrappers that take ids, open a transaction, call a plain function, and
ring the doorbell after the commit. Every one is safe to run twice.

Torch is imported lazily (only aggregation needs it), so the web tier can import this module
to send tasks by name without loading torch.
"""

from __future__ import annotations

import logging
from datetime import datetime
from functools import cache
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

import config
from store import clients as client_store
from store.blobs import BlobStore, task_dir
from store.bus import get_bus
from store.db import Unavailable, get_db
from store.models import FEDERATED, Task, utcnow
from workers import celery, lifecycle, scheduling

log = logging.getLogger(__name__)

# Transient outages (database down) are retried with backoff; beat's sweep re-drives
# whatever still did not happen after that.
RETRY: dict[str, Any] = {
    "bind": True,
    "autoretry_for": (Unavailable,),
    "retry_backoff": 1,
    "retry_backoff_max": 30,
    "max_retries": 10,
}


@cache
def settings() -> config.Settings:
    return config.load()


def blobs() -> BlobStore:
    return BlobStore(settings().CHECKPOINT_DIR)


def _now(now_ts: float | None) -> datetime:
    return datetime.utcfromtimestamp(now_ts) if now_ts is not None else utcnow()


@celery.task(name="workers.tasks.schedule", **RETRY)
def schedule(self: Any, client_id: str | None = None) -> int:
    """Serve one waiting client, or (no id) every waiting client while fitting work is queued."""
    db = get_db()
    cfg = settings()
    if client_id is not None:
        waiting = [client_id]
    else:
        waiting = db.run(
            lambda s: (
                scheduling.waiting_clients(s, limit=cfg.SCHEDULE_BATCH) if scheduling.any_queued(s) else []
            )
        )
    assigned = 0
    for cid in waiting:

        def fill(s: Session, cid: str = cid) -> list[int]:
            made = scheduling.fill_client(
                s, cid, utcnow(), max_tasks=cfg.MAX_TASKS_PER_CLIENT, skip_locked=db.is_mysql
            )
            return [a.id for a in made]

        created = db.run(fill)
        if created:
            assigned += len(created)
            get_bus().publish([cid])
            log.info("task=schedule client=%s assignments=%s", cid, ",".join(map(str, created)))
    if client_id is None and len(waiting) == cfg.SCHEDULE_BATCH and assigned:
        schedule.delay()  # more clients wait than one run serves
    return assigned


@celery.task(name="workers.tasks.prepare_task", **RETRY)
def prepare_task(self: Any, task_id: int) -> bool:
    """Create the first round's shards (and, for federated training, the initial model)."""
    db = get_db()
    task_type = db.run(lambda s: s.execute(select(Task.type).where(Task.id == task_id)).scalar())
    if task_type is None:
        return False
    if task_type == FEDERATED:
        from workers import federated

        created = federated.prepare(db, blobs(), task_id, settings())
    else:
        created = db.run(lambda s: lifecycle.prepare_generic(s, task_id, utcnow()))
    log.info("task=prepare_task id=%d type=%s created=%s", task_id, task_type, created)
    if created:
        schedule.delay()
    return created


@celery.task(name="workers.tasks.advance_task", **RETRY)
def advance_task(self: Any, task_id: int) -> str:
    """A rank finished: complete or fail the task, or hand a finished round to aggregation."""
    db = get_db()
    outcome, notify = db.run(lambda s: lifecycle.advance(s, task_id, utcnow()))
    get_bus().publish(notify)
    if outcome == "aggregate":
        round_no = db.run(
            lambda s: s.execute(select(Task.current_round).where(Task.id == task_id)).scalar_one()
        )
        aggregate_round.delay(task_id, round_no)
    return outcome


@celery.task(name="workers.tasks.aggregate_round", **RETRY)
def aggregate_round(self: Any, task_id: int, round_no: int) -> str:
    """Aggregate a finished federated round into the next global model (idempotent per round)."""
    from workers import federated

    outcome = federated.aggregate(get_db(), blobs(), task_id, round_no, settings())
    log.info("task=aggregate_round id=%d round=%d outcome=%s", task_id, round_no, outcome)
    if outcome in ("next_round", "failed"):
        schedule.delay()
    return outcome


@celery.task(name="workers.tasks.sweep", **RETRY)
def sweep(self: Any, now_ts: float | None = None) -> dict[str, int]:
    """Beat's sweep. Bounded per run; every step is a compare-and-set, so overlapping runs are safe."""
    return sweep_once(_now(now_ts))


def sweep_once(now: datetime) -> dict[str, int]:
    db = get_db()
    cfg = settings()
    cutoff = lifecycle.expired_cutoff(now, cfg.CONNECTION_TIMEOUT)
    expired = db.run(
        lambda s: clients_expire(s, cutoff, now, limit=cfg.SWEEP_LIMIT, max_attempts=cfg.MAX_SHARD_ATTEMPTS)
    )
    released = sum(len(tasks) for _, tasks in expired)
    if released:
        schedule.delay()
    to_prepare, to_advance = db.run(lambda s: lifecycle.stalled(s, now, limit=cfg.SWEEP_LIMIT))
    for task_id in to_prepare:
        prepare_task.delay(task_id)
    for task_id in to_advance:
        advance_task.delay(task_id)
    waiting = db.run(lambda s: lifecycle.explain_waiting(s, now, limit=cfg.SWEEP_LIMIT))
    stats = {
        "expired": len(expired),
        "released": released,
        "prepared": len(to_prepare),
        "advanced": len(to_advance),
        "waiting": waiting,
    }
    log.info("task=sweep state=finish %s", " ".join(f"{k}={v}" for k, v in stats.items()))
    return stats


def clients_expire(
    s: Session, cutoff: datetime, now: datetime, *, limit: int, max_attempts: int
) -> list[tuple[str, list[int]]]:
    expired = client_store.expire(s, cutoff, now, limit=limit, max_attempts=max_attempts)
    for client_id, tasks in expired:
        log.info("event=client_expired client=%s released_tasks=%s", client_id, lifecycle.ids(tasks))
    return expired


@celery.task(name="workers.tasks.purge_task_files", **RETRY)
def purge_task_files(self: Any, task_id: int) -> None:
    """Delete a deleted task's model files."""
    blobs().remove(task_dir(task_id))
