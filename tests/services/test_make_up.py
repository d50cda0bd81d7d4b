"""`make up` works here: the Makefile target creates its database (init-db), starts the Procfile's
processes under honcho with prefixed output, the web tier answers, both workers answer a ping and
consume their queue, a submitted task is prepared, Flower asks for its password, and Ctrl-C
(SIGINT to make's process group, as a terminal sends it) stops every process it started, the
workers by Celery's soft shutdown (REMAP_SIGTERM=SIGQUIT: "Cold shutdown"), none SIGKILLed.

Private parts: a port for the web tier and one for Flower, a database of our own on the session's
MariaDB (``aifarm_up_<pid>``, made by init-db, dropped after), and a redis-server of our own on a
free port. Not a db of the shared Redis: a second test run beside this one (TEST_REDIS_DB) would
have its worker take this stack's jobs, or this stack take its. ``UP_ENV=/dev/null``: a .env file
of the developer's must not point the stack elsewhere.
"""

from __future__ import annotations

import base64
import os
import re
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from tests.conftest import MYSQL_HOST, MYSQL_PORT, mysql_connect, service_env
from tests.faults.test_outages import RedisServer
from tests.helpers import Proc, free_port, request

START_TIMEOUT = 120.0  # init-db, then every process importing its code (torch in the workers)
STOP_TIMEOUT = 20.0  # Ctrl-C to the last process gone; honcho's SIGKILL comes 10 s after a first exit
FLOWER_AUTH = "ops:make-up-test"
PROCESSES = ("web", "worker", "aggregator", "beat", "flower")  # the Procfile's
PREFIXED = re.compile(r"^\d\d:\d\d:\d\d (\S+)\s+\| ", re.MULTILINE)


class Stack:
    def __init__(self, proc: Proc, redis_url: str, port: int, flower_port: int) -> None:
        self.proc = proc
        self.redis_url = redis_url
        self.port = port
        self.flower_port = flower_port
        self.tree: list[tuple[int, str]] = []  # the processes below make, once all have started

    def within(self, timeout: float, what: str, check: Callable[[], Any]) -> Any:
        """Poll ``check`` until it returns something truthy; fail with one line saying what did not
        happen (then the end of make up's output) after ``timeout`` s or if make up ended."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.proc.alive():
                self.fail(f"make up exited (rc={self.proc.popen.returncode}) before {what}")
            try:
                result = check()
            except (OSError, ConnectionError):
                result = None
            if result:
                return result
            time.sleep(0.25)
        self.fail(f"{what}: not within {timeout:.0f} s")

    def fail(self, line: str) -> None:
        tail = "\n".join(self.proc.output().splitlines()[-40:])
        pytest.fail(f"{line}\n--- make up's output ends ({self.proc.log_path}):\n{tail}", pytrace=False)


@pytest.fixture
def stack(services: None, tmp_path: Path) -> Iterator[Stack]:
    database = f"aifarm_up_{os.getpid()}"
    drop_database(database)
    broker = RedisServer(free_port(), tmp_path)
    broker.start()
    redis_url = f"redis://127.0.0.1:{broker.port}/0"
    port, flower_port = free_port(), free_port()
    env = service_env(
        tmp_path,
        DATABASE_URL=f"mysql+pymysql://root@{MYSQL_HOST}:{MYSQL_PORT}/{database}",
        REDIS_URL=redis_url,
        SERVER_HOST="127.0.0.1",
        SERVER_PORT=str(port),
        WEB_CONCURRENCY="1",
        FLOWER_PORT=str(flower_port),
        FLOWER_BASIC_AUTH=FLOWER_AUTH,
    )
    for name in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL"):  # run as from a shell, not as `make test`'s child
        env.pop(name, None)
    proc = Proc("make-up", ["make", "--no-print-directory", "up", "UP_ENV=/dev/null"], env, tmp_path)
    up = Stack(proc, redis_url, port, flower_port)
    try:
        yield up
    finally:
        for pid, started in up.tree + descendants(proc.popen.pid):
            if alive(pid, started):
                os.kill(pid, signal.SIGKILL)
        proc.stop()
        broker.kill()
        drop_database(database)


def test_make_up_runs_the_topology_and_ctrl_c_stops_all_of_it(stack: Stack) -> None:
    health = stack.within(START_TIMEOUT, "GET /healthz answered 200", lambda: healthz(stack.port))
    assert health["database"] and health["broker"], health

    nodes = stack.within(START_TIMEOUT, "both Celery workers answered a ping", lambda: pinged(stack))
    assert sorted(name.split("@")[0] for name in nodes) == ["aggregator", "worker"]
    for queue in ("celery", "aggregation"):  # each queue has its consumer
        assert ping_task(stack.redis_url, queue) == "pong", f"workers.tasks.ping on the {queue} queue"

    status, task = request(stack.port, "POST", "/api/tasks", {"type": "echo", "config": {"num_shards": 2}})
    assert status == 201, task
    stack.within(
        30,
        f"task {task['id']} prepared (2 shards queued)",
        lambda: request(stack.port, "GET", f"/api/tasks/{task['id']}")[1]["shards"] == {"queued": 2},
    )

    assert request(stack.flower_port, "GET", "/", token=None)[0] == 401  # no password, no Flower
    basic = "Basic " + base64.b64encode(FLOWER_AUTH.encode()).decode()
    assert request(stack.flower_port, "GET", "/", token=None, headers={"Authorization": basic})[0] == 200
    stack.within(30, "beat started", lambda: "beat: Starting..." in stack.proc.output())
    prefixes = set(PREFIXED.findall(stack.proc.output()))
    assert {f"{name}.1" for name in PROCESSES} | {"system"} <= prefixes

    tree = stack.tree = descendants(stack.proc.popen.pid)
    assert len(tree) >= 2 * len(PROCESSES), tree  # honcho's shells, gunicorn's and Celery's children
    os.killpg(stack.proc.popen.pid, signal.SIGINT)  # Ctrl-C
    deadline = time.monotonic() + STOP_TIMEOUT
    while time.monotonic() < deadline and any(alive(*p) for p in tree):
        time.sleep(0.1)
    left = [cmdline(pid) for pid, started in tree if alive(pid, started)]
    if left:
        stack.fail(f"{len(left)} process(es) still running {STOP_TIMEOUT:.0f} s after Ctrl-C: {left}")
    stack.proc.popen.wait(5)

    output = stack.proc.output()
    assert "SIGINT received" in output
    assert "sending SIGKILL" not in output, "a process outlived honcho's grace"
    for worker in ("worker.1", "aggregator.1"):
        assert re.search(rf"^\S+ {worker}\s+\| worker: Cold shutdown", output, re.MULTILINE), worker
    for name in PROCESSES:
        assert f"{name}.1 stopped" in output, name


def healthz(port: int) -> dict[str, Any] | None:
    status, body = request(port, "GET", "/healthz", token=None, timeout=5)
    return body if status == 200 else None


def pinged(stack: Stack) -> list[str] | None:
    app = Celery("make-up-test", broker=stack.redis_url)
    try:
        replies = app.control.ping(timeout=1.0)
    finally:
        app.close()
    names = [name for reply in replies for name in reply]
    return names if len(names) >= 2 else None


def ping_task(redis_url: str, queue: str) -> Any:
    app = Celery("make-up-test", broker=redis_url, backend=redis_url)
    app.conf.update(task_serializer="json", accept_content=["json"], result_accept_content=["json"])
    try:
        return app.send_task("workers.tasks.ping", queue=queue).get(timeout=30)
    finally:
        app.close()


def descendants(root: int) -> list[tuple[int, str]]:
    """Every process below ``root``, as (pid, start time): a pid reused later is not ours."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := read_stat(int(entry.name))) is not None:
            children.setdefault(int(stat[1]), []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            stat = read_stat(child)
            if stat is not None:
                found.append((child, stat[19]))
                todo.append(child)
    return found


def read_stat(pid: int) -> list[str] | None:
    """/proc/PID/stat's fields after the command name: [state, ppid, ...]; None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def alive(pid: int, started: str) -> bool:
    stat = read_stat(pid)
    return stat is not None and stat[19] == started and stat[0] != "Z"


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()[:100]
    except OSError:
        return str(pid)


def drop_database(name: str) -> None:
    conn = mysql_connect()
    try:
        with conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS {name}")
    finally:
        conn.close()
