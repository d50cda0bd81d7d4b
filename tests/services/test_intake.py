"""The web tier's group commits (app/intake.py) on MariaDB: requests (and results, closed
sockets) that arrive while a batch is written go together in the next transaction, and each
still gets its own answer: accepted, refused (disabled client, superseded connection), or the
database's error."""

from __future__ import annotations

import threading
import uuid
from datetime import timedelta

import pytest
from sqlalchemy import update

from app.intake import Departures, Intake
from store import clients
from store.db import Database, Unavailable
from store.models import Client, TaskAssignment, TaskShard, utcnow
from tests.conftest import mysql_connect, rows
from tests.helpers import wait_for
from tests.services.test_schedule_listen import add_task

pytestmark = pytest.mark.usefixtures("clean")

HW = clients.Hardware(
    cpu_info={"cores": 2}, ram_info={"total_gb": 4}, gpu_info=[], cores=2, ram_gb=4.0, gpu_count=0,
    gpu_memory_gb=0.0, task_types=None,
)  # fmt: skip


def connected(db: Database, n: int) -> list[tuple[str, str]]:
    """``n`` registered clients, each on its own connection: (client id, conn id)."""
    made = []
    for _ in range(n):
        conn_id = uuid.uuid4().hex
        cid, _, _ = db.run(
            lambda s, c=conn_id: clients.connect(
                s, HW, None, None, c, utcnow(), max_clients=1000, remote="127.0.0.1"
            )
        )
        made.append((cid, conn_id))
    return made


class Rings:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


def test_requests_that_arrive_during_a_write_share_the_next_transaction(db: Database) -> None:
    pairs = connected(db, 40)
    rings = Rings()
    intake = Intake(db, max_tasks=3, written=rings)
    # The first request's transaction waits on a row lock held elsewhere, so the other 39
    # arrive while it is being written; they must go in one transaction after it.
    blocker = mysql_connect(db.engine.url.database)
    blocker.begin()
    with blocker.cursor() as cur:
        cur.execute("SELECT id FROM clients WHERE id = %s FOR UPDATE", (pairs[0][0],))
    answers: dict[str, bool] = {}

    def ask(cid: str, conn: str) -> None:
        answers[cid] = intake.request(cid, conn, timeout=30)

    first = threading.Thread(target=ask, args=pairs[0], daemon=True)
    rest = [threading.Thread(target=ask, args=p, daemon=True) for p in pairs[1:]]
    try:
        first.start()
        wait_for(lambda: intake._writers and not intake._gathered, 10, what="the first batch taken")
        for t in rest:
            t.start()
        wait_for(lambda: len(intake._gathered) == 39, 10, what="39 requests gathered")
    finally:  # a failure must not leave the lock to hang the next test's cleanup
        blocker.rollback()
        blocker.close()
    for t in [first, *rest]:
        t.join(30)
    assert answers == {cid: True for cid, _ in pairs}
    assert (intake.batches, intake.items) == (2, 40)
    assert rings.count == 2  # one scheduling ring per transaction, not per request
    assert rows(
        db, "SELECT COUNT(*) FROM clients WHERE pending_requests = 1 AND requested_at IS NOT NULL"
    ) == [(40,)]


def test_each_request_of_a_batch_gets_its_own_answer(db: Database) -> None:
    (ok, disabled, moved, eager) = connected(db, 4)
    db.run(lambda s: clients.set_disabled(s, disabled[0], True, utcnow(), max_attempts=3))
    db.run(  # the client connected again elsewhere: this connection is no longer its own
        lambda s: s.execute(update(Client).where(Client.id == moved[0]).values(conn_id="elsewhere"))
    )
    rings = Rings()
    intake = Intake(db, max_tasks=3, written=rings)
    blocker = mysql_connect(db.engine.url.database)
    blocker.begin()
    with blocker.cursor() as cur:  # hold the writer on a first batch while the others gather
        cur.execute("SELECT id FROM clients WHERE id = %s FOR UPDATE", (ok[0],))
    answers: list[tuple[str, bool]] = []

    def ask(p: tuple[str, str]) -> None:
        answers.append((p[0], intake.request(*p, timeout=30)))

    order = [ok, disabled, moved, eager, eager, eager, eager, eager]
    threads = [threading.Thread(target=ask, args=(p,), daemon=True) for p in order]
    try:
        threads[0].start()
        wait_for(lambda: intake._writers and not intake._gathered, 10, what="the first batch taken")
        for t in threads[1:]:
            t.start()
        wait_for(lambda: len(intake._gathered) == 7, 10, what="7 requests gathered")
    finally:
        blocker.rollback()
        blocker.close()
    for t in threads:
        t.join(30)
    by_client: dict[str, list[bool]] = {}
    for cid, answer in answers:
        by_client.setdefault(cid, []).append(answer)
    assert by_client == {ok[0]: [True], disabled[0]: [False], moved[0]: [False], eager[0]: [True] * 5}
    pending = dict(rows(db, "SELECT id, pending_requests FROM clients"))
    # five requests of one connection in one batch count up to MAX_TASKS_PER_CLIENT, no further
    assert pending == {ok[0]: 1, disabled[0]: 0, moved[0]: 0, eager[0]: 3}


def test_every_request_of_a_batch_gets_the_outage_when_the_database_is_down(db: Database) -> None:
    down = Database("mysql+pymysql://root@127.0.0.1:1/nowhere", pool_size=2, timeout=2)
    rings = Rings()
    intake = Intake(down, max_tasks=3, written=rings)
    errors: list[BaseException] = []

    def ask(i: int) -> None:
        try:
            intake.request(f"c{i}", f"k{i}", timeout=30)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(errors) == 10 and all(isinstance(e, Unavailable) for e in errors), errors
    assert rings.count == 0  # nothing committed: no scheduling run asked for
    with pytest.raises(Unavailable):  # the writer outlived the outage: it answers the next one too
        intake.request("c0", "k0", timeout=30)
    assert [w.is_alive() for w in intake._writers] == [True]


def held_shards(db: Database, pairs: list[tuple[str, str]], tasks: int) -> list[int]:
    """``tasks`` echo tasks of one shard per client, each client holding one shard of each."""
    from store import task_admin
    from workers import lifecycle, scheduling

    ids = []
    for _ in range(tasks):
        task_id = db.run(
            lambda s: (
                task_admin.create(
                    s,
                    type="echo",
                    requirements={},
                    config={},
                    priority=0,
                    num_shards=len(pairs),
                    now=utcnow(),
                ).id
            )
        )
        db.run(lambda s, t=task_id: lifecycle.prepare_generic(s, t, utcnow()))
        ids.append(task_id)
    for cid, conn in pairs:
        for _ in range(tasks):
            db.run(
                lambda s, c=cid, k=conn: clients.request_work_batch(s, [(c, k)], utcnow(), max_tasks=tasks)
            )
        got = db.run(
            lambda s, c=cid: scheduling.fill_client(s, c, utcnow(), max_tasks=tasks, skip_locked=True)
        )
        assert len(got) == tasks
    return ids


def test_results_of_a_batch_commit_together_and_a_refused_one_leaves_the_others(db: Database) -> None:
    from app.intake import Result, Results
    from server_settings import Settings
    from store.assignments import UnknownTask

    pairs = connected(db, 6)
    first, second = held_shards(db, pairs, tasks=2)
    advanced: list[int] = []
    rings = Rings()
    results = Results(db, Settings(MAX_TASKS_PER_CLIENT=2), advance=advanced.append, written=rings)
    results.writers = 1  # one writer, so the results that arrive while it waits gather in one batch
    blocker = mysql_connect(db.engine.url.database)
    blocker.begin()
    with blocker.cursor() as cur:  # the first result waits here; the others gather behind it
        cur.execute("SELECT id FROM task_shards WHERE task_id = %s FOR UPDATE", (second,))
    sent = [
        Result(cid, task, 0, "completed", {"score": 1.0}, None)
        for cid, _ in pairs
        for task in (first, second)
    ]
    sent.insert(5, Result(pairs[0][0], 999_999, 0, "completed", {}, None))  # no such task: refused alone
    answers: dict[int, object] = {}

    def send(i: int) -> None:
        try:
            answers[i] = results.submit(sent[i], timeout=30)
        except Exception as error:
            answers[i] = error

    threads = [threading.Thread(target=send, args=(i,), daemon=True) for i in range(len(sent))]
    try:
        threads[-1].start()  # a result of the locked task goes first and waits
        wait_for(lambda: results._writers and not results._gathered, 10, what="the first batch taken")
        for t in threads[:-1]:
            t.start()
        wait_for(lambda: len(results._gathered) == len(sent) - 1, 10, what="the other results gathered")
    finally:
        blocker.rollback()
        blocker.close()
    for t in threads:
        t.join(30)
    refused = [i for i, a in answers.items() if isinstance(a, Exception)]
    assert refused == [5] and isinstance(answers[5], UnknownTask)
    assert all(a[2] is False for i, a in answers.items() if i != 5)  # type: ignore[index]
    assert rows(db, "SELECT COUNT(*) FROM task_assignments WHERE status = 'completed'") == [(12,)]
    assert results.batches == 2 and results.items == 13
    # one advance_task per task per batch, not one per result
    assert sorted(advanced) == [first, second, second] or sorted(advanced) == [first, first, second]
    assert rings.count == 2


def test_a_batch_that_keeps_losing_lock_waits_is_written_one_message_at_a_time(
    mysql_url: str, db: Database
) -> None:
    """Two lock wait timeouts in a row (1205, here after 1 s): the batch is split, and every
    message is written on its own, as without batching; only the one whose row stays locked
    waits for it."""
    from sqlalchemy import event

    from app.intake import _Item

    impatient = Database(mysql_url, pool_size=4)
    event.listen(
        impatient.engine,
        "connect",
        lambda conn, _: conn.cursor().execute("SET SESSION innodb_lock_wait_timeout = 1"),
    )
    (a, b, c) = connected(db, 3)
    intake = Intake(impatient, max_tasks=3, written=Rings())
    blocker = mysql_connect(db.engine.url.database)
    blocker.begin()
    items = [_Item(b), _Item(c), _Item(a)]
    writer = threading.Thread(target=intake._write, args=(items,), daemon=True)
    try:
        with blocker.cursor() as cur:
            cur.execute("SELECT id FROM clients WHERE id = %s FOR UPDATE", (a[0],))
        writer.start()
        wait_for(lambda: items[0].done.is_set() and items[1].done.is_set(), 30, what="b and c written alone")
        assert not items[2].done.is_set()  # a's row is still locked: a is being retried
    finally:
        blocker.rollback()
        blocker.close()
    writer.join(30)
    assert [(i.outcome, i.error) for i in items] == [(True, None)] * 3
    assert (intake.batches, intake.items) == (3, 3)  # the batch of three never committed
    assert rows(db, "SELECT COUNT(*) FROM clients WHERE pending_requests = 1") == [(3,)]


def test_batched_progress_is_one_statement_that_keeps_each_assignments_own_values(db: Database) -> None:
    from store import assignments

    pairs = connected(db, 3)
    held_shards(db, pairs, tasks=1)
    ids = [r[0] for r in rows(db, "SELECT id FROM task_assignments ORDER BY id")]
    reports = [(aid, 10.0 * (i + 1), {"loss": 1.0 / (i + 1), "step": i}) for i, aid in enumerate(ids)]
    db.run(lambda s: assignments.record_progress(s, reports, utcnow()))
    got = rows(db, "SELECT id, status, progress, metrics FROM task_assignments ORDER BY id")
    import json

    assert [(a, st, p, json.loads(m)) for a, st, p, m in got] == [
        (aid, "training", value, metrics) for aid, value, metrics in reports
    ]


def test_sockets_that_close_together_are_released_in_one_transaction(db: Database) -> None:
    """A web process's clients all leave at once: the disconnects that arrive while one is
    written go in the next transaction. Each client is no longer connected and its open
    assignment's deadline comes within RECONNECT_GRACE, except a client that registered again
    on another socket meanwhile: its closed socket changes nothing."""
    pairs = connected(db, 30)
    first, moved, holder = pairs[0], pairs[1], pairs[2]
    db.run(lambda s: s.execute(update(Client).where(Client.id == moved[0]).values(conn_id="elsewhere")))
    task_id = add_task(db, shards=2)
    now = utcnow()
    far = now + timedelta(hours=1)
    with db.session() as s:
        for rank, client_id in enumerate([holder[0], moved[0]]):
            shard = s.query(TaskShard).filter_by(task_id=task_id, rank=rank).one()
            s.add(
                TaskAssignment(
                    task_id=task_id, client_id=client_id, assigned_at=now, updated_at=now, status="assigned",
                    rank=rank, round=0, shard_id=shard.id, deadline_at=far,
                )
            )  # fmt: skip
    departures = Departures(db, grace=5.0)
    blocker = mysql_connect(db.engine.url.database)
    blocker.begin()
    with blocker.cursor() as cur:  # hold the writer on a first batch while the others gather
        cur.execute("SELECT id FROM clients WHERE id = %s FOR UPDATE", (first[0],))
    answers: dict[str, bool] = {}

    def close(pair: tuple[str, str]) -> None:
        answers[pair[0]] = departures.submit(pair, timeout=30)

    threads = [threading.Thread(target=close, args=(p,), daemon=True) for p in pairs]
    try:
        threads[0].start()
        wait_for(lambda: departures._writers and not departures._gathered, 10, what="the first batch taken")
        for t in threads[1:]:
            t.start()
        wait_for(lambda: len(departures._gathered) == 29, 10, what="29 disconnects gathered")
    finally:
        blocker.rollback()
        blocker.close()
    for t in threads:
        t.join(30)
    assert answers == {cid: cid != moved[0] for cid, _ in pairs}
    assert (departures.batches, departures.items) == (2, 30)
    connections = dict(rows(db, "SELECT id, conn_id FROM clients"))
    assert connections == {cid: ("elsewhere" if cid == moved[0] else None) for cid, _ in pairs}
    deadlines = dict(rows(db, "SELECT client_id, deadline_at FROM task_assignments"))
    soon = utcnow().replace(tzinfo=None) + timedelta(seconds=5)
    assert deadlines[holder[0]] <= soon < deadlines[moved[0]]
