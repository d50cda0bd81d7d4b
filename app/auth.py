"""Bearer tokens: admins for the REST API, clients (id + token) for model exchange; and the
keys the rate limits count by, so that nobody can spend someone else's budget."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar, cast

from flask import current_app, g, request
from flask_limiter.util import get_remote_address
from sqlalchemy import select

from app.errors import ApiError
from store.auth import AdminPrincipal, admin_principal, hash_token, token_matches
from store.db import Database
from store.models import Client, utcnow

F = TypeVar("F", bound=Callable[..., Any])

#: Seconds the model-exchange limiter trusts an (id, token) check it made: the limit's key
#: only, never the answer to the request (each view checks the token in the database again).
CLIENT_KEY_TTL_S = 10.0
CLIENT_KEY_CACHE_MAX = 10_000
_client_keys: dict[tuple[str, str], tuple[float, bool]] = {}
_client_keys_lock = threading.Lock()
_UNSET = object()


def bearer() -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def db() -> Database:
    return cast(Database, current_app.extensions["aifarm.db"])


def current_admin() -> AdminPrincipal | None:
    """The admin this request's bearer token proves, read from the database once per request
    (the rate limiter and the view share the answer); None without a valid admin token."""
    cached = g.get("_admin", _UNSET)
    if cached is not _UNSET:
        return cast(AdminPrincipal | None, cached)
    token = bearer()
    principal = None
    if token is not None:
        env_token = current_app.config["SETTINGS"].ADMIN_TOKEN
        principal = db().run(lambda s: admin_principal(s, token, env_token, utcnow()))
    g._admin = principal
    return principal


def is_admin() -> bool:
    return current_admin() is not None


def admin_required(view: F) -> F:
    @wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if bearer() is None:
            raise ApiError(401, "missing 'Authorization: Bearer <admin token>'")
        principal = current_admin()
        if principal is None:
            raise ApiError(401, "invalid admin token")  # expired and revoked ones too
        g.principal = "admin"
        g.actor = principal.actor
        return view(*args, **kwargs)

    return cast(F, wrapper)


def client_identity() -> str | None:
    """The client id proven by ``X-Client-Id`` + ``Authorization: Bearer <client token>``, or None.
    Read from the database (once per request), so a rotated or revoked token fails at once."""
    cached = g.get("_client", _UNSET)
    if cached is not _UNSET:
        return cast(str | None, cached)
    client_id = request.headers.get("X-Client-Id")
    token = bearer()
    found = None
    if client_id and token is not None:
        token_hash = db().run(
            lambda s: s.execute(select(Client.token_hash).where(Client.id == client_id)).scalar()
        )
        if token_hash is not None and token_matches(token, token_hash):
            found = client_id
    g._client = found
    return found


def _remote_key() -> str:
    return f"addr:{get_remote_address()}"


def admin_rate_key() -> str:
    """RATE_LIMIT counts per admin (``env``, ``user:<name>``, ``token:<id>``) for a valid
    admin token, and per remote address for everything else: guessing tokens is limited per
    address, and nobody without the token can spend an admin's budget."""
    try:
        principal = current_admin()
    except Exception:  # the database is down: the view answers 503; count by address meanwhile
        return _remote_key()
    return _remote_key() if principal is None else f"admin:{principal.actor}"


def exchange_rate_key() -> str:
    """CLIENT_RATE_LIMIT counts per client id only when the bearer token is that client's,
    per remote address otherwise: a forged ``X-Client-Id`` spends the forger's budget, not
    the victim's, and rotating made-up ids escapes nothing. A valid pair is remembered for
    CLIENT_KEY_TTL_S seconds (per process), so the limiter costs no query in the steady state."""
    client_id = request.headers.get("X-Client-Id")
    token = bearer()
    if not client_id or token is None:
        return _remote_key()
    key = (client_id, hash_token(token))
    now = time.monotonic()
    hit = _client_keys.get(key)
    if hit is not None and hit[0] > now:
        valid = hit[1]
    else:
        try:
            valid = client_identity() == client_id
        except Exception:  # the database is down: the view answers 503
            return _remote_key()
        with _client_keys_lock:
            if len(_client_keys) >= CLIENT_KEY_CACHE_MAX:
                _client_keys.clear()
            _client_keys[key] = (now + CLIENT_KEY_TTL_S, valid)
    return f"client:{client_id}" if valid else _remote_key()
