"""The embedded default: ``python -m app`` with nothing configured serves everything from one process."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import service_env
from tests.helpers import Proc, WsClient, free_port, request, start_embedded, wait_for


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path]]:
    run_dir = tmp_path_factory.mktemp("embedded")
    port = free_port()
    proc: Proc = start_embedded(service_env(run_dir, MAX_CLIENTS="3"), port, run_dir / "procs")
    yield port, run_dir
    proc.stop()


def test_embedded_serves_a_task_end_to_end(embedded: tuple[int, Path]) -> None:
    port, run_dir = embedded
    status, health = request(port, "GET", "/healthz", token=None)
    assert (status, health["mode"], health["database"], health["broker"]) == (200, "embedded", True, True)
    a, b = WsClient(port).register(), WsClient(port).register()
    try:
        a.request_task()
        b.request_task()
        status, task = request(port, "POST", "/api/tasks", {"type": "echo", "config": {"num_shards": 2}})
        assert status == 201
        got = {c.client_id: c.next_task() for c in (a, b)}
        assert sorted(t["rank"] for t in got.values()) == [0, 1]
        for c in (a, b):
            c.result(got[c.client_id], score=1.0)
        done = wait_for(
            lambda: (t := request(port, "GET", f"/api/tasks/{task['id']}")[1])["status"] == "completed" and t,
            what="completion",
        )
        assert done["result"]["metrics"] == {"score": 1.0}
    finally:
        a.close()
        b.close()
    assert (run_dir / "data" / "aifarm.sqlite3").exists()
    for name in ("server.log", "error.log", "access.log"):
        assert (run_dir / "logs" / name).exists(), name


def test_max_clients_turns_the_next_one_away(embedded: tuple[int, Path]) -> None:
    port, _ = embedded
    clients = [WsClient(port).register() for _ in range(3)]
    extra = WsClient(port)
    try:
        extra.send({"type": "register", **WsClient.HARDWARE})
        error = extra.expect_error("server_full")
        assert "3 clients" in error["message"]
        clients[0].close()
        wait_for(lambda: _registers(port), what="a free slot after a disconnect")
    finally:
        for c in clients:
            c.close()
        extra.close()


def _registers(port: int) -> bool:
    c = WsClient(port)
    try:
        c.send({"type": "register", **WsClient.HARDWARE})
        return c.recv()["type"] == "registered"
    finally:
        c.close()


def test_without_admin_token_one_is_generated_printed_once_and_works(tmp_path: Path) -> None:
    env = service_env(tmp_path)
    env.pop("ADMIN_TOKEN")
    port = free_port()
    first = start_embedded(env, port, tmp_path / "procs")
    try:
        printed = wait_for(
            lambda: re.search(r"ADMIN TOKEN \(shown once, stored hashed\): (\S+)", first.output())
        )
        token = printed.group(1)
        assert request(port, "GET", "/api/tasks", token=token)[0] == 200
        assert request(port, "GET", "/api/tasks", token=token + "x")[0] == 401
    finally:
        first.stop()
    second = start_embedded(env, port, tmp_path / "procs2")  # same data: the token exists already
    try:
        assert "ADMIN TOKEN" not in second.output()
        assert request(port, "GET", "/api/tasks", token=token)[0] == 200
    finally:
        second.stop()
