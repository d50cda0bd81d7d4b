"""Start the server's processes locally and talk to them: used by demo.py, bench/ and tests/.

Each process writes its output to ``<log_dir>/<name>.out`` and runs in its own session, so
``stop()`` ends it and its children (Celery's pool, gunicorn's workers).
"""

from __future__ import annotations

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

ROOT = Path(__file__).resolve().parent
ADMIN = "test-admin-token"  # the ADMIN_TOKEN tests and local runs set
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
            args,
            cwd=ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
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


def _die_with_parent() -> None:
    """Linux: SIGKILL this child when the process that started it dies, so a killed test run or
    benchmark leaves no worker behind to steal the next run's messages."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


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
    # SIGTERM is Celery's soft shutdown: a running job goes back to the broker (docs/operations.md)
    proc = Proc(name, args, {"REMAP_SIGTERM": "SIGQUIT", **env}, log_dir)
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


def digits_config(rounds: int, clients: int, strategy: str = "fedavg") -> dict[str, Any]:
    """The task of `make demo` and bench/federated.py: an MLP on digits, one shard per client.

    5 local epochs at lr 0.3: with 4 clients and 10 rounds, within 1 point of centralized
    training (``train_centralized``: rounds x local_epochs epochs at the same lr) on each of
    seeds 0..4 (bench/seeds.py, BENCHMARKS.md); 1 epoch at lr 0.05 was 1.95 points behind."""
    return {
        "model": "mlp",
        "dataset": "digits",
        "rounds": rounds,
        "num_shards": clients,
        "local_epochs": 5,
        "batch_size": 32,
        "lr": 0.3,
        "partition": "iid",
        "strategy": strategy,
    }


def local_env(run_dir: Path, admin_token: str, **extra: str) -> dict[str, str]:
    """The environment of a local run whose files all live under ``run_dir``."""
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "ADMIN_TOKEN": admin_token,
        "RATE_LIMIT": "100000/minute",
        "DATA_DIR": str(run_dir / "data"),
        "LOG_DIR": str(run_dir / "logs"),
        "CHECKPOINT_DIR": str(run_dir / "checkpoints"),
        **extra,
    }


def start_topology(env: dict[str, str], port: int, log_dir: Path) -> list[Proc]:
    """The embedded server, or (``DATABASE_URL`` and ``REDIS_URL`` in ``env``) the production
    topology: ``python -m app init-db``, then a Celery worker, beat, and gunicorn on ``port``."""
    if not (env.get("DATABASE_URL") and env.get("REDIS_URL")):
        return [start_embedded(env, port, log_dir)]
    subprocess.run(
        [python(), "-m", "app", "init-db"], cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL
    )
    procs = [start_worker(env, log_dir, name="worker", concurrency=2), start_beat(env, log_dir)]
    procs.append(start_gunicorn({**env, "SERVER_PORT": str(port)}, port, log_dir))
    return procs


def start_clients(port: int, count: int, state_dir: Path, env: dict[str, str], log_dir: Path) -> list[Proc]:
    """``count`` reference clients (``python -m client``), each with its own state file."""
    return [
        Proc(
            f"client-{port}-{i}",
            [python(), "-m", "client", "--server", f"http://127.0.0.1:{port}",
             "--state", str(state_dir / f"client-{port}-{i}.json")],
            {**env, "PYTHONPATH": str(ROOT)},
            log_dir,
        )
        for i in range(count)
    ]  # fmt: skip
