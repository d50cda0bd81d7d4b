"""Exponential backoff with full jitter: wait ``uniform(0, min(cap, base * 2**attempt))``."""

from __future__ import annotations

import random


class Backoff:
    """Delays for reconnecting: 0.5 s doubling up to 30 s by default, each drawn uniformly below the ceiling.

    ``reset()`` after a success (a ``registered`` answer) starts again from ``base``.
    """

    def __init__(self, base: float = 0.5, cap: float = 30.0, rng: random.Random | None = None) -> None:
        if base <= 0 or cap < base:
            raise ValueError("need 0 < base <= cap")
        self.base = base
        self.cap = cap
        self.attempt = 0
        self._rng = rng or random.Random()

    def ceiling(self) -> float:
        """The upper bound of the next delay."""
        return min(self.cap, self.base * 2 ** min(self.attempt, 64))

    def next_delay(self) -> float:
        """The next delay in seconds, in ``[0, ceiling]``; the ceiling then doubles (up to ``cap``)."""
        delay = self._rng.uniform(0.0, self.ceiling())
        self.attempt += 1
        return delay

    def reset(self) -> None:
        self.attempt = 0
