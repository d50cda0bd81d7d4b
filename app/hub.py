"""The sockets this web process holds, and how pushes reach them.

Delivery is reconciliation, not message passing: the database says which assignments each
client holds and what state their tasks are in; a connection remembers what it already told
its client. Reconciling a client sends the difference: ``task`` for a new assignment, ``pause``
/ ``resume`` when its task changed, ``stop`` for an assignment that is gone. The doorbell
(Redis pub/sub, or a function call when embedded) asks for a reconcile of some clients now.
The scheduler's ring carries the assignments it committed (:class:`store.assignments.Made`):
those are pushed as they are when this process knows their task's spec, without a read (a
client that was rung for otherwise too is reconciled from the database instead);
every ``RECONCILE_INTERVAL`` seconds (less often with thousands of sockets: FULL_PASS_RATE)
all local clients are reconciled anyway, so a lost ring delays a push but never loses it;
that pass goes a chunk of clients at a time, with rings served between chunks (spread over
half its period), so a push never waits behind thousands of sockets. Beside it, every
``RECONCILE_INTERVAL`` seconds, a flush writes batched progress, and ``last_seen`` of a
third of the connections, in short transactions (the scheduler skips locked client rows),
and closes connections the database no longer knows.

Before the process exits, :meth:`Hub.shutdown` closes every socket with 1012 (Service
Restart), so clients reconnect (to another web process, or this one restarted) now, and
writes the progress they sent; a connection that goes away leaves its unwritten progress
behind for the next flush.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy.orm import Session

from app import gcpause, metrics
from app.intake import Departures, Intake, Results
from store import assignments, clients
from store.assignments import Made
from store.bus import Bus
from store.db import Database
from store.models import utcnow

if TYPE_CHECKING:
    from app.ws import Connection

log = logging.getLogger(__name__)
T = TypeVar("T")

FULL_PASS_CHUNK = 100  # clients reconciled per step of the periodic pass (rings go between steps)
FULL_PASS_SPREAD = 0.5  # the periodic pass's steps are spread over this share of its period
FULL_PASS_RATE = 200.0  # clients/s the periodic pass reconciles at most (its period grows beyond)
TOUCH_CHUNK = 100  # last_seen refreshed per transaction
TOUCH_SPREAD = 0.5  # a flush's last_seen transactions are spread over this share of its period
YIELD_EVERY = 500  # connections a flush goes through before it lets other greenlets run
YIELD_S = 0.001  # ... for this long
TOUCH_SLICES = 3  # a flush refreshes last_seen of one in this many connections (see Hub.flush)
PROGRESS_CHUNK = 500  # assignments' progress written per transaction
GC_UNFREEZE_S = 600.0  # frozen objects are looked at again this often (app/gcpause.py)
CLOSE_SERVICE_RESTART = 1012  # WebSocket close code (IANA registry): the server restarts; reconnect


class Hub:
    def __init__(
        self,
        db: Database,
        bus: Bus,
        *,
        interval: float,
        intake: Intake,
        results: Results,
        departures: Departures,
        connection_timeout: float = 60.0,
        ping_interval: float = 0.0,
    ) -> None:
        self.db = db
        self.ping_interval = ping_interval  # 0: no pings
        self.bus = bus
        self.interval = interval
        # last_seen of a connection is refreshed every this many flushes: at most 3, and at
        # least four times within CONNECTION_TIMEOUT (the sweep's limit)
        self.touch_slices = max(1, min(TOUCH_SLICES, int(connection_timeout / 4 / interval)))
        self._flushes = 0
        self.intake = intake  # task_request writes, many sockets per transaction
        self.results = results  # task_result writes, likewise
        self.departures = departures  # closed sockets, likewise
        self._conns: dict[str, Connection] = {}
        self._lock = threading.Lock()
        self._pending: set[str] = set()
        self._made: dict[str, list[Made]] = defaultdict(list)  # new assignments rung for, to push
        self._everyone = False
        self._wake = threading.Event()
        self._started = False
        self._stopping = False
        self._drained = threading.Event()  # set when shutting down and no connection is left
        self._left: dict[int, tuple[float, dict[str, Any]]] = {}  # assignment -> unwritten progress
        self._reported: set[Connection] = set()  # connections with progress or utilization to write
        self._open: set[Connection] = set()  # every socket of this process, registered or not: pinged
        self._specs: dict[
            int, tuple[dict[str, Any], dict[str, Any]]
        ] = {}  # task id -> (config, requirements)

    # --- connections ---

    def start(self) -> None:
        """Start the doorbell listener, the reconcile loop and the flush loop (once, in the
        serving process)."""
        with self._lock:
            if self._started:
                return
            self._started = True
        self.bus.listen(self.ring)
        threading.Thread(target=self._loop, daemon=True, name="hub").start()
        collector = gcpause.Collector(unfreeze_every=GC_UNFREEZE_S)
        threading.Thread(target=self._flush_loop, args=(collector,), daemon=True, name="hub-flush").start()
        threading.Thread(target=self._young_loop, args=(collector,), daemon=True, name="hub-gc").start()
        if self.ping_interval > 0:
            threading.Thread(target=self._ping_loop, daemon=True, name="hub-ping").start()

    def opened(self, conn: Connection) -> None:
        """A socket is open (before it registers): pinged from now on."""
        with self._lock:
            self._open.add(conn)

    def attach(self, conn: Connection, *, reconnect: bool) -> None:
        """Hold a registered connection; a reconnecting client is reconciled at once (its work)."""
        assert conn.client_id is not None
        old = None
        with self._lock:
            stopping = self._stopping
            if not stopping:
                old = self._conns.get(conn.client_id)
                self._conns[conn.client_id] = conn
        if stopping:  # registered while this process shuts down: reconnect elsewhere
            close_for_restart(conn)
            return
        if old is not None and old is not conn:
            old.close_superseded()
        if reconnect:
            self.ring([conn.client_id], [])

    def reported(self, conn: Connection) -> None:
        """``conn`` holds progress or utilization for the next flush."""
        with self._lock:
            self._reported.add(conn)

    def detach(self, conn: Connection) -> None:
        """The socket ended: forget it, keeping its unwritten progress for the next flush."""
        progress = conn.take_progress()
        with self._lock:
            for aid, value, metrics in progress:
                self._left[aid] = (value, metrics)
            self._open.discard(conn)
            if conn.client_id is not None and self._conns.get(conn.client_id) is conn:
                del self._conns[conn.client_id]
            if self._stopping and not self._conns:
                self._drained.set()

    def count(self) -> int:
        return len(self._conns)

    def ring(self, client_ids: Iterable[str] | None, made: Iterable[Made] = ()) -> None:
        """Reconcile these local clients (None: all of them) as soon as possible; ``made``:
        new assignments of theirs, to push without reading them (:meth:`_push_made`)."""
        with self._lock:
            if client_ids is None:
                self._everyone = True
            else:
                carried = set()
                for m in made:
                    if m.client_id in self._conns:
                        self._made[m.client_id].append(m)
                        carried.add(m.client_id)
                self._pending.update(c for c in client_ids if c in self._conns and c not in carried)
                if not self._pending and not self._made:
                    return
        self._wake.set()

    # --- the loop ---

    def _loop(self) -> None:
        """Serve rings as they come; every ``interval`` s reconcile every local client too, a
        chunk at a time between rings, so a push never waits behind a pass over thousands.
        The chunks are spread over the first half of the interval (FULL_PASS_SPREAD): back to
        back, 30 of them with 3,000 clients took the process's CPU for half a second, and
        every push waited behind them. At most FULL_PASS_RATE clients a second: with more
        connections than ``interval`` x that, the pass comes less often (3,000: every 15 s;
        10,000: every 50 s). Every change is rung for; the pass only catches a lost ring, and
        at 3,000 clients every 5 s it raised the median push by half while it ran."""
        backlog: list[str] = []  # what is left of the periodic pass over every client
        next_full = time.monotonic() + self.interval
        next_chunk = pace = 0.0
        while True:
            due = next_chunk if backlog else next_full
            self._wake.wait(timeout=max(0.0, due - time.monotonic()))
            self._wake.clear()
            with self._lock:
                pending, self._pending = self._pending, set()
                made, self._made = self._made, defaultdict(list)
                if self._everyone or time.monotonic() >= next_full:
                    self._everyone = False
                    backlog = sorted(self._conns)
                    period = full_pass_period(len(backlog), self.interval)
                    next_full = time.monotonic() + period
                    pace = period * FULL_PASS_SPREAD / max(1, -(-len(backlog) // FULL_PASS_CHUNK))
                    next_chunk = time.monotonic()
            chunk: list[str] = []
            if backlog and time.monotonic() >= next_chunk:
                chunk, backlog = backlog[:FULL_PASS_CHUNK], backlog[FULL_PASS_CHUNK:]
                next_chunk += pace
            ids = pending.union(chunk)
            ids.update(self._push_made({c: rows for c, rows in made.items() if c not in ids}))
            if not ids:
                continue
            try:
                self.reconcile(sorted(ids))
            except Exception as error:  # the database may be down: keep serving, try again later
                log.warning("event=hub_pass state=failed error=%s", type(error).__name__)
                with self._lock:
                    self._pending.update(ids)
                time.sleep(min(self.interval, 1.0))

    def _flush_loop(self, collector: gcpause.Collector) -> None:
        """Every ``interval`` s write batched progress and last_seen (:meth:`flush`), beside the
        reconcile loop rather than in it; and keep full garbage collections short (app/gcpause.py)."""
        last = time.monotonic()
        while True:  # a flush takes part of the period (its spread touches): the period stays
            time.sleep(max(0.0, last + self.interval - time.monotonic()))
            last = time.monotonic()
            collector.tick()
            try:
                self.flush()
            except Exception as error:  # the database may be down: what was not written is kept
                log.warning("event=hub_flush state=failed error=%s", type(error).__name__)

    def _ping_loop(self) -> None:
        """Every ``ping_interval`` s, a WebSocket ping to every open socket, a chunk at a time
        spread over the interval; a socket whose previous ping got no pong is closed
        (:meth:`app.ws.Connection.ping`). simple-websocket can do it per socket, but then every
        socket waits for its next frame in a selector of its own: that wait cost nearly half
        of the web process's CPU at 10,000 clients (progress taken in: 10,000/s with it,
        17,000/s without; bench/load.py)."""
        while True:
            started = time.monotonic()
            with self._lock:
                conns = list(self._open)
            for chunk in paced(conns, FULL_PASS_CHUNK, self.ping_interval):
                for conn in chunk:
                    conn.ping()
            time.sleep(max(0.0, started + self.ping_interval - time.monotonic()))

    def _young_loop(self, collector: gcpause.Collector) -> None:
        """Young garbage collections on a timer, each small (app/gcpause.py)."""
        while True:
            time.sleep(gcpause.YOUNG_EVERY)
            collector.young()

    def _push_made(self, made: dict[str, list[Made]]) -> set[str]:
        """Push new assignments as the scheduler's ring carried them; returns the clients
        left to reconcile from the database instead (a task whose spec is not cached here).

        Only ``task`` messages: what the ring did not say (pauses, assignments that ended) is
        the next reconcile's. An assignment that ended between its commit and this push (within
        milliseconds) is sent anyway, and stopped by the next reconcile."""
        left: set[str] = set()
        for client_id, rows in made.items():
            if any(m.task_id not in self._specs for m in rows):
                left.add(client_id)
                continue
            conn = self._conns.get(client_id)
            if conn is not None:
                rows_open = [m.as_open(self._specs[m.task_id]) for m in rows]
                metrics.pushed("ring", conn.apply(rows_open, complete=False))
        return left

    def reconcile(self, client_ids: list[str]) -> None:
        if len(self._specs) > 10_000:
            self._specs.clear()
        # first: one pass serves many sockets; it does not queue behind a burst of single messages
        rows = self.db.run(lambda s: assignments.open_for_clients(s, client_ids, self._specs), first=True)
        by_client: dict[str, list[assignments.Open]] = defaultdict(list)
        for row in rows:
            by_client[row.client_id].append(row)
        for client_id in client_ids:
            conn = self._conns.get(client_id)
            if conn is not None:
                metrics.pushed("read", conn.apply(by_client.get(client_id, [])))

    def flush(self) -> None:
        """Write batched progress and reported utilization, refresh last_seen of a slice of
        the local connections, and close those of the slice that the database no longer knows.

        Progress that could not be written (the database is down) is kept for the next flush;
        utilization is a sample, and the next report replaces it."""
        conns = list(self._conns.values())
        with self._lock:
            latest, self._left = self._left, {}
            reported, self._reported = self._reported, set()
        utilization: dict[str, dict[str, Any]] = {}
        # Only the connections that reported since the last flush: going through all 10,000
        # took 120 ms of the process, and the task_requests answered meanwhile waited.
        for i, conn in enumerate(reported):
            if i % YIELD_EVERY == YIELD_EVERY - 1:
                # Let the sockets be served (10,000 in a row took 40 ms of CPU). A positive
                # sleep: gevent runs a sleep(0) again before it polls the sockets.
                time.sleep(YIELD_S)
            for aid, value, values in conn.take_progress():
                latest[aid] = (value, values)
            if (report := conn.take_utilization()) is not None:
                utilization[conn.conn_id] = report
        # last_seen: a slice of the connections each flush (below)
        self._flushes += 1
        turn = self._flushes % self.touch_slices
        due = [conn for conn in conns if conn.slice % self.touch_slices == turn]
        if not conns and not latest:
            return
        progress = [(aid, value, metrics) for aid, (value, metrics) in latest.items()]
        now = utcnow()

        # Progress in short transactions of PROGRESS_CHUNK assignments: a result waits for the
        # row of its assignment, and one transaction over 10,000 rows kept them locked for seconds.
        written = 0
        try:
            for start in range(0, len(progress), PROGRESS_CHUNK):
                part = progress[start : start + PROGRESS_CHUNK]

                def write(s: Session, part: list[tuple[int, float, dict[str, Any]]] = part) -> None:
                    assignments.record_progress(s, part, now)

                self.db.run(write, first=True)
                written = start + len(part)
        except Exception:
            with self._lock:  # kept, unless a newer report of the same assignment came meanwhile
                for aid, value, metrics in progress[written:]:
                    self._left.setdefault(aid, (value, metrics))
            raise
        if utilization:
            self.db.run(lambda s: clients.record_utilization(s, utilization, now), first=True)
        # last_seen: a slice of the connections each flush, so each is refreshed (and checked:
        # is it still its client's?) every ``touch_slices`` flushes, well within
        # CONNECTION_TIMEOUT; a short transaction per chunk, so that client rows are never
        # locked long (the scheduler skips locked rows, and a request waits for its row).
        # All of them every flush took 0.2 s of the process's CPU every 5 s at 3,000 clients.
        # The chunks are spread over part of the period: 3,300 rows at once (every 5 s at 10,000
        # clients) kept MariaDB busy and the rows locked for 200 ms, and the task_requests of
        # that moment, whose intake writes the same rows, waited (p99 at a steady 500/s).
        for chunk in paced(due, TOUCH_CHUNK, self.interval * TOUCH_SPREAD):
            ids = [c.conn_id for c in chunk]

            def touch(s: Session, ids: list[str] = ids) -> set[str]:
                return clients.touch(s, ids, utcnow())

            alive = self.db.run(touch, first=True)
            for conn in chunk:
                if conn.conn_id not in alive:
                    conn.close_superseded()

    # --- shutdown ---

    def shutdown(self, timeout: float) -> None:
        """Before the process exits: close every socket with 1012 (Service Restart) so its
        client reconnects now, wait up to ``timeout`` seconds for the sockets to end (what a
        client sent before our close is still handled), then write the batched progress.

        Safe to call again (a second call writes whatever is left); connections registering
        after the first call are closed the same way."""
        with self._lock:
            self._stopping = True
            conns = list(self._conns.values())
            if not conns:
                self._drained.set()
        if conns:
            log.info("event=shutdown state=closing connections=%d", len(conns))
        for conn in conns:
            close_for_restart(conn)
        if not self._drained.wait(timeout):
            log.warning("event=shutdown state=timeout open_connections=%d", len(self._conns))
        try:
            self.flush()
        except Exception as error:
            log.error("event=shutdown state=flush_failed error=%s", type(error).__name__)


def full_pass_period(connections: int, interval: float) -> float:
    """Seconds between two periodic passes over every local client: ``interval``, or longer
    when that would reconcile more than FULL_PASS_RATE clients a second."""
    return max(interval, connections / FULL_PASS_RATE)


def paced(items: list[T], size: int, seconds: float) -> Iterator[list[T]]:
    """``items`` in chunks of ``size``, the chunks spread evenly over ``seconds``: the first at
    once, each next one when its share of the time has passed (the caller's work included)."""
    chunks = [items[start : start + size] for start in range(0, len(items), size)]
    started = time.monotonic()
    for n, chunk in enumerate(chunks):
        if n:
            time.sleep(max(0.0, started + n * seconds / len(chunks) - time.monotonic()))
        yield chunk


def close_for_restart(conn: Connection) -> None:
    """Close a client's socket with 1012 (Service Restart): the client reconnects, keeping its
    id, and is sent its open assignments again wherever it lands."""
    with contextlib.suppress(Exception):  # it may be closed already
        conn.ws.close(reason=CLOSE_SERVICE_RESTART, message="server restarting; reconnect")
