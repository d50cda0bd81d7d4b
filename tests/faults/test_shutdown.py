"""Graceful shutdown: SIGTERM of the web process with clients connected, and of a Celery
worker in the middle of a job. Real processes; the database says afterwards what survived."""

from __future__ import annotations

import json
import os
import re
import signal
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pymysql
import pytest
import websocket
from celery import Celery

from launch import start_clients
from store import task_admin
from store.db import Database
from store.models import utcnow
from tests.conftest import mysql_connect, rows, service_env
from tests.faults.test_outages import RedisServer
from tests.helpers import (
    Proc,
    WsClient,
    free_port,
    request,
    start_embedded,
    start_gunicorn,
    start_worker,
    wait_for,
)

pytestmark = pytest.mark.usefixtures("clean")

RESTART = 1012  # WebSocket close code "Service Restart": reconnect


def close_frame(client: WsClient, timeout: float = 15.0) -> tuple[int, str]:
    """Read until the server closes the socket; its close code and reason."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        client.ws.settimeout(left)
        try:
            opcode, data = client.ws.recv_data(control_frame=True)
        except websocket.WebSocketTimeoutException:
            break
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            code = struct.unpack("!H", data[:2])[0] if len(data) >= 2 else 0
            return code, data[2:].decode(errors="replace")
    raise AssertionError(f"the server did not close the socket within {timeout}s")


def exits(proc: Proc, timeout: float) -> int:
    """The exit status of ``proc``, which must end within ``timeout`` seconds."""
    try:
        return proc.popen.wait(timeout)
    except Exception as error:
        raise AssertionError(
            f"{proc.name} still running {timeout}s after SIGTERM:\n{proc.output()}"
        ) from error


def assert_clean_exit(output: str) -> None:
    assert "BlockingSwitchOutError" not in output, output
    assert "Traceback" not in output, output


def send_progress(client: WsClient, task: dict[str, Any], progress: float) -> None:
    client.send(
        {
            "type": "task_progress",
            "task_id": task["id"],
            "round": task["round"],
            "progress": progress,
            "metrics": {"step": progress},
        }
    )


# --- the web process ---


def test_sigterm_of_the_embedded_server_with_clients_connected(tmp_path: Path) -> None:
    # Progress is written by the periodic flush (hourly here) or by the shutdown: only the
    # shutdown can have written it.
    env = service_env(tmp_path, RECONCILE_INTERVAL="3600")
    port = free_port()
    server = start_embedded(env, port, tmp_path / "procs")
    db = Database(f"sqlite:///{tmp_path / 'data' / 'aifarm.sqlite3'}")
    volunteer: Proc | None = None
    try:
        client = WsClient(port).register()
        client.request_task()
        status, created = request(port, "POST", "/api/tasks", {"type": "echo", "config": {"num_shards": 1}})
        assert status == 201
        task = client.next_task()
        # A real client beside it, connected and idle (the only shard is taken).
        state = tmp_path / "state"
        volunteer = start_clients(port, 1, state, env, tmp_path / "procs")[0]
        wait_for(lambda: "registered as new client" in volunteer.output(), 60, what="the client registers")
        volunteer_id = _client_id(state)

        send_progress(client, task, 42.0)
        server.kill(signal.SIGTERM)

        assert close_frame(client)[0] == RESTART
        assert exits(server, 20) == 0
        assert_clean_exit(server.output())
        assert_clean_exit((tmp_path / "logs" / "error.log").read_text())
        progress = rows(
            db, "SELECT progress, status FROM task_assignments WHERE task_id = :t", t=created["id"]
        )
        assert progress == [(42.0, "training")]

        # The same server again: the real client comes back by itself, as itself.
        server.stop()
        server = start_embedded(env, port, tmp_path / "procs")
        wait_for(
            lambda: rows(db, "SELECT conn_id FROM clients WHERE id = :c", c=volunteer_id)[0][0] is not None,
            60,
            what="the client to reconnect",
        )
        assert "code 1012" in volunteer.output()
        assert "registered again as client" in volunteer.output()
        assert _client_id(state) == volunteer_id
        assert rows(db, "SELECT COUNT(*) FROM clients") == [(2,)]  # nobody registered as new
        server.kill(signal.SIGTERM)
        assert exits(server, 20) == 0
        assert_clean_exit(server.output())
    finally:
        server.stop()
        if volunteer is not None:
            volunteer.stop()
        db.dispose()


def _progress(db: Database, task_id: int) -> list[tuple[Any, ...]]:
    return rows(db, "SELECT progress, status FROM task_assignments WHERE task_id = :t", t=task_id)


def _client_id(state_dir: Path) -> str:
    (path,) = state_dir.glob("*.json")
    return str(json.loads(path.read_text())["client_id"])


@pytest.fixture(scope="module")
def private_redis(services: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """A Redis of our own: no worker of another module consumes these tests' messages."""
    broker = RedisServer(free_port(), tmp_path_factory.mktemp("shutdown-redis"))
    broker.start()
    yield broker.port
    broker.kill()


def test_sigterm_of_gunicorn_with_clients_connected(
    mysql_url: str, private_redis: int, db: Database, tmp_path: Path
) -> None:
    env = service_env(
        tmp_path,
        DATABASE_URL=mysql_url,
        REDIS_URL=f"redis://127.0.0.1:{private_redis}/0",
        RECONCILE_INTERVAL="3600",
    )
    worker = start_worker(env, tmp_path / "procs", name="web-shutdown-worker", concurrency=1)
    port = free_port()
    web = start_gunicorn(env, port, tmp_path / "procs", workers=1)
    try:
        client = WsClient(port).register()
        bystander = WsClient(port).register()
        client.request_task()
        status, created = request(port, "POST", "/api/tasks", {"type": "echo"})
        assert status == 201
        task = client.next_task()
        send_progress(client, task, 7.0)
        web.kill(signal.SIGTERM)

        assert close_frame(client)[0] == RESTART
        assert close_frame(bystander)[0] == RESTART
        assert exits(web, 20) == 0
        output = web.output()
        assert_clean_exit(output)
        assert "graceful timeout" not in output  # the sockets were let go, not cut at the deadline
        progress = rows(
            db, "SELECT progress, status FROM task_assignments WHERE task_id = :t", t=created["id"]
        )
        assert progress == [(7.0, "training")]
        # Both are disconnected (the socket's end was recorded), their work is still theirs.
        assert rows(db, "SELECT COUNT(*) FROM clients WHERE conn_id IS NOT NULL") == [(0,)]
        assert rows(db, "SELECT client_id FROM task_assignments WHERE task_id = :t", t=created["id"]) == [
            (client.client_id,)
        ]
    finally:
        web.stop()
        worker.stop()


# --- a Celery worker ---


def test_sigterm_of_the_worker_during_a_long_job(
    mysql_url: str, private_redis: int, db: Database, tmp_path: Path
) -> None:
    """The job blocks on a row lock this test holds, so it is genuinely running when the
    worker gets SIGTERM. The worker must hand it back (not wait for it, nor leave it to the
    broker's one-hour visibility timeout); another worker then runs it, once."""
    broker = f"redis://127.0.0.1:{private_redis}/1"
    env = service_env(
        tmp_path,
        DATABASE_URL=mysql_url,
        REDIS_URL=broker,
        DB_TIMEOUT="60",  # the job waits on the lock instead of timing out and retrying
        REMAP_SIGTERM="SIGQUIT",  # as docs/operations.md says to run workers
    )
    task_id = db.run(
        lambda s: (
            task_admin.create(
                s,
                type="echo",
                requirements={},
                config={"num_shards": 2},
                priority=0,
                num_shards=2,
                now=utcnow(),
            ).id
        )
    )
    database = mysql_url.rsplit("/", 1)[1]
    lock = mysql_connect(database)
    lock.autocommit(False)
    monitor = mysql_connect()
    producer = Celery("shutdown-test", broker=broker)
    producer.conf.update(task_serializer="json", accept_content=["json"])
    first = second = None
    try:
        with lock.cursor() as cur:
            cur.execute("SELECT id FROM tasks WHERE id = %s FOR UPDATE", (task_id,))
        producer.send_task("workers.tasks.prepare_task", args=[task_id])
        first = start_worker(env, tmp_path / "procs", name="worker-a", concurrency=1)
        waiting_a = wait_for(lambda: _blocked(monitor, database), 30, what="the job to wait on the lock")

        os.kill(first.popen.pid, signal.SIGTERM)
        assert exits(first, 30) == 0
        assert_clean_exit(first.output())
        assert not _succeeded(first.output())

        second = start_worker(env, tmp_path / "procs", name="worker-b", concurrency=1)
        # The job runs again, on the second worker: it waits on the same lock.
        wait_for(
            lambda: [c for c in _blocked(monitor, database) if c not in waiting_a],
            30,
            what="the job handed back to run on the second worker",
        )
        lock.rollback()
        wait_for(lambda: _succeeded(second.output()), 30, what="the job to finish on the second worker")

        assert len(_succeeded(first.output() + second.output())) == 1
        assert rows(
            db, "SELECT round, `rank`, status FROM task_shards WHERE task_id = :t ORDER BY `rank`", t=task_id
        ) == [
            (0, 0, "queued"),
            (0, 1, "queued"),
        ]
    finally:
        lock.close()
        monitor.close()
        producer.close()
        for proc in (first, second):
            if proc is not None:
                proc.stop()


def _blocked(monitor: pymysql.Connection, database: str) -> list[int]:  # type: ignore[type-arg]
    """Connections of the test database running a locking read (waiting on our lock)."""
    with monitor.cursor() as cur:
        cur.execute(
            "SELECT id FROM information_schema.PROCESSLIST WHERE db = %s AND command = 'Query' "
            "AND info LIKE %s AND id <> CONNECTION_ID()",
            (database, "%FOR UPDATE%"),
        )
        return [int(row[0]) for row in cur.fetchall()]


def _succeeded(output: str) -> list[str]:
    return re.findall(r"Task workers\.tasks\.prepare_task\[[^\]]+\] succeeded", output)
