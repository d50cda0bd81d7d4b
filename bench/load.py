"""Load benchmark: many real WebSocket clients against the production topology, in one run.

    .venv/bin/python bench/load.py [--clients 1000] [--drivers 2] [--web-workers 1]
                                   [--progress-seconds 10] [--progress-rate 20000] [--steady-rate 500]
                                   [--steady-seconds 6] [--heartbeat 5] [--settle 2] [--no-reference]

Starts, on this machine: gunicorn (gevent workers, ``WEB_CONCURRENCY``), a Celery worker
(prefork), on MariaDB (its own database ``aifarm_load``) and Redis (db 12). The clients are
asyncio ``websockets`` connections, spread over ``--drivers`` processes. Phases:

1. connect and register every client                  -> connections held, web RSS per connection
2. N shards queued; every client sends task_request at once -> request->task p50/p99, assignments/s
3. every client sends task_progress for a while         -> progress messages/s ingested by the web
   tier (its own counter, aifarm_ws_messages_total), and the latest progress is in MySQL; the
   cores each part of the stack kept busy meanwhile, and the web's CPU per message
4. every client sends its task_result and waits for result_accepted -> every result recorded once
5. steady requests, once the worker is idle: every connected client sends a heartbeat every
   ``--heartbeat`` s, and from ``--settle`` s later clients send task_request at ``--steady-rate``
   per second in all (each client once, evenly spaced) -> request->task p50/p99 at that rate
6. every client closes its socket at once (a network blip)  -> seconds until every client row is
   released (the web tier writes each disconnect)
7. references, same machine, same run: a Celery no-op task (enqueue rate, completion rate, round
   trip), a MariaDB SKIP LOCKED claim loop (one connection), and a bare flask-sock echo under
   gunicorn's gevent worker (idle memory per socket, echo messages/s with 100 sockets).

Checks while measuring: no shard is assigned twice, every result is acknowledged and recorded.
Prints a markdown table and writes bench/out/load.json. The drivers share the machine's cores
with the server: on a small machine the figures are a lower bound (and noisy when the CPU is
shared). ``run_load`` is also what tests/services/test_load_smoke.py runs, with 100 clients.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import random
import resource
import shutil
import sys
import textwrap
import time
import urllib.request
from multiprocessing.connection import Connection as Pipe
from pathlib import Path
from typing import Any

import psutil
import pymysql
from websockets.asyncio.client import ClientConnection, connect
from websockets.frames import apply_mask

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.claim import claims_per_second  # noqa: E402
from launch import Proc, free_port, request, start_gunicorn, start_worker, wait_for  # noqa: E402
from store import schema  # noqa: E402
from training.version import PROTOCOL_VERSION, VERSION  # noqa: E402

DB = "aifarm_load"
REDIS = "redis://127.0.0.1:6379/12"
ADMIN = "load-admin"
HARDWARE = {"cpu_info": {"cores": 4}, "ram_info": {"total_gb": 16}, "gpu_info": []}
SHARDS_PER_TASK = 100
PHASE_TIMEOUT = 120.0  # seconds any one phase may take before it is reported as failed


def raise_open_files() -> int:
    """Raise this process's open-files limit to its hard limit (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# a task_progress message as json.dumps writes it (formatting it so costs a third of json.dumps)
PROGRESS = b'{"type": "task_progress", "task_id": %d, "round": %d, "progress": %.1f, "metrics": {"loss": %r}}'


def client_frame(payload: bytes) -> bytes:
    """One masked text frame, as a client sends it (RFC 6455 5.2)."""
    mask = random.randbytes(4)
    n = len(payload)
    if n < 126:
        head = bytes((0x81, 0x80 | n))
    elif n < 65536:
        head = bytes((0x81, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x81, 0x80 | 127)) + n.to_bytes(8, "big")
    return head + mask + apply_mask(payload, mask)


# --- the drivers: asyncio clients in child processes ---


class Driver:
    """Clients of one driver process; commands come through a pipe, answers go back."""

    def __init__(self, port: int, count: int) -> None:
        self.url = f"ws://127.0.0.1:{port}/ws"
        self.count = count
        self.socks: list[ClientConnection] = []
        self.tasks: list[dict[str, Any]] = []

    async def _call(self, ws: ClientConnection, message: dict[str, Any], want: str) -> dict[str, Any]:
        await ws.send(json.dumps(message))
        return await self._until(ws, want)

    async def _until(self, ws: ClientConnection, want: str) -> dict[str, Any]:
        while True:
            reply = json.loads(await ws.recv())
            if reply["type"] in (want, "error"):
                return dict(reply)

    async def _request_task(self, ws: ClientConnection, errors: list[str]) -> dict[str, Any] | None:
        """Send task_request and wait for the task; None (and the reason in ``errors``) if none came."""
        try:
            reply = await asyncio.wait_for(self._call(ws, {"type": "task_request"}, "task"), PHASE_TIMEOUT)
        except Exception as error:
            errors.append(type(error).__name__)
            return None
        if reply["type"] == "error":
            errors.append(reply.get("code", "?"))
            return None
        return reply

    async def register(self) -> dict[str, Any]:
        gate = asyncio.Semaphore(200)
        errors: list[str] = []

        async def one() -> None:
            async with gate:
                try:
                    ws = await connect(self.url, open_timeout=60, ping_interval=None, max_size=2**20)
                    reply = await self._call(
                        ws,
                        {
                            "type": "register",
                            **HARDWARE,
                            "protocol_version": PROTOCOL_VERSION,
                            "client_version": VERSION,
                            "task_types": ["echo"],
                        },
                        "registered",
                    )
                except Exception as error:
                    errors.append(type(error).__name__)
                    return
                if reply["type"] == "registered":
                    self.socks.append(ws)
                else:
                    errors.append(reply.get("code", "?"))
                    await ws.close()

        await asyncio.gather(*(one() for _ in range(self.count)))
        return {"registered": len(self.socks), "errors": errors}

    async def burst(self, start_at: float) -> dict[str, Any]:
        await asyncio.sleep(max(0.0, start_at - time.time()))
        latencies: list[float] = []
        firsts: list[float] = []
        lasts: list[float] = []
        errors: list[str] = []
        self.tasks = [{} for _ in self.socks]

        async def one(i: int, ws: ClientConnection) -> None:
            sent = time.time()
            firsts.append(sent)
            reply = await self._request_task(ws, errors)
            if reply is None:
                return
            got = time.time()
            lasts.append(got)
            latencies.append(got - sent)
            self.tasks[i] = reply["data"]

        await asyncio.gather(*(one(i, ws) for i, ws in enumerate(self.socks)))
        shards = [(t["id"], t["round"], t["rank"]) for t in self.tasks if t]
        return {"latencies": latencies, "first": min(firsts, default=0), "last": max(lasts, default=0),
                "errors": errors, "shards": shards}  # fmt: skip

    async def progress(self, seconds: float, per_client: float) -> dict[str, Any]:
        """``per_client`` progress messages/s from each client that holds a task, for ``seconds``.

        One loop writes each message as a ready-made masked text frame straight to its socket's
        transport, round robin over the clients. The frames are the ones ``ws.send`` would write
        (RFC 6455, masked, one frame a message), but a send through the library and a timer per
        client cost the drivers about as much CPU as the server spends taking the message in,
        and the drivers share the server's cores. A socket whose outgoing buffer is over 64 KB
        (the server is not reading it) is skipped: what was skipped was not offered."""
        clients = [(ws, t) for ws, t in zip(self.socks, self.tasks, strict=True) if t]
        rate = per_client * len(clients)
        sent = skipped = 0
        steps = [0] * len(clients)
        i = 0
        t0 = time.perf_counter()
        while clients and (elapsed := time.perf_counter() - t0) < seconds:
            for _ in range(int(elapsed * rate) - sent - skipped):
                k = i % len(clients)
                i += 1
                ws, task = clients[k]
                transport = ws.transport
                if transport.is_closing() or transport.get_write_buffer_size() > 65536:
                    skipped += 1
                    continue
                steps[k] += 1
                body = PROGRESS % (task["id"], task["round"], min(99.0, steps[k] / 10), 1.0 / steps[k])
                transport.write(client_frame(body))
                sent += 1
            await asyncio.sleep(0.005)
        return {"sent": sent, "skipped": skipped}

    async def results(self, timeout: float) -> dict[str, Any]:
        acks: list[dict[str, Any]] = []
        errors: list[str] = []
        latencies: list[float] = []

        async def one(ws: ClientConnection, task: dict[str, Any]) -> None:
            body = {"type": "task_result", "task_id": task["id"], "round": task["round"],
                    "status": "completed", "metrics": {"score": 1.0}}  # fmt: skip
            sent = time.time()
            try:
                await ws.send(json.dumps(body))
                while True:  # errors about earlier progress may come first: only this result's answer counts
                    reply = json.loads(await asyncio.wait_for(ws.recv(), timeout))
                    if reply["type"] == "result_accepted":
                        acks.append(reply)
                        latencies.append(time.time() - sent)
                        return
                    if reply["type"] == "error" and reply.get("in_reply_to") == "task_result":
                        errors.append(reply.get("code", "?"))
                        return
            except Exception as error:
                errors.append(type(error).__name__)

        await asyncio.gather(*(one(ws, t) for ws, t in zip(self.socks, self.tasks, strict=True) if t))
        return {"acks": acks, "errors": errors, "latencies": latencies}

    async def steady(
        self, start_at: float, rate: float, count: int, heartbeat: float, warmup: float = 0.0
    ) -> dict[str, Any]:
        """``count`` task_requests, ``rate`` per second in all (evenly spaced), one socket after
        the other (a socket asks again once the others asked), while every socket sends a
        heartbeat every ``heartbeat`` s, from ``warmup`` s before the first request."""
        await asyncio.sleep(max(0.0, start_at - time.time()))
        latencies: list[float] = []
        errors: list[str] = []
        shards: list[tuple[int, int, int]] = []
        timeline: list[tuple[float, float]] = []  # (answered at, latency)
        beating = True

        async def beat(ws: ClientConnection, offset: float) -> None:
            await asyncio.sleep(offset)
            while beating:
                with contextlib.suppress(Exception):
                    await ws.send('{"type": "heartbeat"}')
                await asyncio.sleep(heartbeat)

        async def ask(ws: ClientConnection) -> None:
            sent = time.perf_counter()
            reply = await self._request_task(ws, errors)
            if reply is None:
                return
            latencies.append(time.perf_counter() - sent)
            timeline.append((time.time(), latencies[-1]))
            shards.append((reply["data"]["id"], reply["data"]["round"], reply["data"]["rank"]))

        n = len(self.socks)
        beats = (
            [asyncio.create_task(beat(ws, i * heartbeat / n)) for i, ws in enumerate(self.socks)]
            if heartbeat > 0
            else []
        )
        asks: list[asyncio.Task[None]] = []
        await asyncio.sleep(warmup)
        t0 = time.perf_counter()
        for i in range(count):  # past the last socket, the first ones ask again (after their last answer)
            await asyncio.sleep(max(0.0, t0 + i / rate - time.perf_counter()))
            if i >= n:
                await asks[i - n]
            asks.append(asyncio.create_task(ask(self.socks[i % n])))
        offered_s = time.perf_counter() - t0
        await asyncio.gather(*asks)
        beating = False
        for b in beats:
            b.cancel()
        await asyncio.gather(*beats, return_exceptions=True)
        return {"latencies": latencies, "errors": errors, "shards": shards, "offered_s": offered_s,
                "timeline": timeline}  # fmt: skip

    async def close(self) -> dict[str, Any]:
        await asyncio.gather(*(ws.close() for ws in self.socks), return_exceptions=True)
        return {}

    async def serve(self, pipe: Pipe) -> None:
        loop = asyncio.get_running_loop()
        while True:
            command, args = await loop.run_in_executor(None, pipe.recv)
            if command == "exit":
                return
            pipe.send(await getattr(self, command)(*args))


def driver_main(pipe: Pipe, port: int, count: int) -> None:
    raise_open_files()
    asyncio.run(Driver(port, count).serve(pipe))


class Drivers:
    """``n`` driver processes sharing ``clients`` between them."""

    def __init__(self, port: int, clients: int, n: int) -> None:
        ctx = multiprocessing.get_context("fork")  # the children need nothing re-imported
        self.pipes: list[Pipe] = []
        self.procs = []
        for i in range(n):
            share = clients // n + (1 if i < clients % n else 0)
            mine, theirs = ctx.Pipe()
            proc = ctx.Process(target=driver_main, args=(theirs, port, share), daemon=True)
            proc.start()
            self.pipes.append(mine)
            self.procs.append(proc)

    def all(self, command: str, *args: Any) -> list[dict[str, Any]]:
        for pipe in self.pipes:
            pipe.send((command, args))
        return [pipe.recv() for pipe in self.pipes]

    def stop(self) -> None:
        for pipe in self.pipes:
            with contextlib.suppress(OSError):
                pipe.send(("exit", ()))
        for proc in self.procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()


def _split(total: int, n: int) -> list[range]:
    """``total`` items over ``n`` parts, as even as can be (the drivers' shares)."""
    sizes = [total // n + (1 if i < total % n else 0) for i in range(n)]
    starts = [sum(sizes[:i]) for i in range(n)]
    return [range(a, a + b) for a, b in zip(starts, sizes, strict=True)]


# --- the server side ---


def reset_database(database: str, redis_url: str) -> str:
    conn = pymysql.connect(host="127.0.0.1", user="root", autocommit=True)
    with conn.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS {database}")
        cur.execute(f"CREATE DATABASE {database} CHARACTER SET utf8mb4 COLLATE utf8mb4_general_ci")
        cur.execute(f"USE {database}")
        for statement in schema.statements():
            cur.execute(statement)
    conn.close()
    import redis

    redis.Redis.from_url(redis_url).flushdb()
    return f"mysql+pymysql://root@127.0.0.1:3306/{database}"


def stack_env(
    database_url: str, redis_url: str, clients: int, web_workers: int, run_dir: Path
) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "ADMIN_TOKEN": ADMIN,
        "MAX_CLIENTS": str(clients + 1000),
        "WORKER_CONNECTIONS": str(clients + 1000),
        "WS_MESSAGES_PER_MINUTE": "1000000",
        "RATE_LIMIT": "1000000/minute",
        "LOG_DIR": str(run_dir / "logs"),
        "LOG_LEVEL": os.environ.get("LOG_LEVEL", "WARNING"),
        "CHECKPOINT_DIR": str(run_dir / "ck"),
        "DATA_DIR": str(run_dir / "data"),
        "SWEEP_INTERVAL": "3600",
        "SCHEDULE_INTERVAL": "3600",
        "WEB_CONCURRENCY": str(web_workers),
    }


def web_rss(proc: Proc) -> int:
    """Resident memory of gunicorn's worker processes (not the master), bytes."""
    master = psutil.Process(proc.popen.pid)
    return sum(child.memory_info().rss for child in master.children(recursive=True))


class CpuMeter:
    """CPU time of each part of the stack (web, drivers, celery, mariadb, redis, this script)."""

    def __init__(self, web: Proc | None, worker: Proc | None, drivers: Drivers) -> None:
        def tree(proc: Proc | None) -> list[psutil.Process]:
            if proc is None:
                return []
            top = psutil.Process(proc.popen.pid)
            return [top, *top.children(recursive=True)]

        def named(name: str) -> list[psutil.Process]:
            return [p for p in psutil.process_iter(["name"]) if p.info["name"] == name]

        self.parts = {
            "web": tree(web),
            "drivers": [psutil.Process(p.pid) for p in drivers.procs],
            "celery": tree(worker),
            "mariadb": named("mariadbd"),
            "redis": named("redis-server"),
            "bench": [psutil.Process()],
        }

    def read(self) -> dict[str, float]:
        seconds = {}
        for part, procs in self.parts.items():
            seconds[part] = 0.0
            for proc in procs:
                with contextlib.suppress(psutil.Error):
                    times = proc.cpu_times()
                    seconds[part] += times.user + times.system
        return seconds

    @staticmethod
    def cores(before: dict[str, float], after: dict[str, float], wall: float) -> dict[str, float]:
        """Cores each part kept busy between two readings ``wall`` seconds apart."""
        return {part: (after[part] - before[part]) / max(1e-9, wall) for part in before}


def counter(port: int, name: str, token: str, timeout: float = 30, **labels: str) -> float:
    status, body = request(port, "GET", "/metrics", token=token, timeout=timeout)
    assert status == 200, body
    from prometheus_client.parser import text_string_to_metric_families

    return sum(
        s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
        if s.name == name and labels.items() <= s.labels.items()
    )


def sql(database_url: str, query: str, *args: Any) -> list[tuple[Any, ...]]:
    database = database_url.rsplit("/", 1)[1]
    conn = pymysql.connect(host="127.0.0.1", user="root", database=database, autocommit=True)
    with conn.cursor() as cur:
        cur.execute(query, args)
        found = [tuple(r) for r in cur.fetchall()]
    conn.close()
    return found


def queue_shards(port: int, count: int, token: str, database_url: str) -> None:
    for start in range(0, count, SHARDS_PER_TASK):
        config = {"num_shards": min(SHARDS_PER_TASK, count - start)}
        status, body = request(port, "POST", "/api/tasks", {"type": "echo", "config": config}, token=token)
        assert status == 201, body
    wait_for(
        lambda: sql(database_url, "SELECT COUNT(*) FROM task_shards WHERE status = 'queued'")[0][0] >= count,
        PHASE_TIMEOUT,
        0.2,
        f"{count} queued shards",
    )


def wait_for_idle_worker(redis_url: str) -> float:
    """Wait until the worker has no job queued or running (``advance_task`` for each task of
    the results phase, the steady phase's ``prepare_task``s); returns the seconds waited. A
    steady phase started before that measured its first requests queued behind those jobs
    (at 10,000 clients the first 250 ms of requests waited 100 to 300 ms)."""
    import redis

    broker = redis.Redis.from_url(redis_url)
    t0 = time.perf_counter()
    wait_for(
        lambda: broker.llen("celery") == 0 and broker.hlen("unacked") == 0,
        PHASE_TIMEOUT,
        0.05,
        "an idle worker",
    )
    broker.close()
    return time.perf_counter() - t0


def run_load(
    port: int,
    web: Proc | None,
    database_url: str,
    *,
    clients: int,
    drivers: int = 2,
    progress_seconds: float = 10.0,
    progress_rate: float = 20000.0,
    token: str = ADMIN,
    ack_timeout: float = PHASE_TIMEOUT,
    steady_rate: float = 500.0,
    steady_seconds: float = 6.0,
    heartbeat: float = 5.0,
    redis_url: str | None = None,
    settle: float = 0.0,
    worker: Proc | None = None,
) -> dict[str, Any]:
    """Drive ``clients`` clients against a running stack; returns the figures and the checks.
    ``redis_url``: the broker, to start the steady phase once the worker's queue is empty;
    ``settle``: seconds of heartbeats before the first steady request (see ``--settle``);
    ``web``, ``worker``: the stack's processes, for memory and the CPU each part used."""
    out: dict[str, Any] = {"clients": clients, "drivers": drivers}
    rss0 = web_rss(web) if web is not None else 0
    group = Drivers(port, clients, drivers)
    meter = CpuMeter(web, worker, group)
    try:
        # 1. connections
        t0 = time.perf_counter()
        reg = group.all("register")
        out["register_s"] = time.perf_counter() - t0
        out["registered"] = sum(r["registered"] for r in reg)
        out["register_errors"] = [e for r in reg for e in r["errors"]]
        if web is not None:
            time.sleep(1.0)
            rss1 = web_rss(web)
            out["web_rss_before_mb"] = rss0 / 2**20
            out["web_rss_connected_mb"] = rss1 / 2**20
            out["web_kb_per_connection"] = (rss1 - rss0) / max(1, out["registered"]) / 1024
        # 2. burst of requests
        queue_shards(port, out["registered"], token, database_url)
        burst = group.all("burst", time.time() + 0.5)
        latencies = [x for b in burst for x in b["latencies"]]
        first = min(b["first"] for b in burst)
        last = max(b["last"] for b in burst)
        shards = [tuple(s) for b in burst for s in b["shards"]]
        out["assigned"] = len(latencies)
        out["burst_errors"] = [e for b in burst for e in b["errors"]]
        out["burst_p50_ms"] = pct(latencies, 0.5) * 1000
        out["burst_p99_ms"] = pct(latencies, 0.99) * 1000
        out["assignments_per_s"] = len(latencies) / max(1e-9, last - first)
        out["shards_given_twice"] = len(shards) - len(set(shards))
        # 3. progress
        if progress_seconds > 0:
            before = counter(port, "aifarm_ws_messages_total", token, direction="in", type="task_progress")
            cpu0 = meter.read()
            t0 = time.perf_counter()
            offered = group.all("progress", progress_seconds, progress_rate / max(1, out["assigned"]))
            sent = sum(r["sent"] for r in offered)
            # what was sent and not yet handled is still counted: wait for the counter to settle
            seen = [before]

            def settled() -> bool:
                seen.append(
                    counter(port, "aifarm_ws_messages_total", token, direction="in", type="task_progress")
                )
                return seen[-1] - before >= sent or (len(seen) > 3 and seen[-1] == seen[-2])

            wait_for(settled, PHASE_TIMEOUT, 0.5, "progress handled")
            elapsed = time.perf_counter() - t0
            out["progress_sent"] = sent
            out["progress_ingested"] = seen[-1] - before
            out["progress_per_s"] = (seen[-1] - before) / elapsed
            out["progress_offered_per_s"] = sent / progress_seconds
            out["progress_skipped"] = sum(r["skipped"] for r in offered)
            out["progress_cores"] = meter.cores(cpu0, meter.read(), elapsed)
            out["progress_web_us_per_message"] = (
                out["progress_cores"]["web"] * elapsed / max(1, out["progress_ingested"]) * 1e6
            )
        # 4. results
        t0 = time.perf_counter()
        res = group.all("results", ack_timeout)
        out["results_s"] = time.perf_counter() - t0
        acks = [a for r in res for a in r["acks"]]
        out["results_acknowledged"] = len(acks)
        out["result_errors"] = [e for r in res for e in r["errors"]]
        ack_latencies = [x for r in res for x in r["latencies"]]
        out["result_ack_p50_ms"] = pct(ack_latencies, 0.5) * 1000
        out["result_ack_p99_ms"] = pct(ack_latencies, 0.99) * 1000
        # 5. steady requests while every client is connected and sends heartbeats
        if steady_seconds > 0:
            # each client asks at most twice: it holds at most MAX_TASKS_PER_CLIENT (3) tasks
            count = min(2 * out["registered"], int(steady_rate * steady_seconds))
            queue_shards(port, count, token, database_url)
            if redis_url is not None:
                out["steady_waited_s"] = wait_for_idle_worker(redis_url)
            out["steady_settle_s"] = settle
            shares = [len(r) for r in _split(count, drivers)]
            for pipe, share in zip(group.pipes, shares, strict=True):
                pipe.send(
                    ("steady", (time.time() + 0.5, steady_rate * share / count, share, heartbeat, settle))
                )
            cpu0, t0 = meter.read(), time.perf_counter()
            steady = [pipe.recv() for pipe in group.pipes]
            out["steady_cores"] = meter.cores(cpu0, meter.read(), time.perf_counter() - t0)
            latencies = [x for r in steady for x in r["latencies"]]
            out["steady_requests"] = count
            out["steady_rate_offered"] = count / max(r["offered_s"] for r in steady)
            out["steady_assigned"] = len(latencies)
            out["steady_errors"] = [e for r in steady for e in r["errors"]]
            out["steady_p50_ms"] = pct(latencies, 0.5) * 1000
            out["steady_p99_ms"] = pct(latencies, 0.99) * 1000
            out["steady_max_ms"] = max(latencies, default=float("nan")) * 1000
            out["heartbeat_s"] = heartbeat
            out["steady_timeline"] = sorted(x for r in steady for x in r["timeline"])
            steady_shards = [tuple(x) for r in steady for x in r["shards"]]
            out["shards_given_twice"] += len(steady_shards) - len(set(steady_shards))
        # 6. every client leaves at once (a network blip, a proxy restart): until every client row is released
        t0 = time.perf_counter()
        group.all("close")
        wait_for(
            lambda: sql(database_url, "SELECT COUNT(*) FROM clients WHERE conn_id IS NOT NULL")[0][0] == 0,
            PHASE_TIMEOUT,
            0.1,
            "every client row released",
        )
        out["disconnect_s"] = time.perf_counter() - t0
    finally:
        group.stop()
    # the checks, from MySQL
    out["results_recorded"] = sql(
        database_url, "SELECT COUNT(*) FROM task_assignments WHERE status = 'completed'"
    )[0][0]
    out["shards_held_twice"] = sql(
        database_url,
        "SELECT COUNT(*) FROM (SELECT shard_id FROM task_assignments WHERE status <> 'released' "
        "GROUP BY shard_id HAVING COUNT(*) > 1) twice",
    )[0][0]
    out["unavailable_errors"] = counter(
        port, "aifarm_ws_errors_total", token, code="unavailable", timeout=PHASE_TIMEOUT
    )
    return out


# --- references, on the same machine ---


def reference_celery(redis_url: str, n: int = 2000) -> dict[str, Any]:
    """A no-op task through the same broker and worker: enqueue rate, completion rate, round trip."""
    from celery import Celery

    probe = Celery("load", broker=redis_url, backend=redis_url)
    probe.conf.update(task_serializer="json", accept_content=["json"], result_accept_content=["json"])
    probe.send_task("workers.tasks.ping").get(timeout=30)  # warm
    t0 = time.perf_counter()
    pending = [probe.send_task("workers.tasks.ping") for _ in range(n)]
    enqueued = time.perf_counter() - t0
    for p in pending:
        p.get(timeout=120)
    done = time.perf_counter() - t0
    rtt = []
    for _ in range(200):
        sent = time.perf_counter()
        probe.send_task("workers.tasks.ping").get(timeout=30)
        rtt.append(time.perf_counter() - sent)
    probe.close()
    return {"celery_enqueue_per_s": n / enqueued, "celery_noop_per_s": n / done,
            "celery_rtt_p50_ms": pct(rtt, 0.5) * 1000}  # fmt: skip


def reference_claim(database_url: str, rows: int = 100_000, claims: int = 3000) -> dict[str, Any]:
    """``SELECT ... FOR UPDATE SKIP LOCKED`` + ``UPDATE`` + ``COMMIT`` on the real index, one connection."""
    return {"claims_per_s": claims_per_second(database_url.rsplit("/", 1)[1], rows, claims)}


ECHO_APP = textwrap.dedent(
    """
    from flask import Flask
    from flask_sock import Sock

    app = Flask(__name__)
    sock = Sock(app)

    @sock.route("/echo")
    def echo(ws):
        while True:
            ws.send(ws.receive())
    """
)


async def _echo_figures(port: int, idle: int, proc: Proc) -> dict[str, Any]:
    url = f"ws://127.0.0.1:{port}/echo"
    rss0 = web_rss(proc)
    gate = asyncio.Semaphore(200)

    async def opened() -> ClientConnection:
        async with gate:
            return await connect(url, open_timeout=60, ping_interval=None)

    socks = await asyncio.gather(*(opened() for _ in range(idle)))
    await asyncio.sleep(1.0)
    per_socket = (web_rss(proc) - rss0) / idle / 1024
    count = 0
    end = time.time() + 5.0

    async def echo(ws: ClientConnection) -> None:
        nonlocal count
        while time.time() < end:
            await ws.send("x" * 100)
            await ws.recv()
            count += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(echo(ws) for ws in socks[:100]))
    rate = count / (time.perf_counter() - t0)
    await asyncio.gather(*(ws.close() for ws in socks), return_exceptions=True)
    return {"echo_kb_per_socket": per_socket, "echo_messages_per_s": rate, "echo_idle_sockets": idle}


def reference_echo(run_dir: Path, idle: int) -> dict[str, Any]:
    """A bare flask-sock echo under gunicorn's gevent worker: idle memory per socket, echo rate."""
    app_dir = run_dir / "echo"
    app_dir.mkdir(parents=True, exist_ok=True)
    (app_dir / "echo_app.py").write_text(ECHO_APP)
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(app_dir)}
    args = [sys.executable, "-m", "gunicorn", "echo_app:app", "--bind", f"127.0.0.1:{port}", "--workers", "1",
            "--worker-class", "gevent", "--worker-connections", str(idle + 1000)]  # fmt: skip
    proc = Proc("echo", args, env, run_dir)
    try:
        wait_for(lambda: _port_open(port), 60, 0.2, "echo server")
        return asyncio.run(_echo_figures(port, idle, proc))
    finally:
        proc.stop()


def _port_open(port: int) -> bool:
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1)
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False
    return True


# --- the report ---


def cores(split: dict[str, float] | None) -> str:
    """``web 0.95, drivers 0.20, ...``: the cores each part of the stack kept busy."""
    return ", ".join(f"{part} {busy:.2f}" for part, busy in (split or {}).items()) or "-"


def report(r: dict[str, Any]) -> str:
    lines = [
        f"## Load, {r['clients']} WebSocket clients ({r['drivers']} driver processes), gunicorn gevent "
        f"x{r['web_workers']}, Celery prefork x{r['celery_concurrency']}, MariaDB + Redis, "
        f"{os.cpu_count()} cores (drivers on the same cores)",
        "",
        "| measure | value | goal / reference |",
        "|---|---|---|",
        f"| connections held (registered) | {r['registered']} of {r['clients']} | 10,000 per web process |",
        f"| web process RSS before / connected | {r.get('web_rss_before_mb', 0):.0f} MB / "
        f"{r.get('web_rss_connected_mb', 0):.0f} MB | |",
        f"| web memory per connection | {r.get('web_kb_per_connection', 0):.0f} KB | < 60 KB; bare flask-sock "
        f"{r.get('echo_kb_per_socket', float('nan')):.0f} KB |",
        f"| task_request -> task, burst of {r['assigned']}: p50 / p99 | {r['burst_p50_ms']:.0f} ms / "
        f"{r['burst_p99_ms']:.0f} ms | p99 < 50 ms (steady) |",
        f"| assignments/s (burst) | {r['assignments_per_s']:.0f} | 1,000; bare claim loop "
        f"{r.get('claims_per_s', float('nan')):.0f}/s |",
        f"| progress ingested/s (offered {r.get('progress_offered_per_s', 0):.0f}/s) | "
        f"{r.get('progress_per_s', 0):.0f} | 10,000; bare echo {r.get('echo_messages_per_s', float('nan')):.0f} msg/s |",
        f"| cores busy while taking progress in ({os.cpu_count()} here) | {cores(r.get('progress_cores'))} | "
        f"web {r.get('progress_web_us_per_message', float('nan')):.0f} µs of CPU a message |",
        f"| task_result -> result_accepted p50 / p99 | {r['result_ack_p50_ms']:.0f} ms / "
        f"{r['result_ack_p99_ms']:.0f} ms | |",
        f"| task_request -> task at a steady {r.get('steady_rate_offered', 0):.0f}/s "
        f"({r.get('steady_requests', 0)} requests; all {r['registered']} clients connected, a heartbeat "
        f"every {r.get('heartbeat_s', 0):.0f} s each): p50 / p99 / max | {r.get('steady_p50_ms', float('nan')):.1f} ms / "
        f"{r.get('steady_p99_ms', float('nan')):.1f} ms / {r.get('steady_max_ms', float('nan')):.0f} ms | "
        f"p99 < 25 ms at 500/s; Celery no-op round trip p50 {r.get('celery_rtt_p50_ms', float('nan')):.1f} ms |",
        f"| cores busy in the steady phase | {cores(r.get('steady_cores'))} | |",
        f"| every client closes at once: all rows released after | {r.get('disconnect_s', float('nan')):.1f} s | |",
        f"| reference: Celery no-op enqueue / completion / round trip p50 | "
        f"{r.get('celery_enqueue_per_s', float('nan')):.0f}/s / {r.get('celery_noop_per_s', float('nan')):.0f}/s / "
        f"{r.get('celery_rtt_p50_ms', float('nan')):.1f} ms | |",
        "",
        f"checks: shards given twice {r['shards_given_twice']}, held twice {r['shards_held_twice']}; "
        f"results acknowledged {r['results_acknowledged']}, recorded {r['results_recorded']} of {r['assigned']}; "
        f"errors: register {len(r['register_errors'])}, burst {len(r['burst_errors'])}, "
        f"results {sorted(set(r['result_errors']))} x{len(r['result_errors'])}, "
        f"steady {sorted(set(r.get('steady_errors', [])))} x{len(r.get('steady_errors', []))}; "
        f"'unavailable' answered {r['unavailable_errors']:.0f}",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--drivers", type=int, default=2, help="client processes")
    parser.add_argument("--web-workers", type=int, default=1)
    parser.add_argument("--celery-concurrency", type=int, default=2)
    parser.add_argument("--progress-seconds", type=float, default=10.0)
    parser.add_argument("--progress-rate", type=float, default=20000.0, help="progress messages/s offered")
    parser.add_argument(
        "--ack-timeout", type=float, default=PHASE_TIMEOUT, help="seconds a client waits for result_accepted"
    )
    parser.add_argument("--steady-rate", type=float, default=500.0, help="task_request/s in the steady phase")
    parser.add_argument("--steady-seconds", type=float, default=6.0, help="0: no steady phase")
    parser.add_argument("--heartbeat", type=float, default=5.0, help="seconds between a client's heartbeats")
    parser.add_argument(
        "--settle", type=float, default=2.0,
        help="seconds of heartbeats between an idle worker and the first steady request: started "
        "together, the first half second of requests met 2,000 heartbeats a second starting at "
        "once (and right after 10,000 results, passes of one client took 12 to 17 ms, not 4)",
    )  # fmt: skip
    parser.add_argument("--database", default=DB)
    parser.add_argument("--redis", default=REDIS)
    parser.add_argument("--no-reference", action="store_true", help="skip the reference figures")
    args = parser.parse_args()
    limit = raise_open_files()
    if limit < args.clients * 2 + 1000:
        print(f"open-files limit {limit} is low for {args.clients} clients (each is two sockets here)")
    run_dir = ROOT / "bench" / "out" / "load-run"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    database_url = reset_database(args.database, args.redis)
    env = stack_env(database_url, args.redis, args.clients, args.web_workers, run_dir)
    worker = start_worker(env, run_dir, name="load-worker", concurrency=args.celery_concurrency)
    port = free_port()
    web = start_gunicorn(env, port, run_dir, workers=args.web_workers)
    try:
        results = run_load(port, web, database_url, clients=args.clients, drivers=args.drivers,
                           progress_seconds=args.progress_seconds, progress_rate=args.progress_rate,
                           ack_timeout=args.ack_timeout, steady_rate=args.steady_rate,
                           steady_seconds=args.steady_seconds, heartbeat=args.heartbeat,
                           redis_url=args.redis, settle=args.settle, worker=worker)  # fmt: skip
        if not args.no_reference:
            results.update(reference_celery(args.redis))
    finally:
        web.stop()
        worker.stop()
    results.update(web_workers=args.web_workers, celery_concurrency=args.celery_concurrency)
    if not args.no_reference:
        results.update(reference_claim(database_url))
        results.update(reference_echo(run_dir, idle=min(args.clients, 5000)))
    out = ROOT / "bench" / "out" / "load.json"
    out.write_text(json.dumps(results, indent=2, default=str))
    print("\n" + report(results))
    print(f"\nwritten: {out.relative_to(ROOT)}")
    ok = results["shards_given_twice"] == 0 and results["results_recorded"] == results["assigned"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
