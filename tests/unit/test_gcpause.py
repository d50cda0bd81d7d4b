"""app/gcpause.py: survivors of a full collection are frozen on the next tick, and unfrozen
once per interval."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from app.gcpause import Collector


@pytest.fixture
def clean_gc() -> Iterator[None]:
    gc.unfreeze()
    yield
    gc.unfreeze()


def test_a_full_collection_is_followed_by_a_freeze_and_the_interval_by_an_unfreeze(clean_gc: None) -> None:
    collector = Collector(unfreeze_every=3600)
    try:
        collector.tick()
        assert gc.get_freeze_count() == 0  # no full collection yet: nothing to freeze
        gc.collect(1)
        collector.tick()
        assert gc.get_freeze_count() == 0  # a young collection is not a reason
        gc.collect()
        collector.tick()
        frozen = gc.get_freeze_count()
        assert frozen > 1000  # the interpreter's own objects, at least
        collector.unfreeze_every = 0  # the interval has passed
        collector.tick()
        assert gc.get_freeze_count() == 0
    finally:
        collector.close()
    assert collector._noted not in gc.callbacks


def test_cyclic_garbage_made_after_a_freeze_is_still_collected(clean_gc: None) -> None:
    collector = Collector(unfreeze_every=3600)
    try:
        gc.collect()
        collector.tick()

        class Node:
            pass

        a, b = Node(), Node()
        a.other, b.other = b, a  # type: ignore[attr-defined]
        del a, b
        assert gc.collect() >= 2
    finally:
        collector.close()
