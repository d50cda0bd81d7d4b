"""Running tasks: the assignment, what a runner may ask of the session, and the worker thread.

A *runner* (one per task type) turns an :class:`Assignment` into the metrics of a completed
result, or raises to fail it. :class:`TaskRunner` runs one assignment at a time in a worker
thread, queues the rest, and holds the server's ``pause``/``stop`` for them, so the socket
thread keeps reading while a task trains.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from client.ledger import TaskKey
from client.progress import Display
from client.state import Identity

log = logging.getLogger("aifarm.client")

FEDERATED = "federated_training"
MAX_ERROR_TEXT = 2000


class TaskDropped(Exception):
    """Raised by a runner: the task is no longer this client's (stopped, reassigned, deleted).

    Nothing is reported for it.
    """


def as_int(value: Any) -> int | None:
    """An integer, or a string of digits, as an int; anything else (a bool too) as None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return None


@dataclass(frozen=True)
class Assignment:
    """The ``data`` of a ``task`` message."""

    task_id: int
    type: str
    round: int | None
    rank: int | None
    data: Mapping[str, Any]

    @property
    def key(self) -> TaskKey:
        return (self.task_id, self.round, self.rank)

    @property
    def label(self) -> str:
        parts = [f"task {self.task_id}"]
        if self.round is not None:
            parts.append(f"round {self.round}")
        if self.rank is not None:
            parts.append(f"shard {self.rank}")
        return " ".join(parts)

    @classmethod
    def parse(cls, data: Any) -> Assignment:
        """Raises ``ValueError`` naming the problem."""
        if not isinstance(data, Mapping):
            raise ValueError("task.data must be an object")
        task_id = as_int(data.get("id"))
        if task_id is None:
            raise ValueError("task.data.id must be an integer")
        kind = data.get("type")
        if not isinstance(kind, str) or not kind:
            raise ValueError(f"task {task_id}: data.type must be a non-empty string")
        round_no = as_int(data.get("round")) if data.get("round") is not None else None
        rank = as_int(data.get("rank")) if data.get("rank") is not None else None
        return cls(task_id, kind, round_no, rank, data)


def result_message(assignment: Assignment, status: str, **fields: Any) -> dict[str, Any]:
    """The ``task_result`` of ``assignment`` (``completed`` or ``failed``) with ``fields``."""
    message: dict[str, Any] = {"type": "task_result", "task_id": assignment.task_id, "status": status}
    if assignment.round is not None:
        message["round"] = assignment.round
    message.update(fields)
    return message


class TaskHost(Protocol):
    """What a running task may ask of the session."""

    identity: Identity | None

    def is_paused(self, task_id: int) -> bool: ...

    def report_progress(
        self, assignment: Assignment, progress: float, metrics: Mapping[str, Any]
    ) -> None: ...


class TaskControl:
    """What a runner gets besides the assignment: the hooks into the session."""

    def __init__(self, session: TaskHost, assignment: Assignment, stop_event: threading.Event) -> None:
        self._session = session
        self.assignment = assignment
        self._stop = stop_event

    def should_stop(self) -> bool:
        return self._stop.is_set()

    def should_pause(self) -> bool:
        return self._session.is_paused(self.assignment.task_id)

    def report(self, progress: float, metrics: Mapping[str, Any]) -> None:
        """Progress in 0..100 and a flat object of numbers (``loss``, ``accuracy``, ``epoch``)."""
        self._session.report_progress(self.assignment, progress, metrics)

    def identity(self) -> Identity:
        identity = self._session.identity
        if identity is None:
            raise TaskDropped("this client has no identity any more")
        return identity


Runner = Callable[[Assignment, TaskControl], dict[str, Any]]
"""Runs one assignment; returns the metrics of a completed result or raises (failed result)."""


def spawn_thread(target: Callable[[], None], name: str) -> None:
    """Run ``target`` in a new daemon thread (tests pass a function that calls it inline)."""
    threading.Thread(target=target, name=name, daemon=True).start()


class TaskRunner:
    """Runs assignments one at a time in a worker thread; the others wait in a queue.

    It shares the session's lock, so "is this assignment running or queued?" and "is its
    result recorded?" have one answer. When a task's thread ends, ``on_end(assignment, result)``
    is called under that lock (``result`` None: nothing to report, it was dropped or stopped),
    then the next task starts, then ``on_idle()`` is called without the lock.
    """

    def __init__(
        self,
        runners: Mapping[str, Runner],
        host: TaskHost,
        lock: threading.RLock,
        *,
        on_end: Callable[[Assignment, dict[str, Any] | None], None],
        on_idle: Callable[[], None],
        spawn: Callable[[Callable[[], None], str], None] = spawn_thread,
        display: Display | None = None,
    ) -> None:
        self.runners = dict(runners)
        self._host = host
        self._lock = lock
        self._idle = threading.Condition(lock)
        self._on_end = on_end
        self._on_idle = on_idle
        self._spawn = spawn
        self.display = display
        self._queue: deque[Assignment] = deque()
        self._current: Assignment | None = None
        self._current_stop = threading.Event()
        self._paused: set[int] = set()
        self.closing = False  # shutting down: start nothing more

    # --- the queue ---

    def holds(self, key: TaskKey) -> bool:
        """An assignment with ``key`` is running or queued."""
        with self._lock:
            current = self._current is not None and self._current.key == key
            return current or any(queued.key == key for queued in self._queue)

    def enqueue(self, assignment: Assignment) -> None:
        """Queue ``assignment``; :meth:`start_next` starts it when nothing runs."""
        with self._lock:
            self._queue.append(assignment)

    def busy(self) -> bool:
        with self._lock:
            return self._current is not None or bool(self._queue)

    def wants_work(self) -> bool:
        """Nothing runs or waits, and no shutdown is under way."""
        with self._lock:
            return not self.closing and not self.busy()

    # --- the server's control ---

    def is_paused(self, task_id: int) -> bool:
        with self._lock:
            return task_id in self._paused

    def pause(self, task_id: int) -> None:
        with self._lock:
            self._paused.add(task_id)

    def resume(self, task_id: int) -> None:
        with self._lock:
            self._paused.discard(task_id)

    def forget_pauses(self) -> None:
        """A new connection: the server says again which tasks are paused."""
        with self._lock:
            self._paused.clear()

    def stop(self, task_id: int) -> tuple[int, bool]:
        """Drop ``task_id``'s queued assignments and stop its running one.

        Returns how many were dropped from the queue and whether one was running.
        """
        with self._lock:
            self._paused.discard(task_id)
            before = len(self._queue)
            self._queue = deque(a for a in self._queue if a.task_id != task_id)
            running = self._current is not None and self._current.task_id == task_id
            if running:
                self._current_stop.set()
            return before - len(self._queue), running

    def drop_all(self) -> None:
        """Empty the queue, forget pauses and stop the running task."""
        with self._lock:
            self._queue.clear()
            self._paused.clear()
            self._current_stop.set()

    def shutdown(self, timeout: float) -> None:
        """Stop everything and wait (up to ``timeout``) for the running task's thread to end."""
        with self._lock:
            self.closing = True
            self.drop_all()
            deadline = time.monotonic() + timeout
            while self._current is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._idle.wait(remaining)

    # --- the worker ---

    def start_next(self) -> None:
        """Start the first queued assignment in a worker thread, unless one runs already."""
        with self._lock:
            if self._current is not None or not self._queue or self.closing:
                return
            assignment = self._queue.popleft()
            self._current = assignment
            self._current_stop = threading.Event()
            stop_event = self._current_stop
        self._spawn(lambda: self._work(assignment, stop_event), f"task-{assignment.task_id}")

    def _work(self, assignment: Assignment, stop_event: threading.Event) -> None:
        result: dict[str, Any] | None = None
        outcome = "dropped"
        if self.display is not None:
            self.display.start(assignment.label)
        try:
            result, outcome = self._run(assignment, stop_event)
        finally:
            if self.display is not None:
                self.display.finish(outcome)
            with self._lock:
                self._on_end(assignment, None if stop_event.is_set() else result)
                self._current = None
                self._idle.notify_all()
            self.start_next()
            self._on_idle()

    def _run(self, assignment: Assignment, stop_event: threading.Event) -> tuple[dict[str, Any] | None, str]:
        """Call the runner: the result to report (None: none) and the outcome for the display."""
        control = TaskControl(self._host, assignment, stop_event)
        try:
            metrics = self.runners[assignment.type](assignment, control)
            if stop_event.is_set():
                return None, "stopped"
            result = result_message(assignment, "completed", metrics=metrics)
            return result, "completed " + " ".join(
                f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()
            )
        except TaskDropped as why:
            return None, f"dropped: {why}" if str(why) else "dropped"
        except Exception as error:
            if stop_event.is_set():
                return None, "stopped"
            text = f"{type(error).__name__}: {error}"[:MAX_ERROR_TEXT]
            log.error("%s failed: %s", assignment.label, text)
            log.debug("traceback of the failure", exc_info=True)
            return result_message(assignment, "failed", error=text), f"failed: {text}"
