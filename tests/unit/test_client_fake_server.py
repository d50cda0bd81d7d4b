"""``python -m client`` against a small fake server speaking docs/protocol.md (Flask + flask-sock).

The fake keeps the protocol's rules that matter to a client: register/registered with a token,
auth_failed for an unknown identity, one task per task_request, assignments sent again on a new
connection, model download with X-Checksum-Sha256, upload before a completed result. The real
server's end-to-end tests live elsewhere; these check the client process end to end without
MariaDB or Redis.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import socket
import stat
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask, Response, request
from flask_sock import Sock
from werkzeug.serving import BaseWSGIServer, make_server

from launch import wait_for
from training.data import shard_size
from training.models import build_model
from training.serialize import state_from_bytes, state_to_bytes

ROOT = Path(__file__).resolve().parents[2]
WAIT = 120.0

CONFIG: dict[str, Any] = {
    "model": "mlp",
    "dataset": "synthetic",
    "rounds": 3,
    "num_shards": 2,
    "local_epochs": 2,
    "batch_size": 16,
    "lr": 0.05,
    "momentum": 0.0,
    "partition": "iid",
    "alpha": 0.5,
    "seed": 3,
    "strategy": "fedavg",
    "strategy_params": {},
}


def assignment(task_id: int, round_no: int, rank: int, kind: str = "federated_training") -> dict[str, Any]:
    data: dict[str, Any] = {
        "id": task_id,
        "type": kind,
        "round": round_no,
        "rank": rank,
        "num_shards": CONFIG["num_shards"],
        "config": CONFIG,
        "requirements": {},
    }
    if kind == "federated_training":
        data["model_url"] = f"/api/tasks/{task_id}/rounds/{round_no}/model"
        data["update_url"] = f"/api/tasks/{task_id}/rounds/{round_no}/updates/{rank}"
    return data


class FakeFarm:
    def __init__(self, tasks: list[dict[str, Any]], *, known: dict[str, str] | None = None) -> None:
        self.lock = threading.Lock()
        self.tokens: dict[str, str] = dict(known or {})
        self.queue = deque(tasks)
        self.open: dict[str, list[dict[str, Any]]] = {}
        self.registers: list[dict[str, Any]] = []
        self.requests = 0
        self.progress: list[dict[str, Any]] = []
        self.results: list[dict[str, Any]] = []
        self.uploads: dict[tuple[int, int, int], int] = {}
        self.violations: list[str] = []
        self.connections = 0
        self.model = state_to_bytes(build_model(CONFIG).state_dict())
        self.bad_checksum = False
        # hooks: (farm, send, assignment) after a task is sent
        self.on_assign: (
            Callable[[FakeFarm, Callable[[dict[str, Any]], None], dict[str, Any]], None] | None
        ) = None
        self.close_after_assign_once = False
        self.model_unavailable: set[int] = set()  # task ids whose model answers 503 (retried)
        self.app = self._build_app()

    # --- HTTP ---

    def _auth(self) -> str | None:
        client_id = request.headers.get("X-Client-Id", "")
        header = request.headers.get("Authorization", "")
        with self.lock:
            expected = self.tokens.get(client_id)
        if expected is None or header != f"Bearer {expected}":
            return None
        return client_id

    def _build_app(self) -> Flask:
        app = Flask("fakefarm")
        sock = Sock(app)

        @app.get("/api/tasks/<int:task_id>/rounds/<int:round_no>/model")
        def model(task_id: int, round_no: int) -> Response:
            if self._auth() is None:
                return Response(json.dumps({"error": "unauthorized", "message": "who?"}), status=401)
            if task_id in self.model_unavailable:
                return Response(json.dumps({"error": "unavailable", "message": "later"}), status=503)
            checksum = hashlib.sha256(self.model).hexdigest()
            if self.bad_checksum:
                checksum = "0" * 64
            return Response(
                self.model, mimetype="application/octet-stream", headers={"X-Checksum-Sha256": checksum}
            )

        @app.put("/api/tasks/<int:task_id>/rounds/<int:round_no>/updates/<int:rank>")
        def update(task_id: int, round_no: int, rank: int) -> Response:
            client_id = self._auth()
            if client_id is None:
                return Response(json.dumps({"error": "unauthorized", "message": "who?"}), status=401)
            body = request.get_data()
            try:
                state = state_from_bytes(body)
            except ValueError as error:
                return Response(json.dumps({"error": "invalid_update", "message": str(error)}), status=400)
            reference = state_from_bytes(self.model)
            if {k: tuple(v.shape) for k, v in state.items()} != {
                k: tuple(v.shape) for k, v in reference.items()
            }:
                return Response(json.dumps({"error": "invalid_update", "message": "shapes"}), status=400)
            examples = request.headers.get("X-Num-Examples", "")
            if not examples.isdigit():
                return Response(json.dumps({"error": "invalid_update", "message": "examples"}), status=400)
            with self.lock:
                self.uploads[(task_id, round_no, rank)] = int(examples)
            digest = hashlib.sha256(body).hexdigest()
            return Response(json.dumps({"status": "accepted", "sha256": digest}), status=201)

        @sock.route("/ws")
        def ws_route(ws: Any) -> None:
            self._serve(ws)

        return app

    # --- WebSocket ---

    def _serve(self, ws: Any) -> None:
        with self.lock:
            self.connections += 1
        client_id: str | None = None

        def send(message: dict[str, Any]) -> None:
            ws.send(json.dumps(message))

        while True:
            raw = ws.receive(timeout=0.05)
            if raw is None:
                continue
            message = json.loads(raw)
            kind = message.get("type")
            if kind == "register":
                with self.lock:
                    self.registers.append(message)
                claimed = message.get("client_id")
                if claimed is not None:
                    with self.lock:
                        ok = self.tokens.get(claimed) == message.get("token")
                    if not ok:
                        send(
                            {
                                "type": "error",
                                "code": "auth_failed",
                                "message": "unknown client_id or wrong token",
                            }
                        )
                        continue
                    client_id = claimed
                    send({"type": "registered", "client_id": client_id})
                else:
                    client_id = f"c-{secrets.token_hex(4)}"
                    token = secrets.token_urlsafe(16)
                    with self.lock:
                        self.tokens[client_id] = token
                    send({"type": "registered", "client_id": client_id, "token": token})
                with self.lock:
                    resend = list(self.open.get(client_id, []))
                for data in resend:
                    send({"type": "task", "data": data})
            elif client_id is None:
                send({"type": "error", "code": "not_registered", "message": "send 'register' first"})
            elif kind == "task_request":
                with self.lock:
                    self.requests += 1
                    given = self.queue.popleft() if self.queue else None
                    if given is not None:
                        self.open.setdefault(client_id, []).append(given)
                if given is not None:
                    send({"type": "task", "data": given})
                    if self.on_assign is not None:
                        self.on_assign(self, send, given)
                    if self.close_after_assign_once:
                        self.close_after_assign_once = False
                        ws.close()
                        return
            elif kind == "task_progress":
                with self.lock:
                    self.progress.append(message)
            elif kind == "task_result":
                key = (message["task_id"], message.get("round"))
                with self.lock:
                    held = self.open.get(client_id, [])
                    match = [d for d in held if (d["id"], d["round"]) == key]
                    if not match:
                        self.violations.append(f"result for a task not held: {message}")
                        send({"type": "error", "code": "not_assigned", "message": "not yours"})
                        continue
                    data = match[0]
                    if message["status"] == "completed" and (data["id"], data["round"], data["rank"]) not in (
                        self.uploads
                    ):
                        self.violations.append(f"completed before upload: {message}")
                    held.remove(data)
                    self.results.append(message)
                ack = {"type": "result_accepted", "task_id": data["id"], "round": data["round"]}
                send({**ack, "rank": data["rank"], "assignment_id": 1, "status": message["status"]})


@pytest.fixture
def fake_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Running:
    def __init__(self, farm: FakeFarm, port: int) -> None:
        self.farm = farm
        self.server: BaseWSGIServer = make_server("127.0.0.1", port, farm.app, threaded=True)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        self.server.shutdown()
        self.thread.join(timeout=10)


@pytest.fixture
def serve(fake_port: int) -> Iterator[Callable[[FakeFarm], Running]]:
    running: list[Running] = []

    def start(farm: FakeFarm) -> Running:
        r = Running(farm, fake_port)
        running.append(r)
        return r

    yield start
    for r in running:
        r.stop()


def client_cmd(url: str, state: Path, max_tasks: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "client",
        "--server",
        url,
        "--state",
        str(state),
        "--max-tasks",
        str(max_tasks),
        "--device",
        "cpu",
        "--give-up-after",
        "60",
    ]


def client_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("AIFARM_")}


def run_client(url: str, state: Path, max_tasks: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        client_cmd(url, state, max_tasks),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=WAIT,
        env=client_env(),
    )


def test_trains_uploads_reports_and_exits_after_max_tasks(
    tmp_path: Path, serve: Callable[[FakeFarm], Running]
) -> None:
    farm = FakeFarm([assignment(1, 0, 0), assignment(1, 0, 1), assignment(1, 1, 0)])
    server = serve(farm)
    state = tmp_path / "state" / "client.json"
    out = run_client(server.url, state, 2)
    assert out.returncode == 0, out.stderr
    assert farm.violations == []
    assert [(r["task_id"], r["round"], r["status"]) for r in farm.results] == [(1, 0, "completed")] * 2
    for result, rank in zip(farm.results, (0, 1), strict=True):
        metrics = result["metrics"]
        assert metrics["num_examples"] == shard_size(CONFIG, rank)
        assert metrics["train_loss"] > 0
        assert farm.uploads[(1, 0, rank)] == shard_size(CONFIG, rank)
    assert farm.progress, "no task_progress was sent"
    assert all(
        0 <= p["progress"] <= 100 and {"loss", "accuracy", "epoch"} <= set(p["metrics"])
        for p in farm.progress
    )
    assert len(farm.queue) == 1  # it asked for exactly two tasks
    register = farm.registers[0]
    assert register["task_types"] == ["federated_training"]
    assert register["cpu_info"]["cores"] >= 1 and register["ram_info"]["total_gb"] > 0
    assert "client_id" not in register
    saved = json.loads(state.read_text())
    assert saved["client_id"] in farm.tokens and saved["token"] == farm.tokens[saved["client_id"]]
    assert stat.S_IMODE(state.stat().st_mode) == 0o600

    # A restart reconnects as the same client.
    out = run_client(server.url, state, 1)
    assert out.returncode == 0, out.stderr
    assert farm.registers[-1]["client_id"] == saved["client_id"]
    assert farm.registers[-1]["token"] == saved["token"]
    assert json.loads(state.read_text())["client_id"] == saved["client_id"]
    assert len(farm.results) == 3


def test_unknown_identity_registers_fresh(tmp_path: Path, serve: Callable[[FakeFarm], Running]) -> None:
    farm = FakeFarm([assignment(2, 0, 0)])
    server = serve(farm)
    state = tmp_path / "client.json"
    state.write_text(json.dumps({"client_id": "c-forgotten", "token": "nope"}))
    out = run_client(server.url, state, 1)
    assert out.returncode == 0, out.stderr
    assert farm.registers[0]["client_id"] == "c-forgotten"
    assert "client_id" not in farm.registers[1]
    saved = json.loads(state.read_text())
    assert saved["client_id"] != "c-forgotten" and saved["client_id"] in farm.tokens
    assert farm.results[0]["status"] == "completed"


def test_unknown_task_type_and_bad_checksum_fail_with_reasons(
    tmp_path: Path, serve: Callable[[FakeFarm], Running]
) -> None:
    farm = FakeFarm([assignment(3, 0, 0, kind="render_video"), assignment(4, 0, 0)])
    farm.bad_checksum = True
    server = serve(farm)
    out = run_client(server.url, tmp_path / "client.json", 2)
    assert out.returncode == 0, out.stderr
    statuses = [(r["task_id"], r["status"]) for r in farm.results]
    assert statuses == [(3, "failed"), (4, "failed")]
    assert "render_video" in farm.results[0]["error"]
    assert "checksum" in farm.results[1]["error"]
    assert farm.uploads == {}


def test_dropped_connection_resumes_the_same_assignment(
    tmp_path: Path, serve: Callable[[FakeFarm], Running]
) -> None:
    farm = FakeFarm([assignment(5, 0, 1)])
    farm.close_after_assign_once = True
    server = serve(farm)
    out = run_client(server.url, tmp_path / "client.json", 1)
    assert out.returncode == 0, out.stderr
    assert farm.connections >= 2
    assert len({r.get("client_id") for r in farm.registers[1:]}) == 1  # same identity after the drop
    assert [(r["task_id"], r["status"]) for r in farm.results] == [(5, "completed")]
    assert farm.violations == []
    assert "already working on it" in out.stderr or "already finished" in out.stderr


def test_stop_drops_the_task_and_asks_for_more(tmp_path: Path, serve: Callable[[FakeFarm], Running]) -> None:
    farm = FakeFarm([assignment(6, 0, 0), assignment(7, 0, 0)])
    farm.model_unavailable.add(6)  # task 6 is still downloading (retrying) when its stop comes

    def stop_first(farm: FakeFarm, send: Callable[[dict[str, Any]], None], data: dict[str, Any]) -> None:
        if data["id"] == 6:
            with farm.lock:
                for held in farm.open.values():
                    if data in held:
                        held.remove(data)
            send({"type": "stop", "task_id": 6})

    farm.on_assign = stop_first
    server = serve(farm)
    out = run_client(server.url, tmp_path / "client.json", 1)
    assert out.returncode == 0, out.stderr
    assert [(r["task_id"], r["status"]) for r in farm.results] == [(7, "completed")]
    assert farm.violations == []
    assert (6, 0, 0) not in farm.uploads
    assert farm.requests == 2


def test_pause_then_resume_finishes_the_task(tmp_path: Path, serve: Callable[[FakeFarm], Running]) -> None:
    farm = FakeFarm([assignment(8, 0, 0)])

    def pause_then_resume(
        farm: FakeFarm, send: Callable[[dict[str, Any]], None], data: dict[str, Any]
    ) -> None:
        send({"type": "pause", "task_id": 8})
        send({"type": "resume", "task_id": 8})

    farm.on_assign = pause_then_resume
    server = serve(farm)
    out = run_client(server.url, tmp_path / "client.json", 1)
    assert out.returncode == 0, out.stderr
    assert "task 8: paused by the server" in out.stderr
    assert "task 8: resumed" in out.stderr
    assert [(r["task_id"], r["status"]) for r in farm.results] == [(8, "completed")]


def test_waits_for_a_server_that_is_not_up_yet(
    tmp_path: Path, fake_port: int, serve: Callable[[FakeFarm], Running]
) -> None:
    log_path = tmp_path / "client.log"
    url = f"http://127.0.0.1:{fake_port}"
    with log_path.open("w") as log_file:
        proc = subprocess.Popen(
            client_cmd(url, tmp_path / "client.json", 1),
            cwd=ROOT,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            text=True,
            env=client_env(),
        )
        try:
            wait_for(
                lambda: "cannot connect" in log_path.read_text() or proc.poll() is not None,
                WAIT,
                what="the client to try to connect",
            )
            assert proc.poll() is None, log_path.read_text()
            farm = FakeFarm([assignment(9, 0, 0)])
            serve(farm)
            assert proc.wait(timeout=WAIT) == 0, log_path.read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert [(r["task_id"], r["status"]) for r in farm.results] == [(9, "completed")]
