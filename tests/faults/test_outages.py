"""Dead dependencies: the database, the broker, the worker. Clear errors, no hangs, nothing committed lost."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from store.db import Database
from tests.conftest import ADMIN_PASSWORD, MYSQL_HOST, MYSQL_PORT, rows, service_env
from tests.faults.proxy import Proxy
from tests.helpers import (
    Proc,
    WsClient,
    free_port,
    request,
    start_beat,
    start_gunicorn,
    start_worker,
    wait_for,
)

pytestmark = pytest.mark.usefixtures("clean")


# --- the database goes away ---


@pytest.fixture(scope="module")
def db_proxy(services: None) -> Proxy:
    return Proxy((MYSQL_HOST, MYSQL_PORT))


@pytest.fixture(scope="module")
def behind_proxy(
    mysql_url: str, redis_url: str, db_proxy: Proxy, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[int]:
    """gunicorn and a worker whose MariaDB is reached through the proxy; yields the web port."""
    run_dir = tmp_path_factory.mktemp("db-outage")
    url = mysql_url.replace(f"{MYSQL_HOST}:{MYSQL_PORT}", f"127.0.0.1:{db_proxy.port}")
    env = service_env(
        run_dir, DATABASE_URL=url, REDIS_URL=redis_url.rsplit("/", 1)[0] + "/12", DB_TIMEOUT="2"
    )
    worker = start_worker(env, run_dir / "procs", name="db-outage-worker", concurrency=1)
    port = free_port()
    web = start_gunicorn(env, port, run_dir / "procs", workers=1)
    yield port
    web.stop()
    worker.stop()


@pytest.mark.parametrize("outage", ["refuse", "blackhole"])
def test_a_database_outage_is_a_503_and_loses_nothing(
    behind_proxy: int, db_proxy: Proxy, db: Database, outage: str
) -> None:
    port = behind_proxy
    status, kept = request(port, "POST", "/api/tasks", {"type": "echo", "config": {"keep": "me"}})
    assert status == 201
    bystander = WsClient(port).register()
    try:
        getattr(db_proxy, outage)()
        # An error, not a hang: a request that took longer would raise socket.timeout here.
        status, reply = request(port, "POST", "/api/tasks", {"type": "echo"}, timeout=20)
        assert status == 503, reply
        assert reply["error"] == "unavailable"
        assert request(port, "GET", "/api/tasks")[0] == 503
        sign_in = {"username": "admin", "password": ADMIN_PASSWORD}
        status, reply = request(port, "POST", "/admin/login", sign_in, token=None, timeout=20)
        assert (status, reply["error"]) == (503, "unavailable"), reply
        status, health = request(port, "GET", "/healthz", token=None)
        assert (status, health["database"]) == (503, False)
        bystander.request_task()
        assert bystander.expect_error("unavailable", timeout=20)["message"]
        newcomer = WsClient(port, timeout=30)
        newcomer.send({"type": "register", **WsClient.HARDWARE})
        newcomer.expect_error("unavailable", timeout=20)
        newcomer.close()
    finally:
        db_proxy.restore()
    wait_for(
        lambda: request(port, "GET", "/healthz", token=None)[0] == 200, 30, 0.5, "health after the outage"
    )
    status, task = request(port, "GET", f"/api/tasks/{kept['id']}")
    assert status == 200 and task["config"]["keep"] == "me"  # committed before the outage, still there
    assert rows(db, "SELECT COUNT(*) FROM tasks") == [(1,)]  # nothing half-written during it
    assert request(port, "POST", "/admin/login", sign_in, token=None)[0] == 200
    try:
        bystander.request_task()  # the same socket carries on
        assert bystander.next_task(timeout=20)["id"] == kept["id"]
    finally:
        bystander.close()


# --- the broker goes away ---


class RedisServer:
    def __init__(self, port: int, run_dir: Path) -> None:
        self.port = port
        self.run_dir = run_dir
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        exe = shutil.which("redis-server")
        assert exe, "redis-server must be installed"
        self.proc = subprocess.Popen(
            [
                exe,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.run_dir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(lambda: _redis_up(self.port), 10, what="private redis")

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(5)
            self.proc = None


def _redis_up(port: int) -> bool:
    import redis

    try:
        return bool(redis.Redis(port=port, socket_connect_timeout=0.5).ping())
    except redis.RedisError:
        return False


@pytest.fixture(scope="module")
def private_broker(
    mysql_url: str, services: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[int, RedisServer, dict[str, str], Path, list[Proc]]]:
    """gunicorn, a worker and beat on a Redis of our own that a test may kill."""
    run_dir = tmp_path_factory.mktemp("broker-outage")
    broker = RedisServer(free_port(), run_dir)
    broker.start()
    env = service_env(
        run_dir,
        DATABASE_URL=mysql_url,
        REDIS_URL=f"redis://127.0.0.1:{broker.port}/0",
        SCHEDULE_INTERVAL="1",
        SWEEP_INTERVAL="2",
    )
    procs = [start_worker(env, run_dir / "procs", name="broker-outage-worker", concurrency=1)]
    procs.append(start_beat(env, run_dir / "procs"))
    port = free_port()
    procs.append(start_gunicorn(env, port, run_dir / "procs", workers=1))
    yield port, broker, env, run_dir, procs
    for proc in procs:
        proc.stop()
    broker.kill()


def test_a_broker_outage_is_a_503_and_work_resumes_after(
    private_broker: tuple[int, RedisServer, dict[str, str], Path, list[Proc]], db: Database
) -> None:
    port, broker, _, _, _ = private_broker
    client = WsClient(port).register()
    try:
        broker.kill()
        status, reply = request(port, "POST", "/api/tasks", {"type": "echo"})
        assert (status, reply["error"]) == (503, "unavailable")
        assert "broker" in reply["message"]
        assert rows(db, "SELECT COUNT(*) FROM tasks") == [(0,)]  # refused before anything was written
        status, health = request(port, "GET", "/healthz", token=None)
        assert (status, health["broker"], health["database"]) == (503, False, True)
        client.request_task()
        client.expect_error("unavailable")
        assert request(port, "GET", "/api/tasks")[0] == 200  # reads do not need the broker

        broker.start()  # a fresh, empty Redis: every queued message is gone
        wait_for(lambda: request(port, "GET", "/healthz", token=None)[0] == 200, 30, 0.5, "broker back")
        status, task = wait_for(
            lambda: (r := request(port, "POST", "/api/tasks", {"type": "echo"}))[0] == 201 and r,
            30,
            0.5,
            "task accepted again",
        )
        client.request_task()
        assert client.next_task(timeout=30)["id"] == task["id"]
    finally:
        client.close()


def test_work_waits_for_a_dead_worker_and_survives_it(
    private_broker: tuple[int, RedisServer, dict[str, str], Path, list[Proc]], db: Database
) -> None:
    port, _, env, run_dir, procs = private_broker
    worker = procs[0]
    worker.kill()  # SIGKILL: no goodbye
    client = WsClient(port).register()
    try:
        status, task = request(port, "POST", "/api/tasks", {"type": "echo"})
        assert status == 201
        client.request_task()
        assert [m for m in client.silent(2.0) if m["type"] == "task"] == []  # nobody schedules
        procs[0] = start_worker(env, run_dir / "procs", name="broker-outage-worker-2", concurrency=1)
        assert client.next_task(timeout=30)["id"] == task["id"]
        assert rows(db, "SELECT status FROM tasks WHERE id = :t", t=task["id"]) == [("running",)]
    finally:
        client.close()
