"""Group commit for the web tier's writes: many sockets' messages, one transaction.

``task_request`` and ``task_result`` are small writes. Written one transaction each, a burst
of them spent most of the web process's CPU on transaction overhead (turn, checkout, ping,
commit) and ran one Redis or Celery command each afterwards. Here a message joins the batch
being gathered and waits for it; one writer writes every message that arrived meanwhile in
one transaction, then does the follow-up once per batch (one scheduling ring; one
``advance_task`` per task, not per result). Nothing waits on a timer: under light load a
batch holds one message and is written at once; under heavy load each batch holds what
arrived during the previous write.

Each message still gets its own answer after the commit, as a transaction of its own would
have given it: its outcome, its own refusal (a result for a task the client does not hold
wrote nothing, the others commit), or the database error that
:meth:`GroupCommit.submit` raises for the whole batch (``Unavailable`` when it is down).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Generic, TypeVar

from sqlalchemy.orm import Session

import server_settings
from store import assignments, clients
from store.assignments import NotAssigned, Superseded, TimedOut, UnknownTask, UploadRequired
from store.db import Busy, Database, Unavailable
from store.models import TaskAssignment, TaskShard, utcnow

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

# Refusals of one result; anything else (a database error) is the whole batch's.
REFUSALS = (NotAssigned, UnknownTask, UploadRequired, Superseded, TimedOut)


@dataclass
class _Item(Generic[T]):
    value: T
    done: threading.Event = field(default_factory=threading.Event)
    outcome: Any = None
    error: BaseException | None = None


class GroupCommit(Generic[T, R]):
    """``writers`` writer threads (greenlets under gevent), each writing the next batch;
    callers of :meth:`submit` wait for theirs.

    ``write(session, items)`` runs in one transaction and returns one outcome per item (a
    value, or the exception that item is answered with). ``after(items, outcomes)`` runs
    once the transaction committed, before anyone is answered."""

    def __init__(
        self,
        db: Database,
        write: Callable[[Session, list[T]], list[R | Exception]],
        *,
        max_batch: int,
        after: Callable[[list[T], list[R | Exception]], None] | None = None,
        name: str = "group-commit",
        writers: int = 1,
    ) -> None:
        self.db = db
        self.write = write
        self.max_batch = max_batch
        self.after = after
        self.name = name
        self._lock = threading.Lock()
        self._gathered: list[_Item[T]] = []
        self._wake = threading.Event()
        self.writers = writers  # transactions in flight at once (each takes the next batch)
        self._writers: list[threading.Thread] = []
        self.batches = 0  # transactions committed (tests and benchmarks read these)
        self.items = 0

    def submit(self, value: T, *, timeout: float) -> R:
        """Write ``value`` with whatever else arrives meanwhile; its outcome once committed.
        Raises the item's own refusal, or the batch's database error."""
        item: _Item[T] = _Item(value)
        with self._lock:
            self._gathered.append(item)
            self._writers = [w for w in self._writers if w.is_alive()]
            while len(self._writers) < self.writers:
                writer = threading.Thread(target=self._write_forever, daemon=True, name=self.name)
                writer.start()
                self._writers.append(writer)
        self._wake.set()
        if not item.done.wait(timeout):
            with self._lock:
                waiting = item in self._gathered
                if waiting:  # not taken by the writer: withdrawn, so "nothing was changed" is true
                    self._gathered.remove(item)
            if waiting:
                raise Busy(f"not written within {timeout:.0f}s")
            item.done.wait()  # its transaction is under way; db.run ends it with an answer or an error
        if item.error is not None:
            raise item.error
        outcome: R = item.outcome
        return outcome

    def _write_forever(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            while True:
                with self._lock:
                    batch = self._gathered[: self.max_batch]
                    del self._gathered[: self.max_batch]
                if not batch:
                    break
                self._write(batch)

    def _write(self, batch: list[_Item[T]]) -> None:
        values = [item.value for item in batch]
        try:
            # a batch holds more row locks than one message: it may lose a deadlock more often
            outcomes = self.db.run(
                lambda s: self.write(s, values), first=True, attempts=2 if len(batch) > 1 else 4
            )
        except Unavailable as error:
            if len(batch) > 1:
                # Still contended (deadlocks, lock waits), or a connection lost under a long lock
                # wait: each message alone, as without batching. (When the database is down,
                # each fails at once as well.)
                cause = type(error.__cause__ or error).__name__
                log.info(
                    "event=group_commit name=%s state=split size=%d error=%s", self.name, len(batch), cause
                )
                for item in batch:
                    self._write([item])
                return
            self._fail(batch, error)
            return
        except BaseException as error:  # every message of the batch gets the transaction's error
            self._fail(batch, error)
            if not isinstance(error, Exception):
                raise
            return
        self.batches += 1
        self.items += len(batch)
        if self.after is not None:
            try:
                self.after(values, outcomes)
            except Exception as error:  # a follow-up is a doorbell: beat's sweep finds the work anyway
                log.warning(
                    "event=group_commit_after name=%s state=failed error=%s", self.name, type(error).__name__
                )
        for item, outcome in zip(batch, outcomes, strict=True):
            if isinstance(outcome, Exception):
                item.error = outcome
            else:
                item.outcome = outcome
            item.done.set()

    @staticmethod
    def _fail(batch: list[_Item[T]], error: BaseException) -> None:
        for item in batch:
            item.error = error
            item.done.set()


class Intake(GroupCommit[tuple[str, str], bool]):
    """``task_request``: (client id, conn id) in, True once committed, False if the client may
    not get work (disabled, or this connection is no longer its own)."""

    def __init__(self, db: Database, *, max_tasks: int, written: Callable[[], None]) -> None:
        def write(s: Session, pairs: list[tuple[str, str]]) -> list[bool | Exception]:
            accepted = clients.request_work_batch(s, pairs, utcnow(), max_tasks=max_tasks)
            return [conn_id in accepted for _, conn_id in pairs]

        def after(pairs: list[tuple[str, str]], outcomes: list[bool | Exception]) -> None:
            if any(o is True for o in outcomes):
                written()  # one scheduling ring for the whole batch

        super().__init__(db, write, max_batch=500, after=after, name="intake")

    def request(self, client_id: str, conn_id: str, *, timeout: float) -> bool:
        return self.submit((client_id, conn_id), timeout=timeout)


class Departures(GroupCommit[tuple[str, str], bool]):
    """Closed sockets: (client id, conn id) in; True once committed if it was the client's
    current connection, False if the client had registered again elsewhere meanwhile. When
    every client of a web process leaves at once (a network blip, a proxy restart), one
    transaction a socket released 10,000 clients in 25 s, with the pool's connections, and so
    every other message's database work, waiting behind them."""

    def __init__(self, db: Database, *, grace: float | None) -> None:
        def write(s: Session, pairs: list[tuple[str, str]]) -> list[bool | Exception]:
            gone = clients.disconnect_batch(s, pairs, utcnow(), grace=grace)
            return [pair in gone for pair in pairs]

        super().__init__(db, write, max_batch=500, name="departures")


@dataclass(frozen=True)
class Result:
    """A ``task_result`` as received: who sent it and what it says."""

    client_id: str
    task_id: int
    round: int | None
    status: str
    metrics: dict[str, Any]
    error: str | None


Recorded = tuple[TaskAssignment, TaskShard | None, bool]  # (assignment, shard, duplicate)


def record_result(
    s: Session,
    r: Result,
    now: datetime,
    settings: server_settings.Settings,
    specs: dict[int, tuple[str, dict[str, Any]]] | None = None,
) -> Recorded:
    """Record one result (``assignments.finish``); a result recorded before is a duplicate.
    Raises the refusals in :data:`REFUSALS`, before writing anything. ``specs``: the tasks'
    (type, config) read so far in this transaction."""
    try:
        assignment, shard = assignments.finish(
            s,
            r.client_id,
            r.task_id,
            r.round,
            r.status,
            r.metrics,
            r.error,
            now,
            max_attempts=settings.MAX_SHARD_ATTEMPTS,
            max_tasks=settings.MAX_TASKS_PER_CLIENT,
            specs=specs,
        )
    except NotAssigned:
        again = assignments.reported(s, r.client_id, r.task_id, r.round, r.status)
        if again is None:
            raise
        return again, None, True
    return assignment, shard, False


class Results(GroupCommit[Result, Recorded]):
    """``task_result``: a batch in one transaction. A refused result wrote nothing (every
    refusal comes before the first write: ``assignments.finish``), so it leaves the others
    without a savepoint each (two round trips of about ten per result); each task's type and
    config are read once per batch. After the commit one ``advance_task`` per task and one
    scheduling ring (a finished client may take more work, a failed shard is free again)."""

    def __init__(
        self,
        db: Database,
        settings: server_settings.Settings,
        *,
        advance: Callable[[int], None],
        written: Callable[[], None],
    ) -> None:
        def write(s: Session, results: list[Result]) -> list[Recorded | Exception]:
            now = utcnow()
            outcomes: list[Recorded | Exception | None] = [None] * len(results)
            specs: dict[int, tuple[str, dict[str, Any]]] = {}
            # in one order (task, client) whoever writes: two batches never wait on each other in a cycle
            for i in sorted(range(len(results)), key=lambda i: (results[i].task_id, results[i].client_id)):
                try:
                    outcomes[i] = record_result(s, results[i], now, settings, specs)
                except REFUSALS as refusal:
                    outcomes[i] = refusal
            return [o for o in outcomes if o is not None]

        def after(results: list[Result], outcomes: list[Recorded | Exception]) -> None:
            fresh = sorted(
                {
                    r.task_id
                    for r, o in zip(results, outcomes, strict=True)
                    if not isinstance(o, Exception) and not o[2]
                }
            )
            for task_id in fresh:
                advance(task_id)
            if fresh:
                written()

        # Embedded SQLite: one result per transaction (one process, one writer at a time).
        # Four transactions at once: a result is about ten statements, and one writer alone was
        # bound by their round trips, not by the CPU or the database.
        super().__init__(
            db,
            write,
            max_batch=50 if db.is_mysql else 1,
            after=after,
            name="results",
            writers=4 if db.is_mysql else 1,
        )
