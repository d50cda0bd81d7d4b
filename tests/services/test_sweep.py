"""The timeout sweep, run by the real worker: silent clients become inactive, their work moves once."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import timedelta

import pytest
from celery import Celery

from store import clients as client_store
from store.db import Database
from store.models import Client, utcnow
from tests.conftest import mysql_connect, rows
from tests.helpers import Proc, WsClient, request, wait_for

pytestmark = pytest.mark.usefixtures("clean")

FINISHED = re.compile(r"task=sweep state=finish [^\n]*")


def sweep(
    celery_client: Celery, worker: Proc, times: int = 1, then: Callable[[], object] | None = None
) -> list[str]:
    """Send ``times`` sweeps to the worker, call ``then`` (if given), wait for every one of them
    to finish, and return their log lines (``task=sweep state=finish expired=…``)."""
    start = len(worker.output())
    for _ in range(times):
        celery_client.send_task("workers.tasks.sweep")
    if then is not None:
        then()

    def finished() -> list[str]:
        found = FINISHED.findall(worker.output()[start:])
        return found if len(found) >= times else []

    return wait_for(finished, 30, what=f"{times} sweep(s) finished")


def waiting_on_client_row(database: str) -> int:
    """Sweeps inside their transaction, waiting on a client's row (the expiry's compare-and-set)."""
    monitor = mysql_connect()
    try:
        with monitor.cursor() as cur:
            cur.execute(
                "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE db = %s AND command = 'Query' "
                "AND info LIKE 'UPDATE clients SET status%%'",
                (database,),
            )
            return int(cur.fetchone()[0])  # type: ignore[index]
    finally:
        monitor.close()


def silence(db: Database, client_id: str, seconds: int) -> None:
    """Pretend the client was last heard from ``seconds`` ago."""
    with db.session() as s:
        row = s.get(Client, client_id)
        assert row is not None
        row.last_seen = utcnow() - timedelta(seconds=seconds)


def test_a_silent_client_is_swept_and_its_shard_rescheduled_exactly_once(
    server: int, worker: Proc, db: Database, celery_client: Celery, mysql_url: str
) -> None:
    gone, waiting = WsClient(server).register(), WsClient(server).register()
    try:
        status, task = request(server, "POST", "/api/tasks", {"type": "echo"})
        assert status == 201
        gone.request_task()
        got = gone.next_task()
        gone.close()  # disconnects; keeps its assignment until CONNECTION_TIMEOUT
        wait_for(
            lambda: rows(db, "SELECT conn_id FROM clients WHERE id = :c", c=gone.client_id) == [(None,)],
            what="disconnect recorded",
        )
        waiting.request_task()
        wait_for(
            lambda: (
                rows(db, "SELECT pending_requests FROM clients WHERE id = :c", c=waiting.client_id) == [(1,)]
            ),
            what="the request recorded",
        )

        # Not before the timeout: a sweep runs (and finishes) while the client is merely away.
        (line,) = sweep(celery_client, worker)
        assert "expired=0 released=0" in line
        assert rows(
            db, "SELECT client_id, status FROM task_assignments WHERE task_id = :t", t=task["id"]
        ) == [(gone.client_id, "assigned")]
        assert rows(db, "SELECT status FROM clients WHERE id = :c", c=gone.client_id) == [("active",)]

        # Overlapping sweeps: with the client's row locked, two sweeps (the worker runs two jobs
        # at once) reach the expiry's compare-and-set and wait there, inside their transactions,
        # while a third waits for a free slot. Then the row is let go.
        silence(db, gone.client_id, 3600)
        database = mysql_url.rsplit("/", 1)[1]
        lock = mysql_connect(database)
        lock.begin()
        try:
            with lock.cursor() as cur:
                cur.execute("SELECT id FROM clients WHERE id = %s FOR UPDATE", (gone.client_id,))

            def overlap_then_release() -> None:
                wait_for(lambda: waiting_on_client_row(database) == 2, 30, what="two sweeps at once")
                lock.rollback()

            lines = sweep(celery_client, worker, 3, then=overlap_then_release)
        finally:
            lock.close()
        released = [line for line in lines if "expired=1 released=1" in line]
        assert len(released) == 1, lines  # one sweep won the client; the others found it gone
        assert all("expired=0 released=0" in line for line in lines if line not in released), lines

        again = waiting.next_task()
        assert (again["id"], again["rank"]) == (got["id"], got["rank"])
        history = rows(
            db, "SELECT client_id, status FROM task_assignments WHERE task_id = :t ORDER BY id", t=task["id"]
        )
        assert history == [(gone.client_id, "released"), (waiting.client_id, "assigned")]
        assert rows(db, "SELECT status FROM clients WHERE id = :c", c=gone.client_id) == [("inactive",)]
        assert rows(db, "SELECT attempts FROM task_shards WHERE task_id = :t", t=task["id"]) == [(0,)]
        # Nothing else was pushed to it: everything sent before the pause below came first.
        assert request(server, "PUT", f"/api/tasks/{task['id']}/status", {"status": "paused"})[0] == 200
        waiting.expect("pause")
        assert [m for m in waiting.inbox if m["type"] == "task"] == []
    finally:
        waiting.close()


def test_connected_clients_are_not_swept(
    server: int, worker: Proc, db: Database, celery_client: Celery
) -> None:
    alive = WsClient(server).register()
    try:
        silence(db, alive.client_id, 3600)  # the web tier refreshes last_seen of live sockets
        wait_for(
            lambda: (
                rows(
                    db,
                    "SELECT last_seen > :t FROM clients WHERE id = :c",
                    t=utcnow() - timedelta(seconds=60),
                    c=alive.client_id,
                )
                == [(1,)]
            ),
            what="last_seen refreshed",
        )
        (line,) = sweep(celery_client, worker)
        assert "expired=0" in line
        assert rows(db, "SELECT status FROM clients WHERE id = :c", c=alive.client_id) == [("active",)]
        request(server, "POST", "/api/tasks", {"type": "echo"})
        alive.request_task()
        alive.next_task()
    finally:
        alive.close()


def test_a_sweep_is_bounded_and_idempotent(db: Database) -> None:
    now = utcnow()
    with db.session() as s:
        for i in range(5):
            s.add(
                Client(
                    id=f"c-stale-{i}",
                    cpu_info={},
                    ram_info={},
                    token_hash="x" * 64,
                    status="active",
                    last_seen=now - timedelta(hours=1),
                    created_at=now,
                )
            )
    cutoff = now - timedelta(seconds=60)
    first = db.run(lambda s: client_store.expire(s, cutoff, now, limit=2, max_attempts=3))
    assert len(first) == 2
    rest = db.run(lambda s: client_store.expire(s, cutoff, now, limit=100, max_attempts=3))
    assert len(rest) == 3
    assert db.run(lambda s: client_store.expire(s, cutoff, now, limit=100, max_attempts=3)) == []
