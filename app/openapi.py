"""The OpenAPI document of the REST API, built from the same tables the validators use."""

from __future__ import annotations

import json
from typing import Any

from app import validation
from store.models import ASSIGNMENT_STATUSES, CLIENT_STATUSES, TASK_STATUSES
from training import spec


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref("Error")}}}


def _json(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _body(schema: dict[str, Any]) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": schema}}}


def _object(properties: dict[str, Any]) -> dict[str, Any]:
    """A JSON object with these properties, all required."""
    return {"type": "object", "required": list(properties), "properties": properties}


PERCENT = {"type": "number", "minimum": 0, "maximum": 100}
GPU_FIELDS: dict[str, Any] = {
    "id": {"type": "integer", "description": "the GPU's index on its client"},
    "utilization": PERCENT,
    "memory_used": {"type": "number", "description": "MiB"},
}
GPU_UTILIZATION = {"type": "object", "required": ["id", "utilization"], "properties": GPU_FIELDS}


def _page_of(item: str) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["items", "total", "page", "per_page"],
        "properties": {
            "items": {"type": "array", "items": _ref(item)},
            "total": {"type": "integer"},
            "page": {"type": "integer"},
            "per_page": {"type": "integer"},
        },
    }


# Requests: generated from the declarations in app/validation.py.
PAGE_PARAMS = validation.query_parameters(validation.PageQuery)
TASK_ID = validation.path_parameter("task_id")
CLIENT_ID = {"name": "client_id", "in": "path", "required": True, "schema": {"type": "string"}}
ROUND = validation.path_parameter("round")
RANK = validation.path_parameter("rank")
CLIENT_AUTH: list[dict[str, list[str]]] = [{"clientToken": [], "clientId": []}]
STRING = {"type": "string"}
EVENT_VIEWS = ("overview", "tasks", "task", "client")  # app/events.py VIEWS
BINARY = {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}


AUTH_ERRORS = {"401": _error("missing or invalid token"), "429": _error("rate limited")}


def _federated_config_schemas(shards_max: int) -> dict[str, Any]:
    """FederatedConfig and every strategy's parameters, from training/spec.py and
    aggregation/spec.py (the declarations that check them), as components."""
    schema = spec.federated_config_schema()
    text = json.dumps(schema).replace('"#/$defs/', '"#/components/schemas/')
    config = json.loads(text)
    components: dict[str, Any] = config.pop("$defs", {})
    config["properties"]["num_shards"]["maximum"] = min(
        config["properties"]["num_shards"]["maximum"], shards_max
    )
    return {**components, "FederatedConfig": config}


def document(max_clients: int = validation.MAX_SHARDS) -> dict[str, Any]:
    """The document; ``max_clients`` is this server's MAX_CLIENTS, which bounds num_shards."""
    shards_max = min(validation.MAX_SHARDS, max_clients)
    requests = validation.component_schemas()
    federated = _federated_config_schemas(shards_max)
    # This server's MAX_CLIENTS bounds num_shards (validation.new_task says so in its message).
    config = next(b for b in requests["NewTask"]["properties"]["config"]["anyOf"] if b["type"] == "object")
    config["properties"] = {"num_shards": {"type": "integer", "minimum": 1, "maximum": shards_max}}
    schemas: dict[str, Any] = {
        "Error": {
            "type": "object",
            "required": ["error", "message"],
            "properties": {
                "error": {"type": "string"},
                "message": {"type": "string"},
                "field": {
                    "type": "string",
                    "description": "the field at fault, when one is: requirements.cpu_cores",
                },
            },
        },
        **requests,
        **federated,
        "Task": {
            "type": "object",
            "properties": {
                "id": {"type": "integer"},
                "type": {"type": "string"},
                "status": {"enum": list(TASK_STATUSES)},
                "status_reason": {"type": ["string", "null"]},
                "priority": {"type": "integer"},
                "requirements": _ref("Requirements"),
                "config": {"type": "object"},
                "num_shards": {"type": "integer"},
                "current_round": {"type": "integer"},
                "client_id": {"type": ["string", "null"]},
                "result": {"type": ["object", "null"]},
                "error_log": {"type": ["string", "null"]},
                "checkpoint_path": {"type": ["string", "null"]},
                "created_at": {"type": "string", "format": "date-time"},
                "updated_at": {"type": "string", "format": "date-time"},
            },
        },
        "Assignment": {
            "type": "object",
            "properties": {
                "id": {"type": "integer"},
                "client_id": {"type": "string"},
                "round": {"type": "integer"},
                "rank": {"type": "integer"},
                "status": {"enum": list(ASSIGNMENT_STATUSES)},
                "progress": {"type": ["number", "null"]},
                "metrics": {"type": ["object", "null"]},
                "deadline_at": {"type": ["string", "null"], "format": "date-time"},
            },
        },
        "Client": {
            "type": "object",
            "properties": {
                "id": {"type": "string"},
                "status": {"enum": list(CLIENT_STATUSES)},
                "disabled": {"type": "boolean"},
                "connected": {"type": "boolean"},
                "cpu_info": {"type": "object"},
                "ram_info": {"type": "object"},
                "gpu_info": {"type": ["array", "null"]},
                "last_seen": {"type": "string", "format": "date-time"},
                "reliability": {
                    "type": "object",
                    "properties": {
                        "valid_results": {"type": "integer"},
                        "error_results": {"type": "integer"},
                        "timeouts": {"type": "integer"},
                        "refused_updates": {"type": "integer"},
                        "mean_turnaround_s": {"type": ["number", "null"]},
                        "throughput": {"type": ["number", "null"], "description": "examples/s"},
                        "score": {"type": "number", "description": "(valid + 1) / (finished + 2)"},
                        "task_quota": {"type": "integer", "description": "open assignments it may hold now"},
                    },
                },
                "utilization": {
                    "type": ["object", "null"],
                    "description": "the resource use it last reported (heartbeat, task_progress); "
                    "null before its first report",
                    "properties": {
                        "cpu_utilization": PERCENT,
                        "ram_utilization": PERCENT,
                        "gpu_utilization": {"type": "array", "items": GPU_UTILIZATION},
                        "reported_at": {"type": "string", "format": "date-time"},
                    },
                },
            },
        },
        "Metrics": _object(
            {
                "cpu_utilization": {**PERCENT, "description": "this server host's CPU use, measured"},
                "ram_utilization": {**PERCENT, "description": "this server host's RAM use"},
                "gpu_utilization": {
                    "type": "array",
                    "description": "each GPU the connected clients last reported",
                    "items": {
                        **GPU_UTILIZATION,
                        "properties": {**GPU_FIELDS, "client_id": {"type": "string"}},
                    },
                },
                "active_tasks": {"type": "integer", "description": "tasks running"},
                "connected_clients": {"type": "integer", "description": "on any web process"},
            }
        ),
    }
    admin: list[dict[str, list[str]]] = [{"adminToken": []}]
    paths: dict[str, Any] = {
        "/healthz": {
            "get": {
                "summary": "Whether the database and the broker answer, and how many clients are "
                "connected to any web process (no auth)",
                "security": [],
                "responses": {
                    "200": _json({"type": "object"}, "both reachable"),
                    "503": _json({"type": "object"}, "one of them is down"),
                },
            }
        },
        "/admin/login": {
            "post": {
                "summary": "Sign in to the admin panel with ADMIN_USERNAME and ADMIN_PASSWORD; the "
                "token it returns is an admin token until expires_at (ADMIN_SESSION_TTL)",
                "security": [],
                "requestBody": _body(_ref("SignIn")),
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "properties": {
                                "token": {"type": "string"},
                                "username": {"type": "string"},
                                "expires_at": {"type": "string", "format": "date-time"},
                            },
                        }
                    ),
                    "400": _error("not a JSON object with username and password strings"),
                    "401": _error("wrong username or password"),
                    "403": _error("password sign-in is off (ADMIN_PASSWORD not set)"),
                    "429": _error("too many attempts (ADMIN_LOGIN_RATE_LIMIT)"),
                },
            }
        },
        "/admin/logout": {
            "post": {
                "summary": "End a panel sign-in: its token stops working (API tokens are kept)",
                "responses": {
                    "200": _json({"type": "object", "properties": {"signed_out": {"type": "boolean"}}}),
                    **AUTH_ERRORS,
                },
            }
        },
        "/admin/events": {
            "get": {
                "summary": "The dashboard's push channel: server-sent events (text/event-stream), an "
                "event named after the view with what it shows (with follow=1, again whenever that "
                "changes in the database); outside RATE_LIMIT (docs/operations.md, 'Dashboard')",
                "parameters": [
                    {"name": "view", "in": "query", "schema": {"enum": list(EVENT_VIEWS)}},
                    {
                        "name": "id",
                        "in": "query",
                        "schema": {"type": "string", "maxLength": 255},
                        "description": "the task id (view=task) or client id (view=client)",
                    },
                    {"name": "status", "in": "query", "schema": {"enum": list(TASK_STATUSES)}},
                    {"name": "type", "in": "query", "schema": {"type": "string"}},
                    {
                        "name": "follow",
                        "in": "query",
                        "schema": {"enum": ["0", "1"], "default": "0"},
                        "description": "0: the current state as one event, then the end; 1: an event "
                        "again at every change, until the stream ends (after 10 minutes at most)",
                    },
                ],
                "responses": {
                    "200": {
                        "description": "the stream",
                        "content": {"text/event-stream": {"schema": STRING}},
                    },
                    "400": _error("an unknown view, or a view without its id"),
                    "404": _error("no such task or client"),
                    **AUTH_ERRORS,
                },
            }
        },
        "/api/openapi.json": {
            "get": {
                "summary": "This document",
                "security": [],
                "responses": {"200": _json({"type": "object"})},
            }
        },
        "/api/protocol.json": {
            "get": {
                "summary": "The WebSocket messages a client sends on /ws, as JSON Schema (docs/protocol.md)",
                "security": [],
                "responses": {"200": _json({"type": "object", "required": ["oneOf"]})},
            }
        },
        "/api/tasks": {
            "get": {
                "summary": "List tasks, newest first",
                "parameters": validation.query_parameters(validation.TaskQuery),
                "responses": {"200": _json(_page_of("Task")), "400": _error("bad filter"), **AUTH_ERRORS},
            },
            "post": {
                "summary": "Submit a task",
                "requestBody": _body(_ref("NewTask")),
                "responses": {
                    "201": _json(_ref("Task"), "created"),
                    "400": _error("invalid task"),
                    "413": _error("body too large"),
                    "503": _error("database or broker unavailable; nothing was written"),
                    **AUTH_ERRORS,
                },
            },
        },
        "/api/tasks/{task_id}": {
            "get": {
                "summary": "A task with its shards, recent assignments and rounds",
                "parameters": [TASK_ID],
                "responses": {"200": _json(_ref("Task")), "404": _error("no such task"), **AUTH_ERRORS},
            },
            "delete": {
                "summary": "Stop the task (its clients are told), then delete it and its files",
                "parameters": [TASK_ID],
                "responses": {
                    "200": _json({"type": "object"}),
                    "404": _error("no such task"),
                    "503": _error("the broker is down: nothing was changed"),
                    **AUTH_ERRORS,
                },
            },
        },
        "/api/tasks/{task_id}/status": {
            "put": {
                "summary": "Pause, resume (running) or stop a task",
                "parameters": [TASK_ID],
                "requestBody": _body(_ref("TaskStatusChange")),
                "responses": {
                    "200": _json(_ref("Task")),
                    "400": _error("unknown status"),
                    "404": _error("no such task"),
                    "409": _error("the task's current status does not allow it"),
                    "503": _error("the broker is down: nothing was changed"),
                    **AUTH_ERRORS,
                },
            }
        },
        "/api/tasks/{task_id}/model": {
            "get": {
                "summary": "The task's latest checkpoint (final model once completed), safetensors",
                "parameters": [TASK_ID],
                "responses": {
                    "200": {"description": "model bytes", "content": BINARY},
                    "404": _error("no such task or no checkpoint yet"),
                    **AUTH_ERRORS,
                },
            }
        },
        "/api/tasks/{task_id}/export": {
            "get": {
                "summary": "A completed task's final model as a torch.export program (.pt2): "
                "torch.export.load(path).module() maps raw inputs to logits (docs/training.md, 'Export')",
                "parameters": [TASK_ID],
                "responses": {
                    "200": {"description": "the .pt2 archive; header X-Checksum-Sha256", "content": BINARY},
                    "404": _error("no such task, not a completed federated task, or no export"),
                    **AUTH_ERRORS,
                },
            }
        },
        "/api/tasks/{task_id}/model-card": {
            "get": {
                "summary": "A completed task's model card: config, dataset, per-round metrics, final "
                "accuracy, the export's format and checksum",
                "parameters": [TASK_ID],
                "responses": {
                    "200": _json(
                        _object(
                            {
                                "task_id": {"type": "integer"},
                                "config": {"type": "object"},
                                "dataset": {"type": "object"},
                                "rounds": {"type": "array", "items": {"type": "object"}},
                                "final": {"type": "object"},
                                "export": {"type": "object"},
                            }
                        )
                    ),
                    "404": _error("no such task, or not a completed federated task"),
                    **AUTH_ERRORS,
                },
            }
        },
        "/api/tasks/{task_id}/rounds/{round}/model": {
            "get": {
                "summary": "The global model a round trains from, safetensors (its clients, or admin)",
                "security": [*CLIENT_AUTH, {"adminToken": []}],
                "parameters": [TASK_ID, ROUND],
                "responses": {
                    "200": {"description": "model bytes; header X-Checksum-Sha256", "content": BINARY},
                    "404": _error("no such task or round"),
                    "409": _error("the client holds no shard of that round"),
                    **AUTH_ERRORS,
                },
            }
        },
        "/api/tasks/{task_id}/rounds/{round}/updates/{rank}": {
            "put": {
                "summary": "Upload a client's trained model for its shard, safetensors",
                "security": CLIENT_AUTH,
                "parameters": [
                    TASK_ID,
                    ROUND,
                    RANK,
                    {
                        "name": "X-Num-Examples",
                        "in": "header",
                        "required": True,
                        "schema": {"type": "integer", "minimum": 1},
                    },
                ],
                "requestBody": {"required": True, "content": BINARY},
                "responses": {
                    "201": _json({"type": "object"}, "accepted"),
                    "200": _json({"type": "object"}, "already accepted (counted once)"),
                    "400": _error("not safetensors, wrong tensors, NaN/Inf, bad X-Num-Examples"),
                    "404": _error("no such task or round"),
                    "409": _error(
                        "not your shard, the round is over, or another copy was accepted (superseded)"
                    ),
                    "413": _error("over MAX_UPLOAD_SIZE"),
                    **AUTH_ERRORS,
                },
            }
        },
        "/api/clients": {
            "get": {
                "summary": "List clients",
                "parameters": validation.query_parameters(validation.ClientQuery),
                "responses": {"200": _json(_page_of("Client")), "400": _error("bad filter"), **AUTH_ERRORS},
            }
        },
        "/api/clients/{client_id}": {
            "get": {
                "summary": "A client with its open assignments",
                "parameters": [CLIENT_ID],
                "responses": {"200": _json(_ref("Client")), "404": _error("no such client"), **AUTH_ERRORS},
            }
        },
        "/api/clients/{client_id}/status": {
            "put": {
                "summary": "Disable a client (no work; its assignments are released) or enable it",
                "parameters": [CLIENT_ID],
                "requestBody": _body(_ref("ClientStatusChange")),
                "responses": {
                    "200": _json(_ref("Client")),
                    "400": _error("unknown status"),
                    "404": _error("no such client"),
                    "503": _error("the broker is down: nothing was changed"),
                    **AUTH_ERRORS,
                },
            }
        },
        "/api/metrics": {
            "get": {
                "summary": "Server CPU/RAM use, the clients' GPU use, active tasks, connected clients",
                "responses": {"200": _json(_ref("Metrics")), **AUTH_ERRORS},
            }
        },
        "/metrics": {
            "get": {
                "summary": 'Prometheus metrics, text format (docs/operations.md, "Metrics"); '
                "open unless METRICS_TOKEN is set",
                "security": [{}, {"metricsToken": []}],
                "responses": {
                    "200": {
                        "description": "Prometheus text exposition format 0.0.4",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    },
                    "401": _error("METRICS_TOKEN is set and the request does not carry it"),
                },
            }
        },
    }
    schemas.update(TOKEN_SCHEMAS)
    paths.update(token_and_audit_paths())
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "AI Farm server",
            "version": "1.0",
            "description": "Admin REST API and client model exchange. The client WebSocket at /ws "
            "is described in docs/protocol.md.",
        },
        "security": admin,
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "adminToken": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "ADMIN_TOKEN or a stored token",
                },
                "clientToken": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "the token from 'registered'",
                },
                "clientId": {"type": "apiKey", "in": "header", "name": "X-Client-Id"},
                "metricsToken": {"type": "http", "scheme": "bearer", "description": "METRICS_TOKEN"},
            },
        },
    }


DATE_TIME = {"type": "string", "format": "date-time"}
NULLABLE_DATE_TIME = {"type": ["string", "null"], "format": "date-time"}
TOKEN_FIELDS: dict[str, Any] = {
    "id": {"type": "integer"},
    "label": {"type": "string"},
    "kind": {"enum": ["api", "panel"], "description": "panel: a sign-in (label panel:<user>)"},
    "created_at": DATE_TIME,
    "expires_at": NULLABLE_DATE_TIME,
    "last_used_at": {**NULLABLE_DATE_TIME, "description": "refreshed at most once a minute"},
    "expired": {"type": "boolean"},
}
TOKEN_SCHEMAS: dict[str, Any] = {
    "AdminToken": _object(TOKEN_FIELDS),
    "AuditEntry": _object(
        {
            "id": {"type": "integer"},
            "at": DATE_TIME,
            "actor": {
                "type": "string",
                "description": "token:<id>, user:<name>, env (ADMIN_TOKEN), anonymous",
            },
            "action": {"type": "string"},
            "target": {"type": ["string", "null"], "description": "task:<id>, client:<id>, token:<id>"},
            "detail": {"type": ["object", "null"], "description": "what was asked, and http_status"},
            "remote": {"type": ["string", "null"]},
        }
    ),
}


def token_and_audit_paths() -> dict[str, Any]:
    """Admin tokens, client token rotation and revocation, the audit log (app/admin_api.py)."""
    token_id = {"name": "token_id", "in": "path", "required": True, "schema": {"type": "integer"}}
    secret = {"type": "string", "description": "the secret, shown only in this answer"}
    client_token = {
        "client_id": {"type": "string"},
        "disconnected": {"type": "boolean", "description": "it was connected: its socket is closed"},
    }
    return {
        "/api/tokens": {
            "get": {
                "summary": "List stored admin tokens (never their secrets)",
                "responses": {
                    "200": _json(_object({"items": {"type": "array", "items": _ref("AdminToken")}})),
                    **AUTH_ERRORS,
                },
            },
            "post": {
                "summary": "Create an admin API token; its secret is shown once",
                "requestBody": {**_body(_ref("NewAdminToken")), "required": False},
                "responses": {
                    "201": _json(_object({**TOKEN_FIELDS, "token": secret}), "created"),
                    "400": _error("bad label or expires_in"),
                    **AUTH_ERRORS,
                },
            },
        },
        "/api/tokens/{token_id}": {
            "delete": {
                "summary": "Revoke an admin token: the next request with it is a 401, in every process",
                "parameters": [token_id],
                "responses": {
                    "200": _json(_object({"revoked": {"type": "integer"}})),
                    "404": _error("no such token"),
                    **AUTH_ERRORS,
                },
            }
        },
        "/api/clients/{client_id}/token": {
            "post": {
                "summary": "Rotate a client's token: a new secret, shown once; the old one stops "
                "working and a connected client is disconnected",
                "parameters": [CLIENT_ID],
                "responses": {
                    "200": _json(_object({**client_token, "token": secret})),
                    "404": _error("no such client"),
                    **AUTH_ERRORS,
                },
            },
            "delete": {
                "summary": "Revoke a client's token: it is disconnected and must register afresh",
                "parameters": [CLIENT_ID],
                "responses": {
                    "200": _json(_object({**client_token, "revoked": {"type": "boolean"}})),
                    "404": _error("no such client"),
                    **AUTH_ERRORS,
                },
            },
        },
        "/api/audit": {
            "get": {
                "summary": "The audit log: admin writes and panel sign-ins, newest first",
                "parameters": PAGE_PARAMS,
                "responses": {
                    "200": _json(_page_of("AuditEntry")),
                    "400": _error("bad page"),
                    **AUTH_ERRORS,
                },
            }
        },
    }
