"""What became of each result this client made: made, sent (on which connection), due again.

A result is its ``task_result`` message dict, marked with ``_key`` (task id, round, rank); the
outbox holds the very same objects, so the two agree on which result is which by identity.
Times are arguments (``now``), so tests pass literals. Not thread-safe: the session calls it
under its lock.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from typing import Any

TaskKey = tuple[int, int | None, int | None]
"""(task id, round, rank): one assignment, and the key its result is known by."""

RESULT_RETRY_WINDOW = 30.0  # seconds: results sent this recently are resent after "unavailable"
REMEMBERED_RESULTS = 64  # finished results kept to answer an assignment offered again


class ResultLedger:
    """The fate of every result: recorded, sent on connection N, resent, forgotten.

    ``max_tasks`` (None: no limit) counts results made, whether completed or failed; a result
    dropped by ``stop`` before it was sent is not counted.
    """

    def __init__(
        self,
        max_tasks: int | None = None,
        *,
        window: float = RESULT_RETRY_WINDOW,
        remembered: int = REMEMBERED_RESULTS,
    ) -> None:
        self.max_tasks = max_tasks
        self.window = window
        self.remembered = remembered
        self.connection = 0  # counts connections (registrations begun)
        self._finished: OrderedDict[TaskKey, dict[str, Any]] = OrderedDict()
        self._produced: set[TaskKey] = set()  # results made (counted against max_tasks)
        self._sent: set[TaskKey] = set()  # results written to a socket at least once
        self._sent_on: dict[TaskKey, int] = {}  # the connection a result was last written on
        self._recent: deque[tuple[float, dict[str, Any]]] = deque()  # (sent at, result)
        self._resend: list[dict[str, Any]] = []  # due again once the server's pause is over

    def new_connection(self) -> None:
        """A registration begins: results sent before were sent on an older connection."""
        self.connection += 1

    # --- making results ---

    def record(self, message: dict[str, Any], key: TaskKey) -> None:
        """A result was made for ``key``: remember it (the last ``remembered``) and count it."""
        message["_key"] = key
        self._finished[key] = message
        while len(self._finished) > self.remembered:
            self._finished.popitem(last=False)
        self._produced.add(key)

    def finished(self, key: TaskKey) -> dict[str, Any] | None:
        """The remembered result of ``key``, or None."""
        return self._finished.get(key)

    def limit_reached(self) -> bool:
        """``max_tasks`` results are made: take no more work."""
        return self.max_tasks is not None and len(self._produced) >= self.max_tasks

    def retry_failure(self, key: TaskKey) -> dict[str, Any] | None:
        """Forget the failure of ``key`` so that a new try's result replaces it; return it.

        Only a failure, and only while ``max_tasks`` is not used up; otherwise None and nothing
        changes. It stays counted; the caller drops the returned message from the outbox.
        """
        failure = self._finished.get(key)
        if failure is None or failure.get("status") != "failed" or self.limit_reached():
            return None
        del self._finished[key]
        self._recent = deque((t, m) for t, m in self._recent if m is not failure)
        self._resend = [m for m in self._resend if m is not failure]
        return failure

    def unmake(self, key: TaskKey) -> None:
        """The result of ``key`` was dropped unsent (the task was stopped): it does not count."""
        self._produced.discard(key)
        self._finished.pop(key, None)

    # --- sending results ---

    def mark_sent(self, message: dict[str, Any], now: float) -> None:
        """The result ``message`` was written to the socket of the current connection at ``now``."""
        key = message["_key"]
        self._sent.add(key)
        self._sent_on[key] = self.connection
        self._recent.append((now, message))
        while self._recent and now - self._recent[0][0] > self.window:
            self._recent.popleft()

    def sent_on_this_connection(self, key: TaskKey) -> bool:
        """The result of ``key`` was last written on the current connection."""
        return self._sent_on.get(key) == self.connection

    def quota_sent(self) -> bool:
        """``max_tasks`` results were written to a socket at least once (never without a limit)."""
        return self.max_tasks is not None and len(self._sent) >= self.max_tasks

    # --- after a transient server error ---

    def hold_recent(self, now: float) -> None:
        """The server refused a message without saying which: results sent within ``window``
        of ``now`` are due again (see :meth:`take_resends`)."""
        for sent_at, message in self._recent:
            if now - sent_at <= self.window and not any(m is message for m in self._resend):
                self._resend.append(message)
        self._recent.clear()

    def take_resends(self) -> list[dict[str, Any]]:
        """The results due again, oldest first; afterwards none is due."""
        due, self._resend = self._resend, []
        return due

    def resends_waiting(self) -> bool:
        return bool(self._resend)
