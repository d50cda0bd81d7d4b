"""The reconciler: what beat's sweep re-drives from the database and CHECKPOINT_DIR when a
message was lost (the broker restarted empty, was flushed, or a worker died holding a job).

The sweep (``workers.tasks.sweep_once``) re-drives most of it already: tasks with no shards
(``prepare_task``), rounds whose shards are all settled (``advance_task``, which hands a
complete federated round to ``aggregate_round``; a round whose aggregation died is retaken
once its lease lapses), rounds past their timeout, expired clients and deadlines. This module
adds what nothing else finds again:

- the files of deleted tasks (``purge_task_files`` lost): a numeric folder under
  ``CHECKPOINT_DIR/tasks/`` with no task row is purged again;
- waiting clients while shards are queued (a ``schedule`` job lost): a scheduling run is
  asked for, as a request would (one at a time, the ``SCHEDULE_PENDING`` flag).

Doorbell rings lost while Redis was away need nothing here: every web process reconciles its
sockets every ``RECONCILE_INTERVAL``, and all of them at once when its doorbell subscription
comes back (``store.bus.RedisBus._listen_forever``).
"""

from __future__ import annotations

import logging
import os
import stat
import time
from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

import server_settings
from store.blobs import BlobStore
from store.bus import get_bus
from store.db import Database
from store.models import Client, Task, TaskShard
from store.states import ClientState, ShardState

log = logging.getLogger(__name__)

SETTLE_S = 5.0  # a task folder written to this recently is left alone (see orphan_task_dirs)
CHUNK = 1000  # task ids per query


def reconcile(db: Database, store: BlobStore, settings: server_settings.Settings) -> dict[str, int]:
    """Re-drive what a lost message left behind (the jobs are sent by name); returns counts."""
    from workers.tasks import purge_task_files, schedule

    orphans = orphan_task_dirs(db, store, time.time(), limit=settings.SWEEP_LIMIT)
    for task_id in orphans:
        log.info("event=orphan_files task=%d action=purge", task_id)
        purge_task_files.delay(task_id=task_id)
    scheduled = 0
    if db.run(clients_wait_for_queued_work) and get_bus().ring_scheduler():
        schedule.delay()
        scheduled = 1
    return {"purged": len(orphans), "scheduled": scheduled}


def orphan_task_dirs(db: Database, store: BlobStore, now_ts: float, *, limit: int) -> list[int]:
    """Ids of the folders under ``tasks/`` that belong to no task (the task was deleted and its
    ``purge_task_files`` job was lost), at most ``limit``.

    A task's row is committed before any of its files is written, so a folder without a row
    is a deleted task's. The one exception is the embedded SQLite database, which may give a
    new task the id of the last one deleted: a folder written to within ``SETTLE_S`` seconds
    is left for a later sweep, so a new task's first files are not taken for the old ones.
    """
    root = store.root / "tasks"
    try:
        with os.scandir(root) as entries:
            names = [entry.name for entry in entries if entry.name.isdigit()]
    except FileNotFoundError:
        return []
    if limit <= 0:
        return []
    ids = sorted(int(name) for name in names)
    present: set[int] = set()
    for start in range(0, len(ids), CHUNK):
        chunk = ids[start : start + CHUNK]

        def query(s: Session, chunk: list[int] = chunk) -> set[int]:
            return existing_tasks(s, chunk)

        present |= db.run(query)
    found = []
    for task_id in ids:  # only the few without a row are looked at more closely
        if task_id in present:
            continue
        try:
            info = (root / str(task_id)).lstat()
        except FileNotFoundError:  # removed meanwhile
            continue
        if stat.S_ISDIR(info.st_mode) and info.st_mtime < now_ts - SETTLE_S:
            found.append(task_id)
            if len(found) >= limit:
                break
    return found


def existing_tasks(s: Session, ids: Sequence[int]) -> set[int]:
    return set(s.execute(select(Task.id).where(Task.id.in_(ids))).scalars())


def clients_wait_for_queued_work(s: Session) -> bool:
    """A connected client asked for work while a shard is queued (fitting or not: the
    scheduling run decides)."""
    waiting = s.execute(
        select(Client.id)
        .where(
            Client.pending_requests > 0,
            Client.status == ClientState.ACTIVE,
            Client.conn_id.is_not(None),
            Client.disabled.is_(False),
        )
        .limit(1)
    ).first()
    if waiting is None:
        return False
    return (
        s.execute(select(TaskShard.id).where(TaskShard.status == ShardState.QUEUED).limit(1)).first()
        is not None
    )
