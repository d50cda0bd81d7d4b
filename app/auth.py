"""Bearer tokens: admins for the REST API, clients (id + token) for model exchange."""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar, cast

from flask import current_app, g, request
from sqlalchemy import select

from app.errors import ApiError
from store.auth import admin_token_valid, token_matches
from store.db import Database
from store.models import Client

F = TypeVar("F", bound=Callable[..., Any])


def bearer() -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def db() -> Database:
    return cast(Database, current_app.extensions["aifarm.db"])


def is_admin() -> bool:
    token = bearer()
    if token is None:
        return False
    env_token = current_app.config["SETTINGS"].ADMIN_TOKEN
    return db().run(lambda s: admin_token_valid(s, token, env_token))


def admin_required(view: F) -> F:
    @wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if bearer() is None:
            raise ApiError(401, "missing 'Authorization: Bearer <admin token>'")
        if not is_admin():
            raise ApiError(401, "invalid admin token")
        g.principal = "admin"
        return view(*args, **kwargs)

    return cast(F, wrapper)


def client_identity() -> str | None:
    """The client id proven by ``X-Client-Id`` + ``Authorization: Bearer <client token>``, or None."""
    client_id = request.headers.get("X-Client-Id")
    token = bearer()
    if not client_id or token is None:
        return None
    token_hash = db().run(
        lambda s: s.execute(select(Client.token_hash).where(Client.id == client_id)).scalar()
    )
    if token_hash is None or not token_matches(token, token_hash):
        return None
    return client_id
