"""``/admin``: a small dashboard over the REST API, and its sign-in.

The page signs in with ``ADMIN_USERNAME`` and ``ADMIN_PASSWORD`` (``POST /admin/login``),
which issues an admin token that expires after ``ADMIN_SESSION_TTL``; the browser keeps it
in session storage and calls the REST API with it, like any admin token (no cookies, so no
cross-site request can act as the admin). An admin token can be pasted instead.
"""

from __future__ import annotations

import hmac
import logging
from typing import Any

from flask import Blueprint, Response, current_app, g, jsonify, request
from werkzeug.security import check_password_hash

from app import validation
from app.admin_api import note
from app.auth import admin_required, bearer, db
from app.errors import ApiError
from store.auth import create_admin_session, end_admin_session
from store.models import utcnow

bp = Blueprint("dashboard", __name__)
#: Sign-in and sign-out, under their own rate limit (ADMIN_LOGIN_RATE_LIMIT per address).
session_bp = Blueprint("admin_session", __name__)
log = logging.getLogger(__name__)

#: Prefixes of werkzeug password hashes (``generate_password_hash``): ADMIN_PASSWORD holding
#: one is checked as a hash, anything else as the password itself.
HASH_PREFIXES = ("scrypt:", "pbkdf2:")


@bp.get("/admin")
def admin_page() -> Response:
    return current_app.send_static_file("admin.html")


@bp.get("/")
def index() -> Response:
    return current_app.send_static_file("admin.html")


def password_matches(given: str, configured: str) -> bool:
    if configured.startswith(HASH_PREFIXES):
        return check_password_hash(configured, given)
    return hmac.compare_digest(given.encode(), configured.encode())


@session_bp.post("/admin/login")
def login() -> tuple[Response, int]:
    settings = current_app.config["SETTINGS"]
    body: Any = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise ApiError(400, 'send a JSON object: {"username": "...", "password": "..."}')
    fields = validation.check(validation.SignIn, body)
    username, password = fields["username"], fields["password"]
    if not settings.ADMIN_PASSWORD:
        raise ApiError(403, "password sign-in is off (ADMIN_PASSWORD is not set); use an admin token")
    name_ok = hmac.compare_digest(username.encode(), settings.ADMIN_USERNAME.encode())
    password_ok = password_matches(password, settings.ADMIN_PASSWORD)  # checked even for a wrong name
    if not (name_ok and password_ok):
        log.warning("event=admin_login state=failed remote=%s", request.remote_addr)
        note("sign_in_failed", None, username=username[:64])  # audited as actor "anonymous"
        raise ApiError(401, "wrong username or password")
    token, expires = db().run(
        lambda s: create_admin_session(s, settings.ADMIN_USERNAME, settings.ADMIN_SESSION_TTL, utcnow())
    )
    g.actor = f"user:{settings.ADMIN_USERNAME}"
    note("sign_in", None, expires_at=expires.isoformat(timespec="seconds") + "Z")
    log.info("event=admin_login state=ok user=%s remote=%s", settings.ADMIN_USERNAME, request.remote_addr)
    reply = {
        "token": token,
        "username": settings.ADMIN_USERNAME,
        "expires_at": expires.isoformat(timespec="seconds") + "Z",
    }
    return jsonify(reply), 200


@session_bp.post("/admin/logout")
@admin_required
def logout() -> tuple[Response, int]:
    token = bearer()
    assert token is not None  # admin_required
    ended = db().run(lambda s: end_admin_session(s, token))
    return jsonify({"signed_out": ended}), 200
