"""Each attack a test (issue 11, "no door left open"), on gunicorn with two web processes on
MariaDB and Redis and a real Celery worker (``server``) unless a test says otherwise.

- the central-DP noise cannot be regenerated from what a client receives, and an admin
  reproduces it from the stored secret;
- every protected endpoint, enumerated from the Flask URL map, refuses a missing, wrong,
  expired and revoked token;
- a client cannot act on another client's assignment, nor spend its budget;
- the admin limit is shared by both web processes and its 429 says when to come back;
- behind a configured proxy the address comes from X-Forwarded-For, and only then;
- a browser's WebSocket handshake from a foreign origin is refused;
- security events reach audit.log without secrets;
- a task with no model yet is a 404 with a reason, and downloads serve the stored digest.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import itertools
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load as load_st
from sqlalchemy import text

from store.db import Database
from tests.conftest import rows
from tests.helpers import ADMIN, ROOT, Proc, WsClient, free_port, request, start_gunicorn, wait_for
from tests.services.test_federated import start_clients, submit, wait_status

pytestmark = pytest.mark.usefixtures("clean")


# --- DP noise: a per-task server secret ---


@pytest.fixture
def client_procs() -> Iterator[list[Proc]]:
    procs: list[Proc] = []
    yield procs
    for p in procs:
        p.stop()


def rerun_round(run_dir: Path, db: Database, task: dict[str, Any], round_no: int, round_seed: int) -> Any:
    """Aggregate round ``round_no`` of ``task`` again here, from its files, with ``round_seed``."""
    import aggregation
    from training import shard_size

    ck = run_dir / "checkpoints"
    updates = [
        aggregation.UpdateFile(str(ck / path), n, shard_size(task["config"], rank), str(aid))
        for aid, rank, path, n in rows(
            db,
            "SELECT id, `rank`, checkpoint_path, num_examples FROM task_assignments "
            "WHERE task_id = :t AND round = :r AND status = 'completed' ORDER BY `rank`, id",
            t=task["id"],
            r=round_no,
        )
    ]
    cfg = task["config"]
    result = aggregation.build_strategy(cfg["strategy"], cfg["strategy_params"]).run_round(
        str(ck / f"tasks/{task['id']}/round-{round_no:05d}/global.safetensors"),
        updates,
        round_seed=round_seed,
        max_slice_bytes=65536,  # the server's AGGREGATION_SLICE_BYTES (conftest.prod_env)
    )
    assert result.params is not None
    return result.params


def test_the_dp_noise_is_not_reproducible_from_what_a_client_receives(
    server: int, run_dir: Path, prod_env: dict[str, str], client_procs: list[Proc], db: Database
) -> None:
    from aggregation.seeds import secret_round_seed

    client_procs.extend(start_clients(server, run_dir, 2, prod_env))
    params = {"clip_norm": 0.5, "noise_multiplier": 1.0, "seed": 5}
    task = submit(server, rounds=1, strategy="fedavg", strategy_params=params)
    done = wait_status(server, task["id"], "completed")
    [(metrics,)] = rows(db, "SELECT metrics FROM task_rounds WHERE task_id = :t AND round = 0", t=task["id"])
    report = json.loads(metrics)["report"]
    assert report["noise_std"] > 0, report
    served = load_st((run_dir / "checkpoints" / done["checkpoint_path"]).read_bytes())

    # Everything a client is told of the task is its config (the `task` message sends nothing
    # else that is random): every seed derived from it gives other noise than the server's.
    seed = done["config"]["strategy_params"]["seed"]
    for guess in (seed, seed * 1_000_003, 0):
        guessed = rerun_round(run_dir, db, done, 0, guess)
        assert any(not torch.equal(guessed[name], served[name]) for name in served), guess

    # The admin, with the secret stored in the database, gets the server's round bit for bit.
    [(secret,)] = rows(db, "SELECT noise_secret FROM tasks WHERE id = :t", t=task["id"])
    assert secret is not None and 0 <= secret < 2**63
    again = rerun_round(run_dir, db, done, 0, secret_round_seed(secret, 0))
    assert set(again) == set(served)
    for name in served:
        assert torch.equal(again[name], served[name]), name

    # and the secret is in no answer a client or an admin gets, nor in any process's log
    for path in (f"/api/tasks/{task['id']}", f"/api/tasks/{task['id']}/model-card"):
        status, answer = request(server, "GET", path)
        assert status == 200 and str(secret) not in str(answer), path
    for log in (run_dir / "procs").glob("*"):
        if log.is_file():
            assert str(secret) not in log.read_text(errors="replace"), log
    for log in (run_dir / "logs").glob("*.log"):
        assert str(secret) not in log.read_text(errors="replace"), log


# --- a gunicorn behind one configured proxy ---

LOGIN_LIMIT = 3  # sign-in attempts a minute on the proxied server
PANEL_ORIGIN = "https://panel.example"
_addresses = itertools.count(1)


def via(address: str | None = None) -> dict[str, str]:
    """The header a reverse proxy adds: a fresh documentation address unless one is given."""
    if address is None:
        n = next(_addresses)
        address = f"198.18.{n // 250}.{n % 250 + 1}"
    return {"X-Forwarded-For": address}


@pytest.fixture(scope="module")
def proxied(prod_env: dict[str, str], worker: Proc, run_dir: Path) -> Iterator[int]:
    """gunicorn (two web processes) told that one proxy stands in front of it (PROXY_HOPS=1),
    with the default admin limit (60/minute), a low sign-in limit and one allowed origin."""
    port = free_port()
    env = {
        **prod_env,
        "PROXY_HOPS": "1",
        "RATE_LIMIT": "60/minute",
        "ADMIN_LOGIN_RATE_LIMIT": f"{LOGIN_LIMIT}/minute",
        "WS_ALLOWED_ORIGINS": PANEL_ORIGIN,
    }
    proc = start_gunicorn(env, port, run_dir / "procs", workers=2)
    yield port
    proc.stop()


def audit_lines(run_dir: Path, *needles: str) -> list[str]:
    """The lines of LOG_DIR/audit.log that contain every needle."""
    text = (run_dir / "logs" / "audit.log").read_text()
    return [line for line in text.splitlines() if all(n in line for n in needles)]


# --- every protected endpoint, from the URL map ---

#: Endpoints anyone may call: each is public on purpose (docs/security.md, "Who can do what").
#: Every other endpoint of the URL map must refuse a missing, wrong, expired or revoked token.
PUBLIC = {
    "healthz",  # load balancers
    "openapi_json",  # the API's description
    "protocol_json",  # the WebSocket messages' description
    "prometheus_metrics",  # open unless METRICS_TOKEN is set (tested in test_metrics)
    "static",  # the panel's files
    "dashboard.index",  # the panel's page: it signs in through the API
    "dashboard.admin_page",
    "admin_session.login",  # sign-in: a password, rate limited per address
    "ws",  # clients authenticate in their register message
}

URL_MAP = """
import json, sys, tempfile
from app import create_app
d = tempfile.mkdtemp()
dirs = {"DATA_DIR": d, "LOG_DIR": d + "/logs", "CHECKPOINT_DIR": d + "/ck", "METRICS_DIR": d + "/m"}
app = create_app(dirs)
rules = [
    {"endpoint": r.endpoint, "rule": r.rule, "methods": sorted(r.methods - {"HEAD", "OPTIONS"}),
     "args": {a: type(c).__name__ for a, c in r._converters.items()}}
    for r in app.url_map.iter_rules()
]
json.dump(rules, sys.stdout)
"""

SAMPLE = {"IntegerConverter": "1", "UnicodeConverter": "c-nobody", "PathConverter": "x"}


def url_map() -> list[dict[str, Any]]:
    """The app's routes, read from a fresh ``create_app()`` in its own process."""
    done = subprocess.run(
        [sys.executable, "-c", URL_MAP], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return list(json.loads(done.stdout))


def sample_path(rule: dict[str, Any]) -> str:
    path = str(rule["rule"])
    for arg, converter in rule["args"].items():
        path = re.sub(rf"<(?:[a-z]+:)?{arg}>", SAMPLE[converter], path)
    return path


def test_every_protected_endpoint_refuses_missing_wrong_expired_and_revoked_tokens(proxied: int) -> None:
    rules = url_map()
    endpoints = {r["endpoint"] for r in rules}
    assert endpoints >= PUBLIC, f"public endpoints gone from the URL map: {PUBLIC - endpoints}"
    protected = [(r, m) for r in rules if r["endpoint"] not in PUBLIC for m in r["methods"]]
    assert len(protected) >= 20, protected  # the admin API, the model exchange, sign-out, ...

    expired = request(proxied, "POST", "/api/tokens", {"label": "expires", "expires_in": 1}, headers=via())[1]
    revoked = request(proxied, "POST", "/api/tokens", {"label": "revoked"}, headers=via())[1]
    assert request(proxied, "GET", "/api/tokens", token=revoked["token"], headers=via())[0] == 200
    assert request(proxied, "DELETE", f"/api/tokens/{revoked['id']}", headers=via())[0] == 200
    wait_for(
        lambda: request(proxied, "GET", "/api/tokens", token=expired["token"], headers=via())[0] == 401,
        15,
        0.2,
        "the 1-second token to expire",
    )

    tokens = {
        "missing": None,
        "wrong": "not-a-token",
        "expired": expired["token"],
        "revoked": revoked["token"],
    }
    let_in = []
    for rule, method in protected:
        path = sample_path(rule)
        for kind, token in tokens.items():
            # a fresh address each time: the answers are not rate limited, whatever the order
            headers = {**via(), "X-Client-Id": "c-nobody"} if kind != "missing" else via()
            status, body = request(proxied, method, path, token=token, headers=headers, raw=b"{}")
            if status != 401 or not isinstance(body, dict) or body.get("error") != "unauthorized":
                let_in.append((rule["endpoint"], method, path, kind, status, body))
    assert let_in == [], let_in


# --- rate limits: shared by the web processes, honest about when to come back ---


def test_61_requests_in_a_minute_across_two_web_processes_get_a_429_with_retry_after(
    proxied: int, run_dir: Path
) -> None:
    """RATE_LIMIT is 60/minute; each request opens a new connection, so the two gunicorn
    workers answer them between them, and count them in one Redis window."""
    me = via()
    answers = []
    for _ in range(61):
        conn = http.client.HTTPConnection("127.0.0.1", proxied, timeout=30)
        try:
            conn.request("GET", "/api/tasks", headers={**me, "Authorization": "Bearer not-a-token"})
            response = conn.getresponse()
            response.read()
            answers.append(
                (
                    response.status,
                    response.getheader("X-RateLimit-Remaining"),
                    response.getheader("Retry-After"),
                )
            )
        finally:
            conn.close()
    assert [a[0] for a in answers] == [401] * 60 + [429], answers
    assert [int(a[1]) for a in answers[:60]] == list(range(59, -1, -1)), answers  # one count, not two
    retry_after = answers[-1][2]
    assert retry_after is not None and 0 < int(retry_after) <= 60, answers[-1]
    # the budget is this address's: another address behind the proxy still has its own
    assert request(proxied, "GET", "/api/tasks", token="not-a-token", headers=via())[0] == 401
    # and the hit is a security event
    assert audit_lines(run_dir, "action=rate_limited", f"remote={me['X-Forwarded-For']}")


def test_a_sign_in_429_says_when_to_come_back(proxied: int) -> None:
    me = via()
    wrong = {"username": "admin", "password": "wrong"}
    answers = [
        request_full(proxied, "POST", "/admin/login", wrong, headers=me) for _ in range(LOGIN_LIMIT + 1)
    ]
    assert [a[0] for a in answers] == [401] * LOGIN_LIMIT + [429], answers
    retry_after = answers[-1][1].get("Retry-After")
    assert retry_after is not None and 0 < int(retry_after) <= 60, answers[-1]


# --- the client address: from X-Forwarded-For behind a configured proxy, and only then ---


def test_behind_a_configured_proxy_the_address_is_the_forwarded_one(proxied: int, run_dir: Path) -> None:
    me = via("203.0.113.77")
    status, made = request(proxied, "POST", "/api/tokens", {"label": "from-behind"}, headers=me)
    assert status == 201
    entry = next(e for e in request(proxied, "GET", "/api/audit", headers=via())[1]["items"]
                 if e["target"] == f"token:{made['id']}")  # fmt: skip
    assert entry["remote"] == "203.0.113.77"
    assert request(proxied, "GET", "/api/tasks", token="not-a-token", headers=me)[0] == 401
    assert audit_lines(run_dir, "action=token_refused", "remote=203.0.113.77")


def test_without_a_configured_proxy_x_forwarded_for_is_ignored(server: int, run_dir: Path) -> None:
    forged = {"X-Forwarded-For": "203.0.113.99"}
    status, made = request(server, "POST", "/api/tokens", {"label": "forged-address"}, headers=forged)
    assert status == 201
    entry = next(e for e in request(server, "GET", "/api/audit")[1]["items"]
                 if e["target"] == f"token:{made['id']}")  # fmt: skip
    assert entry["remote"] == "127.0.0.1"
    assert request(server, "DELETE", f"/api/tokens/{made['id']}", headers=forged)[0] == 200
    assert not audit_lines(run_dir, "203.0.113.99")


# --- browser WebSockets: the Origin is checked before the upgrade ---


def handshake(port: int, origin: str | None) -> tuple[int, dict[str, str], bytes]:
    """A raw WebSocket handshake; returns the HTTP status, headers and body of the answer."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(),
        "Sec-WebSocket-Version": "13",
    }
    if origin is not None:
        headers["Origin"] = origin
    try:
        conn.request("GET", "/ws", headers=headers)
        response = conn.getresponse()
        body = response.read() if response.status != 101 else b""
        return response.status, dict(response.getheaders()), body
    finally:
        conn.close()


def test_a_browser_handshake_from_a_foreign_origin_is_refused(proxied: int, run_dir: Path) -> None:
    status, _, body = handshake(proxied, "https://evil.example")
    assert status == 403, (status, body)
    refused = json.loads(body)
    assert refused["error"] == "origin_not_allowed" and "evil.example" in refused["message"]
    assert handshake(proxied, "null")[0] == 403  # a sandboxed page or a file
    assert handshake(proxied, f"http://evil.example:{proxied}")[0] == 403  # the port is not enough
    # allowed: no Origin (not a browser), the allowlist, and the server's own pages
    assert handshake(proxied, None)[0] == 101
    assert handshake(proxied, PANEL_ORIGIN)[0] == 101
    assert handshake(proxied, f"http://127.0.0.1:{proxied}")[0] == 101
    assert audit_lines(run_dir, "action=forbidden", "origin_not_allowed")
    # a client without an Origin registers as ever
    client = WsClient(proxied).register()
    client.close()


# --- a client acting on another client's assignment ---


def test_a_client_cannot_act_on_another_clients_assignment(server: int, db: Database, run_dir: Path) -> None:
    holder = WsClient(server).register(task_types=["federated_training"])
    stranger = WsClient(server).register(task_types=["federated_training"])
    try:
        submit(server, num_shards=1, rounds=2)
        holder.request_task()
        task = holder.next_task(timeout=30)
        ref = {"task_id": task["id"], "round": task["round"]}
        stranger.send({"type": "task_progress", **ref, "progress": 50})
        stranger.expect_error("not_assigned")
        stranger.send({"type": "task_result", **ref, "status": "failed", "error": "not mine"})
        stranger.expect_error("not_assigned")
        stranger.send({"type": "task_request", "client_id": holder.client_id})
        stranger.expect_error("auth_failed")  # asking as the holder
        thief = WsClient(server)
        try:  # registering as the holder with a wrong token: refused, and a security event
            thief.send({"type": "register", **WsClient.HARDWARE, "client_id": holder.client_id, "token": "x"})
            thief.expect_error("auth_failed")
        finally:
            thief.close()
        assert audit_lines(run_dir, "action=token_refused", f"target=client:{holder.client_id}", "via=ws")
        as_stranger = {"Authorization": f"Bearer {stranger.token}", "X-Client-Id": stranger.client_id or ""}
        status, body = request(server, "GET", task["model_url"], token=None, headers=as_stranger)
        assert (status, body["error"]) == (409, "not_assigned")
        status, body = request(
            server, "PUT", task["update_url"], token=None, raw=b"x",
            headers={**as_stranger, "X-Num-Examples": "10", "Content-Type": "application/octet-stream"},
        )  # fmt: skip
        assert (status, body["error"]) == (409, "not_assigned")
        # the holder's token with the stranger's id, and the reverse, prove nobody
        mixed = {"Authorization": f"Bearer {holder.token}", "X-Client-Id": stranger.client_id or ""}
        assert request(server, "GET", task["model_url"], token=None, headers=mixed)[0] == 401
        # the assignment is the holder's still, untouched
        [(owner, status, progress)] = rows(
            db, "SELECT client_id, status, progress FROM task_assignments WHERE task_id = :t", t=task["id"]
        )
        assert (owner, progress) == (holder.client_id, None) and status in ("assigned", "training")
    finally:
        holder.close()
        stranger.close()


# --- model downloads ---


def test_a_task_without_a_model_is_a_404_with_a_reason(server: int) -> None:
    task = submit(server, num_shards=1, rounds=2)
    for path in ("model", "export", "model-card"):
        status, body = request(server, "GET", f"/api/tasks/{task['id']}/{path}")
        assert (status, body["error"]) == (404, "no_model"), (path, body)
        assert "no model yet" in body["message"] or "no final model yet" in body["message"], body
    status, body = request(server, "GET", "/api/tasks/987654/model")
    assert (status, body["error"]) == (404, "unknown_task")


def test_downloads_serve_the_digest_stored_when_the_file_was_written(
    server: int, run_dir: Path, prod_env: dict[str, str], client_procs: list[Proc], db: Database
) -> None:
    client_procs.extend(start_clients(server, run_dir, 2, prod_env))
    task = submit(server, rounds=1)
    done = wait_status(server, task["id"], "completed")
    [(stored, result)] = rows(db, "SELECT checkpoint_sha256, result FROM tasks WHERE id = :t", t=task["id"])
    model = run_dir / "checkpoints" / done["checkpoint_path"]
    assert stored == hashlib.sha256(model.read_bytes()).hexdigest()
    export_sha = json.loads(result)["export_sha256"]
    assert (
        export_sha
        == hashlib.sha256(
            (run_dir / "checkpoints" / f"tasks/{task['id']}/export/model.pt2").read_bytes()
        ).hexdigest()
    )
    assert request_full(server, "GET", f"/api/tasks/{task['id']}/model")[1]["X-Checksum-Sha256"] == stored
    assert (
        request_full(server, "GET", f"/api/tasks/{task['id']}/export")[1]["X-Checksum-Sha256"] == export_sha
    )
    # the answer is the stored digest, not a hash of the file made for each download
    marker = "f" * 64
    with db.engine.begin() as conn:
        conn.execute(
            text("UPDATE tasks SET checkpoint_sha256 = :m WHERE id = :t"), {"m": marker, "t": task["id"]}
        )
    assert request_full(server, "GET", f"/api/tasks/{task['id']}/model")[1]["X-Checksum-Sha256"] == marker


def request_full(
    port: int,
    method: str,
    path: str,
    body: Any = None,
    *,
    token: str | None = ADMIN,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP request; returns (status, headers, body bytes)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    hdrs = dict(headers or {})
    if token is not None:
        hdrs["Authorization"] = f"Bearer {token}"
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        hdrs["Content-Type"] = "application/json"
    try:
        conn.request(method, path, body=data, headers=hdrs)
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


# --- tokens from the command line ---


def test_tokens_are_created_listed_and_revoked_from_the_command_line(server: int, run_dir: Path) -> None:
    from tests.services.test_admin_cli import admin, cli, ok_json, one_error_line

    made = admin(server, "tokens", "create", "--label", "cli-made", "--expires-in", "3600")
    assert made.returncode == 0, made.stderr
    head, secret = made.stdout.strip().splitlines()
    assert head.startswith("token ") and "cli-made" in head and "shown once" in head, head
    token_id = int(head.split()[1])
    assert request(server, "GET", "/api/tasks", token=secret)[0] == 200

    listed = admin(server, "tokens", "list")
    assert listed.returncode == 0 and secret not in listed.stdout
    assert listed.stdout.splitlines()[0].split() == [
        "ID",
        "LABEL",
        "KIND",
        "CREATED",
        "EXPIRES",
        "LAST_USED",
        "EXPIRED",
    ]
    mine = [t for t in ok_json(admin(server, "tokens", "list", "--json"))["items"] if t["id"] == token_id]
    assert len(mine) == 1 and mine[0]["expires_at"] is not None and "token" not in mine[0]

    revoked = admin(server, "tokens", "revoke", str(token_id))
    assert (revoked.returncode, revoked.stdout.strip()) == (0, f"token {token_id} revoked")
    assert request(server, "GET", "/api/tasks", token=secret)[0] == 401

    # failures: one line, exit 1 (server refusals) or 2 (bad arguments)
    one_error_line(admin(server, "tokens", "revoke", str(token_id)), "404", f"no admin token {token_id}")
    url = f"http://127.0.0.1:{server}"
    one_error_line(cli("tokens", "list", "--server", url, "--token", "wrong"), "401")
    one_error_line(admin(server, "tokens", "create", "--label", "panel:me"), "400", "panel:")
    assert admin(server, "tokens", "create", "--expires-in", "0").returncode == 2
    assert admin(server, "tokens", "revoke", "x").returncode == 2
    # and no secret reaches a log
    for log in (run_dir / "logs").glob("*.log"):
        assert secret not in log.read_text(errors="replace"), log
