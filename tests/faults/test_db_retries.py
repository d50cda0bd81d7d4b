"""``Database.run`` against MariaDB when transactions fail: bounded retries on a deadlock
(1213), a lock wait timeout (1205) and a connection lost under a transaction (2006, 2013); no
retry when the server is down, nor of a COMMIT whose outcome is unknown; and the same
``Database`` works again once the server is back (no process restart)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import event, text
from sqlalchemy.orm import Session

from store.db import Database, Unavailable
from store.models import Task, utcnow
from tests.conftest import MYSQL_HOST, MYSQL_PORT, mysql_connect, rows
from tests.faults.proxy import Proxy

pytestmark = pytest.mark.usefixtures("clean")


@pytest.fixture(scope="module")
def proxy(services: None) -> Proxy:
    return Proxy((MYSQL_HOST, MYSQL_PORT))


@pytest.fixture
def proxied(mysql_url: str, proxy: Proxy) -> Iterator[Database]:
    """A Database reached through the proxy (as a web process or a worker would reach MariaDB)."""
    proxy.restore()
    database = Database(
        mysql_url.replace(f"{MYSQL_HOST}:{MYSQL_PORT}", f"127.0.0.1:{proxy.port}"), pool_size=2, timeout=10
    )
    yield database
    proxy.restore()
    database.dispose()


def new_task(s: Session, label: str) -> int:
    now = utcnow()
    task = Task(
        type="echo", requirements={}, status="pending", created_at=now, updated_at=now,
        num_shards=1, priority=0, config={"label": label},
    )  # fmt: skip
    s.add(task)
    s.flush()
    return task.id


def labels(db: Database) -> list[str]:
    return [r[0] for r in rows(db, "SELECT JSON_VALUE(config, '$.label') FROM tasks ORDER BY id")]


def test_a_connection_lost_mid_transaction_is_run_again_on_a_new_one(
    proxied: Database, proxy: Proxy, db: Database
) -> None:
    runs: list[int] = []

    def work(s: Session) -> int:
        runs.append(1)
        task_id = new_task(s, "once")
        if len(runs) == 1:
            proxy.refuse()  # the server restarts under the open transaction...
            proxy.restore()  # ...and is back at once
        s.execute(text("SELECT 1"))  # 2013 on the first run: the server rolled it back
        return task_id

    task_id = proxied.run(work)
    assert len(runs) == 2
    assert labels(db) == ["once"]  # the first run's insert was rolled back, the second's committed
    assert rows(db, "SELECT id FROM tasks") == [(task_id,)]


def test_a_server_that_stays_down_is_not_waited_for_and_the_same_pool_recovers(
    proxied: Database, proxy: Proxy, db: Database
) -> None:
    runs: list[int] = []

    def work(s: Session) -> int:
        runs.append(1)
        task_id = new_task(s, "after")
        if len(runs) == 1:
            proxy.refuse()  # down, and stays down
        s.execute(text("SELECT 1"))
        return task_id

    with pytest.raises(Unavailable):
        proxied.run(work)
    assert len(runs) == 1  # the retry could not connect: it never reached the work
    assert labels(db) == []
    with pytest.raises(Unavailable):
        proxied.run(lambda s: s.execute(text("SELECT 1")))  # still down: refused at once
    proxy.restore()
    proxied.run(work)  # the same Database, no restart
    assert labels(db) == ["after"]


def test_a_pooled_connection_cut_while_in_steady_use_fails_once_and_is_run_again(
    proxied: Database, proxy: Proxy, db: Database
) -> None:
    """No ping on checkout of a connection used within PING_IDLE_S: the cut is found by the
    first statement, and ``run`` runs the transaction again on a new connection."""
    proxied.run(lambda s: s.execute(text("SELECT 1")))  # one connection in the pool, just used
    proxy.refuse()  # the server restarts between two transactions
    proxy.restore()
    runs: list[int] = []

    def work(s: Session) -> int:
        runs.append(1)
        return new_task(s, "steady")

    proxied.run(work)
    assert len(runs) == 2  # the first run hit the cut connection, the second a new one
    assert labels(db) == ["steady"]


def test_a_pooled_connection_idle_for_a_while_is_pinged_and_replaced_before_use(
    proxied: Database, proxy: Proxy, db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    proxied.run(lambda s: s.execute(text("SELECT 1")))
    proxy.refuse()  # the server restarted while the connection sat in the pool
    proxy.restore()
    monkeypatch.setattr("store.db.PING_IDLE_S", 0.0)  # it has been idle "long enough"
    runs: list[int] = []

    def work(s: Session) -> int:
        runs.append(1)
        return new_task(s, "idle")

    proxied.run(work)
    assert len(runs) == 1  # the ping found it dead at checkout; the work ran once, on a new one
    assert labels(db) == ["idle"]


def test_a_commit_whose_connection_is_lost_is_not_run_again(
    proxied: Database, proxy: Proxy, db: Database
) -> None:
    runs: list[int] = []

    def cut(_conn: Any) -> None:
        proxy.refuse()  # the COMMIT is sent into a dead connection: did it commit? unknown
        proxy.restore()

    event.listen(proxied.engine, "commit", cut)
    try:
        with pytest.raises(Unavailable) as raised:
            proxied.run(lambda s: runs.append(new_task(s, "maybe")))
    finally:
        event.remove(proxied.engine, "commit", cut)
    assert not raised.value.retry_safe
    assert len(runs) == 1
    assert len(labels(db)) <= 1  # once at most, never twice
    proxied.run(lambda s: s.execute(text("SELECT 1")))  # and the pool carries on


def test_a_deadlock_is_run_again_and_both_transactions_commit(db: Database) -> None:
    with db.session() as s:
        first, second = new_task(s, "a"), new_task(s, "b")
    both_hold_one = threading.Barrier(2, timeout=10)
    runs: list[str] = []
    errors: list[BaseException] = []

    def lock_in_order(name: str, ids: tuple[int, int]) -> None:
        def work(s: Session) -> None:
            runs.append(name)
            s.execute(text("SELECT id FROM tasks WHERE id = :t FOR UPDATE"), {"t": ids[0]})
            if runs.count(name) == 1:
                both_hold_one.wait()  # each holds one row and wants the other's: a deadlock
            s.execute(text("UPDATE tasks SET priority = priority + 1 WHERE id = :t"), {"t": ids[1]})

        try:
            db.run(work)
        except BaseException as error:
            errors.append(error)

    threads = [
        threading.Thread(target=lock_in_order, args=("ab", (first, second))),
        threading.Thread(target=lock_in_order, args=("ba", (second, first))),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    assert sorted(runs) in (["ab", "ab", "ba"], ["ab", "ba", "ba"])  # MariaDB's victim ran twice
    assert rows(db, "SELECT priority FROM tasks ORDER BY id") == [(1,), (1,)]  # each update once


def test_a_lock_held_too_long_is_retried_a_bounded_number_of_times_then_is_a_503(
    db: Database, mysql_url: str
) -> None:
    with db.session() as s:
        task_id = new_task(s, "held")
    impatient = Database(mysql_url, pool_size=1)  # its connection's lock wait timeout is 1 s
    holder = mysql_connect(mysql_url.rsplit("/", 1)[1])
    holder.begin()
    runs: list[int] = []

    def work(s: Session) -> None:
        runs.append(1)
        s.execute(text("SET SESSION innodb_lock_wait_timeout = 1"))
        s.execute(text("UPDATE tasks SET priority = 5 WHERE id = :t"), {"t": task_id})

    try:
        with holder.cursor() as cur:
            cur.execute("SELECT id FROM tasks WHERE id = %s FOR UPDATE", (task_id,))
        with pytest.raises(Unavailable, match="busy"):
            impatient.run(work, attempts=2)  # 1205 twice: the web answers 503, a job retries later
        assert len(runs) == 2
        holder.rollback()
        impatient.run(work)  # free again: one run
        assert len(runs) == 3
    finally:
        holder.close()
        impatient.dispose()
    assert rows(db, "SELECT priority FROM tasks") == [(5,)]
