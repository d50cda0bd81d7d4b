"""Federated vs centralized: the digits task with 4 clients for 10 rounds, on this machine.

    .venv/bin/python bench/federated.py [--clients 4] [--rounds 10] [--repeat 3]

Federated: the server (embedded default; the production topology when DATABASE_URL and
REDIS_URL are set) and ``--clients`` reference client processes run the demo's task
(``launch.digits_config``: MLP, digits, iid, 5 local epochs, batch 32, lr 0.3, FedAvg, seed 0).
Centralized: the same model trained on the whole train split for rounds x local_epochs epochs
at the same lr in one process (``training.train_centralized``). Same machine, same run.
bench/seeds.py compares the two on more seeds, without the server.

Coordination overhead per round: from the server's log (``LOG_DIR/server.log``), the time
between the last ``event=result`` of round r (the last update arriving) and the first
``event=dispatch`` of round r+1 (the next round's assignments going out). Between them:
the result's commit, Celery's advance and aggregation jobs (aggregate, evaluate on the test
split, write the model, commit), the scheduling run, and the doorbell to the web tier.

Prints a markdown table; writes bench/out/federated.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from launch import digits_config, free_port, local_env, request, start_clients, start_topology  # noqa: E402

LINE = re.compile(r"^(\S+) INFO aifarm\.ws event=(result|dispatch) task=(\d+) round=(\d+)")


def config(args: argparse.Namespace) -> dict:
    return digits_config(args.rounds, args.clients)


def federated(args: argparse.Namespace, run: Path) -> dict:
    token = secrets.token_urlsafe(16)
    port = free_port()
    env = local_env(run, token)
    procs = start_topology(env, port, run / "procs")
    clients = start_clients(port, args.clients, run, env, run / "procs")
    try:
        # warm-up task: client processes import torch and load the data once
        warm = request(
            port,
            "POST",
            "/api/tasks",
            {"type": "federated_training", "config": {**config(args), "rounds": 1}},
            token=token,
        )[1]
        wait_done(port, warm["id"], token)
        started = time.perf_counter()
        task = request(
            port, "POST", "/api/tasks", {"type": "federated_training", "config": config(args)}, token=token
        )[1]
        detail = wait_done(port, task["id"], token)
        wall = time.perf_counter() - started
    finally:
        for p in clients + procs:
            p.stop()
    overheads = coordination(run / "logs" / "server.log", task["id"])
    return {
        "accuracy": detail["result"]["final"]["test_accuracy"],
        "wall_s": wall,
        "round_s": [r["seconds"] for r in detail["result"]["rounds"]],
        "aggregation_s": [r["aggregation_seconds"] for r in detail["result"]["rounds"]],
        "overhead_ms": overheads,
    }


def wait_done(port: int, task_id: int, token: str) -> dict:
    while True:
        status, detail = request(port, "GET", f"/api/tasks/{task_id}", token=token)
        if status != 200:
            raise SystemExit(f"GET task {task_id}: {status} {detail}")
        if detail["status"] == "completed":
            return detail
        if detail["status"] in ("failed", "error", "stopped"):
            raise SystemExit(f"task {task_id} ended as {detail['status']}: {detail['error_log']}")
        time.sleep(0.1)


def coordination(log: Path, task_id: int) -> list[float]:
    last_result: dict[int, datetime] = {}
    first_dispatch: dict[int, datetime] = {}
    for line in log.read_text().splitlines():
        m = LINE.match(line)
        if not m or int(m.group(3)) != task_id:
            continue
        at = datetime.fromisoformat(m.group(1))
        round_no = int(m.group(4))
        if m.group(2) == "result":
            last_result[round_no] = max(at, last_result.get(round_no, at))
        else:
            first_dispatch.setdefault(round_no, at)
    return [
        (first_dispatch[r + 1] - last_result[r]).total_seconds() * 1000
        for r in sorted(last_result)
        if r + 1 in first_dispatch
    ]


def centralized(args: argparse.Namespace) -> dict:
    code = (
        "import json, time, torch\n"
        "from training import train_centralized\n"
        "from training.spec import normalize_federated_config\n"
        f"cfg = normalize_federated_config({config(args)!r}, default_batch_size=32, default_epochs=1)\n"
        "train_centralized(cfg)  # warm-up: imports, data\n"
        "t = time.perf_counter(); m = train_centralized(cfg); m['wall_s'] = time.perf_counter() - t\n"
        "m['threads'] = torch.get_num_threads()\n"
        "print(json.dumps(m))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=3, help="federated runs (fresh server each)")
    args = parser.parse_args()
    topology = (
        "production (gunicorn + Celery + MariaDB + Redis)" if os.environ.get("REDIS_URL") else "embedded"
    )
    runs = []
    for i in range(args.repeat):
        run = ROOT / "bench" / "out" / f"federated-run-{i}"
        shutil.rmtree(run, ignore_errors=True)
        run.mkdir(parents=True)
        runs.append(federated(args, run))
    central = centralized(args)
    overheads = [o for r in runs for o in r["overhead_ms"]]
    fed_acc = statistics.fmean(r["accuracy"] for r in runs)
    fed_wall = statistics.median(r["wall_s"] for r in runs)
    result = {
        "topology": topology,
        "clients": args.clients,
        "rounds": args.rounds,
        "federated": runs,
        "centralized": central,
        "accuracy_gap_points": (central["test_accuracy"] - fed_acc) * 100,
        "overhead_ms_median": statistics.median(overheads),
        "overhead_ms_p90": sorted(overheads)[int(0.9 * (len(overheads) - 1))],
        "overhead_ms_max": max(overheads),
    }
    out = ROOT / "bench" / "out" / "federated.json"
    out.write_text(json.dumps(result, indent=2))
    print(
        f"\n## Federated ({args.clients} clients, {args.rounds} rounds, {topology}) vs centralized, this machine ({os.cpu_count()} cores), {args.repeat} federated runs\n"
    )
    print("| measure | federated | centralized |")
    print("|---|---|---|")
    print(
        f"| final test accuracy | {fed_acc:.4f} | {central['test_accuracy']:.4f} ({central['epochs']} epochs) |"
    )
    print(
        f"| wall time | {fed_wall:.2f} s (median; after a warm-up task) | {central['wall_s']:.2f} s ({central['threads']} torch threads) |"
    )
    print(f"| accuracy gap | {result['accuracy_gap_points']:.2f} points (goal: within 1) | |")
    print(
        f"| coordination overhead per round (last update in -> next round out) | median {result['overhead_ms_median']:.0f} ms, p90 {result['overhead_ms_p90']:.0f} ms, max {result['overhead_ms_max']:.0f} ms over {len(overheads)} rounds (goal: under 100 ms) | |"
    )
    print(
        f"| aggregation per round (plan + strategy, in the worker) | median {statistics.median(a for r in runs for a in r['aggregation_s']) * 1000:.0f} ms | |"
    )
    print(f"\nwritten: {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
