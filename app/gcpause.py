"""Keep Python's garbage collections short in a web process holding thousands of sockets.

A gevent process with 10,000 registered clients tracks about 1.7 million objects. A full
(generation 2) collection walks all of them: about one second during which no socket is
served, every 10 to 30 s under load (measured with ``gc.callbacks``, bench/load.py). Nearly
all of those objects live as long as their connection and are freed by reference counting;
a full collection found 16 to 310 cyclic ones each time.

So the survivors are frozen (``gc.freeze``): later collections skip them. Cyclic garbage
among frozen objects would never be collected, so every ``unfreeze_every`` seconds they are
unfrozen and collected at once (one long pause per interval instead of one every few seconds).

Young collections needed the same care. Every message a socket handles leaves its greenlet
suspended in new frames, which live until its next message (seconds): 2,000 heartbeats a
second at 10,000 clients promote tens of thousands of young objects a second, while as many
old ones die. CPython counts a collection's due by allocations minus deallocations, so
generation 0 grew unchecked between collections, and single young collections took 20 to
80 ms of CPU (measured, ``time.process_time`` in ``gc.callbacks``), full ones 100 to 160 ms.
:meth:`Collector.young` therefore collects on a timer (every ``YOUNG_EVERY`` seconds), each
time generation 1 (``FREEZE_EVERY``), then freezes what survived, so that no collection walks
more than the last 50 ms's survivors. A generation-1 collection once a second walked a
second's worth: 20 to 38 ms with 10,000 clients, during which no socket was served, and the
task_requests of that moment made the p99 of a steady 500/s (``bench/load.py``; 5 to 13 ms
every 250 ms, then under 3 ms every 50 ms). Cyclic garbage among objects older than 50 ms
waits for the next unfreeze: a full collection found 16 to 310 such objects each time.
"""

from __future__ import annotations

import gc
import logging
import time
from typing import Any

log = logging.getLogger(__name__)

YOUNG_EVERY = 0.05  # seconds between timed generation-0 collections
FREEZE_EVERY = YOUNG_EVERY  # seconds between generation-1 collections, each followed by a freeze


class Collector:
    def __init__(self, unfreeze_every: float, *, freeze_every: float = FREEZE_EVERY) -> None:
        self.unfreeze_every = unfreeze_every
        self.freeze_every = freeze_every
        self._full_since_tick = False
        self._unfrozen_at = time.monotonic()
        self._frozen_at = time.monotonic()
        gc.callbacks.append(self._noted)

    def _noted(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "stop" and info.get("generation") == 2:
            self._full_since_tick = True  # frozen on the next tick, outside the collector

    def young(self) -> None:
        """Called every YOUNG_EVERY seconds (a thread of its own): collect generation 0, or,
        once per ``freeze_every``, generation 1 and freeze the survivors."""
        now = time.monotonic()
        if now - self._frozen_at < self.freeze_every:
            gc.collect(0)
            return
        gc.collect(1)
        gc.freeze()
        self._frozen_at = now

    def tick(self) -> None:
        """Called periodically (the hub's flush loop): freeze after a full collection; once per
        ``unfreeze_every``, unfreeze everything and collect it (cyclic garbage frozen meanwhile
        is freed now)."""
        now = time.monotonic()
        if now - self._unfrozen_at >= self.unfreeze_every:
            log.info("event=gc state=unfreeze frozen=%d", gc.get_freeze_count())
            gc.unfreeze()
            gc.collect()  # before young() freezes again: everything is looked at once per interval
            self._unfrozen_at = now
            self._full_since_tick = True
        if self._full_since_tick:
            self._full_since_tick = False
            gc.freeze()

    def close(self) -> None:
        if self._noted in gc.callbacks:
            gc.callbacks.remove(self._noted)
