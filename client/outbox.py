"""Messages waiting for the socket, oldest first, behind the registration gate.

Nothing leaves before the server answered ``registered``; a message whose send failed goes
back first in line; across a disconnect only results are kept (progress and requests belonged
to the dead socket). Messages are compared by identity: a result is the ledger's own dict.
Not thread-safe: the session calls it under its lock.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping
from typing import Any


def to_wire(message: Mapping[str, Any]) -> dict[str, Any]:
    """The message as sent: without the session's private bookkeeping fields (``_key``)."""
    return {k: v for k, v in message.items() if not k.startswith("_")}


class Outbox:
    """A queue of outgoing messages; ``registered`` opens it."""

    def __init__(self) -> None:
        self.registered = False
        self._messages: deque[dict[str, Any]] = deque()

    def pop(self) -> dict[str, Any] | None:
        """The next message to send, or None. Nothing before ``registered``."""
        if not self.registered or not self._messages:
            return None
        return self._messages.popleft()

    def push_back(self, message: dict[str, Any]) -> None:
        """Sending ``message`` failed: keep it first in line."""
        self._messages.appendleft(message)

    def append(self, message: dict[str, Any]) -> None:
        self._messages.append(message)

    def put_progress(self, message: dict[str, Any]) -> None:
        """Queue a ``task_progress``, replacing one of the same task still waiting."""
        self._drop(lambda m: m.get("type") == "task_progress" and m.get("task_id") == message["task_id"])
        self._messages.append(message)

    def holds(self, message: dict[str, Any]) -> bool:
        """``message`` itself (not an equal one) waits here."""
        return any(m is message for m in self._messages)

    def discard(self, message: dict[str, Any]) -> None:
        """Remove ``message`` itself, wherever it waits."""
        self._drop(lambda m: m is message)

    def has_result(self) -> bool:
        return any(m.get("type") == "task_result" for m in self._messages)

    def has_request(self) -> bool:
        return any(m.get("type") == "task_request" for m in self._messages)

    def drop_task(self, task_id: int) -> list[dict[str, Any]]:
        """Remove the results and progress of ``task_id``; returns the results removed."""
        results = [
            m for m in self._messages if m.get("type") == "task_result" and m.get("task_id") == task_id
        ]
        self._drop(
            lambda m: m.get("type") in ("task_result", "task_progress") and m.get("task_id") == task_id
        )
        return results

    def on_disconnected(self) -> None:
        """The socket is gone: close the gate and keep only the results for the next one."""
        self.registered = False
        self._drop(lambda m: m.get("type") != "task_result")

    def messages(self) -> list[dict[str, Any]]:
        """A copy of what waits, in order (for tests and logs)."""
        return list(self._messages)

    def _drop(self, unwanted: Callable[[dict[str, Any]], bool]) -> None:
        self._messages = deque(m for m in self._messages if not unwanted(m))
