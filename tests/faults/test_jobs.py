"""Lost and duplicate jobs on the production topology (gunicorn, Celery workers, beat, MariaDB,
a Redis of our own): a lost ``advance_task`` or ``aggregate_round`` message is re-driven by
beat's sweep from the database; duplicate ``aggregate_round`` jobs commit a round once.

A message is lost for real: it waits in the broker's queue with no worker consuming it (or
none consuming its queue), and the broker is flushed. Jobs are held mid-transaction by a row
lock the test takes, and checked to be waiting on it, before the duplicates are sent."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from store.blobs import BlobStore
from store.db import Database
from tests.conftest import mysql_connect, rows
from tests.faults.stack import Topology, aggregation_started, finish, take
from tests.faults.test_outages import PREPARE, RowLock, new_task, running
from tests.helpers import (
    Proc,
    WsClient,
    request,
    wait_for,
)
from tests.services.test_federated import submit, wait_status
from workers import recovery

pytestmark = pytest.mark.usefixtures("clean")


@pytest.fixture(scope="module")
def topology(mysql_url: str, services: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Topology]:
    made = Topology(mysql_url, tmp_path_factory.mktemp("jobs"))
    yield made
    made.close()


@pytest.fixture
def stack(topology: Topology) -> Iterator[Topology]:
    yield topology
    topology.stop_workers()


def rounds(db: Database, task_id: int) -> list[tuple[Any, ...]]:
    return rows(db, "SELECT round, status FROM task_rounds WHERE task_id = :t ORDER BY round, id", t=task_id)


# --- lost ---


def test_a_lost_advance_task_is_redriven_by_the_sweep(stack: Topology, db: Database) -> None:
    first = stack.worker("advance-a")
    client = WsClient(stack.port).register()
    try:
        status, task = request(stack.port, "POST", "/api/tasks", {"type": "echo"})
        assert status == 201
        got = take(client)
        stack.stop_workers()  # nobody consumes: the result's advance_task waits in the queue
        client.result(got, score=0.75)
        wait_for(lambda: "workers.tasks.advance_task" in stack.queued("celery"), what="advance_task queued")
        assert rows(db, "SELECT status FROM task_assignments WHERE task_id = :t", t=task["id"]) == [
            ("completed",)
        ]
        stack.flush()  # lost
        assert rows(db, "SELECT status FROM tasks WHERE id = :t", t=task["id"]) == [("running",)]
        second = stack.worker("advance-b")
        stack.beat()
        done = wait_for(
            lambda: (
                (t := request(stack.port, "GET", f"/api/tasks/{task['id']}")[1])["status"] == "completed"
                and t
            ),
            30,
            0.2,
            "the task completed by the re-driven advance",
        )
    finally:
        client.close()
    assert done["result"]["metrics"] == {"score": 0.75}
    assert re.search(r"task=sweep state=finish .*advanced=1", second.output())
    assert "workers.tasks.advance_task[" not in first.output()  # stopped before the result came


def test_a_lost_aggregate_round_is_redriven_by_the_sweep(stack: Topology, db: Database) -> None:
    stack.worker("no-aggregation", queues="celery")  # advances, but leaves aggregate_round queued
    volunteer = WsClient(stack.port).register(task_types=["federated_training"])
    try:
        task = submit(stack.port, num_shards=1, rounds=1)
        finish(stack.port, volunteer, take(volunteer))
        wait_for(
            lambda: stack.queued("aggregation") == ["workers.tasks.aggregate_round"],
            30,
            what="aggregation queued",
        )
        stack.flush()  # lost, before any worker took the round's lease
        assert rows(db, "SELECT aggregating_since FROM task_rounds WHERE task_id = :t", t=task["id"]) == [
            (None,)
        ]
        stack.stop_workers()
        aggregator = stack.worker("aggregator")
        stack.beat()
        done = wait_status(stack.port, task["id"], "completed", timeout=40)
    finally:
        volunteer.close()
    assert aggregation_started(aggregator, task["id"], 0) == 1
    assert [r["round"] for r in done["result"]["rounds"]] == [0]
    assert rounds(db, task["id"]) == [(0, "done")]
    assert re.search(r"task=sweep state=finish .*advanced=1", aggregator.output())


# --- duplicates ---


def test_duplicate_aggregate_round_jobs_commit_the_round_once(
    stack: Topology, db: Database, mysql_url: str
) -> None:
    """The round's own aggregation is held in its commit (the next round's row is gap-locked
    by this test) with its lease live; two duplicates of its job run meanwhile (the worker runs
    three at once) and wait for the task's row; one more comes after the commit. Only the
    first aggregates; the others find the round done and do nothing."""
    worker = stack.worker("dup", concurrency=3)
    volunteer = WsClient(stack.port).register(task_types=["federated_training"])
    gap = mysql_connect(mysql_url.rsplit("/", 1)[1])
    try:
        task = submit(stack.port, num_shards=1, rounds=2)
        shard = take(volunteer)  # round 0 exists; round 1's place is locked below
        gap.begin()
        with gap.cursor() as cur:
            cur.execute(
                "SELECT id FROM task_rounds WHERE task_id = %s AND round = 1 FOR UPDATE", (task["id"],)
            )
        finish(stack.port, volunteer, shard)
        database = mysql_url.rsplit("/", 1)[1]
        wait_for(
            lambda: running(database, "INSERT INTO task_rounds%"), 30, what="the aggregation in its commit"
        )
        assert aggregation_started(worker, task["id"], 0) == 1
        for _ in range(2):
            stack.send("workers.tasks.aggregate_round", task["id"], 0)
        wait_for(
            lambda: len(running(database, PREPARE)) == 2, 30, what="both duplicates waiting for the task"
        )
        gap.rollback()
        wait_for(lambda: _noops(worker) == 2, 30, what="the two duplicates done")
        assert rounds(db, task["id"]) == [(0, "done"), (1, "training")]
        stack.send("workers.tasks.aggregate_round", task["id"], 0)  # a late duplicate
        wait_for(lambda: _noops(worker) == 3, 30, what="the late duplicate done")
    finally:
        gap.close()
        volunteer.close()
    assert aggregation_started(worker, task["id"], 0) == 1
    assert rounds(db, task["id"]) == [(0, "done"), (1, "training")]
    updates = rows(
        db, "SELECT JSON_VALUE(metrics, '$.updates') FROM task_rounds WHERE task_id = :t", t=task["id"]
    )
    assert updates == [("1",), (None,)]  # round 0 aggregated from its one update, once
    assert rows(db, "SELECT COUNT(*) FROM task_shards WHERE task_id = :t AND round = 1", t=task["id"]) == [
        (1,)
    ]


def _noops(proc: Proc) -> int:
    return len(
        re.findall(r"workers\.tasks\.aggregate_round\[[^\]]+\] succeeded in [0-9.]+s: 'noop'", proc.output())
    )


def test_an_aggregate_round_that_finds_a_live_lease_retries_later_and_runs_once(
    stack: Topology, db: Database, mysql_url: str
) -> None:
    """Another worker is aggregating the round (its lease is fresh) when a job for the round
    runs: it does not aggregate beside it, it looks again after AGGREGATION_LEASE. That
    aggregator died (its lease is never renewed): the job's retry finds the lease lapsed and
    aggregates the round, once."""
    stack.worker("lease-celery", queues="celery")  # advances, but leaves aggregate_round queued
    volunteer = WsClient(stack.port).register(task_types=["federated_training"])
    lock = None
    try:
        task = submit(stack.port, num_shards=1, rounds=1)
        finish(stack.port, volunteer, take(volunteer))
        wait_for(
            lambda: stack.queued("aggregation") == ["workers.tasks.aggregate_round"],
            30,
            what="aggregation queued",
        )
        # The job starts and waits for the task's row; meanwhile the other aggregator leases the round.
        lock = RowLock(mysql_url, "tasks", task["id"])
        aggregator = stack.worker("lease-aggregator", queues="aggregation", AGGREGATION_LEASE="3")
        wait_for(lambda: lock.waiters(PREPARE), 30, what="the job waiting for the task's row")
        with db.session() as s:
            s.execute(
                text(
                    "UPDATE task_rounds SET aggregating_since = UTC_TIMESTAMP(6) "
                    "WHERE task_id = :t AND round = 0"
                ),
                {"t": task["id"]},
            )
        lock.release()
        wait_for(
            lambda: re.search(
                r"aggregate_round\[[^\]]+\] retry: Retry in 3s: LeaseHeld", aggregator.output()
            ),
            30,
            what="the job deferred to the live lease",
        )
        assert aggregation_started(aggregator, task["id"], 0) == 0
        done = wait_status(stack.port, task["id"], "completed", timeout=40)
    finally:
        if lock is not None:
            lock.close()
        volunteer.close()
    assert aggregation_started(aggregator, task["id"], 0) == 1
    assert [r["round"] for r in done["result"]["rounds"]] == [0]
    assert rounds(db, task["id"]) == [(0, "done")]


# --- lost purge_task_files ---


def test_the_sweep_finds_the_folders_of_deleted_tasks_only(db: Database, tmp_path: Path) -> None:
    """What the sweep purges again: a task folder with no task row, not written to for a few
    seconds; never the folder of a task that exists, nor anything else under ``tasks/``."""
    store = BlobStore(tmp_path)
    existing = new_task(db)
    deleted, fresh = existing + 1000, existing + 1001
    long_ago = time.time() - 60
    for name in (str(existing), str(deleted), str(fresh), "not-a-task"):
        (tmp_path / "tasks" / name / "round-00000").mkdir(parents=True)
        if name != str(fresh):  # fresh: just written, maybe a new task reusing an id (SQLite)
            os.utime(tmp_path / "tasks" / name, (long_ago, long_ago))
    now, later = time.time(), time.time() + 60  # the sweep's clock, injected
    assert recovery.orphan_task_dirs(db, store, now, limit=10) == [deleted]
    assert recovery.orphan_task_dirs(db, store, later, limit=10) == [deleted, fresh]
    assert recovery.orphan_task_dirs(db, store, later, limit=1) == [deleted]
    assert recovery.orphan_task_dirs(db, BlobStore(tmp_path / "empty"), now, limit=10) == []
