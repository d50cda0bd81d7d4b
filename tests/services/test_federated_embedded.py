"""Federated training on the embedded default, including a server killed mid-task and restarted."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import service_env
from tests.helpers import Proc, free_port, request, start_embedded, wait_for
from tests.services.test_federated import FAST, start_clients


@pytest.fixture
def embedded_run(tmp_path: Path) -> Iterator[tuple[int, Path, dict[str, str], list[Proc]]]:
    env = service_env(tmp_path, CHECKPOINT_FREQUENCY="2", SWEEP_INTERVAL="2", SCHEDULE_INTERVAL="1")
    port = free_port()
    procs = [start_embedded(env, port, tmp_path / "procs")]
    yield port, tmp_path, env, procs
    for proc in procs:
        proc.stop()


def task_detail(port: int, task_id: int) -> dict[str, Any]:
    status, body = request(port, "GET", f"/api/tasks/{task_id}")
    return body if status == 200 else {}


def test_a_server_killed_mid_task_resumes_and_loses_no_round(
    embedded_run: tuple[int, Path, dict[str, str], list[Proc]],
) -> None:
    port, run_dir, env, procs = embedded_run
    procs.extend(start_clients(port, run_dir, 2, env))
    status, task = request(
        port, "POST", "/api/tasks", {"type": "federated_training", "config": {**FAST, "rounds": 6}}
    )
    assert status == 201
    wait_for(lambda: task_detail(port, task["id"]).get("current_round", 0) >= 2, 90, 0.1, "round 2 under way")
    procs[0].kill(signal.SIGKILL)  # no goodbye: in-memory broker, sockets and pending work all gone
    procs[0].popen.wait(10)
    procs[0] = start_embedded(env, port, run_dir / "procs")  # same data dir, same port
    done = wait_for(lambda: (d := task_detail(port, task["id"]))["status"] == "completed" and d, 120, 0.2)
    assert [r["round"] for r in done["result"]["rounds"]] == [0, 1, 2, 3, 4, 5]
    kept = run_dir / "checkpoints" / f"tasks/{task['id']}/checkpoints"
    checkpoints = sorted(p.name for p in kept.iterdir())
    assert checkpoints == ["round-00002.safetensors", "round-00004.safetensors", "round-00006.safetensors"]
    assert done["checkpoint_path"].endswith("round-00006.safetensors")
    status, model = request(port, "GET", f"/api/tasks/{task['id']}/model")
    assert status == 200 and len(model) > 1000
