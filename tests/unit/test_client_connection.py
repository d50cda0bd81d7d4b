"""The transport loop with a scripted fake socket: backoff, reconnects, close frames, exit when done."""

from __future__ import annotations

import json
import random
from collections import deque
from collections.abc import Callable
from typing import Any

import pytest
import websocket

from client.backoff import Backoff
from client.connection import Connection, GaveUp
from client.runner import FEDERATED, Assignment, TaskControl
from client.session import ClientSession, Fatal
from client.state import Identity

HARDWARE = {"cpu_info": {"cores": 1}, "ram_info": {"total_gb": 1.0}, "gpu_info": []}

Reply = Callable[[dict[str, Any]], list[dict[str, Any]]]


class FakeSocket:
    """Answers each sent message through ``reply``; ``recv_data`` times out when nothing is queued."""

    def __init__(
        self, reply: Reply, *, close_after: int | None = None, break_after: int | None = None
    ) -> None:
        self.reply = reply
        self.break_after = break_after  # sending more than this many messages fails (a dead socket)
        self.sent: list[dict[str, Any]] = []
        self.incoming: deque[tuple[int, bytes]] = deque()
        self.closed = False
        self.close_after = close_after  # send a close frame after this many received messages

    def settimeout(self, timeout: float) -> None:
        pass

    def send(self, text: str) -> None:
        if self.break_after is not None and len(self.sent) >= self.break_after:
            raise websocket.WebSocketConnectionClosedException("socket is already closed.")
        message = json.loads(text)
        self.sent.append(message)
        for answer in self.reply(message):
            self.incoming.append((websocket.ABNF.OPCODE_TEXT, json.dumps(answer).encode()))
        if self.close_after is not None and len(self.sent) >= self.close_after:
            self.incoming.append((websocket.ABNF.OPCODE_CLOSE, b"\x03\xf5server full"))

    def recv_data(self, control_frame: bool = False) -> tuple[int, bytes]:
        if self.incoming:
            return self.incoming.popleft()
        raise websocket.WebSocketTimeoutException("timed out")

    def ping(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


def unknown_task_farm(known: dict[str, str], *, acknowledge: bool = True) -> Reply:
    """Registers clients, answers a request with a task of a type the client does not run, and
    acknowledges results (unless ``acknowledge`` is false: the acknowledgement is lost)."""

    def reply(message: dict[str, Any]) -> list[dict[str, Any]]:
        if message["type"] == "register":
            claimed = message.get("client_id")
            if claimed is not None:
                if known.get(claimed) != message.get("token"):
                    return [{"type": "error", "code": "auth_failed", "message": "unknown client"}]
                return [{"type": "registered", "client_id": claimed}]
            known["c-new"] = "t-new"
            return [{"type": "registered", "client_id": "c-new", "token": "t-new"}]
        if message["type"] == "task_request":
            return [{"type": "task", "data": {"id": 4, "type": "mystery", "round": 0, "rank": 0}}]
        if message["type"] == "task_result" and acknowledge:
            ack = {"type": "result_accepted", "task_id": message["task_id"], "round": message.get("round")}
            return [{**ack, "rank": 0, "assignment_id": 1, "status": message["status"], "duplicate": False}]
        return []

    return reply


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 0.05
        return self.now


def make_session(identity: Identity | None, saved: list[Identity], max_tasks: int = 1) -> ClientSession:
    def never(assignment: Assignment, control: TaskControl) -> dict[str, Any]:
        raise AssertionError("no federated task in this script")

    return ClientSession(
        hardware=HARDWARE,
        identity=identity,
        runners={FEDERATED: never},
        save_identity=saved.append,
        forget_identity=lambda: None,
        max_tasks=max_tasks,
        spawn=lambda target, name: target(),
    )


def test_backs_off_until_the_server_is_up_then_reregisters_after_auth_failed() -> None:
    known: dict[str, str] = {}
    sockets: list[FakeSocket] = []
    attempts = 0

    def connect(url: str, **options: Any) -> FakeSocket:
        nonlocal attempts
        attempts += 1
        assert url == "ws://farm.test:8080/ws"
        if attempts <= 3:
            raise ConnectionRefusedError(111, "Connection refused")
        sock = FakeSocket(unknown_task_farm(known))
        sockets.append(sock)
        return sock

    sleeps: list[float] = []
    saved: list[Identity] = []
    session = make_session(Identity("c-stale", "old"), saved)
    connection = Connection(
        "http://farm.test:8080",
        session,
        backoff=Backoff(base=0.5, cap=30.0, rng=random.Random(3)),
        connect=connect,
        sleep=sleeps.append,
        clock=Clock(),
    )
    connection.run()
    assert len(sleeps) == 3  # three refused connections; the auth_failed reconnect is immediate
    for delay, ceiling in zip(sleeps, (0.5, 1.0, 2.0), strict=True):
        assert 0 <= delay <= ceiling
    first, second = sockets
    assert first.sent[0]["client_id"] == "c-stale"
    assert first.closed
    assert "client_id" not in second.sent[0]
    assert saved == [Identity("c-new", "t-new")]
    assert [m["type"] for m in second.sent] == ["register", "task_request", "task_result"]
    assert second.sent[-1]["status"] == "failed" and "mystery" in second.sent[-1]["error"]
    assert second.closed


def test_a_result_not_sent_before_the_socket_died_goes_out_after_reconnecting() -> None:
    known = {"c-1": "t-1"}
    sockets: list[FakeSocket] = []

    def connect(url: str, **options: Any) -> FakeSocket:
        # The first socket dies after register and task_request: the result cannot be sent on it.
        sock = FakeSocket(unknown_task_farm(known), break_after=2 if not sockets else None)
        sockets.append(sock)
        return sock

    sleeps: list[float] = []
    session = make_session(Identity("c-1", "t-1"), [], max_tasks=1)
    Connection("https://farm.test", session, connect=connect, sleep=sleeps.append, clock=Clock()).run()
    assert [m["type"] for m in sockets[0].sent] == ["register", "task_request"]
    assert [m["type"] for m in sockets[1].sent] == ["register", "task_result"]
    assert sockets[1].sent[0]["client_id"] == "c-1"
    assert len(sleeps) == 1  # one backoff between the two connections


def test_result_sent_then_done_without_reconnecting() -> None:
    known = {"c-1": "t-1"}
    sockets: list[FakeSocket] = []

    def connect(url: str, **options: Any) -> FakeSocket:
        sock = FakeSocket(unknown_task_farm(known), close_after=3)  # closes after the result
        sockets.append(sock)
        return sock

    sleeps: list[float] = []
    session = make_session(Identity("c-1", "t-1"), [], max_tasks=1)
    Connection("https://farm.test", session, connect=connect, sleep=sleeps.append, clock=Clock()).run()
    assert [m["type"] for m in sockets[0].sent] == ["register", "task_request", "task_result"]
    assert len(sockets) == 1
    assert sleeps == []


def test_a_result_whose_acknowledgement_was_lost_is_sent_again_after_reconnecting() -> None:
    known = {"c-1": "t-1"}
    sockets: list[FakeSocket] = []

    def connect(url: str, **options: Any) -> FakeSocket:
        # The first socket closes right after the result, its acknowledgement lost with it.
        first = not sockets
        sock = FakeSocket(unknown_task_farm(known, acknowledge=not first), close_after=3 if first else None)
        sockets.append(sock)
        return sock

    sleeps: list[float] = []
    session = make_session(Identity("c-1", "t-1"), [], max_tasks=1)
    Connection("https://farm.test", session, connect=connect, sleep=sleeps.append, clock=Clock()).run()
    assert [m["type"] for m in sockets[0].sent] == ["register", "task_request", "task_result"]
    assert [m["type"] for m in sockets[1].sent] == ["register", "task_result"]
    assert sockets[1].sent[1] == sockets[0].sent[2]
    assert len(sockets) == 2 and session.done


def test_fatal_register_error_stops_the_loop() -> None:
    def reply(message: dict[str, Any]) -> list[dict[str, Any]]:
        return [
            {"type": "error", "code": "invalid_message", "message": "register.cpu_info.cores is required"}
        ]

    session = make_session(None, [])
    connection = Connection(
        "http://farm.test",
        session,
        connect=lambda url, **o: FakeSocket(reply),
        sleep=lambda s: None,
        clock=Clock(),
    )
    with pytest.raises(Fatal, match="cores"):
        connection.run()


def test_gives_up_when_never_registered() -> None:
    def connect(url: str, **options: Any) -> FakeSocket:
        raise ConnectionRefusedError(111, "Connection refused")

    sleeps: list[float] = []
    connection = Connection(
        "http://farm.test",
        make_session(None, []),
        give_up_after=5.0,
        connect=connect,
        sleep=sleeps.append,
        clock=Clock(),
    )
    with pytest.raises(GaveUp, match="giving up"):
        connection.run()
    assert sleeps  # it retried before giving up


def test_server_full_close_then_success() -> None:
    sockets: list[FakeSocket] = []
    known: dict[str, str] = {}

    def connect(url: str, **options: Any) -> FakeSocket:
        if not sockets:

            def full(message: dict[str, Any]) -> list[dict[str, Any]]:
                return [{"type": "error", "code": "server_full", "message": "2 clients are connected"}]

            sock = FakeSocket(full, close_after=1)
        else:
            sock = FakeSocket(unknown_task_farm(known))
        sockets.append(sock)
        return sock

    sleeps: list[float] = []
    Connection(
        "http://farm.test",
        make_session(None, []),
        backoff=Backoff(rng=random.Random(0)),
        connect=connect,
        sleep=sleeps.append,
        clock=Clock(),
    ).run()
    assert len(sockets) == 2
    assert len(sleeps) == 1 and 0 <= sleeps[0] <= 0.5
    assert sockets[1].sent[-1]["type"] == "task_result"
