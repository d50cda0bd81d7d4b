"""The admin command line (``python -m app tasks|clients``) against the real server.

Each command runs as its own process, as an admin would run it; the state it changed is read
back through the REST API."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import launch
from tests.helpers import ADMIN, ROOT, WsClient, free_port, request

pytestmark = pytest.mark.usefixtures("clean")

FEDERATED = {
    "type": "federated_training",
    "config": {
        "model": "mlp",
        "dataset": "synthetic",
        "num_shards": 2,
        "rounds": 2,
        "local_epochs": 1,
        "batch_size": 32,
        "lr": 0.1,
    },
}


def cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """``python -m app ARGS`` with no AIFARM_* variables but those in ``env``."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("AIFARM_")}
    return subprocess.run(
        [sys.executable, "-m", "app", *args],
        cwd=ROOT,
        env={**base, "PYTHONPATH": str(ROOT), **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def admin(port: int, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """The command with this server and the admin token in the environment."""
    return cli(
        *args, env={"AIFARM_SERVER": f"http://127.0.0.1:{port}", "AIFARM_TOKEN": ADMIN}, timeout=timeout
    )


def ok_json(result: subprocess.CompletedProcess[str]) -> Any:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def one_error_line(result: subprocess.CompletedProcess[str], *expected: str) -> None:
    """Exit 1 and one line on stderr that says what went wrong: no traceback."""
    assert result.returncode == 1, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("python -m app: error: "), lines
    for text in expected:
        assert text in lines[0], lines


def task_file(tmp_path: Path, body: Any, name: str = "task.json") -> str:
    path = tmp_path / name
    path.write_text(body if isinstance(body, str) else json.dumps(body))
    return str(path)


def api_task(port: int, task_id: int) -> dict[str, Any]:
    status, task = request(port, "GET", f"/api/tasks/{task_id}")
    assert status == 200, task
    return dict(task)


def test_submit_list_and_show(server: int, tmp_path: Path) -> None:
    path = task_file(tmp_path, {"type": "echo", "priority": 5, "config": {"num_shards": 2}})

    submitted = admin(server, "tasks", "submit", path)
    listed = admin(server, "tasks", "list", "--json")
    shown = admin(server, "tasks", "show", "--json", str(ok_json(listed)["items"][0]["id"]))

    assert submitted.returncode == 0 and submitted.stdout.startswith("submitted task "), submitted
    task_id = int(submitted.stdout.split()[2].rstrip(":"))
    assert [t["id"] for t in ok_json(listed)["items"]] == [task_id]
    assert ok_json(shown)["priority"] == 5 and ok_json(shown)["num_shards"] == 2
    table = admin(server, "tasks", "list", "--type", "echo")
    assert table.returncode == 0
    assert table.stdout.splitlines()[0].split()[:3] == ["ID", "STATUS", "TYPE"]
    assert table.stdout.splitlines()[1].split()[0] == str(task_id)
    assert "1 in all" in table.stdout
    text = admin(server, "tasks", "show", str(task_id))
    assert text.returncode == 0 and text.stdout.startswith(f"task {task_id}: echo, "), text


def test_pause_resume_and_stop_change_the_task(server: int, tmp_path: Path) -> None:
    task_id = ok_json(admin(server, "tasks", "submit", "--json", task_file(tmp_path, {"type": "echo"})))["id"]

    paused = admin(server, "tasks", "pause", str(task_id))
    assert paused.returncode == 0 and f"task {task_id}: echo, paused" in paused.stdout, paused
    assert api_task(server, task_id)["status"] == "paused"

    resumed = admin(server, "tasks", "resume", str(task_id))
    assert resumed.returncode == 0, resumed.stderr
    assert api_task(server, task_id)["status"] == "pending"  # it never ran

    stopped = admin(server, "tasks", "stop", str(task_id))
    assert stopped.returncode == 0, stopped.stderr
    assert api_task(server, task_id)["status"] == "stopped"

    again = admin(server, "tasks", "pause", str(task_id))
    one_error_line(again, "409", "cannot move a stopped task to paused")
    assert api_task(server, task_id)["status"] == "stopped"


@pytest.fixture
def volunteer(server: int) -> Iterator[WsClient]:
    c = WsClient(server).register()
    yield c
    c.close()


def test_clients_list_disable_and_enable(server: int, volunteer: WsClient) -> None:
    cid = volunteer.client_id
    assert cid

    listed = ok_json(admin(server, "clients", "list", "--json"))
    table = admin(server, "clients", "list")
    disabled = admin(server, "clients", "disable", cid)
    after_disable = request(server, "GET", f"/api/clients/{cid}")[1]["disabled"]
    enabled = admin(server, "clients", "enable", cid)
    after_enable = request(server, "GET", f"/api/clients/{cid}")[1]["disabled"]

    assert [c["id"] for c in listed["items"]] == [cid]
    assert cid in table.stdout and "yes" in table.stdout  # connected
    assert disabled.returncode == 0 and disabled.stdout.strip() == f"client {cid}: disabled"
    assert after_disable is True
    assert enabled.returncode == 0 and enabled.stdout.strip() == f"client {cid}: enabled"
    assert after_enable is False
    one_error_line(admin(server, "clients", "disable", "c-nobody"), "404", "no client c-nobody")


def test_watch_draws_each_round_until_the_task_completes(
    server: int, tmp_path: Path, run_dir: Path, prod_env: dict[str, str]
) -> None:
    task_id = ok_json(admin(server, "tasks", "submit", "--json", task_file(tmp_path, FEDERATED)))["id"]
    volunteers = launch.start_clients(server, 2, run_dir, prod_env, run_dir / "procs")
    try:
        watched = admin(server, "tasks", "watch", str(task_id), "--interval", "0.2", timeout=180)
    finally:
        for proc in volunteers:
            proc.stop()

    assert watched.returncode == 0, (watched.stdout, watched.stderr)
    assert watched.stdout.startswith(f"task {task_id}: federated_training, completed; test_accuracy="), (
        watched
    )
    for round_no in (1, 2):
        assert f"task {task_id} round {round_no}/2" in watched.stderr
    assert "100%" in watched.stderr and "Traceback" not in watched.stderr
    assert api_task(server, task_id)["status"] == "completed"


def test_watch_of_a_stopped_task_fails_with_its_status(server: int, tmp_path: Path) -> None:
    task_id = ok_json(admin(server, "tasks", "submit", "--json", task_file(tmp_path, {"type": "echo"})))["id"]
    assert admin(server, "tasks", "stop", str(task_id)).returncode == 0

    watched = admin(server, "tasks", "watch", str(task_id))

    assert watched.returncode == 1
    assert watched.stderr.strip().splitlines()[-1] == (
        f"python -m app: error: task {task_id}: echo, stopped (stopped by an admin)"
    )


def test_a_closed_port_is_one_line() -> None:
    port = free_port()  # nothing listens there
    result = cli("tasks", "list", "--server", f"http://127.0.0.1:{port}", "--token", ADMIN)
    one_error_line(result, f"cannot reach http://127.0.0.1:{port}", "Connection refused")


def test_a_wrong_token_is_one_line(server: int) -> None:
    result = cli("tasks", "list", "--server", f"http://127.0.0.1:{server}", "--token", "not-a-token")
    one_error_line(result, "401", "invalid admin token")


@pytest.mark.parametrize(
    "args, expected",
    [
        (("tasks", "show", "987654"), ("404", "no task 987654")),
        (("tasks", "watch", "987654"), ("404", "no task 987654")),
        (("tasks", "stop", "987654"), ("404", "no task 987654")),
    ],
)
def test_an_unknown_task_is_one_line(server: int, args: tuple[str, ...], expected: tuple[str, ...]) -> None:
    one_error_line(admin(server, *args), *expected)


@pytest.mark.parametrize(
    "content, expected",
    [
        ('{"type": "echo",', ("is not valid JSON",)),
        ("[1, 2]", ("400", "the body must be a JSON object")),
        (
            {"type": "federated_training", "config": {"model": "no-such-model", "dataset": "synthetic"}},
            ("400", "bad_request", "no-such-model"),
        ),
    ],
)
def test_a_malformed_file_is_one_line(
    server: int, tmp_path: Path, content: Any, expected: tuple[str, ...]
) -> None:
    result = admin(server, "tasks", "submit", task_file(tmp_path, content))
    one_error_line(result, *expected)
    assert request(server, "GET", "/api/tasks")[1]["total"] == 0  # nothing was created


@pytest.mark.parametrize(
    "args, expected",
    [
        (("tasks", "list", "--page", "0"), ("400", "page must be an integer in 1..")),
        (("tasks", "list", "--status", "sleeping"), ("400", "status must be one of")),
        (("clients", "list", "--per-page", "1000"), ("400", "per_page must be an integer in 1..100")),
    ],
)
def test_a_refused_query_is_one_line(server: int, args: tuple[str, ...], expected: tuple[str, ...]) -> None:
    one_error_line(admin(server, *args), *expected)


def test_a_missing_file_is_one_line(server: int, tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.json")
    one_error_line(admin(server, "tasks", "submit", missing), f"cannot read {missing}", "No such file")


@pytest.mark.parametrize(
    "args",
    [
        ("tasks",),
        ("tasks", "show", "seven"),
        ("tasks", "fly", "1"),
        ("clients", "disable"),
        ("tasks", "list", "--server", "127.0.0.1:8000"),
        ("tasks", "watch", "1", "--interval", "0"),
    ],
)
def test_usage_errors_exit_2(args: tuple[str, ...]) -> None:
    result = cli(*args, env={"AIFARM_TOKEN": ADMIN})
    assert result.returncode == 2, result
    assert "usage:" in result.stderr and "Traceback" not in result.stderr


def test_the_token_is_required() -> None:
    result = cli("tasks", "list")
    assert result.returncode == 2
    assert "--token (or AIFARM_TOKEN) is required" in result.stderr


def test_the_cli_module_imports_only_the_standard_library_and_tqdm() -> None:
    """A REST client: no Flask, SQLAlchemy, Celery, torch, nor anything of the server's."""
    tree = ast.parse((ROOT / "app" / "admin_cli.py").read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    roots = {name.split(".")[0] for name in imported}
    assert roots - set(sys.stdlib_module_names) == {"tqdm"}
