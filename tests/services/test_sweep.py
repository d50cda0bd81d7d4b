"""The timeout sweep, run by the real worker: silent clients become inactive, their work moves once."""

from __future__ import annotations

from datetime import timedelta

import pytest
from celery import Celery

from store import clients as client_store
from store.db import Database
from store.models import Client, utcnow
from tests.conftest import rows
from tests.helpers import WsClient, request, wait_for

pytestmark = pytest.mark.usefixtures("clean")


def silence(db: Database, client_id: str, seconds: int) -> None:
    """Pretend the client was last heard from ``seconds`` ago."""
    with db.session() as s:
        row = s.get(Client, client_id)
        assert row is not None
        row.last_seen = utcnow() - timedelta(seconds=seconds)


def test_a_silent_client_is_swept_and_its_shard_rescheduled_exactly_once(
    server: int, db: Database, celery_client: Celery
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
        assert [m for m in waiting.silent(1.0) if m["type"] == "task"] == []  # not before the timeout

        silence(db, gone.client_id, 3600)
        for _ in range(3):  # overlapping sweeps: the release still happens once
            celery_client.send_task("workers.tasks.sweep")
        again = waiting.next_task()
        assert (again["id"], again["rank"]) == (got["id"], got["rank"])

        history = rows(
            db, "SELECT client_id, status FROM task_assignments WHERE task_id = :t ORDER BY id", t=task["id"]
        )
        assert history == [(gone.client_id, "released"), (waiting.client_id, "assigned")]
        assert rows(db, "SELECT status FROM clients WHERE id = :c", c=gone.client_id) == [("inactive",)]
        assert rows(db, "SELECT attempts FROM task_shards WHERE task_id = :t", t=task["id"]) == [(0,)]
        assert [m for m in waiting.silent(1.0) if m["type"] == "task"] == []
    finally:
        waiting.close()


def test_connected_clients_are_not_swept(server: int, db: Database, celery_client: Celery) -> None:
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
        celery_client.send_task("workers.tasks.sweep")
        request(server, "POST", "/api/tasks", {"type": "echo"})
        alive.request_task()
        alive.next_task()
        assert rows(db, "SELECT status FROM clients WHERE id = :c", c=alive.client_id) == [("active",)]
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
