"""Workers log to LOG_DIR without losing the console output their command line asks for, and
with the same keys as the web tier, so that one grep follows a round across processes."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

import launch
from tests.helpers import Proc, request, start_worker, wait_for


def test_a_worker_says_ready_at_info_when_log_level_is_warning(
    prod_env: dict[str, str], tmp_path: Path
) -> None:
    env = {**prod_env, "LOG_LEVEL": "WARNING", "LOG_DIR": str(tmp_path / "logs")}
    proc = start_worker(env, tmp_path, name="quiet-worker", concurrency=1)  # waits for "ready."
    try:
        assert "ready." in proc.output()
        assert (tmp_path / "logs" / "server.log").exists()
    finally:
        proc.stop()


@pytest.fixture
def two_clients(server: int, run_dir: Path, prod_env: dict[str, str]) -> Iterator[list[Proc]]:
    procs = launch.start_clients(server, 2, run_dir, prod_env, run_dir / "procs")
    yield procs
    for p in procs:
        p.stop()


def _lines(log: str, task_id: int, round_no: int) -> dict[str, list[str]]:
    """The server.log lines of one round (``task=<id> round=<n>``), by tier: the Celery
    workers (loggers ``workers.*``) or the web processes (``app``, ``aifarm.ws``, ...)."""
    key = re.compile(rf"\btask={task_id} round={round_no}(\s|$)")
    by_tier: dict[str, list[str]] = {"web": [], "workers": []}
    for line in log.splitlines():
        if key.search(line):
            logger = line.split(" ")[2]  # asctime levelname name message
            by_tier["workers" if logger.startswith("workers.") else "web"].append(line)
    return by_tier


@pytest.mark.usefixtures("clean")
def test_one_grep_follows_a_round_across_the_web_and_worker_logs(
    server: int, two_clients: list[Proc], prod_env: dict[str, str]
) -> None:
    config = {"model": "mlp", "dataset": "synthetic", "num_shards": 2, "rounds": 2, "local_epochs": 1}
    status, task = request(server, "POST", "/api/tasks", {"type": "federated_training", "config": config})
    assert status == 201, task
    server_log = Path(prod_env["LOG_DIR"]) / "server.log"

    def round_logged() -> dict[str, list[str]] | None:
        lines = _lines(server_log.read_text(errors="replace"), task["id"], 1)
        done = any("event=round_aggregated" in line for line in lines["workers"])
        return lines if done else None

    lines = wait_for(round_logged, 90, 0.2, f"task {task['id']} round 1 aggregated in server.log")

    web, worker = "\n".join(lines["web"]), "\n".join(lines["workers"])
    # the web tier: each rank handed out and its result, with client and assignment ids
    for event in ("dispatch", "result"):
        found = re.findall(rf"event={event} task=\d+ round=1 rank=\d client=c-\S+ assignment=\d+", web)
        assert len(found) == 2, web
    # the workers: the same round taken, aggregated and committed, under the same keys
    for event in ("event=aggregation_started", "event=aggregate_round", "event=round_aggregated"):
        assert event in worker, worker
    assert "id=" not in worker.replace("_id=", ""), worker  # task ids are `task=`, not `id=`
