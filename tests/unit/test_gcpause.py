"""app/gcpause.py: young collections on a timer, each followed once a second by a freeze; all
unfrozen and collected once per interval."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from app.gcpause import Collector


@pytest.fixture
def clean_gc() -> Iterator[None]:
    gc.unfreeze()
    yield
    gc.unfreeze()


class Node:
    other: Node


def cycle() -> weakref.ref[Node]:
    """A reference cycle nothing else points to (only a collection frees it); a weak ref to it."""
    a, b = Node(), Node()
    a.other, b.other = b, a
    return weakref.ref(a)


def test_young_collects_generation_0_and_freezes_once_per_freeze_every(clean_gc: None) -> None:
    collector = Collector(unfreeze_every=3600, freeze_every=3600)
    try:
        gone = cycle()
        collector.young()  # generation 0 only, no freeze yet
        assert gone() is None  # the young cycle was collected
        assert gc.get_freeze_count() == 0
        collector.freeze_every = 0  # the second has passed
        collector.young()
        assert gc.get_freeze_count() > 1000  # the survivors: the interpreter's own objects, at least
    finally:
        collector.close()


def test_the_interval_unfreezes_and_collects_what_was_frozen_then_freezes_again(clean_gc: None) -> None:
    collector = Collector(unfreeze_every=3600, freeze_every=0)
    try:
        kept = [Node()]
        ref = weakref.ref(kept[0])
        kept[0].other = kept[0]  # a cycle, alive while ``kept`` holds it
        collector.young()  # collected what was garbage, froze the rest: the cycle too
        kept.clear()  # garbage now, but frozen
        gc.collect()
        assert ref() is not None  # frozen: not looked at
        collector.tick()
        assert ref() is not None  # not yet the interval
        collector.unfreeze_every = 0
        collector.tick()
        assert ref() is None  # unfrozen and collected
        assert gc.get_freeze_count() > 1000  # and the survivors frozen again
    finally:
        collector.close()
    assert collector._noted not in gc.callbacks


def test_cyclic_garbage_made_after_a_freeze_is_still_collected(clean_gc: None) -> None:
    collector = Collector(unfreeze_every=3600, freeze_every=0)
    try:
        collector.young()
        gone = cycle()
        assert gc.collect() >= 2
        assert gone() is None
    finally:
        collector.close()
