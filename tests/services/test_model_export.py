"""Using the trained model: a completed task's export (torch.export .pt2) and model card over the
admin API, the export loaded by a process that has only torch, and the predict server
(``python -m training.serve``) on the production topology and on the embedded default."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load as load_st

from tests.conftest import service_env
from tests.helpers import Proc, free_port, request, start_embedded, wait_for
from tests.services.test_federated import FAST, start_clients, submit, wait_status
from training.serve import MAX_ROWS

# Run by a fresh interpreter in isolated mode (-I: no PYTHONPATH, no script or working
# directory on sys.path) from a folder outside the repository: only torch is there to use.
ONLY_TORCH = """
import importlib.util, json, sys
import torch
reachable = [m for m in ("training", "store", "app", "workers", "aggregation") if importlib.util.find_spec(m)]
assert not reachable, f"project code is importable: {reachable}"
extra = {"aifarm.json": ""}
program = torch.export.load(sys.argv[1], extra_files=extra).module()
x = torch.tensor(json.load(open(sys.argv[2])), dtype=torch.float32)
print(json.dumps({"classes": program(x).argmax(dim=1).tolist(), "meta": json.loads(extra["aifarm.json"])}))
"""


def raw_test_rows(config: dict[str, Any], n: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n`` rows of the task's test split as the export takes them (raw pixels, from
    the dataset file) and as the project's evaluation sees them (standardized). Each raw row is
    the dataset row that standardizes to the test row; finding one for every row checks the
    standardization the export bakes in."""
    from training import load_split
    from training.datasets import get_dataset
    from training.program import standardization

    raw = get_dataset(config["dataset"]).load()[0]
    _, test = load_split(config["dataset"], config["seed"])
    mean, std = standardization(config["dataset"], config["seed"])
    scaled = ((raw - mean) / std).reshape(len(raw), -1)
    picks = []
    for row in test.x[:n]:
        distance = np.abs(scaled - row.reshape(-1)).max(axis=1)
        picks.append(int(distance.argmin()))
        assert distance[picks[-1]] < 1e-4
    return raw[picks].astype(np.float32), np.array(test.x[:n])


def project_classes(config: dict[str, Any], weights: bytes, scaled: np.ndarray) -> list[int]:
    """The classes the project's own model (training.build_model, as training.evaluate runs it) gives."""
    from training import build_model

    model = build_model(config)
    model.load_state_dict(load_st(weights))
    model.eval()
    with torch.no_grad():
        return [int(c) for c in model(torch.from_numpy(scaled)).argmax(dim=1)]


def classes_with_torch_only(program: bytes, rows: np.ndarray, where: Path) -> dict[str, Any]:
    where.mkdir(parents=True, exist_ok=True)
    (where / "model.pt2").write_bytes(program)
    (where / "inputs.json").write_text(json.dumps(rows.tolist()))
    done = subprocess.run(
        [sys.executable, "-I", "-c", ONLY_TORCH, "model.pt2", "inputs.json"],
        cwd=where, env={"PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    answer: dict[str, Any] = json.loads(done.stdout)
    return answer


def start_model_server(env: dict[str, str], log_dir: Path) -> tuple[int, Proc]:
    port = free_port()
    args = [sys.executable, "-m", "training.serve", "--host", "127.0.0.1", "--port", str(port)]
    proc = Proc(f"model-server-{port}", args, env, log_dir)

    def up() -> bool:
        assert proc.alive(), proc.output()
        try:
            return request(port, "GET", "/healthz", token=None)[0] == 200
        except OSError:
            return False

    wait_for(up, 60, 0.1, "the model server")
    return port, proc


def predict(port: int, task_id: int | str, body: Any = None, raw: bytes | None = None) -> tuple[int, Any]:
    return request(port, "POST", f"/predict/{task_id}", body, raw=raw, token=None)


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    started: list[Proc] = []
    yield started
    for proc in started:
        proc.stop()


@pytest.mark.usefixtures("clean")
def test_a_completed_task_is_exported_carded_and_served(
    server: int, run_dir: Path, prod_env: dict[str, str], procs: list[Proc], tmp_path: Path
) -> None:
    procs.extend(start_clients(server, run_dir, 2, prod_env))
    task = submit(server, rounds=2)
    done = wait_status(server, task["id"], "completed")
    task_id, config = task["id"], done["config"]

    # the export and the card, over the admin API
    status, program = request(server, "GET", f"/api/tasks/{task_id}/export")
    assert status == 200 and isinstance(program, bytes) and len(program) > 1000
    status, card = request(server, "GET", f"/api/tasks/{task_id}/model-card")
    assert status == 200
    assert card["task_id"] == task_id and card["config"] == config
    assert [r["round"] for r in card["rounds"]] == [0, 1]
    assert all(r["test_accuracy"] is not None and "report" not in r for r in card["rounds"])
    assert card["final"] == done["result"]["final"]
    assert card["export"]["sha256"] == hashlib.sha256(program).hexdigest()
    assert card["export"]["format"] == "torch.export" and card["export"]["input"]["shape"] == [
        "batch",
        1,
        8,
        8,
    ]
    assert card["completed_at"] and card["created_at"] and card["dataset"]["name"] == "synthetic"
    status, weights = request(server, "GET", f"/api/tasks/{task_id}/model")
    assert status == 200
    for path in (f"/api/tasks/{task_id}/export", f"/api/tasks/{task_id}/model-card"):
        assert request(server, "GET", path, token=None)[0] == 401
        assert request(server, "GET", path, token="wrong")[0] == 401

    # a process with torch alone predicts what the project's own model predicts
    raw, scaled = raw_test_rows(config, 12)
    expected = project_classes(config, weights, scaled)
    alone = classes_with_torch_only(program, raw, tmp_path / "outside")
    assert alone["classes"] == expected
    assert alone["meta"]["task_id"] == task_id and alone["meta"]["classes"] == list(range(10))

    # the predict server: valid inputs as 64 numbers or 8x8 give the same classes
    port, proc = start_model_server(prod_env, run_dir / "procs")
    procs.append(proc)
    status, body = predict(port, task_id, {"inputs": raw.reshape(12, 64).tolist()})
    assert status == 200, body
    assert body["predictions"] == expected
    assert len(body["probabilities"]) == 12 and all(abs(sum(p) - 1) < 1e-4 for p in body["probabilities"])
    assert [int(np.argmax(p)) for p in body["probabilities"]] == expected
    status, square = predict(port, task_id, {"inputs": raw.reshape(12, 8, 8).tolist()})
    assert status == 200 and square["predictions"] == expected

    # 404: an unfinished task (no client left to train it), an unknown one, not a route
    for client in procs[:2]:
        client.stop()
    unfinished = submit(server, rounds=2)
    assert predict(port, unfinished["id"], {"inputs": raw[:1].tolist()})[0] == 404
    assert request(server, "GET", f"/api/tasks/{unfinished['id']}/export")[0] == 404
    assert request(server, "GET", f"/api/tasks/{unfinished['id']}/model-card")[0] == 404
    assert predict(port, 999_999, {"inputs": raw[:1].tolist()})[0] == 404
    assert predict(port, 10**30, {"inputs": raw[:1].tolist()})[0] == 404
    assert predict(port, "abc", {"inputs": raw[:1].tolist()})[0] == 404
    assert request(server, "GET", "/api/tasks/999999/export")[0] == 404
    assert request(server, "GET", "/api/tasks/999999/model-card")[0] == 404

    # 400: not JSON, wrong shape, non-numeric, too many or no rows; the server keeps answering
    row = raw[0].reshape(64).tolist()
    refused = [
        (None, b"not json"),
        (None, b"[" * 100_000),
        ([row], None),  # a list, not {"inputs": ...}
        ({"rows": [row]}, None),
        ({"inputs": []}, None),
        ({"inputs": [row] * (MAX_ROWS + 1)}, None),
        ({"inputs": [row[:63]]}, None),
        ({"inputs": [[row[:8]] * 7]}, None),  # 7x8
        ({"inputs": [[row[:7], *[row[:8]] * 7]]}, None),  # ragged
        ({"inputs": [[*row[:63], "1"]]}, None),
        ({"inputs": [[*row[:63], True]]}, None),
        ({"inputs": [[*row[:63], None]]}, None),
        ({"inputs": [[*row[:63], {"x": 1}]]}, None),
        ({"inputs": [[*row[:63], 1e300]]}, None),  # beyond float32
        ({"inputs": [[*row[:63], 10**400]]}, None),
        ({"inputs": row}, None),  # one row, not a list of rows
    ]
    for body_json, body_raw in refused:
        status, answer = predict(port, task_id, body_json, raw=body_raw)
        assert status == 400, (body_json if body_raw is None else body_raw[:20], answer)
        assert answer["error"] == "bad_request" and answer["message"]
    status, answer = predict(port, task_id, raw=b'{"inputs": [[NaN' + b", 0" * 63 + b"]]}")
    assert status == 400, answer
    assert predict(port, task_id, {"inputs": raw[:1].tolist()})[0] == 200
    assert proc.alive() and "Traceback" not in proc.output()


def test_on_the_embedded_default_a_missing_export_is_built_on_first_use(
    tmp_path: Path, procs: list[Proc]
) -> None:
    """SQLite under DATA_DIR, the in-process worker; an export deleted (an older task, say) is
    built again from the final checkpoint by the predict server, and downloadable after."""
    env = service_env(tmp_path)
    port = free_port()
    procs.append(start_embedded(env, port, tmp_path / "procs"))
    procs.extend(start_clients(port, tmp_path, 2, env))
    status, task = request(
        port, "POST", "/api/tasks", {"type": "federated_training", "config": {**FAST, "rounds": 1}}
    )
    assert status == 201
    done = wait_for(
        lambda: (d := request(port, "GET", f"/api/tasks/{task['id']}")[1])["status"] == "completed" and d,
        90,
        0.2,
        "task completed",
    )
    exported = tmp_path / "checkpoints" / f"tasks/{task['id']}/export/model.pt2"
    assert exported.exists()
    exported.unlink()
    assert request(port, "GET", f"/api/tasks/{task['id']}/export")[0] == 404

    model_port, proc = start_model_server(env, tmp_path / "procs")
    procs.append(proc)
    raw, scaled = raw_test_rows(done["config"], 5)
    status, weights = request(port, "GET", f"/api/tasks/{task['id']}/model")
    assert status == 200
    status, body = predict(model_port, task["id"], {"inputs": raw.tolist()})
    assert status == 200, body
    assert body["predictions"] == project_classes(done["config"], weights, scaled)
    assert exported.exists()
    status, program = request(port, "GET", f"/api/tasks/{task['id']}/export")
    assert status == 200 and isinstance(program, bytes)
    assert predict(model_port, task["id"] + 1, {"inputs": raw.tolist()})[0] == 404
