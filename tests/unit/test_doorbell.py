"""The doorbell's message: client ids, and the assignments the scheduler just committed."""

from __future__ import annotations

import pytest

from store.assignments import Made
from store.bus import parse_ring, ring_body


def test_a_ring_carries_client_ids_and_new_assignments_both_ways() -> None:
    made = [Made(7, "c-1", 3, 0, 1, "echo", 4), Made(8, "c-2", 3, 0, 2, "echo", 4)]
    assert parse_ring(ring_body(["c-1", "c-2"], made)) == (["c-1", "c-2"], made)
    assert parse_ring(ring_body(["c-1"])) == (["c-1"], [])
    assert parse_ring(ring_body(None)) == (None, [])  # everyone


def test_a_ring_from_an_older_publisher_has_no_assignments() -> None:
    assert parse_ring('{"clients": ["c-1"]}') == (["c-1"], [])


@pytest.mark.parametrize(
    "data",
    [
        "not json",
        '{"clients": ["c-1"], "made": [[7, "c-1", 3]]}',  # too few fields
        '{"clients": ["c-1"], "made": [["seven", "c-1", 3, 0, 1, "echo", 4]]}',  # not a number
        '{"clients": ["c-1"], "made": 5}',
        "[1, 2]",
    ],
)
def test_a_malformed_ring_is_refused_with_one_of_the_errors_the_listener_catches(data: str) -> None:
    with pytest.raises((ValueError, TypeError, AttributeError)):
        parse_ring(data)
