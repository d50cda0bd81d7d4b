"""A production topology of the tests' own for fault tests that kill and restart its parts:
gunicorn on a Redis of our own (MariaDB is the session's), the workers and beats a test
starts, and a volunteer's steps done by hand over a real socket."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pymysql
import redis
from celery import Celery
from safetensors.numpy import save as save_np

from tests.conftest import mysql_connect, service_env
from tests.faults.test_outages import RedisServer
from tests.helpers import Proc, WsClient, free_port, start_beat, start_gunicorn, start_worker, wait_for
from tests.services.test_federated import fetch_model, upload


class Topology:
    """gunicorn on a Redis of our own; each test starts the workers and the beat it needs."""

    def __init__(self, mysql_url: str, run_dir: Path, **env: str) -> None:
        self.run_dir = run_dir
        self.broker = RedisServer(free_port(), run_dir)
        self.broker.start()
        self.env = service_env(
            run_dir,
            DATABASE_URL=mysql_url,
            REDIS_URL=f"redis://127.0.0.1:{self.broker.port}/0",
            SWEEP_INTERVAL="1",
            SCHEDULE_INTERVAL="3600",
            CONNECTION_TIMEOUT="3600",
            DB_TIMEOUT="60",  # a job waits on a test's lock instead of timing out and retrying
            **env,
        )
        self.port = free_port()
        self.web = start_gunicorn(self.env, self.port, run_dir / "procs", workers=1)
        self.procs: list[Proc] = []
        self.closing: list[Any] = []  # database connections holding a test's locks, closed first

    def worker(self, name: str, concurrency: int = 1, queues: str | None = None, **env: str) -> Proc:
        if queues is None:
            proc = start_worker(
                {**self.env, **env}, self.run_dir / "procs", name=name, concurrency=concurrency
            )
        else:  # as launch.start_worker, consuming only ``queues``
            args = ["-m", "celery", "-A", "workers", "worker", "--loglevel", "INFO", "--concurrency",
                    str(concurrency), "--hostname", f"{name}@%h", "--without-mingle", "--without-gossip",
                    "-Q", queues]  # fmt: skip
            proc = Proc(
                name, [sys.executable, *args], {"REMAP_SIGTERM": "SIGQUIT", **self.env, **env}, self.run_dir
            )
            wait_for(lambda: "ready." in proc.output() or not proc.alive(), 60, what="celery worker ready")
            assert proc.alive(), proc.output()
        self.procs.append(proc)
        return proc

    def beat(self, name: str = "beat") -> Proc:
        """A beat with its own schedule file (DATA_DIR), as two hosts would have."""
        proc = start_beat({**self.env, "DATA_DIR": str(self.run_dir / name)}, self.run_dir / name)
        self.procs.append(proc)
        return proc

    def queued(self, queue: str) -> list[str]:
        client = redis.Redis(port=self.broker.port)
        return [json.loads(m)["headers"]["task"] for m in client.lrange(queue, 0, -1)]

    def flush(self) -> None:
        redis.Redis(port=self.broker.port).flushall()

    def send(self, name: str, *args: Any) -> None:
        producer = Celery("jobs-test", broker=self.env["REDIS_URL"])
        producer.conf.update(task_serializer="json", accept_content=["json"])
        try:
            producer.send_task(name, args=list(args), queue="aggregation" if "aggregate" in name else None)
        finally:
            producer.close()

    def stop_workers(self) -> None:
        for proc in self.procs:
            proc.stop()
        self.procs.clear()

    def close(self) -> None:
        for conn in self.closing:
            if conn.open:
                conn.close()  # a failed test must not leave its lock behind for the next
        self.stop_workers()
        self.web.stop()
        self.broker.kill()


def hold_next_round(mysql_url: str, task_id: int, round_no: int) -> pymysql.Connection:  # type: ignore[type-arg]
    """A transaction whose gap lock keeps anyone from creating round ``round_no`` of the task."""
    conn = mysql_connect(mysql_url.rsplit("/", 1)[1])
    conn.begin()
    with conn.cursor() as cur:
        cur.execute(
            "SELECT id FROM task_rounds WHERE task_id = %s AND `round` = %s FOR UPDATE", (task_id, round_no)
        )
        assert cur.fetchall() == ()
    return conn


def take(c: WsClient) -> dict[str, Any]:
    c.request_task()
    return c.next_task(timeout=30)


def finish(port: int, c: WsClient, task: dict[str, Any]) -> None:
    """Upload the round's global model unchanged as the update, and report the shard done."""
    assert upload(port, c, task, save_np(fetch_model(port, c, task)))[0] == 201
    c.result(task, train_loss=0.5)


def aggregation_started(proc: Proc, task_id: int, round_no: int) -> int:
    return proc.output().count(f"event=aggregation_started task={task_id} round={round_no} ")
