"""What became of each result this client made: made, sent (on which connection), due again,
acknowledged by the server (``result_accepted``) or refused by it for good.

A result is kept until the server acknowledges it: one sent on a connection that dropped
before its acknowledgement came is due again on the next connection (the server
acknowledges a result it recorded already again, so resending is safe).

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
    """The fate of every result: recorded, sent on connection N, resent, acknowledged, forgotten.

    ``max_tasks`` (None: no limit) bounds the results made, whether completed or failed (no
    more work is taken), and the client is done once that many are acknowledged; a result
    dropped by ``stop`` before it was sent, or refused for good by the server, is not counted.
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
        self._unacked: OrderedDict[TaskKey, dict[str, Any]] = OrderedDict()  # made, not acknowledged
        self._acked: set[TaskKey] = set()  # results the server acknowledged

    def new_connection(self) -> None:
        """A registration begins: results sent before were sent on an older connection."""
        self.connection += 1

    # --- making results ---

    def record(self, message: dict[str, Any], key: TaskKey) -> None:
        """A result was made for ``key``: remember it (the last ``remembered``) and count it."""
        message["_key"] = key
        self._finished[key] = message
        self._unacked[key] = message
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
        self._settle(failure)
        return failure

    def unmake(self, key: TaskKey) -> None:
        """The result of ``key`` was dropped unsent (the task was stopped): it does not count."""
        self._produced.discard(key)
        self._finished.pop(key, None)
        if (message := self._unacked.get(key)) is not None:
            self._settle(message)

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

    # --- the server's answers ---

    def waiting(self, task_id: int, round_no: int | None, rank: int | None = None) -> dict[str, Any] | None:
        """The unacknowledged result of that task and round (and rank, when given), or None.

        A result made without a round (a task of one round) matches any round the server names."""
        for key, message in self._unacked.items():
            if key[0] != task_id or (rank is not None and key[2] is not None and key[2] != rank):
                continue
            if round_no is None or key[1] is None or key[1] == round_no:
                return message
        return None

    def acknowledge(self, task_id: int, round_no: int | None, rank: int | None) -> dict[str, Any] | None:
        """The server recorded the result of that task, round and rank (``result_accepted``):
        it is never sent again. Returns the result, or None when none was waiting (an
        acknowledgement repeated, or of a result forgotten since)."""
        message = self.waiting(task_id, round_no, rank)
        if message is None:
            return None
        self._acked.add(message["_key"])
        self._settle(message)
        return message

    def refuse(self, task_id: int, round_no: int | None) -> dict[str, Any] | None:
        """The server refused that task's result for good (``not_assigned``, ``superseded``, ...):
        it is never sent again and does not count against ``max_tasks``. Returns it, or None."""
        message = self.waiting(task_id, round_no)
        if message is None:
            return None
        key = message["_key"]
        self._produced.discard(key)
        self._settle(message)
        return message

    def hold(self, message: dict[str, Any]) -> None:
        """The server refused ``message`` for now (``unavailable``): it is due again after the pause."""
        if any(m is message for m in self._unacked.values()) and not any(m is message for m in self._resend):
            self._resend.append(message)

    def unacknowledged(self) -> list[dict[str, Any]]:
        """The results made and not acknowledged (nor refused), oldest first."""
        return list(self._unacked.values())

    def quota_acknowledged(self) -> bool:
        """``max_tasks`` results were acknowledged by the server (never without a limit)."""
        return self.max_tasks is not None and len(self._acked) >= self.max_tasks

    def _settle(self, message: dict[str, Any]) -> None:
        """``message`` needs no more sending: forget it wherever it waits."""
        if self._unacked.get(message["_key"]) is message:
            del self._unacked[message["_key"]]
        self._recent = deque((t, m) for t, m in self._recent if m is not message)
        self._resend = [m for m in self._resend if m is not message]

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
