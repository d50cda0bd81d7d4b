"""The client's side of the protocol, without a socket: parsed messages in, messages to send out.

:class:`ClientSession` consumes the server's messages (:meth:`ClientSession.handle`) and hands
the transport (:mod:`client.connection`) the messages to send
(:meth:`ClientSession.pop_outgoing`). It is a dispatcher under one lock over three objects with
one job each:

* :class:`~client.ledger.ResultLedger`: the fate of every result (made, sent on which
  connection, due again after a transient error, counted against ``--max-tasks``);
* :class:`~client.outbox.Outbox`: what waits for the socket, behind the registration gate;
* :class:`~client.runner.TaskRunner`: the queue, the worker thread, ``pause`` and ``stop``.

Rules it follows (docs/protocol.md):

* ``register`` first (with the saved id and token); nothing else is sent until ``registered``.
* One ``task_request`` at a time, and only when idle: the server counts requests.
* A ``task`` for a (task id, round, rank) already running or queued is ignored; one already
  finished gets its result again on a new connection (the first may have been lost with the
  old one), and one that failed is tried again.
* ``pause`` holds the task between batches, ``resume`` releases it, ``stop`` drops it: no
  upload, no result, and a new ``task_request``.
* A result is kept until the server acknowledges it (``result_accepted``): one not yet sent,
  or sent on a connection that dropped before its acknowledgement, goes out again on the next
  connection; progress and requests do not survive a reconnect. An ``error`` that names the
  result's task (``in_reply_to`` ``task_result``) settles it: resent after a pause when
  transient, forgotten (not counted against ``--max-tasks``) when final.
* With a ``utilization`` probe, the machine's CPU, RAM and GPU use goes out every
  ``utilization_interval`` seconds: on the next ``task_progress``, or else in a ``heartbeat``.
* ``error`` ``unavailable``/``internal``/``rate_limited``/``client_disabled``: the results sent
  in the last seconds (or the one the error names) and the request are sent again after a
  pause, since "nothing was changed".
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from client.ledger import ResultLedger, TaskKey
from client.outbox import Outbox
from client.progress import Display
from client.runner import Assignment, Runner, TaskRunner, as_int, result_message, spawn_thread
from client.state import Identity
from training.version import PROTOCOL_VERSION, VERSION

log = logging.getLogger("aifarm.client")

RETRY_DELAYS = {"unavailable": 5.0, "internal": 5.0, "rate_limited": 15.0, "client_disabled": 60.0}
# Refusals of a result that sending it again cannot change (docs/protocol.md, "Error codes").
FINAL_REFUSALS = frozenset({"not_assigned", "unknown_task", "superseded", "timed_out", "upload_required"})


class Fatal(Exception):
    """The client cannot go on (the message says why); the process exits non-zero."""


class Reconnect(Exception):
    """Close this connection and connect again; ``immediately`` skips the backoff."""

    def __init__(self, reason: str, *, immediately: bool = False) -> None:
        super().__init__(reason)
        self.immediately = immediately


class ClientSession:
    """One volunteer's protocol state across connections; thread-safe (one lock)."""

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
        utilization: Callable[[], dict[str, Any]] | None = None,
        utilization_interval: float = 10.0,
        rotate_token: bool = False,
        clock: Callable[[], float] = time.monotonic,
        spawn: Callable[[Callable[[], None], str], None] = spawn_thread,
    ) -> None:
        self.hardware = dict(hardware)
        self.identity = identity
        self._save_identity = save_identity
        self._forget_identity = forget_identity
        self.display = display
        self.progress_interval = progress_interval
        self.utilization = utilization
        self.utilization_interval = utilization_interval
        self.clock = clock
        self._rotate_token = rotate_token  # ask for a new token once registered (--rotate-token)

        self._lock = threading.RLock()
        self._ledger = ResultLedger(max_tasks)
        self._outbox = Outbox()
        self._tasks = TaskRunner(
            runners,
            self,
            self._lock,
            on_end=self._task_ended,
            on_idle=self._maybe_request,
            spawn=spawn,
            display=display,
        )
        self._registering_with_saved = False
        self._requested = False  # a task_request was sent and not answered yet
        self._retry_at: float | None = None  # after a transient error: when to send again
        self._last_progress: dict[TaskKey, float] = {}
        self._utilization_at: float | None = None  # when utilization last went out on this connection

    # --- connection life ---

    @property
    def registered(self) -> bool:
        """The server answered ``registered`` on this connection."""
        with self._lock:
            return self._outbox.registered

    def register_message(self) -> dict[str, Any]:
        """The first message of a connection (the saved id and token when there are some)."""
        with self._lock:
            message: dict[str, Any] = {
                "type": "register",
                **self.hardware,
                "task_types": sorted(self._tasks.runners),
                "protocol_version": PROTOCOL_VERSION,
                "client_version": VERSION,
            }
            if self.identity is not None:
                message["client_id"] = self.identity.client_id
                message["token"] = self.identity.token
            self._registering_with_saved = self.identity is not None
            self._outbox.registered = False
            self._ledger.new_connection()
            return message

    def on_disconnected(self) -> None:
        """The socket is gone: forget what only mattered to it, keep results for the next one."""
        with self._lock:
            self._requested = False
            self._utilization_at = None  # the next connection hears it at once
            self._outbox.on_disconnected()

    # --- outbox (the transport's side) ---

    def pop_outgoing(self) -> dict[str, Any] | None:
        """The next message to send, or None. Nothing before ``registered``."""
        with self._lock:
            return self._outbox.pop()

    def push_back(self, message: dict[str, Any]) -> None:
        """Sending ``message`` failed: keep it first in line."""
        with self._lock:
            self._outbox.push_back(message)

    def mark_sent(self, message: dict[str, Any]) -> None:
        """``message`` was written to the socket."""
        with self._lock:
            if message.get("type") == "task_result":
                self._ledger.mark_sent(message, self.clock())
            elif message.get("type") == "task_request":
                self._requested = True

    @property
    def done(self) -> bool:
        """``max_tasks`` results were acknowledged by the server and none waits for it."""
        with self._lock:
            if not self._ledger.quota_acknowledged():
                return False
            waiting = self._ledger.unacknowledged() or self._ledger.resends_waiting()
            return not waiting and self._retry_at is None

    def pending_outgoing(self) -> list[dict[str, Any]]:
        """A copy of the outbox (for tests and logs)."""
        with self._lock:
            return self._outbox.messages()

    # --- server messages ---

    def handle(self, message: Mapping[str, Any]) -> None:
        """Act on one server message. May raise :class:`Fatal` or :class:`Reconnect`."""
        kind = message.get("type")
        if kind == "registered":
            self._on_registered(message)
        elif kind == "task":
            self._on_task(message.get("data"))
        elif kind in ("pause", "resume", "stop"):
            task_id = as_int(message.get("task_id"))
            if task_id is None:
                log.warning("ignoring %s without an integer task_id: %r", kind, message)
            elif kind == "pause":
                self.pause(task_id)
            elif kind == "resume":
                self.resume(task_id)
            else:
                self.stop(task_id)
        elif kind == "result_accepted":
            self._on_result_accepted(message)
        elif kind == "token_rotated":
            self._on_token_rotated(message)
        elif kind == "error":
            self._on_error(str(message.get("code", "")), str(message.get("message", "")), message)
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
            self._outbox.registered = True
            self._requested = False
            # Results sent on an older connection and never acknowledged go out again: the
            # server acknowledges a result it recorded already without recording it twice.
            for result in self._ledger.unacknowledged():
                if not self._outbox.holds(result):
                    log.info("sending the unacknowledged result of task %s again", result.get("task_id"))
                    self._outbox.append(result)
            # The server tells a new connection again which of our tasks are paused.
            self._tasks.forget_pauses()
            if self._rotate_token:
                self._rotate_token = False
                self._outbox.append({"type": "rotate_token"})
        self._maybe_request()

    def _on_token_rotated(self, message: Mapping[str, Any]) -> None:
        """The server replaced our token: keep the new one (the old one no longer works)."""
        token = message.get("token")
        with self._lock:
            if self.identity is None or not isinstance(token, str) or not token:
                raise Fatal(f"the server's 'token_rotated' carries no token for us: {dict(message)!r}")
            identity = Identity(self.identity.client_id, token)
            self._save_identity(identity)  # StateError: the caller turns it into an exit
            self.identity = identity
        log.info("token rotated for client %s; the new one is saved", identity.client_id)

    def _on_task(self, data: Any) -> None:
        try:
            assignment = Assignment.parse(data)
        except ValueError as error:
            self._on_invalid_task(data, error)
            return
        with self._lock:
            if self._offered_again(assignment):
                return
            self._requested = False
            if self._ledger.limit_reached():
                log.info("%s: not taken, --max-tasks results are already made", assignment.label)
                return
            if assignment.type not in self._tasks.runners:
                log.warning("%s: unsupported task type %r", assignment.label, assignment.type)
                why = (
                    f"unsupported task type {assignment.type!r}; "
                    f"this client runs: {', '.join(sorted(self._tasks.runners))}"
                )
                self._add_result(result_message(assignment, "failed", error=why), assignment.key)
            else:
                log.info("%s: received (%s)", assignment.label, assignment.type)
                self._tasks.enqueue(assignment)
        self._tasks.start_next()
        self._maybe_request()

    def _on_invalid_task(self, data: Any, error: ValueError) -> None:
        """A ``task`` that does not parse fails, when it names a task id; else it is only logged."""
        task_id = as_int(data.get("id")) if isinstance(data, Mapping) else None
        log.error("invalid task message: %s", error)
        if task_id is None or not isinstance(data, Mapping):
            return
        round_no = as_int(data.get("round"))
        result: dict[str, Any] = {"type": "task_result", "task_id": task_id, "status": "failed"}
        if round_no is not None:
            result["round"] = round_no
        result["error"] = f"invalid task message: {error}"
        with self._lock:
            self._requested = False
            self._add_result(result, (task_id, round_no, as_int(data.get("rank"))))
        self._maybe_request()

    def _offered_again(self, assignment: Assignment) -> bool:
        """Deal with a ``task`` this client already had; False when it is to be run (again).

        Called under the lock. Running or queued: ignored. Failed: tried again (unless
        ``--max-tasks`` is used up). Finished: its result is sent again, unless it waits in the
        outbox or went out on this connection (the offer crossed it on the same ordered socket;
        a transient refusal comes back as an error and is resent).
        """
        key = assignment.key
        if self._tasks.holds(key):
            log.info("%s: already working on it", assignment.label)
            return True
        # Offered again after a failed try (say, the server went down mid-download and still
        # holds the assignment, or gave the shard back to us): try again rather than repeat a
        # failure that may no longer hold; the retry's result replaces the failure.
        failure = self._ledger.retry_failure(key)
        if failure is not None:
            log.info("%s: offered again after a failed try; trying again", assignment.label)
            self._outbox.discard(failure)
            return False
        finished = self._ledger.finished(key)
        if finished is None:
            return False
        if self._outbox.holds(finished):
            log.info("%s: already finished; its result is about to be sent", assignment.label)
        elif self._ledger.sent_on_this_connection(key):
            log.info("%s: already finished; its result went out on this connection", assignment.label)
        else:
            log.info("%s: already finished; sending its result again", assignment.label)
            self._outbox.append(finished)
        return True

    def _on_result_accepted(self, message: Mapping[str, Any]) -> None:
        task_id = as_int(message.get("task_id"))
        if task_id is None:
            log.warning("ignoring result_accepted without an integer task_id: %r", dict(message))
            return
        with self._lock:
            result = self._ledger.acknowledge(
                task_id, as_int(message.get("round")), as_int(message.get("rank"))
            )
            if result is not None:
                self._outbox.discard(result)  # a resend still waiting is not needed any more
        if result is None:
            log.debug("result_accepted for task %s: nothing was waiting for it", task_id)
        else:
            log.info("task %s: result acknowledged by the server", task_id)

    def _on_result_error(self, code: str, task_id: int, round_no: int | None) -> bool:
        """An ``error`` that names the result it refuses; True when it was dealt with here."""
        with self._lock:
            if code in RETRY_DELAYS:
                result = self._ledger.waiting(task_id, round_no)
                if result is not None:
                    now = self.clock()
                    self._retry_at = max(self._retry_at or now, now + RETRY_DELAYS[code])
                    self._ledger.hold(result)
                return True
            if code in FINAL_REFUSALS:
                result = self._ledger.refuse(task_id, round_no)
                if result is not None:
                    self._outbox.discard(result)
                    log.warning("task %s: the server refused its result (%s); forgetting it", task_id, code)
                return True
        return False

    def _on_error(self, code: str, text: str, message: Mapping[str, Any] | None = None) -> None:
        log.warning("server error %s: %s", code or "?", text)
        with self._lock:
            registering = not self._outbox.registered
        about = message or {}
        task_id = as_int(about.get("task_id"))
        if registering:
            self._on_register_error(code, text)
        elif about.get("in_reply_to") == "task_result" and task_id is not None:
            if self._on_result_error(code, task_id, as_int(about.get("round"))):
                self._maybe_request()
        elif code == "superseded":
            raise Reconnect("superseded by another connection")
        elif code in RETRY_DELAYS:
            with self._lock:
                now = self.clock()
                self._retry_at = now + RETRY_DELAYS[code]
                self._requested = False
                # Which message failed is not said: results sent lately may not have counted.
                self._ledger.hold_recent(now)

    def _on_register_error(self, code: str, text: str) -> None:
        """The server refused the ``register``: start afresh, retry later, or give up."""
        if code == "auth_failed":
            if self._registering_with_saved:
                log.warning("the server does not know the saved identity; registering as a new client")
                self._forget_identity()
                with self._lock:
                    self.identity = None
                self.drop_all_tasks()
                raise Reconnect("saved identity refused", immediately=True)
            raise Fatal(f"the server refused to register this client: {text}")
        if code == "upgrade_required":
            raise Fatal(f"the server needs another version of this client: {text}")
        if code in ("invalid_message", "invalid_json", "unknown_type"):
            raise Fatal(f"the server refused this client's register message: {text}")
        if code == "already_registered":
            return
        if code == "server_full":
            raise Reconnect("server full")
        raise Reconnect(f"registration failed ({code})")

    # --- timers ---

    def tick(self) -> None:
        """Called often by the transport: a due ``heartbeat``, resends after a transient server error."""
        with self._lock:
            if self._outbox.registered and (report := self._utilization_due()) is not None:
                self._outbox.append({"type": "heartbeat", "utilization": report})
            if self._retry_at is None or self.clock() < self._retry_at or not self._outbox.registered:
                return
            self._retry_at = None
            for message in self._ledger.take_resends():
                if not self._outbox.holds(message):
                    log.info("sending the result of task %s again", message.get("task_id"))
                    self._outbox.append(message)
        self._maybe_request()

    # --- control of tasks ---

    def is_paused(self, task_id: int) -> bool:
        return self._tasks.is_paused(task_id)

    def pause(self, task_id: int) -> None:
        self._tasks.pause(task_id)
        log.info("task %d: paused by the server", task_id)

    def resume(self, task_id: int) -> None:
        self._tasks.resume(task_id)
        log.info("task %d: resumed", task_id)

    def stop(self, task_id: int) -> None:
        """Drop every assignment of ``task_id``: running, queued, or finished but not yet reported."""
        with self._lock:
            dropped, running = self._tasks.stop(task_id)
            # finished here but not reported: the server no longer wants it
            for result in self._outbox.drop_task(task_id):
                self._ledger.unmake(result["_key"])
        log.info(
            "task %d: stopped by the server%s", task_id, "" if running or dropped else " (not running here)"
        )
        if not running:
            self._maybe_request()

    def drop_all_tasks(self) -> None:
        self._tasks.drop_all()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the running task and wait (up to ``timeout``) for its thread to finish."""
        self._tasks.shutdown(timeout)

    def busy(self) -> bool:
        return self._tasks.busy()

    # --- results, requests, progress ---

    def _add_result(self, message: dict[str, Any], key: TaskKey) -> None:
        with self._lock:
            self._ledger.record(message, key)
            self._outbox.append(message)

    def _task_ended(self, assignment: Assignment, result: dict[str, Any] | None) -> None:
        """The runner's thread for ``assignment`` ends (under the lock); ``result`` None: no report."""
        if result is not None:
            self._add_result(result, assignment.key)
        self._last_progress.pop(assignment.key, None)

    def _maybe_request(self) -> None:
        """Queue a ``task_request`` when registered, idle, not held back and none is outstanding."""
        with self._lock:
            if (
                self._outbox.registered
                and not self._requested
                and self._retry_at is None
                and self._tasks.wants_work()
                and not self._ledger.limit_reached()
                and not self._outbox.has_request()
            ):
                message: dict[str, Any] = {"type": "task_request"}
                if self.identity is not None:
                    message["client_id"] = self.identity.client_id
                self._outbox.append(message)

    def report_progress(self, assignment: Assignment, progress: float, metrics: Mapping[str, Any]) -> None:
        """Queue a ``task_progress``: at most one every ``progress_interval`` (100 % always)."""
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
            if (report := self._utilization_due()) is not None:
                message["utilization"] = report
            # Coalesce: one waiting progress message per task is enough.
            self._outbox.put_progress(message)

    def _utilization_due(self) -> dict[str, Any] | None:
        """A utilization report when one is due (under the lock); None when not, or empty."""
        now = self.clock()
        if self.utilization is None or (
            self._utilization_at is not None and now - self._utilization_at < self.utilization_interval
        ):
            return None
        self._utilization_at = now
        try:
            report = self.utilization()
        except Exception as error:  # measuring must never stop the client
            log.warning("cannot measure this machine's utilization: %s", error)
            return None
        return report or None
