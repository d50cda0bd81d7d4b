"""The admin panel's sign-in: ADMIN_USERNAME / ADMIN_PASSWORD issue an expiring admin token.

Against gunicorn on MariaDB (the production topology) and against embedded servers (SQLite)
with a hashed password, a tight sign-in rate limit, and no password at all.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from werkzeug.security import generate_password_hash

from store.db import Database
from store.models import utcnow
from tests.conftest import ADMIN_PASSWORD, rows, service_env
from tests.helpers import ADMIN, Proc, free_port, request, start_embedded

pytestmark = pytest.mark.usefixtures("clean")


@pytest.fixture
def no_panel_tokens(db: Database) -> None:
    db.run(lambda s: s.execute(text("DELETE FROM admin_tokens WHERE label LIKE 'panel:%'")))


def panel_tokens(db: Database) -> list[tuple[Any, ...]]:
    return rows(db, "SELECT label, expires_at FROM admin_tokens WHERE label LIKE 'panel:%'")


def sign_in(port: int, username: str = "admin", password: str = ADMIN_PASSWORD) -> tuple[int, Any]:
    return request(port, "POST", "/admin/login", {"username": username, "password": password}, token=None)


@pytest.mark.usefixtures("no_panel_tokens")
def test_sign_in_gives_a_token_for_the_api_until_sign_out(server: int, db: Database) -> None:
    status, body = sign_in(server)
    assert status == 200, body
    assert body["username"] == "admin" and body["expires_at"].endswith("Z")
    token = body["token"]
    assert request(server, "GET", "/api/tasks", token=token)[0] == 200
    [(label, expires_at)] = panel_tokens(db)
    assert label == "panel:admin"
    assert timedelta(hours=7.9) < expires_at - utcnow() <= timedelta(hours=8)  # ADMIN_SESSION_TTL

    assert request(server, "POST", "/admin/logout", token=token) == (200, {"signed_out": True})
    status, body = request(server, "GET", "/api/tasks", token=token)
    assert status == 401 and body["error"] == "unauthorized"
    assert panel_tokens(db) == []


@pytest.mark.usefixtures("no_panel_tokens")
def test_an_expired_sign_in_is_refused_and_swept_by_the_next(server: int, db: Database) -> None:
    token = sign_in(server)[1]["token"]
    expire = text("UPDATE admin_tokens SET expires_at = '2000-01-01' WHERE label LIKE 'panel:%'")
    db.run(lambda s: s.execute(expire))
    status, body = request(server, "GET", "/api/clients", token=token)
    assert status == 401 and body["message"] == "invalid admin token"
    assert sign_in(server)[0] == 200
    assert len(panel_tokens(db)) == 1  # the expired row is gone


@pytest.mark.usefixtures("no_panel_tokens")
@pytest.mark.parametrize(
    ("body", "raw", "status", "needle"),
    [
        ({"username": "admin", "password": "wrong"}, None, 401, "wrong username or password"),
        ({"username": "root", "password": ADMIN_PASSWORD}, None, 401, "wrong username or password"),
        ({"username": "admin"}, None, 400, "password is required"),
        ({"username": "admin", "password": 12345}, None, 400, "password must be a non-empty string"),
        ({"username": "", "password": ""}, None, 400, "username must be a non-empty string"),
        (["admin", ADMIN_PASSWORD], None, 400, "send a JSON object"),
        (None, b"username=admin&password=x", 400, "send a JSON object"),
        (None, b"{not json", 400, "send a JSON object"),
    ],
)
def test_bad_sign_ins_get_a_precise_error_and_no_token(
    server: int, db: Database, body: Any, raw: bytes | None, status: int, needle: str
) -> None:
    headers = {"Content-Type": "application/json"} if raw is not None else None
    got, reply = request(server, "POST", "/admin/login", body, token=None, raw=raw, headers=headers)
    assert got == status, reply
    assert needle in reply["message"]
    assert reply["error"] == {400: "bad_request", 401: "unauthorized"}[status]
    assert panel_tokens(db) == []


def test_sign_out_needs_an_admin_token_and_keeps_api_tokens(server: int) -> None:
    assert request(server, "POST", "/admin/logout", token=None)[0] == 401
    assert request(server, "POST", "/admin/logout", token="not-a-token")[0] == 401
    assert request(server, "POST", "/admin/logout") == (200, {"signed_out": False})  # ADMIN_TOKEN
    assert request(server, "GET", "/api/tasks")[0] == 200


@pytest.fixture(scope="module")
def embedded_pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, int]]:
    """Two embedded servers: a hashed password with 3 sign-ins a minute; no password."""
    procs: list[Proc] = []
    ports: list[int] = []
    settings = [
        {"ADMIN_PASSWORD": generate_password_hash("s3cret panel"), "ADMIN_LOGIN_RATE_LIMIT": "3/minute"},
        {"ADMIN_PASSWORD": ""},
    ]
    try:
        for extra in settings:
            run_dir: Path = tmp_path_factory.mktemp("login")
            port = free_port()
            procs.append(start_embedded(service_env(run_dir, **extra), port, run_dir / "procs"))
            ports.append(port)
        yield ports[0], ports[1]
    finally:
        for proc in procs:
            proc.stop()


def test_a_hashed_password_signs_in_and_attempts_are_rate_limited(embedded_pair: tuple[int, int]) -> None:
    port = embedded_pair[0]
    status, body = sign_in(port, password="s3cret panel")
    assert status == 200, body
    token = body["token"]
    assert sign_in(port, password="guess")[0] == 401
    assert sign_in(port, password=generate_password_hash("s3cret panel"))[0] == 401  # the hash is no password
    status, body = sign_in(port, password="s3cret panel")  # the 4th attempt in a minute
    assert status == 429 and body["error"] == "rate_limited"
    assert request(port, "GET", "/api/tasks", token=token)[0] == 200  # the rest keeps working


def test_without_a_password_sign_in_is_off_and_tokens_still_work(embedded_pair: tuple[int, int]) -> None:
    port = embedded_pair[1]
    status, body = sign_in(port, password="anything")
    assert status == 403 and "ADMIN_PASSWORD is not set" in body["message"]
    assert request(port, "GET", "/api/tasks", token=ADMIN)[0] == 200
