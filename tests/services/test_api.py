"""The admin REST API over gunicorn: auth, validation, limits, filters, pagination, transitions."""

from __future__ import annotations

import re

import pytest

from store.db import Database
from tests.conftest import rows
from tests.helpers import WsClient, request, wait_for

pytestmark = pytest.mark.usefixtures("clean")


def count_tasks(db: Database) -> int:
    return int(rows(db, "SELECT COUNT(*) FROM tasks")[0][0])


@pytest.mark.parametrize("token", [None, "wrong-token", ""])
@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/api/tasks"),
        ("POST", "/api/tasks"),
        ("GET", "/api/tasks/1"),
        ("PUT", "/api/tasks/1/status"),
        ("DELETE", "/api/tasks/1"),
        ("GET", "/api/clients"),
        ("GET", "/api/clients/c-1"),
        ("PUT", "/api/clients/c-1/status"),
        ("GET", "/api/metrics"),
        ("GET", "/api/tasks/1/model"),
    ],
)
def test_every_admin_route_needs_a_valid_bearer_token(
    server: int, db: Database, method: str, path: str, token: str | None
) -> None:
    status, body = request(server, method, path, {"type": "echo", "status": "paused"}, token=token)
    assert status == 401
    assert body["error"] == "unauthorized"
    assert count_tasks(db) == 0


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({}, "type is required"),
        ({"type": ""}, "type must be a name of letters"),
        ({"type": "bad type!"}, "type must be a name of letters"),
        ({"type": "echo", "priority": "high"}, "priority"),
        ({"type": "echo", "priority": 10**6}, "priority"),
        ({"type": "echo", "requirements": {"cpu_cores": -1}}, "requirements.cpu_cores"),
        ({"type": "echo", "requirements": {"ram_gb": "lots"}}, "requirements.ram_gb"),
        ({"type": "echo", "requirements": {"tpus": 1}}, "requirements has unknown keys tpus"),
        ({"type": "echo", "requirements": [1]}, "requirements must be an object"),
        ({"type": "echo", "config": {"num_shards": 0}}, "num_shards"),
        ({"type": "echo", "config": {"num_shards": 101}}, "MAX_CLIENTS"),
        ({"type": "echo", "config": "x"}, "config must be an object"),
        ({"type": "echo", "colour": "blue"}, "unknown field"),
        ({"type": "federated_training", "config": {"model": "gpt5"}}, "config.model"),
        ({"type": "federated_training", "config": {"dataset": "imagenet"}}, "config.dataset"),
        ({"type": "federated_training", "config": {"strategy": "vibes"}}, "strategy"),
        ({"type": "federated_training", "config": {"partition": "random"}}, "config.partition"),
        ({"type": "federated_training", "config": {"rounds": 0}}, "config.rounds"),
        ({"type": "federated_training", "config": {"lr": -0.1}}, "config.lr"),
        ({"type": "federated_training", "config": {"batch_size": 10**9}}, "config.batch_size"),
        ({"type": "federated_training", "config": {"num_shards": 4, "strategy": "krum"}}, "2f + 2"),
        (
            {
                "type": "federated_training",
                "config": {"num_shards": 4, "strategy": "trimmed_mean", "strategy_params": {"beta": 0.5}},
            },
            "beta",
        ),
        ({"type": "federated_training", "config": {"strategy": "fedavg", "strategy_params": {"f": 1}}}, "f"),
        ({"type": "federated_training", "config": {"strategy_params": {"noise_multiplier": 1.0}}}, "clip"),
    ],
)
def test_invalid_tasks_are_a_400_with_the_reason(server: int, db: Database, body: dict, needle: str) -> None:
    status, reply = request(server, "POST", "/api/tasks", body)
    assert status == 400, reply
    assert reply["error"] == "bad_request"
    assert needle in reply["message"]
    assert count_tasks(db) == 0


def test_a_body_that_is_not_json_is_a_400(server: int, db: Database) -> None:
    status, reply = request(
        server, "POST", "/api/tasks", raw=b"{not json", headers={"Content-Type": "text/plain"}
    )
    assert (status, reply["error"]) == (400, "bad_request")
    assert count_tasks(db) == 0


def test_a_body_over_the_limit_is_a_413(server: int, db: Database) -> None:
    big = {"type": "echo", "config": {"blob": "x" * (2 << 20)}}
    status, reply = request(server, "POST", "/api/tasks", big)
    assert status == 413
    assert reply["error"] == "too_large"
    assert count_tasks(db) == 0


def test_create_get_list_filter_and_paginate(server: int) -> None:
    made = []
    for i in range(5):
        status, task = request(
            server, "POST", "/api/tasks", {"type": "echo", "priority": i, "config": {"i": i}}
        )
        assert status == 201
        made.append(task)
    status, one = request(server, "GET", f"/api/tasks/{made[2]['id']}")
    assert status == 200 and one["config"] == {"i": 2, "num_shards": 1} and one["priority"] == 2

    status, page1 = request(server, "GET", "/api/tasks?per_page=2&page=1")
    status, page3 = request(server, "GET", "/api/tasks?per_page=2&page=3")
    assert page1["total"] == 5 and len(page1["items"]) == 2 and len(page3["items"]) == 1
    assert [t["id"] for t in page1["items"]] == [made[4]["id"], made[3]["id"]]  # newest first

    request(server, "PUT", f"/api/tasks/{made[0]['id']}/status", {"status": "stopped"})
    status, stopped = request(server, "GET", "/api/tasks?status=stopped")
    assert [t["id"] for t in stopped["items"]] == [made[0]["id"]]
    status, _ = request(server, "GET", "/api/tasks?status=bogus")
    assert status == 400
    status, _ = request(server, "GET", "/api/tasks?per_page=1000")
    assert status == 400


def test_unknown_ids_are_404(server: int) -> None:
    for method, path, body in [
        ("GET", "/api/tasks/999999", None),
        ("PUT", "/api/tasks/999999/status", {"status": "paused"}),
        ("DELETE", "/api/tasks/999999", None),
        ("GET", "/api/clients/c-nobody", None),
        ("PUT", "/api/clients/c-nobody/status", {"status": "disabled"}),
        ("GET", "/api/tasks/999999/model", None),
    ]:
        status, reply = request(server, method, path, body)
        assert status == 404, (method, path, reply)
        assert reply["message"]


def test_illegal_status_transitions_are_409(server: int) -> None:
    status, task = request(server, "POST", "/api/tasks", {"type": "echo"})
    path = f"/api/tasks/{task['id']}/status"
    status, reply = request(server, "PUT", path, {"status": "running"})  # not paused
    assert status == 409 and "pending" in reply["message"]
    assert request(server, "PUT", path, {"status": "stopped"})[0] == 200
    for target in ("paused", "running", "stopped"):
        status, reply = request(server, "PUT", path, {"status": target})
        assert status == 409, target
        assert reply["error"] == "conflict"
    status, reply = request(server, "PUT", path, {"status": "completed"})  # not an admin's to set
    assert status == 400


def test_clients_list_filter_and_detail(server: int) -> None:
    a, b = WsClient(server).register(), WsClient(server).register()
    try:
        status, listing = request(server, "GET", "/api/clients?status=active")
        assert status == 200 and {c["id"] for c in listing["items"]} == {a.client_id, b.client_id}
        assert all(c["connected"] for c in listing["items"])
        assert all("token" not in c and "token_hash" not in c for c in listing["items"])
        status, detail = request(server, "GET", f"/api/clients/{a.client_id}")
        assert detail["cpu_info"]["cores"] == 4 and detail["assignments"] == []
        status, reply = request(server, "PUT", f"/api/clients/{a.client_id}/status", {"status": "asleep"})
        assert status == 400 and "disabled, enabled" in reply["message"]
        assert request(server, "GET", "/api/clients?status=sleeping")[0] == 400
    finally:
        a.close()
        b.close()


def test_healthz_and_metrics(server: int) -> None:
    status, health = request(server, "GET", "/healthz", token=None)
    assert status == 200
    assert health == {**health, "status": "ok", "database": True, "broker": True, "mode": "production"}
    status, metrics = request(server, "GET", "/api/metrics")
    assert status == 200
    assert set(metrics) == {
        "cpu_utilization",
        "ram_utilization",
        "gpu_utilization",
        "active_tasks",
        "connected_clients",
    }


def test_the_openapi_document_matches_the_routes(server: int) -> None:
    status, doc = request(server, "GET", "/api/openapi.json", token=None)
    assert status == 200 and doc["openapi"].startswith("3.")
    from app import create_app

    app = create_app({"DATABASE_URL": "sqlite://", "REDIS_URL": ""})
    routes: dict[str, set[str]] = {}
    for rule in app.url_map.iter_rules():
        if rule.rule.startswith(("/api", "/admin/")) or rule.rule in ("/healthz", "/metrics"):
            path = re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule).replace("{round_no}", "{round}")
            routes.setdefault(path, set()).update(m.lower() for m in rule.methods - {"HEAD", "OPTIONS"})
    documented = {path: set(ops) for path, ops in doc["paths"].items()}
    assert documented == routes
    # the documented enums are the ones the code checks
    new_task = doc["components"]["schemas"]["NewTask"]["properties"]
    assert new_task["priority"]["minimum"] == -1000
    assert set(doc["components"]["schemas"]["Requirements"]["properties"]) == {
        "cpu_cores",
        "ram_gb",
        "gpu_count",
        "gpu_memory_gb",
    }


def test_the_dashboard_page_is_served(server: int) -> None:
    status, page = request(server, "GET", "/admin", token=None)
    assert status == 200 and b"<title>AI Farm</title>" in page
    assert b"/api/tasks" in page  # it drives the REST API with the token it is given


def test_the_access_log_records_requests(server: int, run_dir) -> None:  # type: ignore[no-untyped-def]
    request(server, "GET", "/api/tasks?marker=1")
    log = run_dir / "logs" / "access.log"
    wait_for(lambda: 'path="/api/tasks"' in log.read_text(), what="access log line")
    assert (run_dir / "logs" / "server.log").read_text()


def test_a_refused_field_is_named_in_the_error(server: int, db: Database) -> None:
    too_many = {"type": "echo", "requirements": {"cpu_cores": 5000}}
    status, body = request(server, "POST", "/api/tasks", too_many)
    assert status == 400, body
    assert body == {
        "error": "bad_request",
        "message": "requirements.cpu_cores must be an integer in 0..4096",
        "field": "requirements.cpu_cores",
    }
    status, body = request(server, "POST", "/api/tasks", {"type": "federated_training", "config": {"lr": 0}})
    assert (status, body["field"]) == (400, "config.lr"), body
    assert count_tasks(db) == 0
