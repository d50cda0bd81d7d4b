"""``GET /metrics``: Prometheus text, right whichever web process answers.

Two kinds of numbers (docs/operations.md, "Metrics"):

* **Counts of state** (connected clients, tasks by status, assignments and shards by state,
  clients' reported utilization, Celery queue depths) are read from the database and Redis at
  scrape time by :class:`StateCollector`, so every web process gives the same answer.
* **Events** (HTTP requests and their latency by route, 429s, WebSocket messages, update
  bytes; round and aggregation times, observed by the Celery worker that commits a round) are
  counted where they happen. gunicorn and ``celery worker`` give each process tree a folder
  under ``METRICS_DIR`` (``server_settings.setup_metrics_dir``: prometheus_client's
  multiprocess mode), and :class:`FolderCollector` merges the folders of this host's running
  trees. A process without such a folder (the embedded server, ``python -m app`` beside
  separate workers) serves its own in-process registry, plus the folders of the workers.

Routes are labelled by their URL rule (``/api/tasks/<int:task_id>``), never by the raw path,
so the number of series stays bounded.
"""

from __future__ import annotations

import hmac
import logging
import os
import socket
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from flask import Flask, Response, current_app, g, request
from prometheus_client import REGISTRY, Counter, Histogram, disable_created_metrics, generate_latest, values
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from sqlalchemy.orm import Session

import server_settings
from app.errors import error_response
from store import clients as client_store
from store.db import Database
from store.models import ASSIGNMENT_STATUSES, CLIENT_STATUSES, SHARD_STATUSES, TASK_STATUSES

log = logging.getLogger(__name__)

MIB = 1 << 20
UNMATCHED = "<unmatched>"  # the route label of a request no URL rule matched (404, 405)
UPLOAD_ENDPOINT = "models.upload_update"

# No *_created series: multiprocess mode has none, so the same scrape looks the same everywhere.
disable_created_metrics()

# --- events, counted in the web process that sees them ---

HTTP_LATENCY = Histogram(
    "aifarm_http_request_duration_seconds",
    "Time to answer an HTTP request, by method and URL rule (WebSocket sessions excluded)",
    ["method", "route"],
)
HTTP_REQUESTS = Counter(
    "aifarm_http_requests",
    "HTTP requests answered, by method, URL rule and status",
    ["method", "route", "status"],
)
RATE_LIMITED = Counter(
    "aifarm_rate_limited",
    "Requests refused for their rate: HTTP 429 by URL rule; WebSocket messages as route /ws",
    ["route"],
)
WS_MESSAGES = Counter(
    "aifarm_ws_messages",
    "WebSocket messages by direction (in, out) and type; in-coming frames that do not parse are type invalid",
    ["direction", "type"],
)
WS_ERRORS = Counter("aifarm_ws_errors", "WebSocket error messages sent, by code", ["code"])
TASKS_PUSHED = Counter(
    "aifarm_tasks_pushed",
    "task messages sent, by how the web process learnt of the assignment: from the scheduler's "
    "ring (ring) or by reading the database (read: a reconcile, or a task whose spec it had not cached)",
    ["source"],
)
UPDATE_BYTES = Counter(
    "aifarm_update_bytes",
    "Bytes of model updates accepted (201) by the model exchange (their Content-Length)",
)


def multiprocess() -> bool:
    """Whether this process counts into a METRICS_DIR folder (prometheus_client chose at import)."""
    return values.ValueClass is not values.MutexValue


def ws_in(kind: str) -> None:
    WS_MESSAGES.labels("in", kind).inc()


def ws_out(kind: str) -> None:
    WS_MESSAGES.labels("out", kind).inc()


def pushed(source: str, count: int) -> None:
    if count:
        TASKS_PUSHED.labels(source).inc(count)


def ws_error(code: str) -> None:
    WS_ERRORS.labels(code).inc()


def ws_rate_limited() -> None:
    RATE_LIMITED.labels("/ws").inc()


# --- the scrape ---


class FolderCollector(Collector):
    """Merges the multiprocess files of this host's running process trees under ``base``
    (and of ``own``, this process's folder, wherever it is). A tree of this host that no
    longer runs is skipped: its counts ended with it; the next start removes its folder.
    Folders of other hosts (a volume shared between containers) are read as they are."""

    def __init__(self, base: Path, own: Path | None = None) -> None:
        self.base = base
        self.own = own

    def folders(self) -> list[Path]:
        host = socket.gethostname()
        found = []
        if self.base.is_dir():
            for folder in self.base.iterdir():
                owner = server_settings.metrics_folder_owner(folder)
                if owner is None or not folder.is_dir():
                    continue
                if owner[0] == host and not server_settings.process_alive(owner[1]):
                    continue
                found.append(folder)
        if self.own is not None and self.own not in found:
            found.append(self.own)
        return found

    def collect(self) -> Iterable[Metric]:
        for attempt in range(3):  # a folder may be removed while it is read (a tree starting)
            files = [str(f) for folder in self.folders() for f in sorted(folder.glob("*.db"))]
            try:
                return list(MultiProcessCollector.merge(files, accumulate=True))
            except FileNotFoundError:
                if attempt == 2:
                    raise
        return []


class StateCollector(Collector):
    """Counts of state, read from the database (and Redis) when scraped."""

    def __init__(self, db: Database, settings: server_settings.Settings) -> None:
        self.db = db
        self.settings = settings
        self._redis: Any = None

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("aifarm_database_up", "1 when the database answered this scrape's queries")
        try:
            counts = self.db.run(lambda s: _state_counts(s, self.settings.METRICS_CLIENT_LIMIT))
        except Exception as error:  # the database is down: say so, and serve the rest
            log.warning("event=metrics_scrape state=database_failed error=%s", type(error).__name__)
            up.add_metric([], 0)
            yield up
        else:
            up.add_metric([], 1)
            yield up
            yield from counts
        yield from self._queues()

    def _queues(self) -> Iterator[Metric]:
        """Messages waiting in each Celery queue (Redis LLEN); absent when embedded."""
        if self.settings.embedded:
            return
        import celeryconfig

        names = [queue.name for queue in celeryconfig.task_queues]
        try:
            if self._redis is None:
                import redis

                self._redis = redis.Redis.from_url(
                    self.settings.REDIS_URL, socket_connect_timeout=1, socket_timeout=2
                )
            pipe = self._redis.pipeline(transaction=False)
            for name in names:
                for key in _priority_keys(name):
                    pipe.llen(key)
            lengths = pipe.execute()
        except Exception as error:
            log.warning("event=metrics_scrape state=broker_failed error=%s", type(error).__name__)
            return
        family = GaugeMetricFamily(
            "aifarm_celery_queue_length",
            "Celery messages waiting in each queue (Redis LLEN)",
            labels=["queue"],
        )
        per_queue = len(_priority_keys(""))
        for i, name in enumerate(names):
            family.add_metric([name], sum(lengths[i * per_queue : (i + 1) * per_queue]))
        yield family


def _priority_keys(queue: str) -> list[str]:
    """The Redis lists of one kombu queue: the queue's own, and one per priority step used."""
    return [queue] + [f"{queue}\x06\x16{step}" for step in (3, 6, 9)]


def _state_counts(s: Session, client_limit: int) -> list[Metric]:
    counts = client_store.state_counts(s)
    out: list[Metric] = []
    connected = GaugeMetricFamily(
        "aifarm_clients_connected", "Clients with a live WebSocket, on any web process (the database's view)"
    )
    connected.add_metric([], counts.connected)
    out.append(connected)
    for name, what, label, states, found in (
        ("aifarm_clients", "Clients by status", "status", CLIENT_STATUSES, counts.clients),
        ("aifarm_tasks", "Tasks by status", "status", TASK_STATUSES, counts.tasks),
        ("aifarm_assignments", "Assignments by state", "state", ASSIGNMENT_STATUSES, counts.assignments),
        (
            "aifarm_shards",
            "Shards (units of claimable work) by state",
            "state",
            SHARD_STATUSES,
            counts.shards,
        ),
    ):
        family = GaugeMetricFamily(name, what, labels=[label])
        for state in states:
            family.add_metric([state], found.get(state, 0))
        out.append(family)
    out.extend(_client_utilization(client_store.reported_utilization(s, limit=client_limit)))
    return out


def _client_utilization(reports: list[tuple[str, dict[str, Any]]]) -> list[Metric]:
    """Per connected client, what it last reported (``heartbeat`` / ``task_progress``)."""
    cpu = GaugeMetricFamily(
        "aifarm_client_cpu_utilization_percent",
        "CPU use a connected client last reported",
        labels=["client_id"],
    )
    ram = GaugeMetricFamily(
        "aifarm_client_ram_utilization_percent",
        "RAM use a connected client last reported",
        labels=["client_id"],
    )
    gpu = GaugeMetricFamily(
        "aifarm_client_gpu_utilization_percent",
        "GPU use a connected client last reported, per GPU",
        labels=["client_id", "gpu"],
    )
    gpu_memory = GaugeMetricFamily(
        "aifarm_client_gpu_memory_used_bytes",
        "GPU memory in use a connected client last reported, per GPU",
        labels=["client_id", "gpu"],
    )
    for client_id, usage in reports:
        if "cpu_utilization" in usage:
            cpu.add_metric([client_id], usage["cpu_utilization"])
        if "ram_utilization" in usage:
            ram.add_metric([client_id], usage["ram_utilization"])
        for device in usage.get("gpu_utilization", []):
            gpu.add_metric([client_id, str(device["id"])], device["utilization"])
            if "memory_used" in device:
                gpu_memory.add_metric([client_id, str(device["id"])], device["memory_used"] * MIB)
    return [cpu, ram, gpu, gpu_memory]


class Scrape(Collector):
    """What one ``GET /metrics`` collects from."""

    def __init__(self, db: Database, settings: server_settings.Settings) -> None:
        if multiprocess():
            own = Path(os.environ["PROMETHEUS_MULTIPROC_DIR"]).resolve()
            self.parts: list[Collector] = [FolderCollector(settings.metrics_dir, own)]
        else:  # this process's own counters, and the folders of the workers of this host
            self.parts = [REGISTRY, FolderCollector(settings.metrics_dir)]
        self.parts.append(StateCollector(db, settings))

    def collect(self) -> Iterator[Metric]:
        for part in self.parts:
            yield from part.collect()


# --- wiring ---


def init_app(app: Flask, db: Database, settings: server_settings.Settings) -> None:
    """Time and count every HTTP request, and serve ``GET /metrics``. Call it before the rate
    limiter is set up, so that its timer runs first and a 429 is counted like any answer."""
    scrape = Scrape(db, settings)

    @app.before_request
    def _start_clock() -> None:
        g.metrics_started = time.perf_counter()

    @app.after_request
    def _observe(response: Response) -> Response:
        route = request.url_rule.rule if request.url_rule is not None else UNMATCHED
        if route == "/ws":  # the socket's whole life, not a request's
            return response
        elapsed = time.perf_counter() - g.get("metrics_started", time.perf_counter())
        HTTP_LATENCY.labels(request.method, route).observe(elapsed)
        HTTP_REQUESTS.labels(request.method, route, str(response.status_code)).inc()
        if response.status_code == 429:
            RATE_LIMITED.labels(route).inc()
        if request.endpoint == UPLOAD_ENDPOINT and response.status_code == 201:
            UPDATE_BYTES.inc(request.content_length or 0)
        return response

    @app.get("/metrics")
    def prometheus_metrics() -> Response | tuple[Response, int]:
        token = current_app.config["SETTINGS"].METRICS_TOKEN
        if token and not hmac.compare_digest(request.headers.get("Authorization", ""), f"Bearer {token}"):
            return error_response(401, "send 'Authorization: Bearer <METRICS_TOKEN>'")
        return Response(generate_latest(scrape), content_type=CONTENT_TYPE_PLAIN_0_0_4)
