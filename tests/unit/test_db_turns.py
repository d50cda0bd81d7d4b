"""The database's turns (store/db.py): at most ``size`` transactions at once, the rest in line."""

from __future__ import annotations

import threading

import pytest

from store.db import Busy, _Turns

WAIT = 30.0  # an upper bound for a thread to get somewhere; never a timing assertion


def test_waiters_are_served_in_arrival_order_and_first_goes_before_them() -> None:
    turns = _Turns(1)
    order: list[str] = []
    queued = threading.Semaphore(0)

    def take(name: str, first: bool = False) -> None:
        with turns.turn(WAIT, first=first):
            order.append(name)

    holder = turns.turn(WAIT)
    holder.__enter__()
    threads = []
    for name, first in (("a", False), ("b", False), ("hub", True)):
        t = threading.Thread(target=take, args=(name, first))
        t.start()
        threads.append(t)
        while turns.waited < len(threads):  # each is in line before the next comes
            queued.acquire(timeout=0.01)
    holder.__exit__(None, None, None)
    for t in threads:
        t.join(WAIT)

    assert order == ["hub", "a", "b"]


def test_a_turn_is_reentrant_within_one_thread() -> None:
    turns = _Turns(1)
    with turns.turn(WAIT), turns.turn(WAIT):  # a transaction inside another: no deadlock
        pass
    with turns.turn(WAIT):  # and the turn was given back once
        pass


def test_no_turn_within_the_timeout_is_busy_and_leaves_the_line() -> None:
    turns = _Turns(1)
    got: list[BaseException] = []

    def late() -> None:
        try:
            with turns.turn(0.05):
                pass
        except Busy as error:
            got.append(error)

    with turns.turn(WAIT):
        t = threading.Thread(target=late)
        t.start()
        t.join(WAIT)
    assert len(got) == 1 and "no database connection free" in str(got[0])
    with turns.turn(WAIT):  # the line holds nobody stale: the next one gets its turn at once
        pass


@pytest.mark.parametrize("size", [1, 3])
def test_never_more_than_size_at_once(size: int) -> None:
    turns = _Turns(size)
    inside = 0
    most = 0
    lock = threading.Lock()

    def work() -> None:
        nonlocal inside, most
        with turns.turn(WAIT):
            with lock:
                inside += 1
                most = max(most, inside)
            threading.Event().wait(0.001)
            with lock:
                inside -= 1

    threads = [threading.Thread(target=work) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert 1 <= most <= size
