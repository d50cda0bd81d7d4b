"""Keep Python's full garbage collections short in a web process holding thousands of sockets.

A gevent process with 10,000 registered clients tracks about 1.7 million objects. A full
(generation 2) collection walks all of them: about one second during which no socket is
served, every 10 to 30 s under load (measured with ``gc.callbacks``, bench/load.py). Nearly
all of those objects live as long as their connection and are freed by reference counting;
a full collection found 16 to 310 cyclic ones each time.

So after a full collection the survivors are frozen (``gc.freeze``): later collections skip
them and take milliseconds. Cyclic garbage among frozen objects would never be collected, so
every ``unfreeze_every`` seconds they are unfrozen and the next full collection looks at
everything again (one long pause per interval instead of one every few seconds).
"""

from __future__ import annotations

import gc
import logging
import time
from typing import Any

log = logging.getLogger(__name__)


class Collector:
    def __init__(self, unfreeze_every: float) -> None:
        self.unfreeze_every = unfreeze_every
        self._full_since_tick = False
        self._unfrozen_at = time.monotonic()
        gc.callbacks.append(self._noted)

    def _noted(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "stop" and info.get("generation") == 2:
            self._full_since_tick = True  # frozen on the next tick, outside the collector

    def tick(self) -> None:
        """Called periodically (the hub's flush loop): freeze after a full collection; unfreeze
        once per ``unfreeze_every``."""
        now = time.monotonic()
        if now - self._unfrozen_at >= self.unfreeze_every:
            log.info("event=gc state=unfreeze frozen=%d", gc.get_freeze_count())
            gc.unfreeze()
            self._unfrozen_at = now
            self._full_since_tick = False
            return
        if self._full_since_tick:
            self._full_since_tick = False
            gc.freeze()

    def close(self) -> None:
        if self._noted in gc.callbacks:
            gc.callbacks.remove(self._noted)
