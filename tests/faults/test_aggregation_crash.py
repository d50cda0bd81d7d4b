"""Aggregation survives its worker: killed mid-round, the round is retaken once the lease lapses;
alive, its renewed lease keeps everyone else out; two beats at once change nothing.

To hold an aggregation mid-commit for as long as a test needs, the test takes a gap lock on
the next round's row (``SELECT ... FOR UPDATE`` of a row that does not exist yet): the worker's
commit, which inserts that row, waits on it, holding its lease, with its job unacknowledged.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pymysql
import pytest
from safetensors.numpy import save as save_np

import config
from store.db import Database
from store.models import FEDERATED, Task, TaskAssignment, TaskRound, utcnow
from tests.conftest import mysql_connect, rows, service_env
from tests.faults.test_outages import RedisServer
from tests.helpers import Proc, WsClient, free_port, start_beat, start_gunicorn, start_worker, wait_for
from tests.services.test_federated import fetch_model, submit, upload, wait_status
from workers import federated

pytestmark = pytest.mark.usefixtures("clean")


class Topology:
    """gunicorn, workers and beats on a Redis of our own; killed and restarted by the tests."""

    def __init__(self, mysql_url: str, run_dir: Path, **settings: str) -> None:
        self.run_dir = run_dir
        self.broker = RedisServer(free_port(), run_dir)
        self.broker.start()
        self.env = service_env(
            run_dir,
            DATABASE_URL=mysql_url,
            REDIS_URL=f"redis://127.0.0.1:{self.broker.port}/0",
            SWEEP_INTERVAL="1",
            **settings,
        )
        self.procs: list[Proc] = []
        self.closing: list[Any] = []  # database connections holding locks, closed first
        self.port = free_port()
        self.procs.append(start_gunicorn(self.env, self.port, run_dir / "procs", workers=1))

    def worker(self, name: str) -> Proc:
        proc = start_worker(self.env, self.run_dir / "procs", name=name, concurrency=1)
        self.procs.append(proc)
        return proc

    def beat(self, name: str) -> Proc:
        # each beat keeps its own schedule file (DATA_DIR), as two hosts would
        env = {**self.env, "DATA_DIR": str(self.run_dir / name)}
        proc = start_beat(env, self.run_dir / name)
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for conn in self.closing:
            if conn.open:
                conn.close()  # a failed test must not leave its lock behind for the next
        for proc in self.procs:
            proc.stop()
        self.broker.kill()


@pytest.fixture
def topology(mysql_url: str, tmp_path: Path) -> Iterator[Topology]:
    made = Topology(mysql_url, tmp_path)
    yield made
    made.close()


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


def lock_waits(db: Database) -> int:
    return int(
        rows(db, "SELECT COUNT(*) FROM information_schema.INNODB_TRX WHERE trx_state = 'LOCK WAIT'")[0][0]
    )


def take(c: WsClient) -> dict[str, Any]:
    c.request_task()
    return c.next_task(timeout=30)


def finish(port: int, c: WsClient, task: dict[str, Any]) -> None:
    """Upload the global model unchanged as the update, and report the shard done."""
    assert upload(port, c, task, save_np(fetch_model(port, c, task)))[0] == 201
    c.result(task, train_loss=0.5)


def train_round(port: int, c: WsClient) -> dict[str, Any]:
    task = take(c)
    finish(port, c, task)
    return task


def aggregation_started(proc: Proc, task_id: int, round_no: int) -> int:
    return proc.output().count(f"event=aggregation_started task={task_id} round={round_no} ")


def test_a_worker_killed_mid_aggregation_leaves_the_round_to_another_within_the_lease(
    topology: Topology, mysql_url: str, db: Database
) -> None:
    first = topology.worker("doomed-worker")
    topology.beat("beat")
    task = submit(topology.port, num_shards=1, rounds=2)
    volunteer = WsClient(topology.port).register(task_types=["federated_training"])
    try:
        shard = take(volunteer)  # round 0 exists now; the lock below is on round 1's place
        held = hold_next_round(mysql_url, task["id"], 1)
        topology.closing.append(held)
        finish(topology.port, volunteer, shard)
        wait_for(
            lambda: aggregation_started(first, task["id"], 0) == 1 and lock_waits(db) >= 1,
            60,
            0.1,
            "the aggregation waiting in its commit",
        )
        leased = rows(
            db, "SELECT aggregating_since FROM task_rounds WHERE task_id = :t AND round = 0", t=task["id"]
        )
        assert leased[0][0] is not None  # mid-aggregation: the lease is taken and committed
        first.kill()  # SIGKILL, worker and pool alike, with the job unacknowledged
        held.rollback()
        held.close()
        second = topology.worker("second-worker")
        # The lease (30 s by default) lapses; beat's sweep re-drives the round; the new worker
        # retakes it. Within about a minute of the kill, not AGGREGATION_LEASE's old 900 s.
        wait_for(
            lambda: (
                rows(db, "SELECT status FROM task_rounds WHERE task_id = :t AND round = 0", t=task["id"])
                == [("done",)]
            ),
            75,
            0.5,
            "round 0 aggregated by the second worker",
        )
        assert aggregation_started(second, task["id"], 0) == 1
        assert "LeaseHeld" not in second.output()  # beat's sweeps left the live lease alone until it lapsed
        train_round(topology.port, volunteer)
        done = wait_status(topology.port, task["id"], "completed")
    finally:
        volunteer.close()
    assert [r["round"] for r in done["result"]["rounds"]] == [0, 1]  # each round committed once
    assert rows(
        db, "SELECT round, status FROM task_rounds WHERE task_id = :t ORDER BY round", t=task["id"]
    ) == [
        (0, "done"),
        (1, "done"),
    ]


def test_a_live_lease_is_renewed_while_its_aggregation_runs_and_keeps_others_out(db: Database) -> None:
    """The lease keeper against MariaDB, with three-second leases: the round stays leased for
    several lease periods while the job runs, every other taker is refused, and once the job
    is gone the lease lapses and the next taker gets the round."""
    settings = config.Settings(AGGREGATION_LEASE=3)
    now = utcnow()
    with db.session() as s:
        task = Task(
            type=FEDERATED, requirements={}, status="running", created_at=now, updated_at=now,
            config={"rounds": 1, "num_shards": 1}, num_shards=1, current_round=0,
        )  # fmt: skip
        s.add(task)
        s.flush()
        s.add(
            TaskRound(
                task_id=task.id, round=0, status="training", model_path="m", model_sha256="0", started_at=now
            )
        )
        s.add(
            TaskAssignment(
                task_id=task.id, client_id="c-1", assigned_at=now, updated_at=now, status="completed",
                rank=0, round=0, shard_id=0, checkpoint_path="u", num_examples=10,
            )
        )  # fmt: skip
        task_id = task.id

    def lease() -> Any:
        return rows(db, "SELECT aggregating_since FROM task_rounds WHERE task_id = :t", t=task_id)[0][0]

    job = federated.take(db, task_id, 0, settings)
    assert job is not None and job["updates"][0]["num_examples"] == 10
    taken = lease()
    with federated.lease_kept(db, job, settings):
        wait_for(lambda: (lease() - taken).total_seconds() > 7, 30, 0.2, "the lease renewed past two periods")
        with pytest.raises(federated.LeaseHeld):
            federated.take(db, task_id, 0, settings)  # the re-drive of a sweep: refused
    last = lease()

    def take_again() -> Any:
        try:
            return federated.take(db, task_id, 0, settings)
        except federated.LeaseHeld:
            return None

    retaken = wait_for(take_again, 30, 0.5, "the lapsed lease retaken")
    assert retaken["task_id"] == task_id and lease() > last


def test_two_beats_at_once_do_nothing_harmful(topology: Topology, db: Database) -> None:
    worker = topology.worker("worker")
    topology.beat("beat-one")
    topology.beat("beat-two")
    task = submit(topology.port, num_shards=2, rounds=3)
    volunteers = [WsClient(topology.port).register(task_types=["federated_training"]) for _ in range(2)]
    try:
        for _ in range(3):
            for v in volunteers:
                train_round(topology.port, v)
        done = wait_status(topology.port, task["id"], "completed")
    finally:
        for v in volunteers:
            v.close()
    assert [r["round"] for r in done["result"]["rounds"]] == [0, 1, 2]
    assert [r["updates"] for r in done["result"]["rounds"]] == [2, 2, 2]
    for round_no in range(3):
        assert aggregation_started(worker, task["id"], round_no) == 1
    assert (
        rows(
            db,
            "SELECT COUNT(*) FROM task_assignments WHERE task_id = :t AND status = 'completed' "
            "GROUP BY round, `rank` HAVING COUNT(*) > 1",
            t=task["id"],
        )
        == []
    )
    assert rows(
        db, "SELECT COUNT(*) FROM task_shards WHERE task_id = :t AND status = 'done'", t=task["id"]
    ) == [(6,)]
