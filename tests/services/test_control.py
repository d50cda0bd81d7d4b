"""Admin control reaches the clients: pause, resume, stop, delete, disable, enable.

The web process here reconciles its sockets only hourly, so every push these tests see was
delivered by the doorbell (Redis pub/sub): a broken doorbell fails them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from store.db import Database
from tests.conftest import rows
from tests.helpers import Proc, WsClient, free_port, request, start_gunicorn, wait_for
from tests.services.test_metrics import scrape, value

pytestmark = pytest.mark.usefixtures("clean")


@pytest.fixture(scope="module")
def server(prod_env: dict[str, str], worker: Proc, run_dir: Path) -> Iterator[int]:
    """gunicorn as the session's, but with the periodic reconcile hourly: only rings deliver."""
    port = free_port()
    proc = start_gunicorn({**prod_env, "RECONCILE_INTERVAL": "3600"}, port, run_dir / "procs")
    yield port
    proc.stop()


@pytest.fixture
def pair(server: int) -> Iterator[tuple[WsClient, WsClient]]:
    a, b = WsClient(server).register(), WsClient(server).register()
    yield a, b
    a.close()
    b.close()


def requested(db: Database, client: WsClient) -> None:
    wait_for(
        lambda: rows(db, "SELECT pending_requests FROM clients WHERE id = :c", c=client.client_id) == [(1,)],
        what="the request recorded",
    )


def after_a_scheduling_run(server: int) -> None:
    """Return once a scheduling run has served a client that asked after every request made
    so far. That run read those requests too (waiting clients are served oldest first, in the
    same transaction), so whatever it did not hand them, it had nothing to hand."""
    witness = WsClient(server).register(ram_info={"total_gb": 64})
    try:
        status, task = request(
            server, "POST", "/api/tasks", {"type": "echo", "priority": 100, "requirements": {"ram_gb": 64}}
        )
        assert status == 201  # only the witness has the memory for it; before any other queued
        witness.request_task()
        assert witness.next_task()["id"] == task["id"]
    finally:
        witness.close()


def running_task(server: int, holders: list[WsClient], shards: int = 1) -> dict:
    status, task = request(server, "POST", "/api/tasks", {"type": "echo", "config": {"num_shards": shards}})
    assert status == 201
    for h in holders:
        h.request_task()
        assert h.next_task()["id"] == task["id"]
    return task


def put_status(server: int, task_id: int, target: str) -> dict:
    status, body = request(server, "PUT", f"/api/tasks/{task_id}/status", {"status": target})
    assert status == 200, body
    return body


def pushed(server: int) -> dict[str, float]:
    samples = scrape(server)
    return {src: value(samples, "aifarm_tasks_pushed_total", source=src) for src in ("ring", "read")}


@pytest.fixture
def one_process(prod_env: dict[str, str], worker: Proc, run_dir: Path) -> Iterator[int]:
    """One web process (its spec cache is the one both clients meet), reconciling hourly."""
    port = free_port()
    proc = start_gunicorn({**prod_env, "RECONCILE_INTERVAL": "3600"}, port, run_dir / "procs", workers=1)
    yield port
    proc.stop()


def test_a_new_assignment_is_pushed_from_the_schedulers_ring_as_a_read_would_push_it(
    one_process: int,
) -> None:
    """The scheduler's ring carries what it committed. The first assignment of a task is read
    back (this web process has not seen the task's spec yet); the next is pushed as the ring
    carried it, without a read, and is the same message."""
    server = one_process
    a, b = WsClient(server).register(), WsClient(server).register()
    status, task = request(server, "POST", "/api/tasks", {"type": "echo", "config": {"num_shards": 2}})
    assert status == 201
    start = pushed(server)
    a.request_task()
    first = a.next_task()
    read = pushed(server)
    assert (read["ring"] - start["ring"], read["read"] - start["read"]) == (0, 1)
    b.request_task()
    second = b.next_task()
    rung = pushed(server)
    assert (rung["ring"] - read["ring"], rung["read"] - read["read"]) == (1, 0)
    assert first["id"] == second["id"] == task["id"]
    assert {first["rank"], second["rank"]} == {0, 1}
    assert {k: v for k, v in first.items() if k != "rank"} == {k: v for k, v in second.items() if k != "rank"}
    a.close()
    b.close()


def test_pause_and_resume_reach_every_holder(server: int, pair: tuple[WsClient, WsClient]) -> None:
    a, b = pair
    task = running_task(server, [a, b], shards=2)
    assert put_status(server, task["id"], "paused")["status"] == "paused"
    for c in (a, b):
        assert c.expect("pause") == {"type": "pause", "task_id": task["id"]}
    assert put_status(server, task["id"], "running")["status"] == "running"
    for c in (a, b):
        assert c.expect("resume") == {"type": "resume", "task_id": task["id"]}


def test_a_paused_task_is_not_scheduled_until_resumed(
    server: int, pair: tuple[WsClient, WsClient], db: Database
) -> None:
    a, _ = pair
    status, task = request(server, "POST", "/api/tasks", {"type": "echo"})
    assert status == 201
    wait_for(
        lambda: rows(db, "SELECT status FROM task_shards WHERE task_id = :t", t=task["id"]), what="shard"
    )
    put_status(server, task["id"], "paused")
    a.request_task()
    requested(db, a)
    after_a_scheduling_run(server)
    assert rows(db, "SELECT COUNT(*) FROM task_assignments WHERE task_id = :t", t=task["id"]) == [(0,)]
    assert [m for m in a.inbox if m["type"] == "task"] == []
    assert put_status(server, task["id"], "running")["status"] == "pending"  # never ran yet
    assert a.next_task()["id"] == task["id"]


def test_stop_tells_holders_and_frees_nothing_for_others(
    server: int, pair: tuple[WsClient, WsClient], db: Database
) -> None:
    a, b = pair
    task = running_task(server, [a])
    put_status(server, task["id"], "stopped")
    assert a.expect("stop") == {"type": "stop", "task_id": task["id"]}
    b.request_task()
    requested(db, b)
    after_a_scheduling_run(server)
    assert rows(db, "SELECT status FROM task_assignments WHERE task_id = :t", t=task["id"]) == [("released",)]
    assert [m for m in b.inbox if m["type"] == "task"] == []
    a.result({"id": task["id"], "round": 0})  # too late: the task is stopped
    a.expect_error("not_assigned")


def test_delete_stops_first_then_deletes(server: int, pair: tuple[WsClient, WsClient], db: Database) -> None:
    a, _ = pair
    task = running_task(server, [a])
    status, body = request(server, "DELETE", f"/api/tasks/{task['id']}")
    assert (status, body) == (200, {"deleted": task["id"]})
    assert a.expect("stop") == {"type": "stop", "task_id": task["id"]}
    assert request(server, "GET", f"/api/tasks/{task['id']}")[0] == 404
    for table in ("tasks", "task_shards", "task_assignments"):
        column = "id" if table == "tasks" else "task_id"
        assert rows(db, f"SELECT COUNT(*) FROM {table} WHERE {column} = :t", t=task["id"]) == [(0,)]


def test_disable_releases_work_to_others_and_enable_restores(
    server: int, pair: tuple[WsClient, WsClient], db: Database
) -> None:
    a, b = pair
    task = running_task(server, [a])
    b.request_task()
    status, body = request(server, "PUT", f"/api/clients/{a.client_id}/status", {"status": "disabled"})
    assert status == 200 and body["disabled"] is True
    assert a.expect("stop") == {"type": "stop", "task_id": task["id"]}
    assert b.next_task()["id"] == task["id"]  # the released shard went to the waiting client
    a.request_task()
    a.expect_error("client_disabled")
    status, body = request(server, "PUT", f"/api/clients/{a.client_id}/status", {"status": "enabled"})
    assert status == 200 and body["disabled"] is False
    request(server, "POST", "/api/tasks", {"type": "echo"})
    a.request_task()
    assert a.next_task()["type"] == "echo"
