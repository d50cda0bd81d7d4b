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

import pytest

import server_settings
from store.db import Database
from store.models import FEDERATED, Task, TaskAssignment, TaskRound, utcnow
from tests.conftest import rows
from tests.faults.stack import Topology, aggregation_started, finish, hold_next_round, take
from tests.helpers import WsClient, wait_for
from tests.services.test_federated import submit, wait_status
from workers import federated

pytestmark = pytest.mark.usefixtures("clean")


@pytest.fixture
def topology(mysql_url: str, tmp_path: Path) -> Iterator[Topology]:
    made = Topology(mysql_url, tmp_path)
    yield made
    made.close()


def lock_waits(db: Database) -> int:
    return int(
        rows(db, "SELECT COUNT(*) FROM information_schema.INNODB_TRX WHERE trx_state = 'LOCK WAIT'")[0][0]
    )


def train_round(port: int, c: WsClient) -> dict[str, Any]:
    task = take(c)
    finish(port, c, task)
    return task


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
    settings = server_settings.Settings(AGGREGATION_LEASE=3)
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
