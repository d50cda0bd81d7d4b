"""Admin control reaches the clients: pause, resume, stop, delete, disable, enable."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from store.db import Database
from tests.conftest import rows
from tests.helpers import WsClient, request, wait_for

pytestmark = pytest.mark.usefixtures("clean")


@pytest.fixture
def pair(server: int) -> Iterator[tuple[WsClient, WsClient]]:
    a, b = WsClient(server).register(), WsClient(server).register()
    yield a, b
    a.close()
    b.close()


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
    assert [m for m in a.silent(1.0) if m["type"] == "task"] == []
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
    assert [m for m in b.silent(1.0) if m["type"] == "task"] == []
    assert rows(db, "SELECT status FROM task_assignments WHERE task_id = :t", t=task["id"]) == [("released",)]
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
