"""Dead dependencies: the database, the broker, the worker. Clear errors, no hangs, nothing
committed lost, nothing done twice.

Each fault is made while work is in flight: a job is held inside its transaction by a row
lock this test takes (``SELECT ... FOR UPDATE``), and the test checks on the database that the
job is really waiting on it (``INNODB_TRX``: ``LOCK WAIT``) before it cuts, restarts or kills."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery

from store import task_admin
from store.db import Database
from store.models import utcnow
from tests.conftest import ADMIN_PASSWORD, MYSQL_HOST, MYSQL_PORT, mysql_connect, rows, service_env
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


# --- holding a job inside its transaction ---


class RowLock:
    """An open transaction holding ``row_id`` of ``table``: a job that locks it, updates it or
    inserts a row referring to it waits, inside its own transaction, until :meth:`release`."""

    def __init__(self, mysql_url: str, table: str, row_id: int) -> None:
        self.database = mysql_url.rsplit("/", 1)[1]
        self.conn = mysql_connect(self.database)
        self.conn.begin()
        with self.conn.cursor() as cur:
            cur.execute(f"SELECT id FROM {table} WHERE id = %s FOR UPDATE", (row_id,))
            assert cur.fetchall() == ((row_id,),)

    def waiters(self, like: str) -> list[int]:
        """The connections running a statement like ``like`` on the test database: one that
        cannot finish while the lock is held is waiting for it."""
        return running(self.database, like)

    def release(self) -> None:
        self.conn.rollback()

    def close(self) -> None:
        self.conn.close()


def running(database: str, like: str) -> list[int]:
    """Connections (ids) running a statement like ``like`` on ``database``. (The processlist
    rather than INNODB_LOCK_WAITS: MariaDB 10.11 does not always list a foreign key check's
    wait there.)"""
    monitor = mysql_connect()
    try:
        with monitor.cursor() as cur:
            cur.execute(
                "SELECT id FROM information_schema.PROCESSLIST WHERE db = %s AND command = 'Query' "
                "AND info LIKE %s AND id <> CONNECTION_ID()",
                (database, like),
            )
            return sorted(int(r[0]) for r in cur.fetchall())
    finally:
        monitor.close()


PREPARE = "SELECT%FROM tasks%FOR UPDATE"  # prepare_task's locking read of its task
ASSIGN = "INSERT INTO task_assignments%"  # a scheduling run recording an assignment (its task's key)


def new_task(db: Database, shards: int = 1) -> int:
    """An echo task committed without its prepare_task message (a test sends that itself)."""
    return db.run(
        lambda s: task_admin.create(
            s, type="echo", requirements={}, config={"num_shards": shards}, priority=0,
            num_shards=shards, now=utcnow(),
        ).id
    )  # fmt: skip


def shard_counts(db: Database, task_ids: list[int]) -> list[int]:
    return [rows(db, "SELECT COUNT(*) FROM task_shards WHERE task_id = :t", t=t)[0][0] for t in task_ids]


# --- the database goes away ---


@dataclass
class Stack:
    """gunicorn, a worker (and a beat) on a Redis of our own; what a test may kill or replace."""

    port: int
    env: dict[str, str]
    run_dir: Path
    broker: RedisServer
    web: Proc
    worker: Proc
    beat: Proc | None = None
    extra: list[Proc] = field(default_factory=list)

    def send(self, name: str, *args: Any) -> None:
        producer = Celery("outage-test", broker=self.env["REDIS_URL"])
        producer.conf.update(task_serializer="json", accept_content=["json"])
        try:
            producer.send_task(name, args=list(args))
        finally:
            producer.close()

    def redis(self) -> redis.Redis:
        return redis.Redis(port=self.broker.port, socket_connect_timeout=2)

    def queued(self) -> list[str]:
        """The names of the jobs waiting in the broker's queue."""
        return [json.loads(m)["headers"]["task"] for m in self.redis().lrange("celery", 0, -1)]

    def refuses_writes(self) -> bool:
        """An admin write is refused for want of the broker (probed without writing anything)."""
        return request(self.port, "PUT", "/api/clients/c-nobody/status", {"status": "enabled"})[0] == 503

    def new_worker(self, name: str) -> Proc:
        self.worker = start_worker(self.env, self.run_dir / "procs", name=name, concurrency=1)
        self.extra.append(self.worker)
        return self.worker

    def stop(self) -> None:
        for proc in (self.web, self.worker, self.beat, *self.extra):
            if proc is not None:
                proc.stop()
        self.broker.kill()


@pytest.fixture(scope="module")
def db_proxy(services: None) -> Proxy:
    return Proxy((MYSQL_HOST, MYSQL_PORT))


@pytest.fixture(scope="module")
def behind_proxy(
    mysql_url: str, db_proxy: Proxy, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """gunicorn and a worker whose MariaDB is reached through the proxy."""
    run_dir = tmp_path_factory.mktemp("db-outage")
    broker = RedisServer(free_port(), run_dir)
    broker.start()
    url = mysql_url.replace(f"{MYSQL_HOST}:{MYSQL_PORT}", f"127.0.0.1:{db_proxy.port}")
    env = service_env(
        run_dir, DATABASE_URL=url, REDIS_URL=f"redis://127.0.0.1:{broker.port}/0", DB_TIMEOUT="2"
    )
    # The worker's jobs may wait on a test's lock for longer than the web's requests may take.
    worker = start_worker(
        {**env, "DB_TIMEOUT": "30"}, run_dir / "procs", name="db-outage-worker", concurrency=1
    )
    port = free_port()
    web = start_gunicorn(env, port, run_dir / "procs", workers=1)
    stack = Stack(port, env, run_dir, broker, web, worker)
    yield stack
    stack.stop()


@pytest.mark.parametrize("outage", ["refuse", "blackhole"])
def test_a_database_outage_is_a_503_and_loses_nothing(
    behind_proxy: Stack, db_proxy: Proxy, db: Database, outage: str
) -> None:
    port = behind_proxy.port
    status, kept = request(port, "POST", "/api/tasks", {"type": "echo", "config": {"keep": "me"}})
    assert status == 201
    # No job in flight when the database goes: a job's reconnect would hang on the blackhole
    # for its DB_TIMEOUT, and the bystander below would wait behind it.
    wait_for(lambda: shard_counts(db, [kept["id"]]) == [1], what="the task prepared")
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


def test_a_database_restart_mid_scheduling_is_retried_and_recovers_without_restarting_anything(
    behind_proxy: Stack, db_proxy: Proxy, db: Database, mysql_url: str
) -> None:
    """A scheduling run has locked the waiting client and claimed the shard, and waits on our
    lock of the task's row to insert the assignment (its foreign key), when every connection
    to MariaDB dies and new ones are refused (what a restart looks like to the clients).
    The run is retried once at once (2013: the server rolled it back), finds the server
    down, and is retried by Celery with backoff; requests get 503. Once the server is back
    the same processes carry on: the client gets the shard, once."""
    stack = behind_proxy
    worker_log = len(stack.worker.output())
    status, task = request(stack.port, "POST", "/api/tasks", {"type": "echo"})
    assert status == 201
    wait_for(lambda: shard_counts(db, [task["id"]]) == [1], what="the task prepared")
    lock = RowLock(mysql_url, "tasks", task["id"])
    client = WsClient(stack.port).register()
    try:
        client.request_task()
        wait_for(lambda: lock.waiters(ASSIGN), 20, what="scheduling mid-transaction, waiting on our lock")
        db_proxy.refuse()
        status, reply = request(stack.port, "GET", "/api/tasks", timeout=20)
        assert (status, reply["error"]) == (503, "unavailable")

        def log() -> str:
            return stack.worker.output()[worker_log:]

        wait_for(lambda: "errno=2013 reason=lost_connection" in log(), 20, what="the run retried at once")
        wait_for(
            lambda: re.search(r"workers\.tasks\.schedule\[.*\] retry: Retry in", log()), 20, what="backoff"
        )
        db_proxy.restore()
        lock.release()  # the dead transaction gets its lock and is rolled back
        got = client.next_task(timeout=30)
    finally:
        db_proxy.restore()
        lock.close()
        client.close()
    assert got["id"] == task["id"]
    assert rows(db, "SELECT client_id, status FROM task_assignments WHERE task_id = :t", t=task["id"]) == [
        (client.client_id, "assigned")
    ]
    assert rows(db, "SELECT status FROM task_shards WHERE task_id = :t", t=task["id"]) == [("assigned",)]
    assert stack.worker.alive() and stack.web.alive()  # nothing was restarted
    assert request(stack.port, "GET", "/healthz", token=None)[0] == 200


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
    try:
        return bool(redis.Redis(port=port, socket_connect_timeout=0.5).ping())
    except redis.RedisError:
        return False


@pytest.fixture(scope="module")
def private_broker(
    mysql_url: str, services: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """gunicorn, a worker and beat on a Redis of our own that a test may kill or flush.

    Only the doorbell delivers (the periodic reconcile is hourly), and only jobs and the
    sweep (every 2 s) schedule (beat's scheduling pass is hourly): what the tests see is what
    those deliver."""
    run_dir = tmp_path_factory.mktemp("broker-outage")
    broker = RedisServer(free_port(), run_dir)
    broker.start()
    env = service_env(
        run_dir,
        DATABASE_URL=mysql_url,
        REDIS_URL=f"redis://127.0.0.1:{broker.port}/0",
        SCHEDULE_INTERVAL="3600",
        SWEEP_INTERVAL="2",
        RECONCILE_INTERVAL="3600",
        CONNECTION_TIMEOUT="3600",
        DB_TIMEOUT="60",  # a job waits on a test's lock instead of timing out and retrying
    )
    worker = start_worker(env, run_dir / "procs", name="broker-outage-worker", concurrency=1)
    beat = start_beat(env, run_dir / "procs")
    port = free_port()
    web = start_gunicorn(env, port, run_dir / "procs", workers=1)
    stack = Stack(port, env, run_dir, broker, web, worker, beat)
    yield stack
    stack.stop()


def test_a_broker_outage_refuses_writes_and_the_doorbell_catches_up(
    private_broker: Stack, db: Database
) -> None:
    stack = private_broker
    port = stack.port
    holder, waiting = WsClient(port).register(), WsClient(port).register()
    try:
        status, held = request(port, "POST", "/api/tasks", {"type": "echo"})
        assert status == 201
        holder.request_task()
        assert holder.next_task(timeout=20)["id"] == held["id"]

        stack.broker.kill()
        wait_for(stack.refuses_writes, 10, what="the web tier to see the broker gone")  # (cached 1 s)
        status, reply = request(port, "POST", "/api/tasks", {"type": "echo"})
        assert (status, reply["error"]) == (503, "unavailable")
        assert "broker" in reply["message"]
        # Every admin write is refused before anything is written (docs/operations.md).
        for method, path, body in (
            ("PUT", f"/api/tasks/{held['id']}/status", {"status": "paused"}),
            ("DELETE", f"/api/tasks/{held['id']}", None),
            ("PUT", f"/api/clients/{holder.client_id}/status", {"status": "disabled"}),
        ):
            status, reply = request(port, method, path, body)
            assert (status, reply["error"]) == (503, "unavailable"), (method, path, reply)
        assert rows(db, "SELECT id, status FROM tasks") == [(held["id"], "running")]
        assert rows(db, "SELECT status FROM task_assignments") == [("assigned",)]
        assert rows(db, "SELECT disabled FROM clients WHERE id = :c", c=holder.client_id) == [(0,)]
        status, health = request(port, "GET", "/healthz", token=None)
        assert (status, health["broker"], health["database"]) == (503, False, True)
        waiting.request_task()
        assert "broker" in waiting.expect_error("unavailable")["message"]  # not "the database"
        assert request(port, "GET", "/api/tasks")[0] == 200  # reads do not need the broker

        # A write that raced the outage (committed; its doorbell ring lost): the web process
        # reconciles every socket when its doorbell subscription comes back.
        db.run(lambda s: task_admin.set_status(s, held["id"], "paused", utcnow()))
        stack.broker.start()  # a fresh, empty Redis: every queued message is gone
        assert holder.expect("pause", timeout=30) == {"type": "pause", "task_id": held["id"]}

        wait_for(lambda: request(port, "GET", "/healthz", token=None)[0] == 200, 30, 0.5, "broker back")
        status, task = wait_for(
            lambda: (r := request(port, "POST", "/api/tasks", {"type": "echo"}))[0] == 201 and r,
            30,
            0.5,
            "task accepted again",
        )
        waiting.request_task()
        assert waiting.next_task(timeout=30)["id"] == task["id"]
        status, reply = request(
            port, "PUT", f"/api/clients/{holder.client_id}/status", {"status": "disabled"}
        )
        assert (status, reply["disabled"]) == (200, True)
    finally:
        holder.close()
        waiting.close()


@pytest.mark.parametrize("loss", ["restart", "flushall"])
def test_queued_and_in_flight_work_survive_a_broker_that_loses_everything(
    private_broker: Stack, db: Database, mysql_url: str, loss: str
) -> None:
    """The worker (one process) is inside prepare_task of task A, held by our lock; queued
    behind it: the prepare_task of B and C, the purge of deleted task D's files, the waiting
    clients' scheduling run, beat's sweeps. Redis is restarted empty, or flushed. The worker
    carries on by itself, and the sweep re-drives from the database what was lost."""
    stack = private_broker
    worker, worker_log = stack.worker, len(stack.worker.output())
    waiting = [WsClient(stack.port).register() for _ in range(3)]
    lock = None
    try:
        a = new_task(db)
        lock = RowLock(mysql_url, "tasks", a)
        stack.send("workers.tasks.prepare_task", a)
        wait_for(lambda: lock.waiters(PREPARE), 20, what="prepare_task of A inside its transaction")

        d = request(stack.port, "POST", "/api/tasks", {"type": "echo"})[1]["id"]
        files = Path(stack.env["CHECKPOINT_DIR"]) / "tasks" / str(d)
        (files / "round-00000").mkdir(parents=True)
        (files / "round-00000" / "global.safetensors").write_bytes(b"a model")
        assert request(stack.port, "DELETE", f"/api/tasks/{d}")[0] == 200
        b, c = (request(stack.port, "POST", "/api/tasks", {"type": "echo"})[1]["id"] for _ in range(2))
        for w in waiting:
            w.request_task()
        wait_for(
            lambda: rows(db, "SELECT COUNT(*) FROM clients WHERE pending_requests = 1") == [(3,)],
            what="the requests recorded",
        )
        queued = stack.queued()
        assert queued.count("workers.tasks.prepare_task") >= 3 and "workers.tasks.purge_task_files" in queued

        if loss == "restart":
            stack.broker.kill()
            stack.broker.start()
        else:
            stack.redis().flushall()
        assert not {"workers.tasks.prepare_task", "workers.tasks.purge_task_files"} & set(stack.queued())
        lock.release()  # A's job, still running in the worker, goes on

        got = {w.next_task(timeout=40)["id"] for w in waiting}  # pushed by the doorbell alone
    finally:
        if lock is not None:
            lock.close()
        for w in waiting:
            w.close()
    assert got == {a, b, c}
    assert shard_counts(db, [a, b, c]) == [1, 1, 1]
    wait_for(lambda: not files.exists(), 30, what="the deleted task's files purged")
    log = worker.output()[worker_log:]
    for task_id in (a, b, c):  # each prepared once
        assert log.count(f"event=prepare_task task={task_id} type=echo created=True") == 1, log
    sweeps = re.findall(r"task=sweep state=finish .*", log)  # what re-drove B, C and D's purge
    assert any(re.search(r" prepared=[12] ", line) for line in sweeps), log
    assert any(" purged=1 " in f"{line} " for line in sweeps), log
    assert stack.worker is worker and worker.alive()  # the same worker, reconnected by itself


def test_a_worker_killed_mid_job_leaves_the_job_to_the_sweep(
    private_broker: Stack, db: Database, mysql_url: str
) -> None:
    """SIGKILL of the whole worker while prepare_task runs (held by our lock). Its message
    stays unacknowledged: the broker would hand it out again only after visibility_timeout
    (an hour). The sweep finds the task unprepared and drives it again; it is prepared once."""
    stack = private_broker
    doomed, doomed_log = stack.worker, len(stack.worker.output())
    task_id = new_task(db, shards=2)
    lock = RowLock(mysql_url, "tasks", task_id)
    client = WsClient(stack.port).register()
    try:
        stack.send("workers.tasks.prepare_task", task_id)
        wait_for(lambda: lock.waiters(PREPARE), 20, what="prepare_task inside its transaction")
        doomed.kill()  # SIGKILL, the worker and its pool alike
        wait_for(lambda: not doomed.alive(), 10, what="the worker gone")
        lock.release()  # what the killed job had begun is rolled back
        assert shard_counts(db, [task_id]) == [0]
        client.request_task()
        replacement = stack.new_worker("broker-outage-worker-2")
        got = client.next_task(timeout=40)
    finally:
        lock.close()
        client.close()
    assert got["id"] == task_id
    assert shard_counts(db, [task_id]) == [2]
    assert not re.search(r"prepare_task\[[^\]]+\] succeeded", doomed.output()[doomed_log:])
    log = replacement.output()
    assert log.count(f"event=prepare_task task={task_id} type=echo created=True") == 1
    assert re.search(r"task=sweep state=finish .*prepared=1", log), log


def test_a_job_whose_pool_process_dies_is_delivered_again_at_once(
    private_broker: Stack, db: Database, mysql_url: str
) -> None:
    """SIGKILL of the pool process running prepare_task (held by our lock); the worker itself
    lives. task_acks_late + task_reject_on_worker_lost: the message goes back to the queue at
    once and runs again, in a new pool process; its effect happens once."""
    stack = private_broker
    worker, worker_log = stack.worker, len(stack.worker.output())
    task_id = new_task(db, shards=3)
    lock = RowLock(mysql_url, "tasks", task_id)
    try:
        stack.send("workers.tasks.prepare_task", task_id)
        first = wait_for(lambda: lock.waiters(PREPARE), 20, what="prepare_task inside its transaction")
        (child,) = children(worker.popen.pid)
        os.kill(child, signal.SIGKILL)
        wait_for(
            lambda: [w for w in lock.waiters(PREPARE) if w not in first],
            30,
            what="the job delivered again and waiting on the lock",
        )
        lock.release()
        wait_for(lambda: shard_counts(db, [task_id]) == [3], 20, what="the task prepared")
    finally:
        lock.close()
    log = worker.output()[worker_log:]
    assert "WorkerLostError" in log
    assert log.count(f"event=prepare_task task={task_id} type=echo created=True") == 1
    assert worker.alive() and stack.worker is worker
    assert shard_counts(db, [task_id]) == [3]


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (a prefork worker's pool)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry.name))
    return found
