"""The pure rules behind two defences: which WebSocket origins may connect, and the secret
round seeds of the DP noise."""

from __future__ import annotations

import pytest

from aggregation.seeds import secret_round_seed
from app.ws import origin_allowed

HOST = "farm.example:8000"


@pytest.mark.parametrize(
    ("origin", "allowed", "ok"),
    [
        (None, "", True),  # not a browser
        ("http://farm.example:8000", "", True),  # the server's own pages
        ("https://FARM.example:8000/", "", True),
        ("https://evil.example", "", False),
        ("http://evil.example:8000", "", False),  # same port, other host
        ("http://farm.example", "", False),  # other port
        ("null", "", False),  # sandboxed pages, files
        ("", "", False),
        ("ws://farm.example:8000", "", False),
        ("https://panel.example", "https://panel.example, https://other.example", True),
        ("https://panel.example/", "https://PANEL.example", True),
        ("http://panel.example", "https://panel.example", False),  # the scheme is part of it
        ("https://anything.example", "*", True),
    ],
)
def test_which_origins_may_open_the_websocket(origin: str | None, allowed: str, ok: bool) -> None:
    assert origin_allowed(origin, HOST, allowed) is ok


def test_round_seeds_come_from_the_secret_and_differ_by_round_and_task() -> None:
    seeds = [secret_round_seed(123456789, r) for r in range(100)]
    assert seeds == [secret_round_seed(123456789, r) for r in range(100)]  # reproducible
    assert len(set(seeds)) == 100
    assert all(0 <= s < 2**63 for s in seeds)
    assert secret_round_seed(123456790, 0) != seeds[0]
    assert secret_round_seed(0, 0) != 0  # the old config-derived seed of round 0 with seed 0
