"""Each attack a test (issue 11, "no door left open"), on gunicorn with two web processes on
MariaDB and Redis and a real Celery worker (``server``) unless a test says otherwise.

- the central-DP noise cannot be regenerated from what a client receives, and an admin
  reproduces it from the stored secret;
- every protected endpoint, enumerated from the Flask URL map, refuses a missing, wrong,
  expired and revoked token;
- a client cannot act on another client's assignment, nor spend its budget;
- the admin limit is shared by both web processes and its 429 says when to come back;
- behind a configured proxy the address comes from X-Forwarded-For, and only then;
- a browser's WebSocket handshake from a foreign origin is refused;
- security events reach audit.log without secrets;
- a task with no model yet is a 404 with a reason, and downloads serve the stored digest.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load as load_st

from store.db import Database
from tests.conftest import rows
from tests.helpers import Proc, request
from tests.services.test_federated import start_clients, submit, wait_status

pytestmark = pytest.mark.usefixtures("clean")


# --- DP noise: a per-task server secret ---


@pytest.fixture
def client_procs() -> Iterator[list[Proc]]:
    procs: list[Proc] = []
    yield procs
    for p in procs:
        p.stop()


def rerun_round(run_dir: Path, db: Database, task: dict[str, Any], round_no: int, round_seed: int) -> Any:
    """Aggregate round ``round_no`` of ``task`` again here, from its files, with ``round_seed``."""
    import aggregation
    from training import shard_size

    ck = run_dir / "checkpoints"
    updates = [
        aggregation.UpdateFile(str(ck / path), n, shard_size(task["config"], rank), str(aid))
        for aid, rank, path, n in rows(
            db,
            "SELECT id, `rank`, checkpoint_path, num_examples FROM task_assignments "
            "WHERE task_id = :t AND round = :r AND status = 'completed' ORDER BY `rank`, id",
            t=task["id"],
            r=round_no,
        )
    ]
    cfg = task["config"]
    result = aggregation.build_strategy(cfg["strategy"], cfg["strategy_params"]).run_round(
        str(ck / f"tasks/{task['id']}/round-{round_no:05d}/global.safetensors"),
        updates,
        round_seed=round_seed,
        max_slice_bytes=65536,  # the server's AGGREGATION_SLICE_BYTES (conftest.prod_env)
    )
    assert result.params is not None
    return result.params


def test_the_dp_noise_is_not_reproducible_from_what_a_client_receives(
    server: int, run_dir: Path, prod_env: dict[str, str], client_procs: list[Proc], db: Database
) -> None:
    from aggregation.seeds import secret_round_seed

    client_procs.extend(start_clients(server, run_dir, 2, prod_env))
    params = {"clip_norm": 0.5, "noise_multiplier": 1.0, "seed": 5}
    task = submit(server, rounds=1, strategy="fedavg", strategy_params=params)
    done = wait_status(server, task["id"], "completed")
    [(metrics,)] = rows(db, "SELECT metrics FROM task_rounds WHERE task_id = :t AND round = 0", t=task["id"])
    report = json.loads(metrics)["report"]
    assert report["noise_std"] > 0, report
    served = load_st((run_dir / "checkpoints" / done["checkpoint_path"]).read_bytes())

    # Everything a client is told of the task is its config (the `task` message sends nothing
    # else that is random): every seed derived from it gives other noise than the server's.
    seed = done["config"]["strategy_params"]["seed"]
    for guess in (seed, seed * 1_000_003, 0):
        guessed = rerun_round(run_dir, db, done, 0, guess)
        assert any(not torch.equal(guessed[name], served[name]) for name in served), guess

    # The admin, with the secret stored in the database, gets the server's round bit for bit.
    [(secret,)] = rows(db, "SELECT noise_secret FROM tasks WHERE id = :t", t=task["id"])
    assert secret is not None and 0 <= secret < 2**63
    again = rerun_round(run_dir, db, done, 0, secret_round_seed(secret, 0))
    assert set(again) == set(served)
    for name in served:
        assert torch.equal(again[name], served[name]), name

    # and the secret is in no answer a client or an admin gets, nor in any process's log
    for path in (f"/api/tasks/{task['id']}", f"/api/tasks/{task['id']}/model-card"):
        status, answer = request(server, "GET", path)
        assert status == 200 and str(secret) not in str(answer), path
    for log in (run_dir / "procs").glob("*"):
        if log.is_file():
            assert str(secret) not in log.read_text(errors="replace"), log
    for log in (run_dir / "logs").glob("*.log"):
        assert str(secret) not in log.read_text(errors="replace"), log
