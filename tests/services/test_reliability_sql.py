"""``reliability.note`` writes a valid result as one UPDATE computed in SQL: it must agree with
the Python rules (:func:`store.reliability.quota_after`) for every stored quota, on MariaDB."""

from __future__ import annotations

import pytest
from sqlalchemy.orm import Session

from store import reliability
from store.db import Database
from store.models import Client, utcnow
from tests.conftest import rows

pytestmark = pytest.mark.usefixtures("clean")


def client_with(db: Database, cid: str, task_quota: int | None, throughput: float | None) -> None:
    now = utcnow()
    with db.session() as s:
        s.add(
            Client(
                id=cid, cpu_info={"cores": 4}, ram_info={"total_gb": 8}, cpu_cores=4, ram_gb=8,
                token_hash="x" * 64, status="active", last_seen=now, created_at=now,
                task_quota=task_quota, throughput=throughput, valid_results=2, turnaround_s=10.0,
            )
        )  # fmt: skip


@pytest.mark.parametrize("max_tasks", [1, 3, 8])
@pytest.mark.parametrize("stored", [None, -1, 0, 1, 2, 3, 4, 7, 8, 20])
def test_a_valid_result_moves_the_quota_as_the_python_rule_does(
    db: Database, max_tasks: int, stored: int | None
) -> None:
    client_with(db, "c-q", stored, None)
    db.run(lambda s: reliability.note(s, "c-q", "valid", max_tasks=max_tasks, turnaround_s=4.5))
    assert rows(db, "SELECT task_quota, valid_results, turnaround_s FROM clients WHERE id = 'c-q'") == [
        (reliability.quota_after(stored, "valid", max_tasks), 3, 14.5)
    ]


def test_a_valid_result_averages_the_measured_throughput(db: Database) -> None:
    client_with(db, "c-new", None, None)
    client_with(db, "c-old", None, 100.0)
    for cid in ("c-new", "c-old"):
        db.run(lambda s, c=cid: reliability.note(s, c, "valid", max_tasks=3, examples_per_s=50.0))
    assert rows(db, "SELECT id, throughput FROM clients ORDER BY id") == [("c-new", 50.0), ("c-old", 75.0)]


def test_an_error_after_a_valid_result_in_one_transaction_sees_the_valid_one(db: Database) -> None:
    """The error path loads the client: it must see what the valid result's UPDATE wrote."""
    client_with(db, "c-mix", 2, None)

    def both(s: Session) -> None:
        loaded = s.get(Client, "c-mix")  # in the session before the UPDATE, as a batch may have it
        reliability.note(s, "c-mix", "valid", max_tasks=8)  # 2 -> 4
        reliability.note(s, "c-mix", "error", max_tasks=8)  # 4 -> 2 (from a stale 2: 1)
        assert loaded is not None and loaded.task_quota == 2

    db.run(both)
    assert rows(db, "SELECT task_quota, valid_results, error_results FROM clients WHERE id = 'c-mix'") == [
        (2, 3, 1)
    ]
