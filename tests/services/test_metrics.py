"""Metrics: ``GET /metrics`` (Prometheus text) and ``GET /api/metrics`` (the specification's
JSON), on gunicorn with two web processes and a Celery worker, and embedded.

Counts of state come from the database, so every web process answers with all the clients;
events (HTTP, WebSocket, uploads, rounds) are counted in the process that saw them and merged
across processes. Clients report their CPU, RAM and GPU use in ``heartbeat`` and
``task_progress``; a malformed report is refused with ``invalid_message`` and changes nothing.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

import launch
from app.protocol import Heartbeat, ProtocolError, TaskProgress, parse
from store.db import Database
from tests.conftest import rows, service_env
from tests.helpers import ADMIN, Proc, WsClient, free_port, request, start_embedded, start_gunicorn, wait_for
from tests.services.test_federated import FAST

MIB = 1 << 20
MODEL_ROUTE = "/api/tasks/<int:task_id>/rounds/<int:round_no>/model"
UPDATE_ROUTE = "/api/tasks/<int:task_id>/rounds/<int:round_no>/updates/<int:rank>"
REPORT = {
    "cpu_utilization": 12.5,
    "ram_utilization": 40,
    "gpu_utilization": [{"id": 0, "utilization": 77, "memory_used": 2048}],
}


# --- reading the metrics ---


def scrape(port: int, token: str | None = None) -> list[Sample]:
    status, body = request(port, "GET", "/metrics", token=token)
    assert status == 200, body
    return [s for family in text_string_to_metric_families(body.decode()) for s in family.samples]


def value(samples: list[Sample], name: str, **labels: str) -> float:
    """The sum of the samples called ``name`` whose labels include ``labels`` (0 if none)."""
    return sum(s.value for s in samples if s.name == name and labels.items() <= s.labels.items())


def names(samples: list[Sample]) -> set[str]:
    return {s.name for s in samples}


def api_metrics(port: int) -> dict[str, Any]:
    status, body = request(port, "GET", "/api/metrics")
    assert status == 200, body
    return dict(body)


def client_detail(port: int, client_id: str) -> dict[str, Any]:
    status, body = request(port, "GET", f"/api/clients/{client_id}")
    assert status == 200, body
    return dict(body)


def healthz_clients(port: int) -> int:
    status, health = request(port, "GET", "/healthz", token=None)
    assert status == 200, health
    return int(health["connected_clients"])


# --- the protocol: literal frames ---


def heartbeat(utilization: Any) -> str:
    return json.dumps({"type": "heartbeat", "utilization": utilization})


MALFORMED: list[Any] = [
    [12.5],
    {"cpu_utilization": 101},
    {"cpu_utilization": -0.5},
    {"cpu_utilization": "12"},
    {"ram_utilization": True},
    {"ram_utilization": None},
    {"load_average": 1.0},
    {"gpu_utilization": {"id": 0, "utilization": 5}},
    {"gpu_utilization": [7]},
    {"gpu_utilization": [{"id": 0}]},
    {"gpu_utilization": [{"id": 0, "utilization": 50, "temperature": 60}]},
    {"gpu_utilization": [{"id": -1, "utilization": 50}]},
    {"gpu_utilization": [{"id": 0, "utilization": 50, "memory_used": -5}]},
    {"gpu_utilization": [{"id": 0, "utilization": 5}, {"id": 0, "utilization": 6}]},
]


def test_utilization_is_parsed_bounded_and_optional() -> None:
    msg = parse(heartbeat(REPORT))
    assert isinstance(msg, Heartbeat) and msg.utilization is not None
    assert msg.utilization.reported() == {
        "cpu_utilization": 12.5,
        "ram_utilization": 40.0,
        "gpu_utilization": [{"id": 0, "utilization": 77.0, "memory_used": 2048}],
    }
    assert parse('{"type": "heartbeat"}') == Heartbeat(utilization=None)
    empty = parse(heartbeat({}))
    assert isinstance(empty, Heartbeat) and empty.utilization is not None
    assert empty.utilization.reported() is None  # {} reports nothing
    progress = parse(
        json.dumps(
            {"type": "task_progress", "task_id": 3, "progress": 5, "utilization": {"cpu_utilization": 0}}
        )
    )
    assert isinstance(progress, TaskProgress) and progress.utilization is not None
    assert progress.utilization.reported() == {"cpu_utilization": 0.0}
    for bad in MALFORMED:
        with pytest.raises(ProtocolError) as refused:
            parse(heartbeat(bad))
        assert refused.value.code == "invalid_message", bad
        assert "heartbeat.utilization" in refused.value.message, bad


# --- gunicorn (two web processes) and a Celery worker ---


def web_processes(port: int) -> set[str]:
    """The web processes (host:pid) holding the connected clients' sockets."""
    status, page = request(port, "GET", "/api/clients?status=active&per_page=100")
    assert status == 200, page
    return {c["session_info"]["web"] for c in page["items"] if c["connected"]}


@pytest.mark.usefixtures("clean")
def test_every_web_process_counts_the_clients_of_all_of_them(server: int) -> None:
    sockets: list[WsClient] = []
    try:

        def held_by_two_processes() -> bool:
            sockets.append(WsClient(server).register())
            return len(web_processes(server)) >= 2

        wait_for(held_by_two_processes, 60, 0, "sockets on both gunicorn workers")
        connected = len(sockets)
        for _ in range(8):  # each answer comes from either process
            assert healthz_clients(server) == connected
            assert api_metrics(server)["connected_clients"] == connected
            assert value(scrape(server), "aifarm_clients_connected") == connected
    finally:
        for c in sockets:
            c.close()
    wait_for(lambda: healthz_clients(server) == 0, what="no client connected")
    assert value(scrape(server), "aifarm_clients_connected") == 0


@pytest.fixture
def client_procs() -> Iterator[list[Proc]]:
    procs: list[Proc] = []
    yield procs
    for p in procs:
        p.stop()


@pytest.mark.usefixtures("clean")
def test_a_federated_task_shows_in_the_prometheus_metrics(
    server: int, run_dir: Path, prod_env: dict[str, str], client_procs: list[Proc], db: Database
) -> None:
    before = scrape(server)
    client_procs.extend(launch.start_clients(server, 2, run_dir, prod_env, run_dir / "procs"))
    status, task = request(
        server, "POST", "/api/tasks", {"type": "federated_training", "config": {**FAST, "rounds": 2}}
    )
    assert status == 201, task

    def completed() -> bool:
        status = request(server, "GET", f"/api/tasks/{task['id']}")[1]["status"]
        assert status not in ("failed", "error")
        return bool(status == "completed")

    wait_for(completed, 120, 0.3, f"task {task['id']} completed")
    after = scrape(server)

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    # Histograms observed by the Celery worker's pool processes, served by the web processes.
    for histogram in ("aifarm_round_duration_seconds", "aifarm_aggregation_seconds"):
        assert grew(f"{histogram}_count") == 2, histogram
        assert grew(f"{histogram}_bucket", le="+Inf") == 2, histogram
        assert grew(f"{histogram}_sum") > 0, histogram
    # Counts of state, from the database.
    assert value(after, "aifarm_tasks", status="completed") == 1
    assert value(after, "aifarm_tasks", status="running") == 0
    assert value(after, "aifarm_assignments", state="completed") == 4
    assert value(after, "aifarm_shards", state="done") == 4
    assert {"celery", "aggregation"} <= {
        s.labels["queue"] for s in after if s.name == "aifarm_celery_queue_length"
    }
    # WebSocket messages by direction and type.
    assert grew("aifarm_ws_messages_total", direction="in", type="register") >= 2
    assert grew("aifarm_ws_messages_total", direction="in", type="task_result") >= 4
    assert grew("aifarm_ws_messages_total", direction="in", type="task_progress") >= 4
    assert grew("aifarm_ws_messages_total", direction="in", type="heartbeat") >= 2
    assert grew("aifarm_ws_messages_total", direction="out", type="task") >= 4
    # HTTP latency by URL rule (never the raw path), and the bytes of the accepted updates.
    assert grew("aifarm_http_request_duration_seconds_count", method="GET", route=MODEL_ROUTE) >= 4
    assert grew("aifarm_http_request_duration_seconds_count", method="PUT", route=UPDATE_ROUTE) >= 4
    assert grew("aifarm_http_requests_total", method="PUT", route=UPDATE_ROUTE, status="201") == 4
    assert not any("/api/tasks/" in s.labels.get("route", "") and "<" not in s.labels["route"] for s in after)
    last_round = rows(
        db,
        "SELECT checkpoint_path FROM task_assignments "
        "WHERE task_id = :t AND round = 1 AND status = 'completed'",
        t=task["id"],
    )
    sizes = [(run_dir / "checkpoints" / path).stat().st_size for (path,) in last_round]
    assert len(sizes) == 2 and sizes[0] == sizes[1]  # one model: every update is the same size
    assert grew("aifarm_update_bytes_total") == 4 * sizes[0]
    # The reference clients report their CPU and RAM use (psutil; no GPU here).
    reports = wait_for(lambda: reported(server, 2), what="both clients' reports stored")
    assert all(0 <= r["cpu_utilization"] <= 100 and 0 < r["ram_utilization"] <= 100 for r in reports), reports
    assert all("gpu_utilization" not in r for r in reports), reports


def reported(port: int, clients: int) -> list[dict[str, Any]] | None:
    """The utilization every client reported, once ``clients`` clients have one (batched writes)."""
    status, page = request(port, "GET", "/api/clients?per_page=100")
    assert status == 200, page
    reports = [c["utilization"] for c in page["items"] if c["utilization"]]
    return reports if len(reports) == clients else None


@pytest.fixture
def reporter(server: int) -> Iterator[WsClient]:
    c = WsClient(server).register()
    yield c
    c.close()


@pytest.mark.usefixtures("clean")
def test_a_reported_utilization_shows_in_the_client_the_json_and_prometheus(
    server: int, reporter: WsClient
) -> None:
    cid = reporter.client_id
    assert cid is not None
    assert client_detail(server, cid)["utilization"] is None
    reporter.send(heartbeat(REPORT))
    shown = wait_for(lambda: client_detail(server, cid)["utilization"], what="the report stored")
    assert {k: v for k, v in shown.items() if k != "reported_at"} == {
        "cpu_utilization": 12.5,
        "ram_utilization": 40.0,
        "gpu_utilization": [{"id": 0, "utilization": 77.0, "memory_used": 2048}],
    }
    assert datetime.fromisoformat(shown["reported_at"].rstrip("Z")) <= datetime.utcnow()
    gpus = api_metrics(server)["gpu_utilization"]
    assert gpus == [{"client_id": cid, "id": 0, "utilization": 77.0, "memory_used": 2048}]
    samples = scrape(server)
    assert value(samples, "aifarm_client_cpu_utilization_percent", client_id=cid) == 12.5
    assert value(samples, "aifarm_client_ram_utilization_percent", client_id=cid) == 40.0
    assert value(samples, "aifarm_client_gpu_utilization_percent", client_id=cid, gpu="0") == 77.0
    assert value(samples, "aifarm_client_gpu_memory_used_bytes", client_id=cid, gpu="0") == 2048 * MIB

    # Malformed reports are refused, each with invalid_message, and change nothing.
    errors_before = value(samples, "aifarm_ws_errors_total", code="invalid_message")
    for bad in MALFORMED:
        reporter.send(heartbeat(bad))
        error = reporter.expect_error("invalid_message")
        assert "heartbeat.utilization" in error["message"], (bad, error)
    progress = {
        "type": "task_progress",
        "task_id": 999999,
        "progress": 5,
        "utilization": {"cpu_utilization": 500},
    }
    reporter.send(progress)  # refused as malformed before its task is even looked up
    assert "task_progress.utilization.cpu_utilization" in reporter.expect_error("invalid_message")["message"]
    flushed_after = datetime.utcnow() + timedelta(seconds=1)  # last_seen has whole seconds
    wait_for(
        lambda: datetime.fromisoformat(client_detail(server, cid)["last_seen"].rstrip("Z")) >= flushed_after,
        what="a batched flush after the refused reports",
    )
    assert client_detail(server, cid)["utilization"] == shown
    samples = scrape(server)
    assert value(samples, "aifarm_client_cpu_utilization_percent", client_id=cid) == 12.5
    assert (
        value(samples, "aifarm_ws_errors_total", code="invalid_message") - errors_before == len(MALFORMED) + 1
    )

    # A valid report in task_progress: refused along with the progress when the task is not
    # the client's; nothing is stored.
    reporter.send({**progress, "utilization": {"cpu_utilization": 99}})
    reporter.expect_error("unknown_task")
    reporter.send(heartbeat({"cpu_utilization": 55}))
    wait_for(
        lambda: client_detail(server, cid)["utilization"]["cpu_utilization"] == 55.0, what="the new report"
    )
    assert "gpu_utilization" not in client_detail(server, cid)["utilization"]  # the latest report, whole


def test_cpu_utilization_is_a_measurement_not_the_load_average(server: int) -> None:
    first = api_metrics(server)
    assert 0 <= first["cpu_utilization"] <= 100 and 0 < first["ram_utilization"] <= 100

    def agrees_with_psutil() -> bool:
        """Two requests on one keep-alive connection reach one web process; the second
        measures a fresh window inside the request, which the test measures around."""
        conn = http.client.HTTPConnection("127.0.0.1", server, timeout=10)
        headers = {"Authorization": f"Bearer {ADMIN}"}
        try:
            conn.request("GET", "/api/metrics", headers=headers)
            conn.getresponse().read()
            psutil.cpu_percent(interval=None)
            conn.request("GET", "/api/metrics", headers=headers)
            served = json.loads(conn.getresponse().read())["cpu_utilization"]
            measured = psutil.cpu_percent(interval=None)
        finally:
            conn.close()
        return abs(served - measured) <= 20

    wait_for(agrees_with_psutil, 30, 0.2, "the served CPU use within 20 points of psutil's")
    # All cores busy: a measurement says so at once (a load average would take a minute).
    burners = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 1)
    ]
    try:
        wait_for(lambda: api_metrics(server)["cpu_utilization"] >= 90, 20, 0.3, "CPU use of 90% or more")
    finally:
        for p in burners:
            p.kill()
            p.wait()


@pytest.fixture(scope="module")
def strict_server(prod_env: dict[str, str], worker: Proc, run_dir: Path) -> Iterator[int]:
    """A gunicorn with tight limits and a METRICS_DIR and METRICS_TOKEN of its own."""
    port = free_port()
    env = {
        **prod_env,
        "RATE_LIMIT": "3/minute",
        "WS_MESSAGES_PER_MINUTE": "4",
        "METRICS_DIR": str(run_dir / "metrics-strict"),
        "METRICS_TOKEN": "scrape-token",
    }
    proc = start_gunicorn(env, port, run_dir / "procs")
    yield port
    proc.stop()


@pytest.mark.usefixtures("clean")
def test_refusals_for_rate_are_counted(strict_server: int) -> None:
    assert request(strict_server, "GET", "/metrics", token=None)[0] == 401
    assert request(strict_server, "GET", "/metrics", token="wrong")[0] == 401
    statuses = [request(strict_server, "GET", "/api/tasks")[0] for _ in range(6)]
    refused = statuses.count(429)
    assert refused >= 3 and set(statuses) == {200, 429}, statuses
    c = WsClient(strict_server).register()  # one message of the 4 a minute
    try:
        for _ in range(7):
            c.send(heartbeat({"cpu_utilization": 1}))
        limited = [m for m in c.silent(1.0) if m.get("code") == "rate_limited"]
    finally:
        c.close()
    assert len(limited) >= 4, limited
    samples = scrape(strict_server, token="scrape-token")
    assert value(samples, "aifarm_rate_limited_total", route="/api/tasks") == refused
    assert value(samples, "aifarm_http_requests_total", route="/api/tasks", status="429") == refused
    assert value(samples, "aifarm_rate_limited_total", route="/ws") == len(limited)
    assert value(samples, "aifarm_ws_errors_total", code="rate_limited") == len(limited)
    assert value(samples, "aifarm_ws_messages_total", direction="in", type="heartbeat") == 7 - len(limited)
    # its own METRICS_DIR: the folders of the session's worker are not merged in
    assert "aifarm_round_duration_seconds_count" not in names(samples)


# --- embedded: one process, its own registry ---


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path]]:
    run_dir = tmp_path_factory.mktemp("embedded-metrics")
    port = free_port()
    proc = start_embedded(service_env(run_dir), port, run_dir / "procs")
    yield port, run_dir
    proc.stop()


def test_embedded_serves_metrics_from_its_one_process(embedded: tuple[int, Path]) -> None:
    port, run_dir = embedded
    samples = scrape(port)
    assert value(samples, "aifarm_clients_connected") == 0
    assert value(samples, "aifarm_database_up") == 1
    assert "aifarm_celery_queue_length" not in names(samples)  # no Redis: no queues to measure
    assert "process_cpu_seconds_total" in names(samples)  # the in-process registry's own collectors
    first = api_metrics(port)
    assert first["connected_clients"] == 0 and first["active_tasks"] == 0 and first["gpu_utilization"] == []
    assert 0 <= first["cpu_utilization"] <= 100 and 0 < first["ram_utilization"] <= 100
    procs = launch.start_clients(port, 2, run_dir, service_env(run_dir), run_dir / "procs")
    try:
        wait_for(lambda: healthz_clients(port) == 2, 60, 0.2, "two clients connected")
        status, task = request(
            port, "POST", "/api/tasks", {"type": "federated_training", "config": {**FAST, "rounds": 1}}
        )
        assert status == 201, task
        wait_for(
            lambda: request(port, "GET", f"/api/tasks/{task['id']}")[1]["status"] == "completed",
            120,
            0.3,
            "the embedded task completed",
        )
        samples = scrape(port)
        assert value(samples, "aifarm_round_duration_seconds_count") == 1  # observed by the in-process worker
        assert value(samples, "aifarm_aggregation_seconds_count") == 1
        assert (
            value(samples, "aifarm_http_requests_total", method="PUT", route=UPDATE_ROUTE, status="201") == 2
        )
        assert value(samples, "aifarm_tasks", status="completed") == 1
        wait_for(lambda: reported(port, 2), what="both clients' reports stored")
        assert api_metrics(port)["connected_clients"] == 2
        samples = scrape(port)
        assert len([s for s in samples if s.name == "aifarm_client_cpu_utilization_percent"]) == 2
    finally:
        for p in procs:
            p.stop()
