"""``make demo``: volunteer clients train the digits model together, round after round.

    python demo.py [--clients 4] [--rounds 10] [--strategy fedavg]

Starts the server on the embedded default (``python -m app``: SQLite, in-process Celery
worker and beat; nothing else to install), launches ``--clients`` reference client
processes, submits the federated digits task through the REST API, prints a line per round
(clients, train loss, test accuracy, seconds), downloads the final model, and exits 0 when
the task completes.

With ``DATABASE_URL`` and ``REDIS_URL`` set it runs the same demo on the production
topology instead: ``python -m app init-db``, then gunicorn, a Celery worker and beat as
separate processes.

Everything it writes goes to ``demo-run/`` (logs, checkpoints, the final model).
"""

from __future__ import annotations

import argparse
import hashlib
import secrets
import shutil
import sys
import time
from typing import Any

from launch import ROOT, digits_config, free_port, local_env, request, start_clients, start_topology

RUN = ROOT / "demo-run"


def task_body(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "type": "federated_training",
        "config": digits_config(args.rounds, args.clients, args.strategy),
        "requirements": {"cpu_cores": 1, "ram_gb": 0.5},
    }


def show_round(r: dict[str, Any]) -> None:
    m = r.get("metrics") or {}
    loss = m.get("train_loss")
    print(
        f"{m.get('round', r['round']) + 1:>5}  {m.get('clients', 0):>7}  "
        f"{loss if loss is None else f'{loss:10.4f}':>10}  {m.get('test_accuracy', 0):>13.4f}  "
        f"{m.get('seconds', 0):>7.2f}",
        flush=True,
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--strategy", default="fedavg")
    parser.add_argument("--timeout", type=float, default=300, help="give up after this many seconds")
    args = parser.parse_args()

    shutil.rmtree(RUN, ignore_errors=True)
    RUN.mkdir()
    token = secrets.token_urlsafe(16)
    port = free_port()
    env = local_env(RUN, token, SERVER_HOST="127.0.0.1", SERVER_PORT=str(port))
    started = time.monotonic()
    production = bool(env.get("DATABASE_URL") and env.get("REDIS_URL"))
    if production:
        print("server: production topology (gunicorn + celery worker + celery beat on MySQL and Redis)")
    else:
        print(f"server: embedded (SQLite under {RUN / 'data'}, in-process Celery worker and beat)")
    procs = start_topology(env, port, RUN / "procs")
    clients = start_clients(port, args.clients, RUN, env, RUN / "procs")
    try:
        status, task = request(port, "POST", "/api/tasks", task_body(args), token=token)
        if status != 201:
            print(f"submit failed: {status} {task}", file=sys.stderr)
            return 1
        print(f"task {task['id']}: {args.clients} clients x {args.rounds} rounds of FedAvg on digits (MLP)\n")
        print("round  clients  train_loss  test_accuracy  seconds")
        shown = 0
        detail: dict[str, Any] = {}
        while time.monotonic() - started < args.timeout:
            status, detail = request(port, "GET", f"/api/tasks/{task['id']}", token=token)
            if status != 200:
                print(f"status check failed: {status} {detail}", file=sys.stderr)
                return 1
            done = [r for r in detail["rounds"] if r["status"] == "done"]
            for r in done[shown:]:
                show_round(r)
            shown = len(done)
            if detail["status"] in ("completed", "failed", "error", "stopped"):
                break
            time.sleep(0.25)
        if detail.get("status") != "completed":
            print(
                f"\ntask ended as {detail.get('status', 'unknown')}: "
                f"{detail.get('error_log') or 'timed out'}",
                file=sys.stderr,
            )
            return 1
        status, model = request(port, "GET", f"/api/tasks/{task['id']}/model", token=token)
        if status != 200 or not isinstance(model, bytes):
            print(f"model download failed: {status}", file=sys.stderr)
            return 1
        path = RUN / "final-model.safetensors"
        path.write_bytes(model)
        final = detail["result"]["final"]
        print(
            f"\nfinal test accuracy {final['test_accuracy']:.4f} after {args.rounds} rounds, "
            f"{time.monotonic() - started:.1f} s in all"
        )
        digest = hashlib.sha256(model).hexdigest()
        print(f"final model: {path.relative_to(ROOT)} ({len(model)} bytes, sha256 {digest[:16]}...)")
        print(f"logs: {RUN.name}/logs/  checkpoints: {RUN.name}/checkpoints/")
        return 0
    finally:
        for proc in clients + procs:
            proc.stop()


if __name__ == "__main__":
    sys.exit(main())
