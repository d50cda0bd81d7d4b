"""docker-compose.yml really runs (`make test-docker`; docs/operations.md, "Production with Docker").

The images are built first by docker/build.sh (the Dockerfile unchanged, from a local base image
and the host's torch wheel); this brings the stack up with docker/compose.local.yml (only the mysql
and redis images replaced), then: a missing secret refuses to start with one line; every service
becomes healthy, runs as the aifarm user, init-db has made the schema; a federated task on the
digits runs to completion with two reference clients started here against the published port
(127.0.0.1 only) and reaches its accuracy; Flower refuses anonymous requests and answers with its
basic auth; `docker-compose down` (volumes kept) and `up` keep the finished task and its model.
Everything is torn down (`down -v`) after, failed or not.

Not collected by `make test` (the file name is not test_*.py): `make test-docker` names it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from launch import ROOT, Proc, digits_config, free_port, request, start_clients

PROJECT = "aifarm-e2e"  # compose project: its containers, network and volumes are this test's
COMPOSE = ["docker-compose", "-p", PROJECT, "-f", "docker-compose.yml", "-f", "docker/compose.local.yml"]
OURS = ("web", "worker", "aggregator", "beat", "flower")  # the services of the project's images
LONG_RUNNING = (*OURS, "mysql", "redis")
UP_TIMEOUT = 240.0  # MariaDB's first start, init-db, every service's first health check
TASK_TIMEOUT = 600.0  # 3 rounds of the digits on 2 clients, on a 2-core machine
MIN_ACCURACY = 0.85  # the digits after 3 rounds of 5 local epochs (10 classes: chance is 0.1)
SECRETS = ("ADMIN_TOKEN", "FLOWER_BASIC_AUTH", "MYSQL_PASSWORD")

pytestmark = pytest.mark.timeout(1200)  # the stack's start and the task count in one test each


class Stack:
    def __init__(self, env: dict[str, str], run_dir: Path) -> None:
        self.env = env
        self.run_dir = run_dir
        self.port = int(env["AIFARM_WEB_PORT"])
        self.flower_port = int(env["AIFARM_FLOWER_PORT"])
        self.admin = env["ADMIN_TOKEN"]
        self.finished: dict[str, Any] = {}  # the task of the federated test, for the restart test

    def compose(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """docker-compose ARGS, which must succeed."""
        result = compose(self.env, *args, timeout=timeout)
        if result.returncode != 0:
            self.fail(f"docker-compose {' '.join(args)} exited {result.returncode}: {last_line(result)}")
        return result

    def within(self, timeout: float, what: str, check: Callable[[], Any]) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                result = check()
            except (OSError, ConnectionError):
                result = None
            if result:
                return result
            time.sleep(1)
        self.fail(f"{what}: not within {timeout:.0f} s")

    def fail(self, line: str) -> None:
        logs = compose(self.env, "logs", "--no-color", "--tail", "15", timeout=60).stdout
        pytest.fail(f"{line}\n--- docker-compose logs, last lines of each service:\n{logs}", pytrace=False)

    def healthz(self) -> dict[str, Any] | None:
        status, body = request(self.port, "GET", "/healthz", token=None, timeout=5)
        return body if status == 200 and body.get("status") == "ok" else None

    def containers(self) -> dict[str, dict[str, Any]]:
        """docker inspect of this project's containers, by service name."""
        ids = self.compose("ps", "-q", timeout=60).stdout.split()
        if not ids:
            return {}
        found = json.loads(docker("inspect", *ids).stdout)
        return {c["Config"]["Labels"]["com.docker.compose.service"]: c for c in found}

    def unhealthy(self) -> list[str]:
        """The long-running services not (yet) healthy, as `name=state`."""
        states = {name: c["State"].get("Health", {}).get("Status") for name, c in self.containers().items()}
        return [f"{name}={states.get(name)}" for name in LONG_RUNNING if states.get(name) != "healthy"]

    def up(self) -> None:
        self.compose("up", "-d", "--no-build", timeout=UP_TIMEOUT)
        self.within(UP_TIMEOUT, "GET /healthz answered 200 ok on 127.0.0.1", self.healthz)
        self.within(UP_TIMEOUT, "every service healthy", lambda: not self.unhealthy())


def compose(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            [*COMPOSE, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False
        )
    except FileNotFoundError:
        pytest.fail("docker-compose is missing: run `make test-docker` (docker/engine.sh)", pytrace=False)
    except subprocess.TimeoutExpired:
        pytest.fail(f"docker-compose {' '.join(args)}: no answer within {timeout:.0f} s", pytrace=False)


def docker(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=60, check=True)


def last_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = (result.stderr or result.stdout).strip().splitlines()
    return lines[-1] if lines else ""


def stack_env() -> dict[str, str]:
    return {
        **os.environ,
        "ADMIN_TOKEN": secrets.token_hex(24),
        "FLOWER_BASIC_AUTH": f"ops:{secrets.token_hex(12)}",
        "MYSQL_PASSWORD": secrets.token_hex(16),
        "AIFARM_WEB_ADDRESS": "127.0.0.1",
        "AIFARM_WEB_PORT": str(free_port()),
        "AIFARM_FLOWER_ADDRESS": "127.0.0.1",
        "AIFARM_FLOWER_PORT": str(free_port()),
    }


@pytest.fixture(scope="module")
def env() -> dict[str, str]:
    try:
        subprocess.run(["docker", "info"], capture_output=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        pytest.fail("no Docker daemon answers `docker info`: run `make test-docker`", pytrace=False)
    for image in ("aifarm-server:web", "aifarm-server:worker", "aifarm-local/mariadb:bookworm"):
        if subprocess.run(["docker", "image", "inspect", image], capture_output=True, check=False).returncode:
            pytest.fail(f"image {image} is missing: run `make test-docker` (docker/build.sh)", pytrace=False)
    env = stack_env()
    compose(env, "down", "-v", "--remove-orphans", timeout=120)  # what a killed run left behind
    yield env
    compose(env, "down", "-v", "--remove-orphans", timeout=120)


@pytest.fixture(scope="module")
def stack(env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    up = Stack(env, tmp_path_factory.mktemp("docker"))
    try:
        up.up()
        yield up
    finally:
        logs = compose(env, "logs", "--no-color", timeout=120).stdout
        (up.run_dir / "compose.log").write_text(logs)
        compose(env, "down", "-v", "--remove-orphans", timeout=120)


@pytest.mark.parametrize("name", SECRETS)
def test_a_missing_secret_refuses_to_start_with_one_line(env: dict[str, str], name: str) -> None:
    for value in (None, ""):  # unset, or set empty
        without = {k: v for k, v in env.items() if k != name}
        if value is not None:
            without[name] = value
        result = compose(without, "up", "-d", "--no-build", timeout=120)
        assert result.returncode != 0, result.stdout
        lines = [line for line in result.stderr.splitlines() if f"set {name}" in line]
        assert len(lines) == 1 and "Missing mandatory value" in lines[0], result.stderr
        assert compose(env, "ps", "-q", timeout=60).stdout.split() == []  # nothing started


def test_every_service_is_healthy_and_runs_as_the_aifarm_user(stack: Stack) -> None:
    containers = stack.containers()
    assert containers["init-db"]["State"]["Status"] == "exited"
    assert containers["init-db"]["State"]["ExitCode"] == 0  # the schema, made by `python -m app init-db`
    for name in OURS:
        assert containers[name]["Config"]["User"] == "aifarm", name
        assert containers[name]["Config"]["Image"] == f"aifarm-server:{'web' if name == 'web' else 'worker'}"
    for name, container in containers.items():  # published on 127.0.0.1 only
        for bindings in (container["HostConfig"]["PortBindings"] or {}).values():
            assert all(b["HostIp"] == "127.0.0.1" for b in bindings), (name, bindings)
    torchless = ["python", "-c", "import importlib.util as u; print(u.find_spec('torch') is None)"]
    assert stack.compose("exec", "-T", "web", *torchless).stdout.strip() == "True"  # the web image


def test_a_federated_task_runs_with_two_clients_from_the_host(stack: Stack) -> None:
    procs: list[Proc] = []
    try:
        procs += start_clients(stack.port, 2, stack.run_dir, dict(os.environ), stack.run_dir / "procs")
        status, task = request(
            stack.port,
            "POST",
            "/api/tasks",
            {"type": "federated_training", "config": digits_config(rounds=3, clients=2)},
            token=stack.admin,
        )
        assert status == 201, task

        def finished() -> dict[str, Any] | None:
            detail = request(stack.port, "GET", f"/api/tasks/{task['id']}", token=stack.admin)[1]
            if detail["status"] in ("failed", "error", "stopped"):
                stack.fail(f"task {task['id']} ended {detail['status']}: {detail}")
            return detail if detail["status"] == "completed" else None

        done = stack.within(TASK_TIMEOUT, f"task {task['id']} completed", finished)
    finally:
        for proc in procs:
            proc.stop()
    accuracy = done["result"]["final"]["test_accuracy"]
    assert accuracy >= MIN_ACCURACY, done["result"]["final"]
    assert len(done["result"]["rounds"]) == 3
    status, model = request(stack.port, "GET", f"/api/tasks/{task['id']}/model", token=stack.admin)
    assert status == 200 and isinstance(model, bytes) and model, (status, model[:200])
    stack.finished = {"id": task["id"], "accuracy": accuracy, "sha256": hashlib.sha256(model).hexdigest()}


def test_flower_refuses_anonymous_requests_and_answers_its_basic_auth(stack: Stack) -> None:
    assert request(stack.flower_port, "GET", "/", token=None)[0] == 401
    wrong = "Basic " + base64.b64encode(b"ops:wrong").decode()
    assert request(stack.flower_port, "GET", "/", token=None, headers={"Authorization": wrong})[0] == 401
    basic = "Basic " + base64.b64encode(stack.env["FLOWER_BASIC_AUTH"].encode()).decode()
    assert request(stack.flower_port, "GET", "/", token=None, headers={"Authorization": basic})[0] == 200
    status, workers = request(
        stack.flower_port, "GET", "/api/workers?refresh=1", token=None, headers={"Authorization": basic}
    )
    assert status == 200 and {name.split("@")[0] for name in workers} == {"worker", "aggregator"}, workers


def test_down_and_up_keep_the_finished_task_and_its_model(stack: Stack) -> None:
    finished = stack.finished
    assert finished, "the federated test did not finish a task"
    stack.compose("down", timeout=180)  # volumes kept
    assert stack.compose("ps", "-q", timeout=60).stdout.split() == []
    stack.up()
    detail = request(stack.port, "GET", f"/api/tasks/{finished['id']}", token=stack.admin)[1]
    assert detail["status"] == "completed", detail
    assert detail["result"]["final"]["test_accuracy"] == finished["accuracy"]
    status, model = request(stack.port, "GET", f"/api/tasks/{finished['id']}/model", token=stack.admin)
    assert status == 200 and hashlib.sha256(model).hexdigest() == finished["sha256"]
