"""How often the web process's periodic pass goes over every socket (app/hub.py): the safety
net for a lost ring, bounded so that thousands of sockets do not cost more than rings do."""

from __future__ import annotations

from app.hub import FULL_PASS_RATE, full_pass_period


def test_a_few_sockets_are_all_reconciled_every_interval() -> None:
    assert full_pass_period(0, 5.0) == 5.0
    assert full_pass_period(int(5.0 * FULL_PASS_RATE), 5.0) == 5.0  # the rate just reached


def test_thousands_of_sockets_are_reconciled_at_most_full_pass_rate_a_second() -> None:
    assert FULL_PASS_RATE == 200.0
    assert full_pass_period(3_000, 5.0) == 15.0
    assert full_pass_period(10_000, 5.0) == 50.0
    assert full_pass_period(10_000, 60.0) == 60.0  # a longer interval is kept
