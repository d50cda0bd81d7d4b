"""Tokens: random, shown once, stored as SHA-256. Admin tokens and client tokens alike."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, or_, select, update
from sqlalchemy.orm import Session

from store.models import AdminToken, Client, utcnow

#: The label prefix of panel sign-ins (``panel:<user>``); API token labels may not use it.
PANEL_PREFIX = "panel:"
#: ``last_used_at`` is written at most this often per token (seconds): a read, not a write, per request.
LAST_USED_EVERY_S = 60
#: What a revoked client's ``token_hash`` holds: no SHA-256 hex digest equals it.
REVOKED = "revoked"


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


@dataclass(frozen=True)
class AdminPrincipal:
    """Who an admin request is: a stored token (``token_id``) or ADMIN_TOKEN (``token_id`` None)."""

    token_id: int | None
    label: str

    @property
    def actor(self) -> str:
        """For the audit log and the rate-limit key: ``env``, ``user:<name>``, or ``token:<id>``."""
        if self.token_id is None:
            return "env"
        if self.label.startswith(PANEL_PREFIX):
            return "user:" + self.label.removeprefix(PANEL_PREFIX)
        return f"token:{self.token_id}"


def admin_principal(s: Session, token: str, env_token: str, now: datetime) -> AdminPrincipal | None:
    """Who ``token`` is: ADMIN_TOKEN, or a stored token that has not expired (read from the
    database on every request, so a revoked token fails at once in every process). Notes
    ``last_used_at``, at most once every LAST_USED_EVERY_S seconds."""
    if env_token and hmac.compare_digest(token.encode(), env_token.encode()):
        return AdminPrincipal(None, "ADMIN_TOKEN")
    row = s.execute(
        select(AdminToken.id, AdminToken.label, AdminToken.last_used_at).where(
            AdminToken.token_hash == hash_token(token),
            or_(AdminToken.expires_at.is_(None), AdminToken.expires_at > now),
        )
    ).first()
    if row is None:
        return None
    token_id, label, last_used = row
    if last_used is None or last_used <= now - timedelta(seconds=LAST_USED_EVERY_S):
        s.execute(
            update(AdminToken)
            .where(AdminToken.id == token_id)
            .values(last_used_at=now.replace(microsecond=0))
            .execution_options(synchronize_session=False)
        )
    return AdminPrincipal(token_id, label)


def create_admin_session(s: Session, username: str, ttl_s: int, now: datetime) -> tuple[str, datetime]:
    """A token for an admin panel sign-in, valid for ``ttl_s`` seconds; expired sign-ins
    are deleted on the way. Returns (token, expires_at)."""
    s.execute(delete(AdminToken).where(AdminToken.expires_at.is_not(None), AdminToken.expires_at <= now))
    token = new_token()
    expires = now + timedelta(seconds=ttl_s)
    label = f"{PANEL_PREFIX}{username}"
    s.add(AdminToken(token_hash=hash_token(token), label=label, created_at=now, expires_at=expires))
    return token, expires


def end_admin_session(s: Session, token: str) -> bool:
    """Delete the sign-in token ``token`` (API tokens are kept: revoke them with
    ``DELETE /api/tokens/{id}``). True when one was deleted."""
    result = s.execute(
        delete(AdminToken).where(
            AdminToken.token_hash == hash_token(token), AdminToken.label.startswith(PANEL_PREFIX)
        )
    )
    return bool(getattr(result, "rowcount", 0))


def create_admin_token(s: Session, label: str) -> str:
    return issue_admin_token(s, label, utcnow())[1]


def issue_admin_token(
    s: Session, label: str, now: datetime, expires_in: int | None = None
) -> tuple[AdminToken, str]:
    """A new API token (expiring after ``expires_in`` seconds, or never). Returns the row and
    the secret, which is stored only as its SHA-256."""
    token = new_token()
    expires = None if expires_in is None else (now + timedelta(seconds=expires_in)).replace(microsecond=0)
    row = AdminToken(
        token_hash=hash_token(token), label=label, created_at=now.replace(microsecond=0), expires_at=expires
    )
    s.add(row)
    s.flush()  # its id
    return row, token


def list_admin_tokens(s: Session) -> list[AdminToken]:
    """Every stored admin token, oldest first (expired ones too, until a sign-in deletes them)."""
    return list(s.execute(select(AdminToken).order_by(AdminToken.id)).scalars())


def revoke_admin_token(s: Session, token_id: int) -> AdminToken | None:
    """Delete token ``token_id``: the next request with it is a 401. Returns the row, or None."""
    row = s.get(AdminToken, token_id)
    if row is not None:
        s.delete(row)
    return row


def set_client_token(s: Session, client_id: str, token: str | None) -> str | None:
    """Replace client ``client_id``'s token with ``token`` (rotate) or with nothing that can
    match (None: revoke). Returns the client's live connection id (None when not connected);
    KeyError when there is no such client."""
    row = s.execute(select(Client).where(Client.id == client_id).with_for_update()).scalar_one_or_none()
    if row is None:
        raise KeyError(client_id)
    row.token_hash = REVOKED if token is None else hash_token(token)
    return row.conn_id


def bootstrap_admin_token(s: Session, env_token: str) -> str | None:
    """When ``ADMIN_TOKEN`` is unset and no token exists yet, create one and return it (to print once)."""
    if env_token:
        return None
    if s.execute(select(AdminToken.id).limit(1)).first() is not None:
        return None
    return create_admin_token(s, "bootstrap")
