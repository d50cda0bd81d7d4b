"""Two web processes and two Celery workers under load (issue 12, goals 4 and 5), on a Redis
of our own: the load clients of bench/load.py (asyncio, two driver processes) on web process
A, while a task is submitted, paused and resumed through web process B; and a worker killed
in the middle of a scheduling transaction while a hundred requests wait. Correctness only,
never speed."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from store.db import Database
from tests.conftest import rows
from tests.faults.stack import Topology
from tests.faults.test_outages import ASSIGN, RowLock
from tests.helpers import ADMIN, Proc, WsClient, free_port, request, start_gunicorn, wait_for
from tests.services.test_control import put_status
from tests.services.test_load_smoke import bench_load

pytestmark = pytest.mark.usefixtures("clean")

CLIENTS = 100


@pytest.fixture(scope="module")
def topology(mysql_url: str, services: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Topology]:
    made = Topology(
        mysql_url,
        tmp_path_factory.mktemp("under-load"),
        MAX_CLIENTS="1000",
        WS_MESSAGES_PER_MINUTE="1000000",
        RECONCILE_INTERVAL="1",
    )
    yield made
    made.close()


@pytest.fixture(scope="module")
def web_b(topology: Topology) -> Iterator[int]:
    """A second gunicorn on the same MariaDB and Redis: web process B."""
    port = free_port()
    proc = start_gunicorn(topology.env, port, topology.run_dir / "procs-b", workers=1)
    yield port
    proc.stop()


def shards_held_twice(db: Database) -> list[tuple[Any, ...]]:
    return rows(
        db,
        "SELECT shard_id, COUNT(*) FROM task_assignments WHERE status <> 'released' "
        "GROUP BY shard_id HAVING COUNT(*) > 1",
    )


def test_a_client_on_one_web_process_gets_work_and_control_from_the_other_under_load(
    topology: Topology, web_b: int, db: Database, mysql_url: str
) -> None:
    workers = [topology.worker("load-w1", concurrency=2), topology.worker("load-w2", concurrency=2)]
    load = bench_load()
    group = load.Drivers(topology.port, CLIENTS, 2)  # every load client on A
    probe = WsClient(topology.port)
    try:
        assert sum(r["registered"] for r in group.all("register")) == CLIENTS
        load.queue_shards(web_b, CLIENTS, ADMIN, mysql_url)  # submitted through B
        burst = group.all("burst", time.time() + 0.2)
        assert [e for b in burst for e in b["errors"]] == []
        assert sum(len(b["shards"]) for b in burst) == CLIENTS
        # Load goes on (100 clients, 20 progress messages/s each) while B drives the probe on A.
        for pipe in group.pipes:
            pipe.send(("progress", (6.0, 0.05)))
        probe.register()
        probe.request_task()
        status, task = request(web_b, "POST", "/api/tasks", {"type": "echo"})
        assert status == 201, task
        got = probe.next_task(timeout=20)
        assert got["id"] == task["id"]
        assert put_status(web_b, task["id"], "paused")["status"] == "paused"
        probe.expect("pause", timeout=10, task_id=task["id"])
        put_status(web_b, task["id"], "running")
        probe.expect("resume", timeout=10, task_id=task["id"])
        sent = sum(pipe.recv()["sent"] for pipe in group.pipes)
        assert sent > 0
        results = group.all("results", 60.0)
        assert [e for r in results for e in r["errors"]] == []
        assert sum(len(r["acks"]) for r in results) == CLIENTS
        group.all("close")
    finally:
        group.stop()
        probe.close()
        for w in workers:
            w.stop()
    assert shards_held_twice(db) == []
    assert rows(db, "SELECT COUNT(*) FROM task_assignments WHERE status = 'completed'") == [(CLIENTS,)]
    # Both workers did jobs: the scheduling and the rest were spread over them, not pinned.
    assert all("succeeded" in w.output() for w in workers)


def test_a_worker_killed_mid_scheduling_under_load_loses_no_request(
    topology: Topology, db: Database, mysql_url: str
) -> None:
    """A hundred clients ask at once; the scheduler's transaction is held on a task row (our
    lock) and its worker is SIGKILLed there. MariaDB rolls the transaction back and frees the
    scheduler lock with the dead connection; the requests are rows, not messages: a new
    worker, asked by beat's sweep, serves every one, and no shard is given twice."""
    doomed = topology.worker("sched-doomed", concurrency=2)
    load = bench_load()
    group = load.Drivers(topology.port, CLIENTS, 2)
    lock: RowLock | None = None
    try:
        assert sum(r["registered"] for r in group.all("register")) == CLIENTS
        status, task = request(
            topology.port, "POST", "/api/tasks", {"type": "echo", "config": {"num_shards": CLIENTS}}
        )
        assert status == 201, task
        wait_for(
            lambda: (
                rows(db, "SELECT COUNT(*) FROM task_shards WHERE task_id = :t", t=task["id"]) == [(CLIENTS,)]
            ),
            30,
            what="shards queued",
        )
        lock = RowLock(mysql_url, "tasks", task["id"])  # the assignments (their foreign key) wait here
        for pipe in group.pipes:
            pipe.send(("burst", (time.time() + 0.2,)))
        wait_for(lambda: lock is not None and lock.waiters(ASSIGN), 30, what="scheduling held")
        doomed.kill()
        wait_for(lambda: not doomed.alive(), 10, what="the worker gone")
        lock.release()
        assert rows(db, "SELECT COUNT(*) FROM task_assignments") == [(0,)]  # rolled back
        wait_for(  # the requests are rows: they outlive the worker (and the job it held)
            lambda: rows(db, "SELECT COUNT(*) FROM clients WHERE pending_requests > 0") == [(CLIENTS,)],
            30,
            what="every request recorded",
        )
        # The killed job's message comes back only after the broker's visibility timeout: the
        # sweep (beat) finds the waiting clients and asks for a scheduling run.
        replacement: Proc = topology.worker("sched-replacement", concurrency=2)
        topology.beat("under-load-beat")
        burst = [pipe.recv() for pipe in group.pipes]
        group.all("close")
    finally:
        if lock is not None:
            lock.close()
        group.stop()
    assert [e for b in burst for e in b["errors"]] == []
    shards = [tuple(s) for b in burst for s in b["shards"]]
    assert len(shards) == len(set(shards)) == CLIENTS
    assert shards_held_twice(db) == []
    assert "succeeded" in replacement.output()
