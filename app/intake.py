"""``task_request`` intake with group commit: many sockets' requests, one transaction.

A ``task_request`` is one small write (the client's ``pending_requests``). Written one
transaction each, a burst of them spent most of the web process's CPU on transaction overhead
(checkout, ping, compile, commit) and ran one Redis command each to ring the scheduler. Here a
request joins the batch being gathered and waits for it; one writer writes every request that
arrived meanwhile in one transaction, then asks for one scheduling run. Nothing waits on a
timer: under light load a batch holds one request and is written at once; under heavy load
each batch holds what arrived during the previous write.

Each request still gets its own answer after the commit: accepted, refused (the client is
disabled, or this connection is no longer its connection), or the database error that
:meth:`Intake.request` raises, exactly as a transaction of its own would have.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from store import clients
from store.db import Busy, Database
from store.models import utcnow

log = logging.getLogger(__name__)

MAX_BATCH = 500  # requests written per transaction


@dataclass
class _Request:
    client_id: str
    conn_id: str
    done: threading.Event = field(default_factory=threading.Event)
    accepted: bool = False
    error: BaseException | None = None


class Intake:
    def __init__(self, db: Database, *, max_tasks: int, written: Callable[[], None]) -> None:
        self.db = db
        self.max_tasks = max_tasks
        self.written = written  # called once after a batch with an accepted request committed
        self._lock = threading.Lock()
        self._gathered: list[_Request] = []
        self._wake = threading.Event()
        self._writer: threading.Thread | None = None
        self.batches = 0  # transactions written (tests and benchmarks read these)
        self.requests = 0

    def request(self, client_id: str, conn_id: str, *, timeout: float) -> bool:
        """Record one ``task_request``; True once committed, False if the client may not get
        work. Raises what the transaction raised (``Unavailable`` when the database is down)."""
        item = _Request(client_id, conn_id)
        with self._lock:
            self._gathered.append(item)
            if self._writer is None or not self._writer.is_alive():
                self._writer = threading.Thread(target=self._write_forever, daemon=True, name="intake")
                self._writer.start()
        self._wake.set()
        if not item.done.wait(timeout):
            with self._lock:
                waiting = item in self._gathered
                if waiting:  # not taken by the writer: withdrawn, so "nothing was changed" is true
                    self._gathered.remove(item)
            if waiting:
                raise Busy(f"task_request not written within {timeout:.0f}s")
            item.done.wait()  # its transaction is under way; db.run ends it with an answer or an error
        if item.error is not None:
            raise item.error
        return item.accepted

    def _write_forever(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            while True:
                with self._lock:
                    batch, self._gathered = self._gathered[:MAX_BATCH], self._gathered[MAX_BATCH:]
                if not batch:
                    break
                self._write(batch)

    def _write(self, batch: list[_Request]) -> None:
        pairs = [(r.client_id, r.conn_id) for r in batch]
        try:
            accepted = self.db.run(
                lambda s: clients.request_work_batch(s, pairs, utcnow(), max_tasks=self.max_tasks),
                first=True,
            )
        except BaseException as error:  # every request of the batch gets the transaction's error
            for r in batch:
                r.error = error
                r.done.set()
            if not isinstance(error, Exception):
                raise
            return
        self.batches += 1
        self.requests += len(batch)
        for r in batch:
            r.accepted = r.conn_id in accepted
        if accepted:
            try:
                self.written()
            except Exception as error:  # the scheduler's beat finds the requests anyway
                log.warning("event=intake_ring state=failed error=%s", type(error).__name__)
        for r in batch:
            r.done.set()
