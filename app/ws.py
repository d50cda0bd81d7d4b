"""``/ws``: one :class:`Connection` per socket. Validate, authenticate, a cheap write, enqueue.

The handler loops on ``ws.receive()``; pushes (``task``, ``pause``, ``resume``, ``stop``) are
sent by the hub's reconcile loop through :meth:`Connection.apply`. A per-connection lock
keeps the two from interleaving frames or racing on what the client was told.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
import zlib
from typing import Any

from simple_websocket import ConnectionClosed
from sqlalchemy.orm import Session
from wsproto.events import Ping

import server_settings
from app import compat, jobs, metrics, protocol
from app.hub import Hub
from app.intake import Result
from app.protocol import (
    Heartbeat,
    ProtocolError,
    Register,
    RotateToken,
    TaskProgress,
    TaskRequest,
    TaskResult,
)
from store import assignments, audit, auth, clients
from store.assignments import NotAssigned, Superseded, TimedOut, UnknownTask, UploadRequired
from store.db import Busy, Database, Unavailable
from store.models import FEDERATED, utcnow
from store.states import TaskState

log = logging.getLogger("aifarm.ws")
security_log = logging.getLogger("aifarm.audit")  # audit.log: security events

CLOSE_TRY_AGAIN = 1013
CLOSE_POLICY = 1008
WEB_PROCESS = f"{socket.gethostname()}:{os.getpid()}"  # kept in a client's session_info


def origin_allowed(origin: str | None, host: str, allowed: str) -> bool:
    """Whether a handshake with this ``Origin`` header may open /ws (checked before the upgrade).

    No header: not a browser (browsers always send one on a WebSocket handshake), allowed. A
    browser page may connect from this server's own origin (the Origin's host:port is the
    Host the request was sent to) or from an origin listed in ``WS_ALLOWED_ORIGINS``
    (``scheme://host[:port]``, comma-separated; ``*`` allows any). Anything else, ``null``
    included, is refused: a page elsewhere must not drive a volunteer's browser into the farm."""
    if origin is None:
        return True
    wanted = origin.strip().rstrip("/").lower()
    listed = {o.strip().rstrip("/").lower() for o in allowed.split(",") if o.strip()}
    if "*" in listed or wanted in listed:
        return True
    scheme, _, netloc = wanted.partition("://")
    return scheme in ("http", "https") and netloc == host.strip().lower()


class Connection:
    def __init__(
        self, ws: Any, hub: Hub, db: Database, settings: server_settings.Settings, remote: str
    ) -> None:
        self.ws = ws
        self.hub = hub
        self.db = db
        self.settings = settings
        self.remote = remote
        self.conn_id = uuid.uuid4().hex
        self.slice = zlib.crc32(self.conn_id.encode())  # which of the hub's flushes refresh last_seen
        self.client_id: str | None = None
        self._lock = threading.RLock()
        self._held: dict[int, assignments.Open] = {}  # assignment id -> what the client was sent
        self._finished: set[int] = set()  # assignments the client reported; never resent
        self._paused: set[int] = set()  # task ids the client was told to pause
        self._progress: dict[int, tuple[float, dict[str, Any]]] = {}
        self._utilization: dict[str, Any] | None = None  # the latest report, not yet written
        self._tokens = float(settings.WS_MESSAGES_PER_MINUTE)
        self._refilled = time.monotonic()
        self._pinged = False  # a ping was sent: the next one needs its pong first

    # --- sending ---

    def send(self, message: dict[str, Any]) -> None:
        with self._lock, contextlib.suppress(ConnectionClosed):
            self.ws.send(json.dumps(message))
            metrics.ws_out(message["type"])

    def error(
        self, code: str, message: str, field: str | None = None, about: dict[str, Any] | None = None
    ) -> None:
        """Send an ``error``; ``about`` names the message refused (a ``task_result``'s task)."""
        metrics.ws_error(code)
        body = {"type": "error", "code": code, "message": message, **(about or {})}
        if field is not None:
            body["field"] = field  # the path of the field at fault, as in the REST API's errors
        self.send(body)

    def ping(self) -> bool:
        """Send a WebSocket ping (the hub calls this every ``WS_PING_INTERVAL``). A socket
        whose previous ping got no pong is dropped instead, as simple-websocket's own pings
        would: a peer that vanished without a FIN (a laptop that slept, a cut network) is
        found within two intervals. Returns whether the socket is still open."""
        ws = self.ws
        with self._lock:
            timed_out = self._pinged and not ws.pong_received  # simple-websocket sets it on a pong
            if ws.connected and not timed_out:
                ws.pong_received = False
                self._pinged = True
                try:
                    ws.sock.send(ws.ws.send(Ping()))
                    return True
                except Exception:  # the socket broke or closed meanwhile
                    pass
        if timed_out:
            log.info("event=ping_timeout client=%s remote=%s", self.client_id, self.remote)
        self._drop("Ping/Pong timeout")
        return False

    def _drop(self, why: str) -> None:
        """End this socket whatever its peer does: close (1008), wake :meth:`serve`, and shut
        the socket down, which ends simple-websocket's reader waiting on a vanished peer."""
        with contextlib.suppress(Exception):  # it may be closed already
            self.ws.close(reason=CLOSE_POLICY, message=why)
        self.ws.event.set()
        with contextlib.suppress(OSError):
            self.ws.sock.shutdown(socket.SHUT_RDWR)

    def close_superseded(self) -> None:
        """Another connection of this client took over (or the sweep timed us out)."""
        self.error("superseded", "this client connected again elsewhere, or timed out; reconnect to continue")
        with contextlib.suppress(Exception):  # it may be closed already
            self.ws.close(reason=CLOSE_POLICY, message="superseded")

    def apply(self, open_rows: list[assignments.Open], *, complete: bool = True) -> int:
        """Bring the client in line with its open assignments in the database (``complete``:
        all of them; else only new ones, as the scheduler's ring carried them: sent if not
        sent before, and nothing else). Returns how many ``task`` messages were sent."""
        sent = 0
        with self._lock:
            desired = {row.assignment_id: row for row in open_rows}
            for aid, row in desired.items():
                if aid in self._finished:
                    continue
                if aid not in self._held:
                    self._held[aid] = row
                    self.send(task_message(row))
                    sent += 1
                    log.info(
                        "event=dispatch task=%d round=%d rank=%d client=%s assignment=%d",
                        row.task_id, row.round, row.rank, row.client_id, aid,
                    )  # fmt: skip
                if not complete:
                    continue
                if row.task_status == TaskState.PAUSED and row.task_id not in self._paused:
                    self._paused.add(row.task_id)
                    self.send({"type": "pause", "task_id": row.task_id})
                elif row.task_status != TaskState.PAUSED and row.task_id in self._paused:
                    self._paused.discard(row.task_id)
                    self.send({"type": "resume", "task_id": row.task_id})
            if not complete:
                return sent
            for aid in [a for a in self._held if a not in desired]:
                row = self._held.pop(aid)
                self._progress.pop(aid, None)
                self._paused.discard(row.task_id)
                if aid not in self._finished:
                    self.send({"type": "stop", "task_id": row.task_id})
                    log.info("event=stop task=%d client=%s assignment=%d", row.task_id, row.client_id, aid)
        return sent

    def take_progress(self) -> list[tuple[int, float, dict[str, Any]]]:
        with self._lock:
            items = [(aid, p, m) for aid, (p, m) in self._progress.items()]
            self._progress.clear()
        return items

    def take_utilization(self) -> dict[str, Any] | None:
        """The resource use the client reported since the last flush (the latest), or None."""
        with self._lock:
            latest, self._utilization = self._utilization, None
        return latest

    # --- receiving ---

    def serve(self) -> None:
        self.hub.opened(self)
        try:
            while True:
                frame = self.ws.receive()
                if frame is None:
                    continue
                if not self._allow():
                    metrics.ws_rate_limited()
                    self.error(
                        "rate_limited", f"more than {self.settings.WS_MESSAGES_PER_MINUTE} messages a minute"
                    )
                    continue
                self._handle(frame)
        except ConnectionClosed:
            pass
        finally:
            self._closed()

    def _allow(self) -> bool:
        rate = self.settings.WS_MESSAGES_PER_MINUTE / 60.0
        now = time.monotonic()
        self._tokens = min(
            float(self.settings.WS_MESSAGES_PER_MINUTE), self._tokens + (now - self._refilled) * rate
        )
        self._refilled = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True

    def _handle(self, frame: str | bytes) -> None:
        kind = "invalid"  # a frame that does not parse
        about: dict[str, Any] | None = None  # a refused result names its task: the client settles it
        try:
            message = protocol.parse(frame)
            if isinstance(message, TaskResult):
                about = {"in_reply_to": "task_result", "task_id": message.task_id, "round": message.round}
            kind = message.TYPE
            if isinstance(message, Register):
                self._register(message)
            elif self.client_id is None:
                raise ProtocolError("not_registered", "send 'register' first")
            elif isinstance(message, TaskRequest):
                self._task_request(message)
            elif isinstance(message, TaskProgress):
                self._task_progress(message)
            elif isinstance(message, TaskResult):
                self._task_result(message)
            elif isinstance(message, RotateToken):
                self._rotate_token()
            elif isinstance(message, Heartbeat):
                self._note_utilization(message.utilization)
        except ProtocolError as problem:
            self.error(problem.code, problem.message, problem.field, about)
        except Busy:
            self.error(
                "unavailable", "the database is busy; nothing was changed, try again shortly", about=about
            )
        except Unavailable:
            self.error(
                "unavailable",
                "the database is unavailable; nothing was changed, try again shortly",
                about=about,
            )
        except Exception:
            log.exception("event=ws_error client=%s", self.client_id)
            self.error("internal", "internal error; nothing was changed", about=about)
        finally:
            metrics.ws_in(kind)

    def _register(self, msg: Register) -> None:
        if self.client_id is not None:
            raise ProtocolError(
                "already_registered", f"this connection is already registered as {self.client_id}"
            )
        minimum = self.settings.MIN_CLIENT_VERSION
        why = compat.refusal(msg.protocol_version, msg.client_version, msg.hardware.task_types, minimum)
        if why is not None:
            log.info(
                "event=register state=upgrade_required protocol=%s version=%s remote=%s",
                msg.protocol_version, msg.client_version, self.remote,
            )  # fmt: skip
            self.error("upgrade_required", why)
            self.ws.close(reason=CLOSE_POLICY, message="upgrade required")
            return
        try:
            client_id, token, disabled = self.db.run(
                lambda s: clients.connect(
                    s,
                    msg.hardware,
                    msg.client_id,
                    msg.token,
                    self.conn_id,
                    utcnow(),
                    max_clients=self.settings.MAX_CLIENTS,
                    remote=self.remote,
                    web=WEB_PROCESS,
                )
            )
        except clients.AuthFailed:
            log.info("event=register state=auth_failed client=%s remote=%s", msg.client_id, self.remote)
            security_log.warning(
                "event=security action=token_refused actor=anonymous target=client:%s remote=%s via=ws",
                msg.client_id, self.remote,
            )  # fmt: skip
            raise ProtocolError("auth_failed", "unknown client_id or wrong token") from None
        except clients.ServerFull:
            self.error("server_full", f"{self.settings.MAX_CLIENTS} clients are connected; try again later")
            self.ws.close(reason=CLOSE_TRY_AGAIN, message="server full")
            return
        self.client_id = client_id
        reply: dict[str, Any] = {"type": "registered", "client_id": client_id}
        if token is not None:
            reply["token"] = token
        self.send(reply)
        log.info(
            "event=register client=%s new=%s cores=%d ram_gb=%.1f gpus=%d version=%s remote=%s",
            client_id, token is not None, msg.hardware.cores, msg.hardware.ram_gb,
            msg.hardware.gpu_count, msg.client_version, self.remote,
        )  # fmt: skip
        if disabled:
            self.error("client_disabled", "an admin disabled this client; it gets no work")
        # A reconnecting client is reconciled at once: it gets its open assignments again.
        self.hub.attach(self, reconnect=token is None)

    def _rotate_token(self) -> None:
        """A new token for this client; the old one stops working at once, this connection stays."""
        client_id = self.client_id
        assert client_id is not None
        secret = auth.new_token()

        def rotate(s: Session) -> None:
            auth.set_client_token(s, client_id, secret)
            audit.record(
                s,
                at=utcnow(),
                actor=f"client:{client_id}",
                action="client_token_rotate",
                target=f"client:{client_id}",
                detail={"by": "the client itself"},
                remote=self.remote,
            )

        self.db.run(rotate)
        self.send({"type": "token_rotated", "client_id": client_id, "token": secret})
        security_log.info(
            "event=audit action=client_token_rotate actor=client:%s target=client:%s remote=%s via=ws",
            client_id, client_id, self.remote,
        )  # fmt: skip

    def _check_id(self, claimed: str | None) -> None:
        if claimed is not None and claimed != self.client_id:
            raise ProtocolError("auth_failed", "client_id is not the id this connection registered as")

    def _task_request(self, msg: TaskRequest) -> None:
        self._check_id(msg.client_id)
        if not jobs.broker_ok():
            raise ProtocolError(
                "unavailable", "the broker is unavailable; nothing was changed, try again shortly"
            )
        assert self.client_id is not None
        if not self.hub.intake.request(self.client_id, self.conn_id, timeout=self.db.queue_timeout):
            raise ProtocolError("client_disabled", "an admin disabled this client; it gets no work")

    def _find(self, task_id: int, round_no: int | None) -> int:
        """The assignment id a progress or result refers to, from what this client was sent."""
        with self._lock:
            for aid, row in self._held.items():
                if row.task_id == task_id and (round_no is None or row.round == round_no):
                    return aid
        client_id = self.client_id
        assert client_id is not None
        try:  # not delivered through this connection (or timed out since): ask the database
            return self.db.run(lambda s: assignments.find_open(s, client_id, task_id, round_no).id)
        except UnknownTask:
            raise ProtocolError("unknown_task", f"no task {task_id}") from None
        except NotAssigned:
            which = f"task {task_id}" + (f" round {round_no}" if round_no is not None else "")
            raise ProtocolError("not_assigned", f"you do not hold {which}") from None
        except Superseded as error:
            raise ProtocolError("superseded", f"{error}; nothing was recorded") from None

    def _task_progress(self, msg: TaskProgress) -> None:
        aid = self._find(msg.task_id, msg.round)
        with self._lock:
            self._progress[aid] = (msg.progress, msg.metrics)
        self.hub.reported(self)
        self._note_utilization(msg.utilization)

    def _note_utilization(self, utilization: protocol.Utilization | None) -> None:
        """Keep the latest report; the hub writes it with the next batched flush."""
        report = utilization.reported() if utilization is not None else None
        if report is not None:
            with self._lock:
                self._utilization = report
            self.hub.reported(self)

    def _task_result(self, msg: TaskResult) -> None:
        """Record a result and acknowledge it (``result_accepted``) after the commit.

        A result recorded before (the client missed the acknowledgement and sent it again) is
        acknowledged again with ``duplicate`` true, and changes nothing. The socket may close
        meanwhile: what was received is still recorded, and a client that got no
        acknowledgement sends the result again on its next connection."""
        client_id = self.client_id
        assert client_id is not None
        result = Result(client_id, msg.task_id, msg.round, msg.status, msg.metrics, msg.error)
        try:
            # written with the other results that arrive meanwhile (app/intake.py)
            assignment, shard, duplicate = self.hub.results.submit(result, timeout=self.db.queue_timeout)
        except UnknownTask:
            raise ProtocolError("unknown_task", f"no task {msg.task_id}") from None
        except NotAssigned:
            raise ProtocolError("not_assigned", f"you do not hold task {msg.task_id}") from None
        except UploadRequired:
            raise ProtocolError(
                "upload_required", "upload the round's update (PUT update_url) before reporting completed"
            ) from None
        except Superseded as error:
            raise ProtocolError("superseded", f"{error}; nothing was recorded") from None
        except TimedOut as error:
            raise ProtocolError("timed_out", f"{error}; nothing was recorded") from None
        with self._lock:
            self._finished.add(assignment.id)
            self._held.pop(assignment.id, None)
            self._progress.pop(assignment.id, None)
        self.send(
            {
                "type": "result_accepted",
                "task_id": msg.task_id,
                "round": assignment.round,
                "rank": assignment.rank,
                "assignment_id": assignment.id,
                "status": msg.status,
                "duplicate": duplicate,
            }
        )
        log.info(
            "event=result task=%d round=%d rank=%d client=%s assignment=%d status=%s shard=%s%s",
            msg.task_id, assignment.round, assignment.rank, client_id, assignment.id, msg.status,
            shard.status if shard else "-", " duplicate=true" if duplicate else "",
        )  # fmt: skip

    def _closed(self) -> None:
        self.hub.detach(self)
        client_id = self.client_id
        if client_id is None:
            return
        try:  # written with the other sockets that close meanwhile (app/intake.py)
            self.hub.departures.submit((client_id, self.conn_id), timeout=self.db.queue_timeout)
        except Exception as error:  # the sweep settles it after CONNECTION_TIMEOUT
            log.warning("event=disconnect client=%s state=failed error=%s", client_id, type(error).__name__)
        log.info("event=disconnect client=%s", client_id)


def task_message(row: assignments.Open) -> dict[str, Any]:
    data: dict[str, Any] = {
        "id": row.task_id,
        "type": row.task_type,
        "config": row.config,
        "requirements": row.requirements,
        "rank": row.rank,
        "num_shards": row.num_shards,
        "round": row.round,
    }
    if row.task_type == FEDERATED:
        data["model_url"] = f"/api/tasks/{row.task_id}/rounds/{row.round}/model"
        data["update_url"] = f"/api/tasks/{row.task_id}/rounds/{row.round}/updates/{row.rank}"
    return {"type": "task", "data": data}
