"""Churn: the digits task with 8 volunteers that keep dying, and one that hangs, against a calm run.

    .venv/bin/python bench/churn.py [--clients 8] [--rounds 20] [--kill-every 3] [--seed 0]

Three runs of the same task on this machine, in one go:

- calm: the embedded server and ``--clients`` reference client processes, nobody dies;
- churn: the same, while every ``--kill-every`` seconds a random client is SIGKILLed and started
  again at once (same state file, so the same client id and token: it reconnects and is given
  its open assignment again), and one more client is frozen with SIGSTOP as soon as it holds a
  shard, and stays frozen: its socket is open but it never answers again;
- centralized: the same model trained in one process on the whole train split for
  rounds x local_epochs epochs (``training.train_centralized``).

The task is ``launch.digits_config`` (the demo's: MLP, digits, iid, 5 local epochs, lr 0.3,
FedAvg) over ``--clients`` shards, with deadlines and a quorum so that no volunteer can hold a
round: ``deadline_s`` (an assignment not finished by then is reissued), ``round_timeout_s`` and
``min_fit_fraction`` (at the timeout a round closes on 3/4 of the updates); and
``RECONNECT_GRACE=0`` with ``SWEEP_INTERVAL=0.25``: a client whose socket closes (a killed
process) has its shard reissued by the next sweep instead of after ``CONNECTION_TIMEOUT``; if
it comes back first with its result, that result still wins. The calm run uses the same
settings. Rounds per minute: rounds over the wall time from submit to completion. Goals: churn at least 70 % of the calm round rate; final accuracy within 1 point of calm.

Prints a markdown table; writes bench/out/churn.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from launch import (  # noqa: E402
    Proc,
    digits_config,
    free_port,
    local_env,
    python,
    request,
    start_topology,
)

QUORUM = {"deadline_s": 2.0, "round_timeout_s": 1.0, "min_fit_fraction": 0.75, "max_round_retries": 5}


def config(args: argparse.Namespace) -> dict[str, Any]:
    return {**digits_config(args.rounds, args.clients), "seed": args.seed, **QUORUM}


def client_proc(port: int, i: int, run: Path, env: dict[str, str], life: int = 0) -> Proc:
    """Reference client ``i``; ``life`` counts its restarts (each has its own log file)."""
    return Proc(
        f"client-{i}-{life}",
        [
            python(),
            "-m",
            "client",
            "--server",
            f"http://127.0.0.1:{port}",
            "--state",
            str(run / f"client-{i}.json"),
        ],
        {**env, "PYTHONPATH": str(ROOT)},
        run / "procs",
    )


def wait_done(port: int, task_id: int, token: str, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, detail = request(port, "GET", f"/api/tasks/{task_id}", token=token)
        if status != 200:
            raise SystemExit(f"GET task {task_id}: {status} {detail}")
        if detail["status"] == "completed":
            return dict(detail)
        if detail["status"] in ("failed", "error", "stopped"):
            raise SystemExit(f"task {task_id} ended as {detail['status']}: {detail['error_log']}")
        time.sleep(0.1)
    raise SystemExit(f"task {task_id} not done after {timeout} s")


class Churn:
    """Kills and restarts random clients, and freezes one extra client once it holds a shard."""

    def __init__(
        self, args: argparse.Namespace, port: int, run: Path, env: dict[str, str], token: str, *, churn: bool
    ) -> None:
        self.args, self.port, self.run, self.env, self.token = args, port, run, env, token
        self.clients = [client_proc(port, i, run, env) for i in range(args.clients)]
        self.lives = [0] * args.clients
        self.hung = client_proc(port, args.clients, run, env) if churn else None
        self.frozen_at: float | None = None
        self.kills = 0
        self.done = threading.Event()
        self.rng = random.Random(args.seed)

    def hung_id(self) -> str | None:
        state = self.run / f"client-{self.args.clients}.json"
        return json.loads(state.read_text()).get("client_id") if state.exists() else None

    def loop(self, task_id: int) -> None:
        next_kill = time.monotonic() + self.args.kill_every
        while not self.done.wait(0.05):
            if self.hung is not None and self.frozen_at is None:
                self.freeze_if_holding(self.hung, task_id)
            if time.monotonic() >= next_kill:
                next_kill += self.args.kill_every
                i = self.rng.randrange(self.args.clients)
                self.clients[i].kill(signal.SIGKILL)
                self.clients[i].popen.wait(5)
                self.lives[i] += 1
                self.clients[i] = client_proc(self.port, i, self.run, self.env, self.lives[i])
                self.kills += 1

    def freeze_if_holding(self, hung: Proc, task_id: int) -> None:
        who = self.hung_id()
        if who is None:
            return
        detail = request(self.port, "GET", f"/api/tasks/{task_id}", token=self.token)[1]
        if any(
            a["client_id"] == who and a["status"] in ("assigned", "training") for a in detail["assignments"]
        ):
            hung.kill(signal.SIGSTOP)  # hangs holding a shard; never answers again
            self.frozen_at = time.monotonic()

    def stop(self) -> None:
        self.done.set()
        if self.hung is not None:
            self.hung.kill(signal.SIGCONT)
            self.hung.stop()
        for p in self.clients:
            p.stop()


def federated(args: argparse.Namespace, run: Path, churn: bool) -> dict[str, Any]:
    token = secrets.token_urlsafe(16)
    port = free_port()
    env = local_env(run, token, SWEEP_INTERVAL="0.25", CONNECTION_TIMEOUT="10", RECONNECT_GRACE="0")
    procs = start_topology(env, port, run / "procs")
    chaos = Churn(args, port, run, env, token, churn=churn)
    killer: threading.Thread | None = None
    try:
        warm = {**digits_config(1, args.clients), "seed": args.seed}  # no deadlines: clients start cold
        task = request(
            port, "POST", "/api/tasks", {"type": "federated_training", "config": warm}, token=token
        )[1]
        wait_done(port, task["id"], token, 300)  # clients import torch and load the data once
        started = time.perf_counter()
        task = request(
            port, "POST", "/api/tasks", {"type": "federated_training", "config": config(args)}, token=token
        )[1]
        if churn:
            killer = threading.Thread(target=chaos.loop, args=(task["id"],), daemon=True)
            killer.start()
        detail = wait_done(port, task["id"], token, 1800)
        wall = time.perf_counter() - started
    finally:
        chaos.done.set()
        if killer is not None:
            killer.join(5)
        chaos.stop()
        for p in procs:
            p.stop()
    rounds = detail["result"]["rounds"]
    timeouts = timed_out(run, task["id"])
    return {
        "churn": churn,
        "accuracy": detail["result"]["final"]["test_accuracy"],
        "test_loss": detail["result"]["final"]["test_loss"],
        "model_sha256": detail["result"]["model_sha256"],
        "wall_s": wall,
        "rounds": len(rounds),
        "rounds_per_minute": 60 * len(rounds) / wall,
        "updates_per_round": [r["updates"] for r in rounds],
        "missing_ranks": [r.get("missing_ranks", []) for r in rounds],
        "kills": chaos.kills,
        "hung": chaos.frozen_at is not None,
        "timeouts": timeouts,
    }


def timed_out(run: Path, task_id: int) -> int:
    """The task's assignments that timed out, from the embedded database (the server is stopped)."""
    import sqlite3

    with sqlite3.connect(run / "data" / "aifarm.sqlite3") as conn:
        query = "SELECT COUNT(*) FROM task_assignments WHERE task_id = ? AND status = 'timed_out'"
        return int(conn.execute(query, (task_id,)).fetchone()[0])


def centralized(args: argparse.Namespace) -> dict[str, Any]:
    code = (
        "import json, time, torch\n"
        "from training import train_centralized\n"
        "from training.spec import normalize_federated_config\n"
        f"cfg = normalize_federated_config({config(args)!r}, default_batch_size=32, default_epochs=1)\n"
        "t = time.perf_counter(); m = train_centralized(cfg); m['wall_s'] = time.perf_counter() - t\n"
        "print(json.dumps(m))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--kill-every", type=float, default=3.0, help="seconds between kills")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    runs = {}
    for name, churn in (("calm", False), ("churn", True)):
        run = ROOT / "bench" / "out" / f"churn-{name}"
        shutil.rmtree(run, ignore_errors=True)
        run.mkdir(parents=True)
        runs[name] = federated(args, run, churn)
    central = centralized(args)
    calm, churned = runs["calm"], runs["churn"]
    ratio = churned["rounds_per_minute"] / calm["rounds_per_minute"]
    gap = (calm["accuracy"] - churned["accuracy"]) * 100
    result = {"args": vars(args), "quorum": QUORUM, **runs, "centralized": central, "rate_ratio": ratio}
    out = ROOT / "bench" / "out" / "churn.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"\n## Churn: {args.clients} clients, {args.rounds} rounds, embedded, {os.cpu_count()} cores\n")
    print("| measure | calm | churn | centralized |")
    print("|---|---|---|---|")
    print(
        f"| rounds per minute | {calm['rounds_per_minute']:.1f} | {churned['rounds_per_minute']:.1f} "
        f"(**{ratio:.2f}** of calm; goal >= 0.70) | |"
    )
    print(
        f"| final test accuracy | {calm['accuracy']:.4f} | {churned['accuracy']:.4f} "
        f"(**{-gap:+.2f}** points against calm; goal within 1) | {central['test_accuracy']:.4f} |"
    )
    print(f"| final test loss | {calm['test_loss']:.4f} | {churned['test_loss']:.4f} | |")
    print(f"| final model differs from calm | | {churned['model_sha256'] != calm['model_sha256']} | |")
    print(f"| wall time | {calm['wall_s']:.1f} s | {churned['wall_s']:.1f} s | {central['wall_s']:.1f} s |")
    print(
        f"| rounds closed on a quorum (updates < {args.clients}) | "
        f"{sum(u < args.clients for u in calm['updates_per_round'])} | "
        f"{sum(u < args.clients for u in churned['updates_per_round'])} | |"
    )
    print(f"| clients killed and restarted | 0 | {churned['kills']} | |")
    print(f"| a client hung holding a shard | no | {'yes' if churned['hung'] else 'no (never got one)'} | |")
    print(f"| assignments timed out and reissued | {calm['timeouts']} | {churned['timeouts']} | |")
    print(f"\nwritten: {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
