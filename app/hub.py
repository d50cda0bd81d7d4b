"""The sockets this web process holds, and how pushes reach them.

Delivery is reconciliation, not message passing: the database says which assignments each
client holds and what state their tasks are in; a connection remembers what it already told
its client. Reconciling a client sends the difference: ``task`` for a new assignment, ``pause``
/ ``resume`` when its task changed, ``stop`` for an assignment that is gone. The doorbell
(Redis pub/sub, or a function call when embedded) asks for a reconcile of some clients now;
every ``RECONCILE_INTERVAL`` seconds all local clients are reconciled anyway, so a lost ring
delays a push but never loses it. The same periodic pass flushes batched progress and
``last_seen`` in one transaction, and closes connections the database no longer knows.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session

from store import assignments, clients
from store.bus import Bus
from store.db import Database
from store.models import utcnow

if TYPE_CHECKING:
    from app.ws import Connection

log = logging.getLogger(__name__)


class Hub:
    def __init__(self, db: Database, bus: Bus, *, interval: float) -> None:
        self.db = db
        self.bus = bus
        self.interval = interval
        self._conns: dict[str, Connection] = {}
        self._lock = threading.Lock()
        self._pending: set[str] = set()
        self._everyone = False
        self._wake = threading.Event()
        self._started = False
        self._specs: dict[
            int, tuple[dict[str, Any], dict[str, Any]]
        ] = {}  # task id -> (config, requirements)

    # --- connections ---

    def start(self) -> None:
        """Start the doorbell listener and the reconcile loop (once, in the serving process)."""
        with self._lock:
            if self._started:
                return
            self._started = True
        self.bus.listen(self.ring)
        threading.Thread(target=self._loop, daemon=True, name="hub").start()

    def attach(self, conn: Connection, *, reconnect: bool) -> None:
        """Hold a registered connection; a reconnecting client is reconciled at once (its work)."""
        assert conn.client_id is not None
        with self._lock:
            old = self._conns.get(conn.client_id)
            self._conns[conn.client_id] = conn
        if old is not None and old is not conn:
            old.close_superseded()
        if reconnect:
            self.ring([conn.client_id])

    def detach(self, conn: Connection) -> None:
        with self._lock:
            if conn.client_id is not None and self._conns.get(conn.client_id) is conn:
                del self._conns[conn.client_id]

    def count(self) -> int:
        return len(self._conns)

    def ring(self, client_ids: Iterable[str] | None) -> None:
        """Reconcile these local clients (None: all of them) as soon as possible."""
        with self._lock:
            if client_ids is None:
                self._everyone = True
            else:
                self._pending.update(c for c in client_ids if c in self._conns)
                if not self._pending:
                    return
        self._wake.set()

    # --- the loop ---

    def _loop(self) -> None:
        next_full = time.monotonic() + self.interval
        while True:
            self._wake.wait(timeout=max(0.0, next_full - time.monotonic()))
            self._wake.clear()
            full = time.monotonic() >= next_full
            with self._lock:
                ids = set(self._conns) if (full or self._everyone) else self._pending
                self._pending = set()
                self._everyone = False
            try:
                if full:
                    next_full = time.monotonic() + self.interval
                    self.flush()
                if ids:
                    self.reconcile(sorted(ids))
            except Exception as error:  # the database may be down: keep serving, try again later
                log.warning("event=hub_pass state=failed error=%s", type(error).__name__)
                with self._lock:
                    self._pending.update(ids)
                time.sleep(min(self.interval, 1.0))

    def reconcile(self, client_ids: list[str]) -> None:
        if len(self._specs) > 10_000:
            self._specs.clear()
        rows = self.db.run(lambda s: assignments.open_for_clients(s, client_ids, self._specs))
        by_client: dict[str, list[assignments.Open]] = defaultdict(list)
        for row in rows:
            by_client[row.client_id].append(row)
        for client_id in client_ids:
            conn = self._conns.get(client_id)
            if conn is not None:
                conn.apply(by_client.get(client_id, []))

    def flush(self) -> None:
        """Write batched progress and refresh last_seen of every local connection."""
        conns = list(self._conns.values())
        if not conns:
            return
        progress = [item for conn in conns for item in conn.take_progress()]
        conn_ids = [c.conn_id for c in conns]
        now = utcnow()

        def write(s: Session) -> set[str]:
            if progress:
                assignments.record_progress(s, progress, now)
            return clients.touch(s, conn_ids, now)

        alive = self.db.run(write)
        for conn in conns:
            if conn.conn_id not in alive:
                conn.close_superseded()
