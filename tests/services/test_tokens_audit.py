"""Token lifecycle, the audit log and honest rate-limit keys (issue 11: "no door left open").

Against gunicorn with two web processes on MariaDB and Redis (``server``): admin tokens are
created, listed, used, revoked and expired; client tokens are rotated and revoked with real
WebSocket clients; every admin write leaves an audit row and a server.log line. A gunicorn
with a low CLIENT_RATE_LIMIT shows that a forged ``X-Client-Id`` spends the forger's budget,
not the victim's.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import websocket

from store.db import Database
from tests.conftest import ADMIN_PASSWORD, rows
from tests.helpers import Proc, WsClient, free_port, request, start_gunicorn, wait_for

pytestmark = pytest.mark.usefixtures("clean")

MODEL = "/api/tasks/1/rounds/0/model"  # a model-exchange route: 409 for a client holding no shard


def audit(port: int, per_page: int = 50) -> list[dict[str, Any]]:
    status, page = request(port, "GET", f"/api/audit?per_page={per_page}")
    assert status == 200, page
    return list(page["items"])


def audited(port: int, action: str, target: str | None) -> dict[str, Any]:
    """The newest audit row of ``action`` on ``target``."""
    for entry in audit(port):
        if entry["action"] == action and entry["target"] == target:
            return entry
    raise AssertionError(f"no audit row {action} {target}: {audit(port)}")


def new_token(port: int, **body: Any) -> dict[str, Any]:
    status, reply = request(port, "POST", "/api/tokens", body)
    assert status == 201, reply
    return dict(reply)


def closed_within(ws: WsClient, seconds: float) -> list[dict[str, Any]]:
    """The messages the server sent before closing the socket, which it must do in time."""
    got: list[dict[str, Any]] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            got.append(ws.recv(timeout=max(0.1, deadline - time.monotonic())))
        except websocket.WebSocketConnectionClosedException:
            return got
        except websocket.WebSocketTimeoutException:
            break
    raise AssertionError(f"the socket was not closed within {seconds}s; got {got}")


def register_with(port: int, client_id: str, token: str) -> dict[str, Any]:
    """The answer to a ``register`` with this id and token (``registered`` or an ``error``)."""
    ws = WsClient(port)
    try:
        ws.send({"type": "register", **WsClient.HARDWARE, "client_id": client_id, "token": token})
        return ws.recv()
    finally:
        ws.close()


# --- admin tokens ---


def test_an_admin_token_is_created_listed_used_and_revoked_in_every_process(server: int) -> None:
    created = new_token(server, label="ci deploy")
    secret, token_id = created["token"], created["id"]
    assert created["label"] == "ci deploy" and created["kind"] == "api" and created["expires_at"] is None

    for _ in range(6):  # new connections: both gunicorn workers answer some
        assert request(server, "GET", "/api/tasks", token=secret)[0] == 200
    status, listed = request(server, "GET", "/api/tokens")
    assert status == 200
    mine = [t for t in listed["items"] if t["id"] == token_id]
    assert len(mine) == 1 and mine[0]["last_used_at"] is not None
    assert set(mine[0]) == {"id", "label", "kind", "created_at", "expires_at", "last_used_at", "expired"}
    assert secret not in str(listed)

    status, reply = request(server, "DELETE", f"/api/tokens/{token_id}")
    assert (status, reply) == (200, {"revoked": token_id})
    answers = [request(server, "GET", "/api/tasks", token=secret) for _ in range(10)]
    assert {(s, r["error"]) for s, r in answers} == {(401, "unauthorized")}, answers
    assert request(server, "GET", "/api/tokens", token=secret)[0] == 401
    assert token_id not in [t["id"] for t in request(server, "GET", "/api/tokens")[1]["items"]]

    assert audited(server, "token_create", f"token:{token_id}")["detail"]["label"] == "ci deploy"
    revoked = audited(server, "token_revoke", f"token:{token_id}")
    assert revoked["actor"] == "env" and revoked["remote"] == "127.0.0.1"
    assert revoked["detail"]["http_status"] == 200


def test_a_token_made_by_a_token_is_audited_under_its_maker(server: int) -> None:
    maker = new_token(server, label="maker")
    status, made = request(server, "POST", "/api/tokens", {"label": "made"}, token=maker["token"])
    assert status == 201
    assert audited(server, "token_create", f"token:{made['id']}")["actor"] == f"token:{maker['id']}"
    for token_id in (made["id"], maker["id"]):
        assert request(server, "DELETE", f"/api/tokens/{token_id}")[0] == 200


def test_an_expiring_token_works_then_is_refused(server: int) -> None:
    created = new_token(server, label="short", expires_in=3)
    assert created["expires_at"] is not None and created["expired"] is False
    assert request(server, "GET", "/api/tasks", token=created["token"])[0] == 200
    _status, reply = wait_for(
        lambda: (a := request(server, "GET", "/api/tasks", token=created["token"]))[0] == 401 and a,
        15,
        0.2,
        "the token to expire",
    )
    assert reply["error"] == "unauthorized"
    listed = {t["id"]: t for t in request(server, "GET", "/api/tokens")[1]["items"]}
    assert listed[created["id"]]["expired"] is True
    assert request(server, "DELETE", f"/api/tokens/{created['id']}")[0] == 200


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"not json", "JSON object"),
        (b"[1, 2]", "JSON object"),
        (b'{"label": 5}', "label"),
        (b'{"label": ""}', "label"),
        (b'{"label": "panel:admin"}', "panel:"),
        (b'{"expires_in": 0}', "expires_in"),
        (b'{"expires_in": "60"}', "expires_in"),
        (b'{"expires_in": true}', "expires_in"),
        (b'{"expires_in": 1.5}', "expires_in"),
        (b'{"secret": "mine"}', "unknown field(s): secret"),
    ],
)
def test_a_malformed_token_request_is_a_400_with_the_reason(server: int, body: bytes, reason: str) -> None:
    status, reply = request(
        server, "POST", "/api/tokens", raw=body, headers={"Content-Type": "application/json"}
    )
    assert status == 400 and reply["error"] == "bad_request" and reason in reply["message"], reply


def test_unknown_ids_are_404_and_wrong_tokens_401(server: int) -> None:
    status, reply = request(server, "DELETE", "/api/tokens/987654321")
    assert (status, reply["error"]) == (404, "not_found") and "987654321" in reply["message"]
    for method, path in [
        ("POST", "/api/clients/c-nobody/token"),
        ("DELETE", "/api/clients/c-nobody/token"),
    ]:
        status, reply = request(server, method, path)
        assert (status, reply["error"]) == (404, "not_found"), (method, reply)
    for method, path in [
        ("GET", "/api/tokens"),
        ("POST", "/api/tokens"),
        ("DELETE", "/api/tokens/1"),
        ("POST", "/api/clients/c-nobody/token"),
        ("DELETE", "/api/clients/c-nobody/token"),
        ("GET", "/api/audit"),
    ]:
        assert request(server, method, path, token="wrong")[0] == 401, (method, path)
        assert request(server, method, path, token=None)[0] == 401, (method, path)
    assert request(server, "GET", "/api/audit?page=0")[0] == 400


# --- client tokens ---


def test_a_rotated_client_token_disconnects_and_only_the_new_one_registers(server: int) -> None:
    client = WsClient(server).register()
    assert client.client_id and client.token
    old = client.token
    assert request(server, "GET", MODEL, token=old, headers={"X-Client-Id": client.client_id})[0] == 409

    status, reply = request(server, "POST", f"/api/clients/{client.client_id}/token")
    assert status == 200 and reply["disconnected"] is True and reply["token"] != old
    try:
        sent = closed_within(client, 10)
        assert any(m.get("code") == "superseded" for m in sent), sent
    finally:
        client.close()

    refused = register_with(server, client.client_id, old)
    assert (refused["type"], refused.get("code")) == ("error", "auth_failed"), refused
    headers = {"X-Client-Id": client.client_id}
    assert request(server, "GET", MODEL, token=old, headers=headers)[0] == 401
    assert register_with(server, client.client_id, reply["token"]) == {
        "type": "registered",
        "client_id": client.client_id,
    }
    assert request(server, "GET", MODEL, token=reply["token"], headers=headers)[0] == 409

    entry = audited(server, "client_token_rotate", f"client:{client.client_id}")
    assert entry["detail"] == {"disconnected": True, "http_status": 200}
    assert reply["token"] not in str(audit(server))


def test_a_client_rotates_its_own_token_and_keeps_its_connection(server: int) -> None:
    client = WsClient(server).register()
    assert client.client_id and client.token
    old, headers = client.token, {"X-Client-Id": client.client_id}
    client.send({"type": "rotate_token"})
    rotated = client.expect("token_rotated")
    assert rotated["client_id"] == client.client_id and rotated["token"] not in (old, None)
    try:
        client.request_task()  # the connection is still registered: a request is taken, no error
        client.send({"type": "task_progress", "task_id": 999999, "progress": 1})
        client.expect_error("unknown_task")
    finally:
        client.close()
    refused = register_with(server, client.client_id, old)
    assert (refused["type"], refused.get("code")) == ("error", "auth_failed"), refused
    assert request(server, "GET", MODEL, token=old, headers=headers)[0] == 401
    assert register_with(server, client.client_id, rotated["token"])["type"] == "registered"
    assert request(server, "GET", MODEL, token=rotated["token"], headers=headers)[0] == 409
    entry = audited(server, "client_token_rotate", f"client:{client.client_id}")
    assert entry["actor"] == f"client:{client.client_id}" and entry["detail"] == {"by": "the client itself"}
    assert rotated["token"] not in str(audit(server))


def test_rotate_token_before_register_is_refused(server: int) -> None:
    ws = WsClient(server)
    try:
        ws.send({"type": "rotate_token"})
        ws.expect_error("not_registered")
    finally:
        ws.close()


def test_a_revoked_client_token_means_registering_afresh(server: int) -> None:
    client = WsClient(server).register()
    assert client.client_id and client.token
    status, reply = request(server, "DELETE", f"/api/clients/{client.client_id}/token")
    assert status == 200 and reply == {"client_id": client.client_id, "revoked": True, "disconnected": True}
    try:
        closed_within(client, 10)
    finally:
        client.close()
    refused = register_with(server, client.client_id, client.token)
    assert (refused["type"], refused.get("code")) == ("error", "auth_failed"), refused
    fresh = WsClient(server).register()
    try:
        assert fresh.client_id != client.client_id and fresh.token
    finally:
        fresh.close()
    # revoking again (not connected now) is fine, and a rotation gives the id back a token
    assert request(server, "DELETE", f"/api/clients/{client.client_id}/token")[1]["disconnected"] is False
    status, rotated = request(server, "POST", f"/api/clients/{client.client_id}/token")
    assert status == 200 and rotated["disconnected"] is False
    assert register_with(server, client.client_id, rotated["token"])["type"] == "registered"
    assert audited(server, "client_token_revoke", f"client:{client.client_id}")["actor"] == "env"


# --- the audit log ---


def test_every_admin_write_and_sign_in_is_audited(server: int, run_dir: Path, db: Database) -> None:
    status, task = request(server, "POST", "/api/tasks", {"type": "echo", "config": {"num_shards": 1}})
    assert status == 201, task
    target = f"task:{task['id']}"
    assert request(server, "PUT", f"/api/tasks/{task['id']}/status", {"status": "paused"})[0] == 200
    assert request(server, "PUT", f"/api/tasks/{task['id']}/status", {"status": "bogus"})[0] == 400
    assert request(server, "DELETE", f"/api/tasks/{task['id']}")[0] == 200
    client = WsClient(server).register()
    try:
        assert (
            request(server, "PUT", f"/api/clients/{client.client_id}/status", {"status": "disabled"})[0]
            == 200
        )
    finally:
        client.close()
    assert (
        request(server, "POST", "/admin/login", {"username": "admin", "password": "nope"}, token=None)[0]
        == 401
    )
    status, session = request(
        server, "POST", "/admin/login", {"username": "admin", "password": ADMIN_PASSWORD}, token=None
    )
    assert status == 200
    assert request(server, "POST", "/admin/logout", token=session["token"])[0] == 200
    assert request(server, "PUT", "/api/tasks/1/status", {"status": "paused"}, token="wrong")[0] == 401

    created = audited(server, "task_create", target)
    assert (created["actor"], created["detail"]) == ("env", {"type": "echo", "http_status": 201})
    statuses = [e["detail"] for e in audit(server) if (e["action"], e["target"]) == ("task_status", target)]
    assert statuses == [{"status": "bogus", "http_status": 400}, {"status": "paused", "http_status": 200}]
    assert audited(server, "task_delete", target)["detail"] == {"http_status": 200}
    assert audited(server, "client_status", f"client:{client.client_id}")["detail"]["status"] == "disabled"
    entries = audit(server)
    failed = next(e for e in entries if e["action"] == "sign_in_failed")
    assert (failed["actor"], failed["detail"]) == ("anonymous", {"username": "admin", "http_status": 401})
    signed_in = next(e for e in entries if e["action"] == "sign_in")
    signed_out = next(e for e in entries if e["action"] == "sign_out")
    assert signed_in["actor"] == signed_out["actor"] == "user:admin"
    assert signed_in["id"] < signed_out["id"] and entries == sorted(entries, key=lambda e: -e["id"])
    # a write refused for its token is not an admin's act: no row, and nothing was written
    assert rows(db, "SELECT COUNT(*) FROM audit_log WHERE target = 'task:1' AND actor = 'anonymous'") == [
        (0,)
    ]

    log = (run_dir / "logs" / "server.log").read_text()
    assert f"event=audit action=task_delete actor=env target={target} status=200 remote=127.0.0.1" in log
    assert "event=audit action=sign_in_failed actor=anonymous target=- status=401" in log


def test_the_audit_log_pages_newest_first(server: int) -> None:
    for label in ("page-a", "page-b", "page-c"):
        new_token(server, label=label)
    status, first = request(server, "GET", "/api/audit?per_page=2")
    assert status == 200 and len(first["items"]) == 2 and first["total"] >= 3
    status, second = request(server, "GET", "/api/audit?page=2&per_page=2")
    assert (
        first["items"][0]["detail"]["label"] == "page-c" and first["items"][1]["detail"]["label"] == "page-b"
    )
    assert second["items"][0]["detail"]["label"] == "page-a"
    for t in request(server, "GET", "/api/tokens")[1]["items"]:
        if t["label"].startswith("page-"):
            request(server, "DELETE", f"/api/tokens/{t['id']}")


# --- honest rate-limit keys ---


@pytest.fixture(scope="module")
def strict(prod_env: dict[str, str], worker: Proc, run_dir: Path) -> Iterator[int]:
    """A gunicorn whose model exchange allows 5 requests a minute."""
    port = free_port()
    proc = start_gunicorn({**prod_env, "CLIENT_RATE_LIMIT": "5/minute"}, port, run_dir / "procs")
    yield port
    proc.stop()


def test_a_forged_client_id_spends_the_forgers_budget_not_the_victims(strict: int) -> None:
    victim = WsClient(strict).register()
    try:
        assert victim.client_id and victim.token
        forged = {"X-Client-Id": victim.client_id}
        spent = [request(strict, "GET", MODEL, token="wrong", headers=forged)[0] for _ in range(7)]
        assert spent == [401] * 5 + [429] * 2, spent
        # made-up ids from the same address escape nothing
        assert request(strict, "GET", MODEL, token="wrong", headers={"X-Client-Id": "c-other"})[0] == 429
        # the victim, from that same address, has its whole budget: 5, and then its own 429
        mine = {"X-Client-Id": victim.client_id}
        answers = [request(strict, "GET", MODEL, token=victim.token, headers=mine)[0] for _ in range(6)]
        assert answers == [409] * 5 + [429], answers
    finally:
        victim.close()
