"""A pooled connection goes back to the pool without a ROLLBACK after its COMMIT, and is
rolled back when it comes back inside a transaction (store/db.py, ``_reset_if_open``)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session

from store.db import Database
from tests.conftest import mysql_connect


@pytest.fixture
def one_connection(mysql_url: str) -> Iterator[Database]:
    db = Database(mysql_url, pool_size=1)  # every transaction on the same connection
    yield db
    db.dispose()


def rollbacks(s: Session) -> tuple[int, int]:
    row = s.execute(text("SHOW SESSION STATUS LIKE 'Com_rollback'")).one()
    return int(s.execute(text("SELECT CONNECTION_ID()")).scalar_one()), int(row[1])


def test_a_committed_transaction_goes_back_without_a_rollback(one_connection: Database) -> None:
    before = one_connection.run(rollbacks)
    for _ in range(5):
        one_connection.run(lambda s: s.execute(text("SELECT 1")).scalar_one())
    assert one_connection.run(rollbacks) == before  # same connection, no ROLLBACK sent since


def test_a_connection_given_back_inside_a_transaction_is_rolled_back(
    one_connection: Database, mysql_url: str
) -> None:
    other = mysql_connect(mysql_url.rsplit("/", 1)[1])
    with other.cursor() as cur:
        cur.execute("CREATE TABLE IF NOT EXISTS pool_probe (id INT PRIMARY KEY, v INT NOT NULL)")
        cur.execute("REPLACE INTO pool_probe VALUES (1, 0)")
    raw = one_connection.engine.raw_connection()
    with raw.cursor() as cur:
        cur.execute("UPDATE pool_probe SET v = 1 WHERE id = 1")  # the row locked, not committed
    raw.close()  # back to the pool with the transaction open
    with other.cursor() as cur:
        cur.execute("SET SESSION innodb_lock_wait_timeout = 5")
        cur.execute("UPDATE pool_probe SET v = 2 WHERE id = 1")  # a lock still held: 1205 after 5 s
        cur.execute("SELECT v FROM pool_probe WHERE id = 1")
        assert cur.fetchone() == (2,)
        cur.execute("DROP TABLE pool_probe")
    other.close()
