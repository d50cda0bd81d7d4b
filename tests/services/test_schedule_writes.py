"""A scheduling pass's writes: the same rows whether they go one statement at a time or, on
the workers' connections (``multi_statements``), in one round trip. On MariaDB of its own."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from sqlalchemy import exc, select, text
from sqlalchemy.orm import Session

from store.db import Database, Unavailable, affected, is_retryable
from store.models import Client, TaskAssignment, TaskShard, utcnow
from tests.conftest import fresh_database
from tests.services.test_schedule_listen import add_client, add_task
from workers import scheduling
from workers.scheduling import serve_batch


@pytest.fixture(params=[False, True], ids=["statement-by-statement", "one-round-trip"])
def one_trip(request: pytest.FixtureRequest, services: None) -> Iterator[tuple[Database, bool]]:
    with fresh_database(f"aifarm_test_{os.getpid()}_writes") as url:
        database = Database(url, multi_statements=request.param)
        yield database, request.param
        database.engine.dispose()


def test_a_pass_records_assignments_their_shards_and_the_requests_left(
    one_trip: tuple[Database, bool],
) -> None:
    db, multi = one_trip
    tasks = [add_task(db, shards=2) for _ in range(3)]  # a client gets one shard of a task at most
    task_id = tasks[0]
    asked = {"c-two": 2, "c-three": 3, "c-four": 3}  # 8 requests, 6 shards: someone is left waiting
    for client_id, n in asked.items():
        add_client(db, client_id, ram_gb=8, waiting=n)
    with db.session() as s:
        # rank 0 went out before and timed out: its old assignment is older than the pass's
        first = s.scalars(select(TaskShard).where(TaskShard.task_id == task_id, TaskShard.rank == 0)).one()
        now = utcnow()
        s.add(
            TaskAssignment(
                task_id=task_id, client_id="c-gone", assigned_at=now, updated_at=now, status="timed_out",
                rank=0, round=0, shard_id=first.id,
            )
        )  # fmt: skip
        first.attempts = 1
    with db.session() as s:
        assert (scheduling._multi_statements(s) is not None) is multi  # the path under test
    done = db.run(lambda s: serve_batch(s, utcnow(), batch=50, max_tasks=3, skip_locked=True))
    assert len(done.assignments) == 6  # every shard went out
    with db.session() as s:
        shards = {sh.id: sh for sh in s.scalars(select(TaskShard).where(TaskShard.task_id.in_(tasks)))}
        for made in done.assignments:
            row = s.get(TaskAssignment, made.assignment_id)
            assert row is not None and row.client_id == made.client_id and row.status == "assigned"
            shard = shards[row.shard_id]
            assert (shard.status, shard.assignment_id, shard.rank) == ("assigned", row.id, made.rank)
        assert sorted(sh.assignment_id for sh in shards.values()) == sorted(
            m.assignment_id for m in done.assignments
        )  # rank 0 points at its new assignment, not at the one that timed out
        for client_id, n in asked.items():
            got = sum(1 for m in done.assignments if m.client_id == client_id)
            client = s.get(Client, client_id)
            assert client is not None and client.pending_requests == n - got
            assert (client.requested_at is None) is (n == got)


def test_an_error_in_any_statement_of_the_one_trip_is_raised_as_sqlalchemy_raises_its_own(
    services: None,
) -> None:
    """``Database.run`` runs a deadlock or a lock wait again and calls a lost connection an
    outage by SQLAlchemy's exception classes: the one-trip write raises those too, whether
    its first statement failed or a later one (read after the first one's rows), and the
    transaction is rolled back whole."""
    with fresh_database(f"aifarm_test_{os.getpid()}_trip") as url:
        db = Database(url, multi_statements=True)
        try:
            task_id = add_task(db, shards=1)
            add_client(db, "c-1", ram_gb=8, waiting=1)
            with db.session() as s:
                shard = s.scalars(select(TaskShard).where(TaskShard.task_id == task_id)).one()
                row = {
                    "task_id": task_id, "client_id": "c-1", "assigned_at": utcnow(), "updated_at": utcnow(),
                    "status": "assigned", "rank": 0, "round": 0, "shard_id": shard.id, "deadline_at": None,
                }  # fmt: skip

            def write(s: Session, left: dict[str, scheduling.Left]) -> list[int]:
                s.execute(text("SET SESSION innodb_lock_wait_timeout = 1"))
                conn = scheduling._multi_statements(s)
                assert conn is not None
                return scheduling._write_in_one_trip(conn, [row], utcnow(), left)

            # the last statement fails (a client's pending requests may not be NULL)
            with pytest.raises(exc.IntegrityError) as failed:
                db.run(lambda s: write(s, {"c-1": (None, None)}), attempts=1)  # type: ignore[dict-item]
            assert failed.value.orig.args[0] == 1048  # type: ignore[union-attr]
            assert rows_of(db, "SELECT COUNT(*) FROM task_assignments") == 0  # the INSERT went too
            # the first statement waits on a lock (the task's row, which the INSERT's key reads)
            with db.engine.connect() as other:
                other.execute(text("SELECT id FROM tasks WHERE id = :t FOR UPDATE"), {"t": task_id})
                with pytest.raises(Unavailable, match="busy: errno 1205") as waited:
                    db.run(lambda s: write(s, {}), attempts=1)  # one try only: "busy", not a bug
                other.rollback()
            assert is_retryable(waited.value.__cause__)  # type: ignore[arg-type]
            assert (
                db.run(lambda s: write(s, {})) and rows_of(db, "SELECT COUNT(*) FROM task_assignments") == 1
            )
        finally:
            db.engine.dispose()


def rows_of(db: Database, sql: str) -> int:
    with db.session() as s:
        return int(s.execute(text(sql)).scalar_one())


def test_an_update_counts_the_rows_it_matched_on_every_kind_of_connection(
    one_trip: tuple[Database, bool],
) -> None:
    """Compare-and-sets read an UPDATE's rowcount as the rows it matched (MySQL's FOUND_ROWS,
    which SQLAlchemy asks for): the workers' connections, with their own flags, count alike.
    Without it a sweep's UPDATE of a row that already held those values counted 0, and the
    ORM raised StaleDataError."""
    db, _ = one_trip
    add_client(db, "c-same", ram_gb=8, waiting=0)
    for _ in range(2):  # the second UPDATE changes nothing and still matches the row
        matched = db.run(
            lambda s: affected(s.execute(text("UPDATE clients SET pending_requests = 0 WHERE id = 'c-same'")))
        )
        assert matched == 1
