"""Tokens: random, shown once, stored as SHA-256. Admin tokens and client tokens alike."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import uuid
from datetime import datetime, timedelta

from sqlalchemy import delete, or_, select
from sqlalchemy.orm import Session

from store.models import AdminToken, utcnow


def new_token() -> str:
    return secrets.token_urlsafe(32)


def new_client_id() -> str:
    return f"c-{uuid.uuid4().hex}"


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def token_matches(token: str, token_hash: str) -> bool:
    return hmac.compare_digest(hash_token(token), token_hash)


def admin_token_valid(s: Session, token: str, env_token: str) -> bool:
    """``ADMIN_TOKEN`` from the environment, or a token stored in ``admin_tokens`` that has
    not expired."""
    if env_token and hmac.compare_digest(token.encode(), env_token.encode()):
        return True
    found = s.execute(
        select(AdminToken.id).where(
            AdminToken.token_hash == hash_token(token),
            or_(AdminToken.expires_at.is_(None), AdminToken.expires_at > utcnow()),
        )
    ).first()
    return found is not None


def create_admin_session(s: Session, username: str, ttl_s: int, now: datetime) -> tuple[str, datetime]:
    """A token for an admin panel sign-in, valid for ``ttl_s`` seconds; expired sign-ins
    are deleted on the way. Returns (token, expires_at)."""
    s.execute(delete(AdminToken).where(AdminToken.expires_at.is_not(None), AdminToken.expires_at <= now))
    token = new_token()
    expires = now + timedelta(seconds=ttl_s)
    label = f"panel:{username}"
    s.add(AdminToken(token_hash=hash_token(token), label=label, created_at=now, expires_at=expires))
    return token, expires


def end_admin_session(s: Session, token: str) -> bool:
    """Delete the sign-in token ``token`` (API tokens, which never expire, are kept).
    True when one was deleted."""
    result = s.execute(
        delete(AdminToken).where(
            AdminToken.token_hash == hash_token(token), AdminToken.expires_at.is_not(None)
        )
    )
    return bool(getattr(result, "rowcount", 0))


def create_admin_token(s: Session, label: str) -> str:
    token = new_token()
    s.add(AdminToken(token_hash=hash_token(token), label=label, created_at=utcnow()))
    return token


def bootstrap_admin_token(s: Session, env_token: str) -> str | None:
    """When ``ADMIN_TOKEN`` is unset and no token exists yet, create one and return it (to print once)."""
    if env_token:
        return None
    if s.execute(select(AdminToken.id).limit(1)).first() is not None:
        return None
    return create_admin_token(s, "bootstrap")
