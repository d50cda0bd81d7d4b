"""Showing task progress: a tqdm bar on a terminal, plain log lines otherwise."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

log = logging.getLogger("aifarm.client")


class Display(Protocol):
    def start(self, label: str) -> None: ...

    def update(self, progress: float, metrics: Mapping[str, Any]) -> None: ...

    def finish(self, outcome: str) -> None: ...


def _format(metrics: Mapping[str, Any]) -> str:
    parts = []
    for key in ("epoch", "loss", "accuracy"):
        value = metrics.get(key)
        if isinstance(value, float) and key != "epoch":
            parts.append(f"{key}={value:.4f}")
        elif value is not None:
            parts.append(f"{key}={value}")
    return " ".join(parts)


class LogDisplay:
    """One log line per update, at most every ``interval`` seconds (always the last one)."""

    def __init__(self, interval: float = 2.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self.clock = clock
        self.label = ""
        self._last = float("-inf")

    def start(self, label: str) -> None:
        self.label = label
        self._last = float("-inf")
        log.info("%s: started", label)

    def update(self, progress: float, metrics: Mapping[str, Any]) -> None:
        now = self.clock()
        if progress >= 100.0 or now - self._last >= self.interval:
            self._last = now
            log.info("%s: %5.1f%% %s", self.label, progress, _format(metrics))

    def finish(self, outcome: str) -> None:
        log.info("%s: %s", self.label, outcome)


class TqdmDisplay:
    """A progress bar per task on the terminal."""

    def __init__(self) -> None:
        self._bar: Any = None
        self.label = ""

    def start(self, label: str) -> None:
        from tqdm import tqdm

        self.finish_bar()
        self.label = label
        self._bar = tqdm(total=100.0, desc=label, unit="%", bar_format="{l_bar}{bar}| {n:.0f}% {postfix}")

    def update(self, progress: float, metrics: Mapping[str, Any]) -> None:
        if self._bar is None:
            return
        self._bar.n = min(100.0, max(0.0, progress))
        self._bar.set_postfix_str(_format(metrics), refresh=False)
        self._bar.refresh()

    def finish_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def finish(self, outcome: str) -> None:
        self.finish_bar()
        log.info("%s: %s", self.label, outcome)


def make_display(stream: Any = None) -> Display:
    """tqdm when ``stream`` (stdout by default) is a terminal, log lines otherwise."""
    stream = stream if stream is not None else sys.stdout
    isatty = getattr(stream, "isatty", None)
    if callable(isatty) and isatty():
        return TqdmDisplay()
    return LogDisplay()
