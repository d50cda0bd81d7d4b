"""Test helpers: a WebSocket client over a real socket; processes and HTTP come from launch.py."""

from __future__ import annotations

import contextlib
import json
import time
from typing import Any

import websocket

from launch import (
    ADMIN,
    ROOT,
    Proc,
    free_port,
    request,
    start_beat,
    start_embedded,
    start_gunicorn,
    start_worker,
    wait_for,
)
from training.version import PROTOCOL_VERSION, VERSION

#: What a current reference client states in register (docs/protocol.md, "Versions").
CURRENT_VERSIONS = {"protocol_version": PROTOCOL_VERSION, "client_version": VERSION}

__all__ = [
    "ADMIN",
    "ROOT",
    "Proc",
    "WsClient",
    "free_port",
    "request",
    "start_beat",
    "start_embedded",
    "start_gunicorn",
    "start_worker",
    "wait_for",
]


class WsClient:
    """A volunteer client over a real WebSocket, for tests."""

    HARDWARE: dict[str, Any] = {
        "cpu_info": {"cores": 4, "model": "test"},
        "ram_info": {"total_gb": 16},
        "gpu_info": [],
    }

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.port = port
        self.ws = websocket.create_connection(f"ws://127.0.0.1:{port}/ws", timeout=timeout)
        self.client_id: str | None = None
        self.token: str | None = None
        self.inbox: list[dict[str, Any]] = []

    def send(self, message: dict[str, Any] | str) -> None:
        self.ws.send(message if isinstance(message, str) else json.dumps(message))

    def recv(self, timeout: float = 10.0) -> dict[str, Any]:
        """The next message, whatever it is, within ``timeout`` seconds."""
        if self.inbox:
            return self.inbox.pop(0)
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if (message := self._next(left)) is not None:
                return message
        raise websocket.WebSocketTimeoutException(f"no message within {timeout}s")

    def _next(self, left: float) -> dict[str, Any] | None:
        """One text message within ``left`` seconds, or None (a timeout, a ping or a pong).

        ``ws.recv()`` answers pings itself and keeps reading, so a server pinging more often
        than ``left`` would hold it forever; returning at control frames keeps every wait
        bounded by its caller's deadline."""
        self.ws.settimeout(left)
        try:
            opcode, data = self.ws.recv_data(control_frame=True)
        except websocket.WebSocketTimeoutException:
            return None
        if opcode in (websocket.ABNF.OPCODE_PING, websocket.ABNF.OPCODE_PONG):
            return None
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            raise websocket.WebSocketConnectionClosedException(f"closed by the server: {data!r}")
        return dict(json.loads(data))

    def expect(self, kind: str, timeout: float = 10.0, **match: Any) -> dict[str, Any]:
        """The next message of type ``kind`` (matching ``match``); others are kept for later."""
        deadline = time.monotonic() + timeout
        for i, message in enumerate(self.inbox):
            if _matches(message, kind, match):
                return self.inbox.pop(i)
        while (left := deadline - time.monotonic()) > 0:
            message = self._next(left)
            if message is None:
                continue
            if _matches(message, kind, match):
                return message
            self.inbox.append(message)
        raise AssertionError(f"no {kind} {match} within {timeout}s; inbox: {self.inbox}")

    def expect_error(self, code: str, timeout: float = 10.0) -> dict[str, Any]:
        return self.expect("error", timeout, code=code)

    def silent(self, seconds: float) -> list[dict[str, Any]]:
        """Everything received within ``seconds`` (used to show nothing was pushed)."""
        got = list(self.inbox)
        self.inbox.clear()
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            if (message := self._next(left)) is not None:
                got.append(message)
        return got

    def register(self, **hardware: Any) -> WsClient:
        body = {"type": "register", **self.HARDWARE, **CURRENT_VERSIONS, **hardware}
        if self.client_id and self.token:
            body.update(client_id=self.client_id, token=self.token)
        self.send(body)
        reply = self.expect("registered")
        self.client_id = reply["client_id"]
        self.token = reply.get("token", self.token)
        return self

    def request_task(self) -> None:
        self.send({"type": "task_request", "client_id": self.client_id})

    def next_task(self, timeout: float = 10.0) -> dict[str, Any]:
        return dict(self.expect("task", timeout)["data"])

    def result(self, task: dict[str, Any], status: str = "completed", **metrics: Any) -> None:
        self.send(
            {
                "type": "task_result",
                "task_id": task["id"],
                "round": task["round"],
                "status": status,
                "metrics": metrics,
            }
        )

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.ws.close()


def _matches(message: dict[str, Any], kind: str, match: dict[str, Any]) -> bool:
    if message.get("type") != kind:
        return False
    for key, value in match.items():
        where = message.get("data", message) if key not in message else message
        if where.get(key) != value:
            return False
    return True
