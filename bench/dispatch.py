"""Dispatch benchmark: N clients over real WebSockets against the production topology.

    .venv/bin/python bench/dispatch.py [--clients 1000] [--web-workers 2] [--celery-concurrency 2]

Starts, on this machine: gunicorn (gevent workers), a Celery worker, against MariaDB (its own
database ``aifarm_bench``) and Redis (db 14). Then, from one gevent process:

1. N clients connect and register at once                    -> registrations/s
2. N shards are queued; all N clients send task_request at once -> request->task latency
   p50/p99 and assignments/s under load
3. 100 clients, one at a time, request a queued shard         -> unloaded latency p50/p99
4. in the same run, the references: a bare Celery no-op round trip (send + result) on the
   same broker and worker, and a bare MariaDB claim transaction (SELECT ... FOR UPDATE SKIP
   LOCKED + UPDATE + COMMIT) on a table with the same index, one connection.

Prints a markdown table and writes bench/out/dispatch.json.
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import gevent  # noqa: E402
import pymysql  # noqa: E402
import websocket  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.claim import claims_per_second  # noqa: E402
from launch import free_port, request, start_gunicorn, start_worker, wait_for  # noqa: E402
from store import schema  # noqa: E402

DB = "aifarm_bench"
REDIS = "redis://127.0.0.1:6379/14"
ADMIN = "bench-admin"
HARDWARE = {"cpu_info": {"cores": 4}, "ram_info": {"total_gb": 16}, "gpu_info": []}


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def reset_database() -> None:
    conn = pymysql.connect(host="127.0.0.1", user="root", autocommit=True)
    with conn.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS {DB}")
        cur.execute(f"CREATE DATABASE {DB} CHARACTER SET utf8mb4 COLLATE utf8mb4_general_ci")
        cur.execute(f"USE {DB}")
        for statement in schema.statements():
            cur.execute(statement)
    conn.close()
    import redis

    redis.Redis.from_url(REDIS).flushdb()


class Client:
    def __init__(self, port: int) -> None:
        self.ws = websocket.create_connection(f"ws://127.0.0.1:{port}/ws", timeout=120)

    def call(self, message: dict, want: str) -> dict:
        self.ws.send(json.dumps(message))
        while True:
            reply = json.loads(self.ws.recv())
            if reply["type"] == want:
                return reply
            if reply["type"] == "error":
                raise RuntimeError(reply)


def queue_shards(port: int, count: int, per_task: int = 100) -> None:
    for start in range(0, count, per_task):
        status, body = request(
            port,
            "POST",
            "/api/tasks",
            {"type": "bench", "config": {"num_shards": min(per_task, count - start)}},
            token=ADMIN,
        )
        assert status == 201, body


def wait_queued(count: int) -> None:
    conn = pymysql.connect(host="127.0.0.1", user="root", database=DB, autocommit=True)

    def queued() -> bool:
        with conn.cursor() as cur:
            cur.execute("SELECT COUNT(*) FROM task_shards WHERE status = 'queued'")
            return cur.fetchone()[0] >= count

    wait_for(queued, 120, 0.1, f"{count} queued shards")
    conn.close()


def bench_topology(n: int, web_workers: int, concurrency: int, run_dir: Path) -> dict:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "DATABASE_URL": f"mysql+pymysql://root@127.0.0.1:3306/{DB}",
        "REDIS_URL": REDIS,
        "ADMIN_TOKEN": ADMIN,
        "MAX_CLIENTS": str(n + 1000),
        "MAX_TASKS_PER_CLIENT": "3",
        "RATE_LIMIT": "1000000/minute",
        "LOG_DIR": str(run_dir / "logs"),
        "LOG_LEVEL": os.environ.get("LOG_LEVEL", "WARNING"),
        "CHECKPOINT_DIR": str(run_dir / "ck"),
        "DATA_DIR": str(run_dir / "data"),
        "SWEEP_INTERVAL": "3600",
        "SCHEDULE_INTERVAL": "3600",
        "WEB_CONCURRENCY": str(web_workers),
    }
    worker = start_worker(env, run_dir, name="bench-worker", concurrency=concurrency)
    port = free_port()
    web = start_gunicorn(env, port, run_dir, workers=web_workers)
    try:
        # 1. registrations
        clients: list[Client] = []
        t0 = time.perf_counter()

        def register() -> None:
            c = Client(port)
            c.call({"type": "register", **HARDWARE}, "registered")
            clients.append(c)

        gevent.joinall([gevent.spawn(register) for _ in range(n)], raise_error=True)
        reg_s = time.perf_counter() - t0

        # 2. burst: everyone asks at once, N shards queued
        queue_shards(port, n)
        wait_queued(n)
        latencies: list[float] = []
        t0 = time.perf_counter()

        def ask(c: Client) -> None:
            sent = time.perf_counter()
            c.call({"type": "task_request"}, "task")
            latencies.append(time.perf_counter() - sent)

        gevent.joinall([gevent.spawn(ask, c) for c in clients], raise_error=True)
        burst_s = time.perf_counter() - t0

        # 3. unloaded: one at a time
        queue_shards(port, 100)
        wait_queued(100)
        single: list[float] = []
        for c in clients[:100]:
            sent = time.perf_counter()
            c.call({"type": "task_request"}, "task")
            single.append(time.perf_counter() - sent)

        # 4a. bare Celery round trip on the same broker and worker
        from celery import Celery

        probe = Celery("bench", broker=REDIS, backend=REDIS)
        probe.conf.update(task_serializer="json", accept_content=["json"], result_accept_content=["json"])
        probe.send_task("workers.tasks.ping").get(timeout=30)  # warm
        rtt = []
        for _ in range(200):
            sent = time.perf_counter()
            assert probe.send_task("workers.tasks.ping").get(timeout=30) == "pong"
            rtt.append(time.perf_counter() - sent)
        for c in clients:
            c.ws.close()
    finally:
        web.stop()
        worker.stop()
    return {
        "clients": n,
        "web_workers": web_workers,
        "celery_concurrency": concurrency,
        "registrations_per_s": n / reg_s,
        "burst_p50_ms": pct(latencies, 0.5) * 1000,
        "burst_p99_ms": pct(latencies, 0.99) * 1000,
        "assignments_per_s": n / burst_s,
        "unloaded_p50_ms": pct(single, 0.5) * 1000,
        "unloaded_p99_ms": pct(single, 0.99) * 1000,
        "celery_noop_rtt_p50_ms": pct(rtt, 0.5) * 1000,
        "celery_noop_rtt_p99_ms": pct(rtt, 0.99) * 1000,
        "celery_noop_per_s_sequential": 1 / statistics.fmean(rtt),
    }


def bench_bare_claim(rows: int = 20_000, claims: int = 5_000) -> dict:
    """The claim transaction alone, on the real schema's index, one connection."""
    rate = claims_per_second(DB, rows, claims)
    return {"bare_claims_per_s": rate, "bare_claim_ms": 1000 / rate}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--web-workers", type=int, default=2)
    parser.add_argument("--celery-concurrency", type=int, default=2)
    args = parser.parse_args()
    run_dir = ROOT / "bench" / "out" / "dispatch-run"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    reset_database()
    results = bench_topology(args.clients, args.web_workers, args.celery_concurrency, run_dir)
    results.update(bench_bare_claim())
    out = ROOT / "bench" / "out" / "dispatch.json"
    out.write_text(json.dumps(results, indent=2))
    r = results
    print(
        f"\n## Dispatch, {r['clients']} WebSocket clients, {r['web_workers']} gunicorn gevent workers, "
        f"Celery prefork x{r['celery_concurrency']}, MariaDB + Redis, this machine ({os.cpu_count()} cores)\n"
    )
    print("| measure | value |")
    print("|---|---|")
    print(f"| registrations/s ({r['clients']} at once) | {r['registrations_per_s']:.0f} |")
    print(
        f"| task_request -> task, burst of {r['clients']}: p50 / p99 | {r['burst_p50_ms']:.0f} ms / {r['burst_p99_ms']:.0f} ms |"
    )
    print(f"| assignments/s (burst) | {r['assignments_per_s']:.0f} |")
    print(
        f"| task_request -> task, one at a time: p50 / p99 | {r['unloaded_p50_ms']:.1f} ms / {r['unloaded_p99_ms']:.1f} ms |"
    )
    print(
        f"| reference: bare Celery no-op round trip p50 / p99 | {r['celery_noop_rtt_p50_ms']:.1f} ms / {r['celery_noop_rtt_p99_ms']:.1f} ms |"
    )
    print(
        f"| reference: bare MariaDB claim transaction | {r['bare_claims_per_s']:.0f}/s ({r['bare_claim_ms']:.2f} ms) |"
    )
    print(f"| assignments/s vs bare claims/s | {r['assignments_per_s'] / r['bare_claims_per_s']:.2f} |")
    print(
        f"| unloaded latency vs Celery round trip | {r['unloaded_p50_ms'] / r['celery_noop_rtt_p50_ms']:.1f}x |"
    )
    print(f"\nwritten: {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
