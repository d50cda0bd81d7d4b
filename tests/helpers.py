"""Test helpers: processes, a WebSocket client, an HTTP client, and waiting with a deadline."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import websocket

ROOT = Path(__file__).resolve().parent.parent
ADMIN = "test-admin-token"
T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(
    check: Callable[[], T], timeout: float = 15.0, interval: float = 0.05, what: str = "condition"
) -> T:
    """Poll ``check`` until it returns something truthy; fail with ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


class Proc:
    """A subprocess with its output in a file, stopped on :meth:`stop`."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_dir: Path) -> None:
        log_dir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.log_path = log_dir / f"{name}.out"
        self._log = open(self.log_path, "ab")  # noqa: SIM115 (open for the process lifetime)
        self.popen = subprocess.Popen(
            args, cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.alive():
            os.killpg(self.popen.pid, sig)

    def stop(self, timeout: float = 10.0) -> None:
        if self.alive():
            os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(5)
        self._log.close()


def python() -> str:
    return sys.executable


def start_gunicorn(env: dict[str, str], port: int, log_dir: Path, workers: int = 2) -> Proc:
    args = [
        python(),
        "-m",
        "gunicorn",
        "app:create_app()",
        "--bind",
        f"127.0.0.1:{port}",
        "--workers",
        str(workers),
        "--worker-class",
        "gevent",
        "--graceful-timeout",
        "3",
    ]
    proc = Proc(f"gunicorn-{port}", args, env, log_dir)
    wait_http(port, proc)
    return proc


def start_embedded(env: dict[str, str], port: int, log_dir: Path) -> Proc:
    proc = Proc(f"embedded-{port}", [python(), "-m", "app"], {**env, "SERVER_PORT": str(port)}, log_dir)
    wait_http(port, proc)
    return proc


def start_worker(env: dict[str, str], log_dir: Path, name: str = "worker", concurrency: int = 2) -> Proc:
    args = [
        python(),
        "-m",
        "celery",
        "-A",
        "workers",
        "worker",
        "--loglevel",
        "INFO",
        "--concurrency",
        str(concurrency),
        "--hostname",
        f"{name}-{os.getpid()}@%h",
        "--without-mingle",
        "--without-gossip",
    ]
    proc = Proc(name, args, env, log_dir)
    wait_for(lambda: "ready." in proc.output() or not proc.alive(), 60, what="celery worker ready")
    assert proc.alive(), proc.output()
    return proc


def start_beat(env: dict[str, str], log_dir: Path) -> Proc:
    args = [python(), "-m", "celery", "-A", "workers", "beat", "--loglevel", "INFO"]
    return Proc("beat", args, env, log_dir)


def wait_http(port: int, proc: Proc) -> None:
    def up() -> bool:
        assert proc.alive(), f"{proc.name} exited:\n{proc.output()}"
        try:
            status, _ = request(port, "GET", "/healthz", token=None)
            return status in (200, 503)
        except OSError:
            return False

    wait_for(up, 60, 0.1, f"{proc.name} to listen on {port}")


def request(
    port: int,
    method: str,
    path: str,
    body: Any = None,
    *,
    token: str | None = ADMIN,
    headers: dict[str, str] | None = None,
    raw: bytes | None = None,
    timeout: float = 30,
) -> tuple[int, Any]:
    """One HTTP request; returns (status, parsed JSON or bytes)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    hdrs = dict(headers or {})
    if token is not None:
        hdrs["Authorization"] = f"Bearer {token}"
    data = raw
    if body is not None:
        data = json.dumps(body).encode()
        hdrs.setdefault("Content-Type", "application/json")
    try:
        conn.request(method, path, body=data, headers=hdrs)
        response = conn.getresponse()
        payload = response.read()
        kind = response.getheader("Content-Type", "")
        if kind.startswith("application/json"):
            return response.status, json.loads(payload)
        return response.status, payload
    finally:
        conn.close()


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
        if self.inbox:
            return self.inbox.pop(0)
        self.ws.settimeout(timeout)
        return dict(json.loads(self.ws.recv()))

    def expect(self, kind: str, timeout: float = 10.0, **match: Any) -> dict[str, Any]:
        """The next message of type ``kind`` (matching ``match``); others are kept for later."""
        deadline = time.monotonic() + timeout
        for i, message in enumerate(self.inbox):
            if _matches(message, kind, match):
                return self.inbox.pop(i)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {kind} {match} within {timeout}s; inbox: {self.inbox}")
            self.ws.settimeout(left)
            try:
                message = json.loads(self.ws.recv())
            except websocket.WebSocketTimeoutException:
                continue
            if _matches(message, kind, match):
                return dict(message)
            self.inbox.append(message)

    def expect_error(self, code: str, timeout: float = 10.0) -> dict[str, Any]:
        return self.expect("error", timeout, code=code)

    def silent(self, seconds: float) -> list[dict[str, Any]]:
        """Everything received within ``seconds`` (used to show nothing was pushed)."""
        got = list(self.inbox)
        self.inbox.clear()
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self.ws.settimeout(left)
            try:
                got.append(json.loads(self.ws.recv()))
            except websocket.WebSocketTimeoutException:
                break
        return got

    def register(self, **hardware: Any) -> WsClient:
        body = {"type": "register", **self.HARDWARE, **hardware}
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
