"""The client's ledger of results, on literal results and times: no session, no threads."""

from __future__ import annotations

from typing import Any

import pytest

from client.ledger import ResultLedger


def result(task_id: int, status: str = "completed", round_no: int = 0) -> dict[str, Any]:
    return {"type": "task_result", "task_id": task_id, "round": round_no, "status": status}


def test_a_recorded_result_is_remembered_under_its_key_and_counted() -> None:
    ledger = ResultLedger(max_tasks=2)
    first = result(7)

    ledger.record(first, (7, 0, 1))

    assert ledger.finished((7, 0, 1)) is first
    assert first["_key"] == (7, 0, 1)
    assert ledger.finished((7, 0, 2)) is None
    assert not ledger.limit_reached()
    ledger.record(result(8), (8, 0, 0))
    assert ledger.limit_reached()


def test_without_max_tasks_there_is_no_limit_and_no_quota() -> None:
    ledger = ResultLedger()
    for task_id in range(5):
        ledger.record(message := result(task_id), (task_id, 0, 0))
        ledger.mark_sent(message, now=10.0)

    assert not ledger.limit_reached()
    for task_id in range(5):
        ledger.acknowledge(task_id, 0, 0)
    assert not ledger.quota_acknowledged()


def test_only_the_latest_results_are_remembered() -> None:
    ledger = ResultLedger(remembered=2)
    for task_id in (1, 2, 3):
        ledger.record(result(task_id), (task_id, 0, 0))

    assert ledger.finished((1, 0, 0)) is None
    assert ledger.finished((2, 0, 0)) is not None and ledger.finished((3, 0, 0)) is not None


def test_the_quota_counts_results_acknowledged_once_each() -> None:
    ledger = ResultLedger(max_tasks=2)
    first, second = result(1), result(2)
    ledger.record(first, (1, 0, 0))
    ledger.record(second, (2, 0, 0))
    ledger.mark_sent(first, now=10.0)
    ledger.mark_sent(second, now=11.0)
    assert not ledger.quota_acknowledged()  # sent is not enough

    assert ledger.acknowledge(1, 0, 0) is first
    assert ledger.acknowledge(1, 0, 0) is None  # acknowledged again (a resend): still one result
    assert not ledger.quota_acknowledged()
    assert ledger.acknowledge(2, 0, 0) is second
    assert ledger.quota_acknowledged()
    assert ledger.unacknowledged() == []


def test_a_result_waits_for_its_acknowledgement_across_connections() -> None:
    ledger = ResultLedger()
    ledger.new_connection()
    done, other = result(7), result(8)
    ledger.record(done, (7, 0, 1))
    ledger.record(other, (8, 0, 0))
    ledger.mark_sent(done, now=10.0)
    ledger.mark_sent(other, now=10.0)
    ledger.acknowledge(8, 0, 0)

    ledger.new_connection()  # the socket dropped before 7's acknowledgement came

    assert ledger.unacknowledged() == [done]
    assert ledger.waiting(7, 0) is done
    assert ledger.waiting(7, 0, rank=2) is None  # another shard of the same task
    assert ledger.acknowledge(7, 0, 1) is done
    assert ledger.unacknowledged() == []


def test_a_result_refused_for_good_is_forgotten_and_not_counted() -> None:
    ledger = ResultLedger(max_tasks=1)
    done = result(7)
    ledger.record(done, (7, 0, 1))
    ledger.mark_sent(done, now=10.0)
    assert ledger.limit_reached()

    assert ledger.refuse(7, 0) is done

    assert ledger.unacknowledged() == []
    assert not ledger.limit_reached()  # it may take another task
    assert not ledger.quota_acknowledged()
    assert ledger.refuse(7, 0) is None


def test_a_result_refused_for_now_is_due_again_and_an_acknowledgement_cancels_it() -> None:
    ledger = ResultLedger()
    done = result(7)
    ledger.record(done, (7, 0, 1))
    ledger.mark_sent(done, now=10.0)

    ledger.hold(done)
    ledger.hold(done)  # once only
    assert ledger.resends_waiting()
    ledger.acknowledge(7, 0, 1)  # the first send counted after all

    assert ledger.take_resends() == []


def test_a_result_of_a_task_of_one_round_matches_the_round_the_server_names() -> None:
    ledger = ResultLedger()
    done = {"type": "task_result", "task_id": 7, "status": "completed"}
    ledger.record(done, (7, None, None))

    assert ledger.acknowledge(7, 0, 0) is done


def test_a_result_is_known_as_sent_on_the_connection_it_went_out_on() -> None:
    ledger = ResultLedger()
    ledger.new_connection()
    done = result(7)
    ledger.record(done, (7, 0, 1))
    assert not ledger.sent_on_this_connection((7, 0, 1))  # made, not sent

    ledger.mark_sent(done, now=10.0)
    assert ledger.sent_on_this_connection((7, 0, 1))

    ledger.new_connection()
    assert not ledger.sent_on_this_connection((7, 0, 1))
    ledger.mark_sent(done, now=20.0)
    assert ledger.sent_on_this_connection((7, 0, 1))


def test_a_failure_is_forgotten_for_a_retry_but_stays_counted() -> None:
    ledger = ResultLedger(max_tasks=2)
    failure = result(7, "failed")
    ledger.record(failure, (7, 0, 1))

    assert ledger.retry_failure((7, 0, 1)) is failure

    assert ledger.finished((7, 0, 1)) is None
    assert ledger.retry_failure((7, 0, 1)) is None  # nothing left to forget
    ledger.record(result(7), (7, 0, 1))  # the retry's result replaces it, counted once
    assert not ledger.limit_reached()


@pytest.mark.parametrize(
    ("status", "max_tasks"),
    [("completed", None), ("failed", 1)],
    ids=["a completed result", "a failure once max_tasks results are made"],
)
def test_is_not_retried(status: str, max_tasks: int | None) -> None:
    ledger = ResultLedger(max_tasks=max_tasks)
    made = result(7, status)
    ledger.record(made, (7, 0, 1))

    assert ledger.retry_failure((7, 0, 1)) is None
    assert ledger.finished((7, 0, 1)) is made


def test_a_retried_failure_is_not_resent_after_a_transient_error() -> None:
    ledger = ResultLedger()
    failure, other = result(7, "failed"), result(8)
    ledger.record(failure, (7, 0, 1))
    ledger.record(other, (8, 0, 0))
    ledger.mark_sent(failure, now=100.0)
    ledger.mark_sent(other, now=101.0)
    ledger.hold_recent(now=102.0)

    ledger.retry_failure((7, 0, 1))

    assert ledger.take_resends() == [other]


def test_a_result_dropped_unsent_is_neither_counted_nor_remembered() -> None:
    ledger = ResultLedger(max_tasks=1)
    ledger.record(result(7), (7, 0, 1))
    assert ledger.limit_reached()

    ledger.unmake((7, 0, 1))

    assert not ledger.limit_reached()
    assert ledger.finished((7, 0, 1)) is None


def test_a_transient_error_makes_the_results_of_the_last_window_due_again() -> None:
    ledger = ResultLedger(window=30.0)
    old, recent, latest = result(1), result(2), result(3)
    for task_id, message in enumerate((old, recent, latest), start=1):
        ledger.record(message, (task_id, 0, 0))
    ledger.mark_sent(old, now=100.0)
    ledger.mark_sent(recent, now=125.0)
    ledger.mark_sent(latest, now=131.0)

    ledger.hold_recent(now=140.0)  # 40 s after the first: too old to have been refused

    assert ledger.resends_waiting()
    assert ledger.take_resends() == [recent, latest]
    assert not ledger.resends_waiting()
    assert ledger.take_resends() == []


def held_once() -> tuple[ResultLedger, dict[str, Any]]:
    """A ledger whose one result, sent at 100 s, was made due again by an error at 101 s."""
    ledger = ResultLedger()
    done = result(7)
    ledger.record(done, (7, 0, 1))
    ledger.mark_sent(done, now=100.0)
    ledger.hold_recent(now=101.0)
    return ledger, done


def test_two_transient_errors_make_a_result_due_once() -> None:
    ledger, done = held_once()
    ledger.mark_sent(done, now=102.0)  # sent again meanwhile (a reconnect)

    ledger.hold_recent(now=103.0)

    assert ledger.take_resends() == [done]


def test_a_transient_error_forgets_what_it_made_due() -> None:
    ledger, _ = held_once()
    ledger.take_resends()

    ledger.hold_recent(now=102.0)  # a second error: the result was not sent again since

    assert ledger.take_resends() == []
