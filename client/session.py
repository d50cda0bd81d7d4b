"""The client's side of the protocol, without a socket: parsed messages in, messages to send out.

:class:`Session` consumes the server's messages (:meth:`Session.handle`), keeps an outbox of
messages to send (:meth:`Session.pop_outgoing`), and runs each task in a worker thread through
a *runner* (one per task type), so the socket thread keeps reading ``pause``/``resume``/``stop``
while a task trains. The transport (:mod:`client.connection`) only moves JSON between the
socket and this class; tests drive it directly.

Rules it follows (docs/protocol.md):

* ``register`` first (with the saved id and token); nothing else is sent until ``registered``.
* One ``task_request`` at a time, and only when idle: the server counts requests.
* A ``task`` for a (task id, round, rank) already running or queued is ignored; one already
  finished gets its result again (the first may have been lost with the connection).
* ``pause`` holds the task between batches, ``resume`` releases it, ``stop`` drops it: no
  upload, no result, and a new ``task_request``.
* Results survive a reconnect (they stay in the outbox); progress and requests do not.
* ``error`` ``unavailable``/``internal``/``rate_limited``/``client_disabled``: the results sent
  in the last seconds and the request are sent again after a pause, since "nothing was changed".
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from client.progress import Display
from client.state import Identity

log = logging.getLogger("aifarm.client")

TaskKey = tuple[int, int | None, int | None]

FEDERATED = "federated_training"
MAX_ERROR_TEXT = 2000
RESULT_RETRY_WINDOW = 30.0  # seconds: results sent this recently are resent after "unavailable"
RETRY_DELAYS = {"unavailable": 5.0, "internal": 5.0, "rate_limited": 15.0, "client_disabled": 60.0}
REMEMBERED_RESULTS = 64


class Fatal(Exception):
    """The client cannot go on (the message says why); the process exits non-zero."""


class Reconnect(Exception):
    """Close this connection and connect again; ``immediately`` skips the backoff."""

    def __init__(self, reason: str, *, immediately: bool = False) -> None:
        super().__init__(reason)
        self.immediately = immediately


class TaskDropped(Exception):
    """Raised by a runner: the task is no longer this client's (stopped, reassigned, deleted).

    Nothing is reported for it.
    """


def _as_int(value: Any) -> int | None:
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
        task_id = _as_int(data.get("id"))
        if task_id is None:
            raise ValueError("task.data.id must be an integer")
        kind = data.get("type")
        if not isinstance(kind, str) or not kind:
            raise ValueError(f"task {task_id}: data.type must be a non-empty string")
        round_no = _as_int(data.get("round")) if data.get("round") is not None else None
        rank = _as_int(data.get("rank")) if data.get("rank") is not None else None
        return cls(task_id, kind, round_no, rank, data)


class TaskControl:
    """What a runner gets besides the assignment: the hooks into the session."""

    def __init__(self, session: Session, assignment: Assignment, stop_event: threading.Event) -> None:
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


def to_wire(message: Mapping[str, Any]) -> dict[str, Any]:
    """The message as sent: without the session's private bookkeeping fields (``_key``)."""
    return {k: v for k, v in message.items() if not k.startswith("_")}


def _spawn_thread(target: Callable[[], None], name: str) -> None:
    threading.Thread(target=target, name=name, daemon=True).start()


class Session:
    def __init__(
        self,
        *,
        hardware: Mapping[str, Any],
        identity: Identity | None,
        runners: Mapping[str, Runner],
        save_identity: Callable[[Identity], None],
        forget_identity: Callable[[], None],
        max_tasks: int | None = None,
        display: Display | None = None,
        progress_interval: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
        spawn: Callable[[Callable[[], None], str], None] = _spawn_thread,
    ) -> None:
        self.hardware = dict(hardware)
        self.identity = identity
        self.runners = dict(runners)
        self._save_identity = save_identity
        self._forget_identity = forget_identity
        self.max_tasks = max_tasks
        self.display = display
        self.progress_interval = progress_interval
        self.clock = clock
        self._spawn = spawn

        self._lock = threading.RLock()
        self._idle = threading.Condition(self._lock)
        self._outbox: deque[dict[str, Any]] = deque()
        self.registered = False
        self._registering_with_saved = False
        self._requested = False
        self._queue: deque[Assignment] = deque()
        self._current: Assignment | None = None
        self._current_stop = threading.Event()
        self._paused: set[int] = set()
        self._finished: OrderedDict[TaskKey, dict[str, Any]] = OrderedDict()
        self._produced: set[TaskKey] = set()  # results made (counted against max_tasks)
        self._sent: set[TaskKey] = set()  # results written to a socket at least once
        self._connection = 0  # counts connections (registrations begun)
        self._sent_on: dict[TaskKey, int] = {}  # the connection a result was last written on
        self._recent: deque[tuple[float, dict[str, Any]]] = deque()
        self._resend: list[dict[str, Any]] = []
        self._last_progress: dict[TaskKey, float] = {}
        self._retry_at: float | None = None
        self._closing = False

    # --- connection life ---

    def register_message(self) -> dict[str, Any]:
        """The first message of a connection (the saved id and token when there are some)."""
        with self._lock:
            message: dict[str, Any] = {
                "type": "register",
                **self.hardware,
                "task_types": sorted(self.runners),
            }
            if self.identity is not None:
                message["client_id"] = self.identity.client_id
                message["token"] = self.identity.token
            self._registering_with_saved = self.identity is not None
            self.registered = False
            self._connection += 1
            return message

    def on_disconnected(self) -> None:
        """The socket is gone: forget what only mattered to it, keep results for the next one."""
        with self._lock:
            self.registered = False
            self._requested = False
            kept = [m for m in self._outbox if m.get("type") == "task_result"]
            self._outbox = deque(kept)

    # --- outbox (the transport's side) ---

    def pop_outgoing(self) -> dict[str, Any] | None:
        """The next message to send, or None. Nothing before ``registered``."""
        with self._lock:
            if not self.registered or not self._outbox:
                return None
            return self._outbox.popleft()

    def push_back(self, message: dict[str, Any]) -> None:
        """Sending ``message`` failed: keep it first in line."""
        with self._lock:
            self._outbox.appendleft(message)

    def mark_sent(self, message: dict[str, Any]) -> None:
        """``message`` was written to the socket."""
        with self._lock:
            if message.get("type") == "task_result":
                self._sent.add(message["_key"])
                self._sent_on[message["_key"]] = self._connection
                now = self.clock()
                self._recent.append((now, message))
                while self._recent and now - self._recent[0][0] > RESULT_RETRY_WINDOW:
                    self._recent.popleft()
            elif message.get("type") == "task_request":
                self._requested = True

    @property
    def done(self) -> bool:
        """``max_tasks`` results were sent and none waits to be sent again."""
        with self._lock:
            if self.max_tasks is None or len(self._sent) < self.max_tasks:
                return False
            pending = any(m.get("type") == "task_result" for m in self._outbox)
            return not pending and self._retry_at is None and not self._resend

    def pending_outgoing(self) -> list[dict[str, Any]]:
        """A copy of the outbox (for tests and logs)."""
        with self._lock:
            return list(self._outbox)

    # --- server messages ---

    def handle(self, message: Mapping[str, Any]) -> None:
        """Act on one server message. May raise :class:`Fatal` or :class:`Reconnect`."""
        kind = message.get("type")
        if kind == "registered":
            self._on_registered(message)
        elif kind == "task":
            self._on_task(message.get("data"))
        elif kind in ("pause", "resume", "stop"):
            task_id = _as_int(message.get("task_id"))
            if task_id is None:
                log.warning("ignoring %s without an integer task_id: %r", kind, message)
            elif kind == "pause":
                self.pause(task_id)
            elif kind == "resume":
                self.resume(task_id)
            else:
                self.stop(task_id)
        elif kind == "error":
            self._on_error(str(message.get("code", "")), str(message.get("message", "")))
        else:
            log.warning("ignoring a server message of unknown type %r", kind)

    def _on_registered(self, message: Mapping[str, Any]) -> None:
        client_id = message.get("client_id")
        token = message.get("token")
        if not isinstance(client_id, str) or not client_id:
            raise Fatal(f"the server's 'registered' has no client_id: {dict(message)!r}")
        with self._lock:
            if isinstance(token, str) and token:
                identity = Identity(client_id, token)
                self._save_identity(identity)  # StateError: the caller turns it into an exit
                self.identity = identity
                log.info("registered as new client %s", client_id)
            elif self.identity is None:
                raise Fatal("the server registered this client without issuing a token")
            else:
                if client_id != self.identity.client_id:
                    raise Fatal(
                        f"registered as {client_id}, but the saved identity is {self.identity.client_id}"
                    )
                log.info("registered again as client %s", client_id)
            self.registered = True
            self._requested = False
            # The server tells a new connection again which of our tasks are paused.
            self._paused.clear()
        self._maybe_request()

    def _on_task(self, data: Any) -> None:
        try:
            assignment = Assignment.parse(data)
        except ValueError as error:
            task_id = _as_int(data.get("id")) if isinstance(data, Mapping) else None
            log.error("invalid task message: %s", error)
            if task_id is not None and isinstance(data, Mapping):
                round_no = _as_int(data.get("round"))
                result: dict[str, Any] = {"type": "task_result", "task_id": task_id, "status": "failed"}
                if round_no is not None:
                    result["round"] = round_no
                result["error"] = f"invalid task message: {error}"
                with self._lock:
                    self._requested = False
                    self._add_result(result, (task_id, round_no, _as_int(data.get("rank"))))
                self._maybe_request()
            return
        with self._lock:
            key = assignment.key
            if (self._current is not None and self._current.key == key) or any(
                queued.key == key for queued in self._queue
            ):
                log.info("%s: already working on it", assignment.label)
                return
            finished = self._finished.get(key)
            # Offered again after a failed try (say, the server went down mid-download and
            # still holds the assignment, or gave the shard back to us): try again rather than
            # repeat a failure that may no longer hold (unless --max-tasks is used up).
            if finished is not None and finished.get("status") == "failed" and not self._limit_reached():
                log.info("%s: offered again after a failed try; trying again", assignment.label)
                del self._finished[key]
                # the retry's result replaces the failure wherever it waits to be (re)sent
                self._outbox = deque(m for m in self._outbox if m is not finished)
                self._recent = deque((t, m) for t, m in self._recent if m is not finished)
                self._resend = [m for m in self._resend if m is not finished]
            elif finished is not None:
                if any(m is finished for m in self._outbox):
                    log.info("%s: already finished; its result is about to be sent", assignment.label)
                elif self._sent_on.get(key) == self._connection:
                    # Offered as we sent the result, on the same ordered socket: the offer
                    # crossed it (a transient refusal comes back as an error and is resent).
                    log.info("%s: already finished; its result went out on this connection", assignment.label)
                else:
                    log.info("%s: already finished; sending its result again", assignment.label)
                    self._outbox.append(finished)
                return
            self._requested = False
            if self._limit_reached():
                log.info("%s: not taken, --max-tasks results are already made", assignment.label)
                return
            if assignment.type not in self.runners:
                log.warning("%s: unsupported task type %r", assignment.label, assignment.type)
                self._add_result(
                    self._result(
                        assignment,
                        "failed",
                        error=(
                            f"unsupported task type {assignment.type!r}; "
                            f"this client runs: {', '.join(sorted(self.runners))}"
                        ),
                    ),
                    key,
                )
            else:
                log.info("%s: received (%s)", assignment.label, assignment.type)
                self._queue.append(assignment)
        self._start_next()
        self._maybe_request()

    def _on_error(self, code: str, text: str) -> None:
        log.warning("server error %s: %s", code or "?", text)
        with self._lock:
            registering = not self.registered
        if registering:
            if code == "auth_failed":
                if self._registering_with_saved:
                    log.warning("the server does not know the saved identity; registering as a new client")
                    self._forget_identity()
                    with self._lock:
                        self.identity = None
                    self.drop_all_tasks()
                    raise Reconnect("saved identity refused", immediately=True)
                raise Fatal(f"the server refused to register this client: {text}")
            if code in ("invalid_message", "invalid_json", "unknown_type"):
                raise Fatal(f"the server refused this client's register message: {text}")
            if code == "already_registered":
                return
            if code == "server_full":
                raise Reconnect("server full")
            raise Reconnect(f"registration failed ({code})")
        if code == "superseded":
            raise Reconnect("superseded by another connection")
        if code in RETRY_DELAYS:
            with self._lock:
                now = self.clock()
                self._retry_at = now + RETRY_DELAYS[code]
                self._requested = False
                # Which message failed is not said: results sent lately may not have counted.
                for sent_at, message in self._recent:
                    if now - sent_at <= RESULT_RETRY_WINDOW and not any(m is message for m in self._resend):
                        self._resend.append(message)
                self._recent.clear()

    # --- timers ---

    def tick(self) -> None:
        """Called often by the transport: resends after a transient server error."""
        with self._lock:
            if self._retry_at is None or self.clock() < self._retry_at or not self.registered:
                return
            self._retry_at = None
            for message in self._resend:
                if not any(m is message for m in self._outbox):
                    log.info("sending the result of task %s again", message.get("task_id"))
                    self._outbox.append(message)
            self._resend.clear()
        self._maybe_request()

    # --- control of tasks ---

    def is_paused(self, task_id: int) -> bool:
        with self._lock:
            return task_id in self._paused

    def pause(self, task_id: int) -> None:
        with self._lock:
            self._paused.add(task_id)
        log.info("task %d: paused by the server", task_id)

    def resume(self, task_id: int) -> None:
        with self._lock:
            self._paused.discard(task_id)
        log.info("task %d: resumed", task_id)

    def stop(self, task_id: int) -> None:
        """Drop every assignment of ``task_id``: running, queued, or finished but not yet reported."""
        with self._lock:
            self._paused.discard(task_id)
            before = len(self._queue)
            self._queue = deque(a for a in self._queue if a.task_id != task_id)
            dropped = before - len(self._queue)
            unsent = [
                m for m in self._outbox if m.get("type") == "task_result" and m.get("task_id") == task_id
            ]
            for message in unsent:  # finished here but not reported: the server no longer wants it
                self._produced.discard(message["_key"])
                self._finished.pop(message["_key"], None)
            self._outbox = deque(
                m
                for m in self._outbox
                if not (m.get("type") in ("task_result", "task_progress") and m.get("task_id") == task_id)
            )
            running = self._current is not None and self._current.task_id == task_id
            if running:
                self._current_stop.set()
        log.info(
            "task %d: stopped by the server%s", task_id, "" if running or dropped else " (not running here)"
        )
        if not running:
            self._maybe_request()

    def drop_all_tasks(self) -> None:
        with self._lock:
            self._queue.clear()
            self._paused.clear()
            self._current_stop.set()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the running task and wait (up to ``timeout``) for its thread to finish."""
        with self._lock:
            self._closing = True
            self.drop_all_tasks()
            deadline = time.monotonic() + timeout
            while self._current is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._idle.wait(remaining)

    def busy(self) -> bool:
        with self._lock:
            return self._current is not None or bool(self._queue)

    # --- the worker ---

    def _result(self, assignment: Assignment, status: str, **fields: Any) -> dict[str, Any]:
        message: dict[str, Any] = {"type": "task_result", "task_id": assignment.task_id, "status": status}
        if assignment.round is not None:
            message["round"] = assignment.round
        message.update(fields)
        return message

    def _add_result(self, message: dict[str, Any], key: TaskKey) -> None:
        with self._lock:
            message["_key"] = key
            self._finished[key] = message
            while len(self._finished) > REMEMBERED_RESULTS:
                self._finished.popitem(last=False)
            self._produced.add(key)
            self._outbox.append(message)

    def _limit_reached(self) -> bool:
        return self.max_tasks is not None and len(self._produced) >= self.max_tasks

    def _maybe_request(self) -> None:
        with self._lock:
            if (
                self.registered
                and not self._requested
                and not self._closing
                and self._retry_at is None
                and self._current is None
                and not self._queue
                and not self._limit_reached()
                and not any(m.get("type") == "task_request" for m in self._outbox)
            ):
                message: dict[str, Any] = {"type": "task_request"}
                if self.identity is not None:
                    message["client_id"] = self.identity.client_id
                self._outbox.append(message)

    def _start_next(self) -> None:
        with self._lock:
            if self._current is not None or not self._queue or self._closing:
                return
            assignment = self._queue.popleft()
            self._current = assignment
            self._current_stop = threading.Event()
            stop_event = self._current_stop
        self._spawn(lambda: self._work(assignment, stop_event), f"task-{assignment.task_id}")

    def _work(self, assignment: Assignment, stop_event: threading.Event) -> None:
        control = TaskControl(self, assignment, stop_event)
        result: dict[str, Any] | None = None
        outcome = "dropped"
        if self.display is not None:
            self.display.start(assignment.label)
        try:
            metrics = self.runners[assignment.type](assignment, control)
            if stop_event.is_set():
                outcome = "stopped"
            else:
                result = self._result(assignment, "completed", metrics=metrics)
                outcome = "completed " + " ".join(
                    f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()
                )
        except TaskDropped as why:
            outcome = f"dropped: {why}" if str(why) else "dropped"
        except Exception as error:
            if stop_event.is_set():
                outcome = "stopped"
            else:
                text = f"{type(error).__name__}: {error}"[:MAX_ERROR_TEXT]
                log.error("%s failed: %s", assignment.label, text)
                log.debug("traceback of the failure", exc_info=True)
                result = self._result(assignment, "failed", error=text)
                outcome = f"failed: {text}"
        finally:
            if self.display is not None:
                self.display.finish(outcome)
            with self._lock:
                if result is not None and not stop_event.is_set():
                    self._add_result(result, assignment.key)
                self._last_progress.pop(assignment.key, None)
                self._current = None
                self._idle.notify_all()
            self._start_next()
            self._maybe_request()

    def report_progress(self, assignment: Assignment, progress: float, metrics: Mapping[str, Any]) -> None:
        if self.display is not None:
            self.display.update(progress, metrics)
        clean = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        message: dict[str, Any] = {
            "type": "task_progress",
            "task_id": assignment.task_id,
            "progress": round(min(100.0, max(0.0, float(progress))), 2),
            "metrics": clean,
        }
        if assignment.round is not None:
            message["round"] = assignment.round
        with self._lock:
            now = self.clock()
            last = self._last_progress.get(assignment.key)
            if last is not None and now - last < self.progress_interval and progress < 100.0:
                return
            self._last_progress[assignment.key] = now
            # Coalesce: one waiting progress message per task is enough.
            self._outbox = deque(
                m
                for m in self._outbox
                if not (m.get("type") == "task_progress" and m.get("task_id") == assignment.task_id)
            )
            self._outbox.append(message)
