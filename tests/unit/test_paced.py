"""app.hub.paced: every item once, in order, in chunks of the size asked (spread in time)."""

from __future__ import annotations

from app.hub import paced


def test_paced_yields_every_item_once_in_order_in_chunks() -> None:
    chunks = list(paced(list(range(250)), 100, 0.03))
    assert [len(c) for c in chunks] == [100, 100, 50]
    assert [x for c in chunks for x in c] == list(range(250))


def test_paced_yields_nothing_for_no_items() -> None:
    assert list(paced([], 100, 10.0)) == []
