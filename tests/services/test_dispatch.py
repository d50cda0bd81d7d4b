"""Registration, requests, scheduling and results over real sockets, a real worker, MariaDB and Redis."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from store.db import Database
from tests.conftest import mysql_connect, rows
from tests.helpers import WsClient, free_port, request, start_embedded, wait_for
from tests.services.test_control import after_a_scheduling_run

pytestmark = pytest.mark.usefixtures("clean")


@pytest.fixture
def clients(server: int) -> Iterator[list[WsClient]]:
    made: list[WsClient] = []
    yield made
    for c in made:
        c.close()


def connect(server: int, made: list[WsClient], **hardware: object) -> WsClient:
    client = WsClient(server).register(**hardware)
    made.append(client)
    return client


def create_task(server: int, **body: object) -> dict:
    status, task = request(server, "POST", "/api/tasks", {"type": "echo", **body})
    assert status == 201, task
    return task


def wait_queued(db: Database, *task_ids: int) -> None:
    """Tasks are prepared by the worker; wait until their shards exist."""
    for task_id in task_ids:
        wait_for(
            lambda t=task_id: rows(db, "SELECT id FROM task_shards WHERE task_id = :t", t=t), what="shards"
        )


def task_of(server: int, task_id: int) -> dict:
    status, task = request(server, "GET", f"/api/tasks/{task_id}")
    assert status == 200, task
    return task


def test_register_issues_an_id_and_a_token_once(server: int, clients: list[WsClient], db: Database) -> None:
    client = connect(server, clients)
    assert client.client_id and client.token
    (token_hash,) = rows(db, "SELECT token_hash FROM clients WHERE id = :id", id=client.client_id)[0]
    assert token_hash != client.token and len(token_hash) == 64  # stored hashed

    again = WsClient(server)
    clients.append(again)
    again.client_id, again.token = client.client_id, client.token
    again.send(
        {"type": "register", **WsClient.HARDWARE, "client_id": client.client_id, "token": client.token}
    )
    reply = again.expect("registered")
    assert reply == {"type": "registered", "client_id": client.client_id}  # no new token


def test_a_request_is_remembered_until_work_appears(server: int, clients: list[WsClient]) -> None:
    client = connect(server, clients)
    client.request_task()
    assert client.silent(1.0) == []
    task = create_task(server, config={"note": "hello"})
    got = client.next_task()
    assert got["id"] == task["id"]
    assert got["config"]["note"] == "hello"
    assert (got["rank"], got["num_shards"], got["round"]) == (0, 1, 0)
    assert task_of(server, task["id"])["status"] == "running"


def test_a_waiting_client_locked_at_scheduling_time_is_served_once_free(
    server: int, clients: list[WsClient], db: Database, mysql_url: str, run_dir: Path
) -> None:
    """SKIP LOCKED skips a client row that someone else holds for a moment (the web tier
    refreshing last_seen does, every RECONCILE_INTERVAL). The run that skipped it must look
    again: no beat runs here, so nothing else would serve the client."""
    client = connect(server, clients)
    client.request_task()
    wait_for(
        lambda: rows(db, "SELECT pending_requests FROM clients WHERE id = :c", c=client.client_id) == [(1,)],
        what="request recorded",
    )
    log = run_dir / "logs" / "server.log"
    lock = mysql_connect(make_url(mysql_url).database)
    try:
        with lock.cursor() as cur:
            cur.execute("START TRANSACTION")
            cur.execute("SELECT id FROM clients WHERE id = %s FOR UPDATE", (client.client_id,))
        task = create_task(server)
        prepared = f"event=prepare_task task={task['id']} "

        def ran_after_prepare() -> bool:
            lines = log.read_text().splitlines()
            at = next((i for i, line in enumerate(lines) if prepared in line), None)
            return at is not None and any(
                "workers.tasks.schedule[" in line and "succeeded" in line for line in lines[at:]
            )

        wait_for(ran_after_prepare, what="a scheduling run while the client row is locked")
        assert [m for m in client.silent(0.5) if m["type"] == "task"] == []
    finally:
        lock.commit()
        lock.close()
    assert client.next_task(timeout=15)["id"] == task["id"]


def test_shards_go_to_distinct_clients_and_results_are_combined(server: int, clients: list[WsClient]) -> None:
    workers = [connect(server, clients) for _ in range(3)]
    task = create_task(server, config={"num_shards": 3})
    for w in workers:
        w.request_task()
    got = {w.client_id: w.next_task() for w in workers}
    assert sorted(t["rank"] for t in got.values()) == [0, 1, 2]
    assert all(t["num_shards"] == 3 for t in got.values())
    for w in workers:
        t = got[w.client_id]
        w.result(t, loss=float(t["rank"]))
    done = wait_for(
        lambda: (t := task_of(server, task["id"]))["status"] == "completed" and t, what="completion"
    )
    assert done["result"]["metrics"] == {"loss": 1.0}
    assert set(done["result"]["ranks"]) == {"0", "1", "2"}


def test_a_failed_rank_goes_to_another_client_then_fails_the_task(
    server: int, clients: list[WsClient], db: Database
) -> None:
    a, b, c, d = (connect(server, clients) for _ in range(4))
    task = create_task(server)  # MAX_SHARD_ATTEMPTS=3
    for attempt, w in enumerate((a, b, c)):
        w.request_task()
        got = w.next_task()
        assert got["id"] == task["id"]
        w.send({"type": "task_result", "task_id": task["id"], "status": "failed", "error": f"boom {attempt}"})
    failed = wait_for(
        lambda: (t := task_of(server, task["id"]))["status"] == "failed" and t, what="task failed"
    )
    assert "boom 0" in failed["error_log"] and "boom 2" in failed["error_log"]
    d.request_task()
    assert [m for m in d.silent(1.0) if m["type"] == "task"] == []
    assert rows(db, "SELECT attempts, status FROM task_shards WHERE task_id = :t", t=task["id"]) == [
        (3, "failed")
    ]


def test_requirements_and_priority_decide_who_gets_what(
    server: int, clients: list[WsClient], db: Database
) -> None:
    cpu = connect(server, clients)
    gpu = connect(server, clients, gpu_info=[{"name": "A100", "memory_gb": 40}])
    needs_gpu = create_task(server, requirements={"gpu_count": 1, "gpu_memory_gb": 24})
    low = create_task(server, priority=1)
    high = create_task(server, priority=5)
    wait_queued(db, needs_gpu["id"], low["id"], high["id"])
    cpu.request_task()
    assert cpu.next_task()["id"] == high["id"]
    cpu.request_task()
    assert cpu.next_task()["id"] == low["id"]
    cpu.request_task()
    assert cpu.silent(1.0) == []  # the GPU task does not fit
    gpu.request_task()
    assert gpu.next_task()["id"] == needs_gpu["id"]


def test_a_client_holds_at_most_max_tasks_per_client(
    server: int, clients: list[WsClient], db: Database
) -> None:
    client = connect(server, clients)
    wait_queued(db, *(create_task(server)["id"] for _ in range(5)))
    for _ in range(3):
        client.request_task()
    got = [client.next_task() for _ in range(3)]
    assert len({t["id"] for t in got}) == 3
    # Two more requests while it holds three: remembered, not served. (Five requests sent at
    # once would be capped at three outstanding and all served: nothing left to remember.)
    client.request_task()
    client.request_task()
    wait_for(
        lambda: rows(db, "SELECT pending_requests FROM clients WHERE id = :c", c=client.client_id) == [(2,)],
        what="two requests remembered",
    )
    after_a_scheduling_run(server)  # it read the two requests and had nothing it could give
    assert [m for m in client.silent(0.5) if m["type"] == "task"] == []
    client.result(got[0])  # load drops: the remembered request is served
    assert client.next_task()["id"] not in {t["id"] for t in got}


def test_a_reconnecting_client_gets_its_assignment_again(server: int, clients: list[WsClient]) -> None:
    first = connect(server, clients)
    task = create_task(server)
    first.request_task()
    got = first.next_task()
    assert got["id"] == task["id"]
    first.close()
    again = WsClient(server)
    clients.append(again)
    again.client_id, again.token = first.client_id, first.token
    again.register()
    assert again.next_task() == got


def test_a_second_connection_of_a_client_supersedes_the_first(server: int, clients: list[WsClient]) -> None:
    first = connect(server, clients)
    second = WsClient(server)
    clients.append(second)
    second.client_id, second.token = first.client_id, first.token
    second.register()
    assert first.expect_error("superseded")["message"]
    second.request_task()  # the new connection is the one that works
    create_task(server)
    assert second.next_task()["type"] == "echo"


def test_python_m_app_serves_the_web_tier_alone_beside_gunicorn(
    server: int, prod_env: dict[str, str], run_dir: Path, clients: list[WsClient]
) -> None:
    """`python -m app` with REDIS_URL set: no in-process worker; the session's Celery worker
    schedules, and the Redis doorbell reaches this process's sockets."""
    port = free_port()
    web = start_embedded(prod_env, port, run_dir / "procs")
    try:
        status, health = request(port, "GET", "/healthz", token=None)
        assert (status, health["mode"]) == (200, "production")
        client = WsClient(port).register()
        clients.append(client)
        client.request_task()
        task = create_task(server)  # submitted through gunicorn, delivered by the other process
        assert client.next_task()["id"] == task["id"]
    finally:
        web.stop()
