"""Admin token lifecycle, client token rotation and revocation, and the audit log.

``/api/tokens``: list, create (the secret is shown once) and revoke admin API tokens.
``/api/clients/{id}/token``: rotate (a new secret, shown once) or revoke a client's token.
``/api/audit``: every admin write and panel sign-in, newest first.

Every admin write anywhere in the app (these routes, ``app/api.py``'s, sign-in and sign-out)
is written to the audit log by :func:`audit_after_request`, after the view answered: one row
in ``audit_log`` and one ``event=audit`` line in server.log.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from flask import Blueprint, Response, current_app, g, jsonify, request
from sqlalchemy.orm import Session
from werkzeug.exceptions import HTTPException

from app import validation
from app.api import iso, paged
from app.auth import admin_required, db
from app.errors import ApiError
from store import audit, clients
from store.auth import (
    PANEL_PREFIX,
    issue_admin_token,
    list_admin_tokens,
    new_token,
    revoke_admin_token,
    set_client_token,
)
from store.bus import get_bus
from store.models import AdminToken, AuditEntry, utcnow

bp = Blueprint("admin_api", __name__, url_prefix="/api")
log = logging.getLogger("aifarm.audit")

WRITES = ("POST", "PUT", "PATCH", "DELETE")
#: The audit action of the admin writes defined elsewhere (an unlisted one is logged under its
#: endpoint name, so a new write route is audited before anyone names it here).
ACTIONS = {
    "api.create_task": "task_create",
    "api.set_task_status": "task_status",
    "api.delete_task": "task_delete",
    "api.set_client_status": "client_status",
    "admin_session.logout": "sign_out",
    "admin_api.create_token": "token_create",
    "admin_api.revoke_token": "token_revoke",
    "admin_api.rotate_client_token": "client_token_rotate",
    "admin_api.revoke_client_token": "client_token_revoke",
}


def token_json(row: AdminToken) -> dict[str, Any]:
    """A token as listed: never its secret nor its hash."""
    return {
        "id": row.id,
        "label": row.label,
        "kind": "panel" if row.label.startswith(PANEL_PREFIX) else "api",
        "created_at": iso(row.created_at),
        "expires_at": iso(row.expires_at),
        "last_used_at": iso(row.last_used_at),
        "expired": row.expires_at is not None and row.expires_at <= utcnow(),
    }


def audit_json(entry: AuditEntry) -> dict[str, Any]:
    return {
        "id": entry.id,
        "at": iso(entry.at),
        "actor": entry.actor,
        "action": entry.action,
        "target": entry.target,
        "detail": entry.detail,
        "remote": entry.remote,
    }


def note(action: str, target: str | None = None, **detail: Any) -> None:
    """Tell :func:`audit_after_request` what this request did (views that know better than
    the endpoint table, and sign-in, which has no admin yet)."""
    g.audit = {"action": action, "target": target, "detail": detail}


# --- admin tokens ---


@bp.get("/tokens")
@admin_required
def list_tokens() -> Response:
    rows = db().run(list_admin_tokens)
    return jsonify({"items": [token_json(r) for r in rows]})


@bp.post("/tokens")
@admin_required
def create_token() -> tuple[Response, int]:
    fields = validation.check(validation.NewToken, validation.json_object() if request.get_data() else {})
    label, expires_in = fields.get("label", "api"), fields.get("expires_in")

    def create(s: Session) -> tuple[dict[str, Any], str]:
        row, secret = issue_admin_token(s, label, utcnow(), expires_in)
        return token_json(row), secret

    listed, secret = db().run(create)
    note("token_create", f"token:{listed['id']}", label=label, expires_in=expires_in)
    return jsonify({**listed, "token": secret}), 201


@bp.delete("/tokens/<int:token_id>")
@admin_required
def revoke_token(token_id: int) -> Response:
    row = db().run(lambda s: revoke_admin_token(s, token_id))
    if row is None:
        raise ApiError(404, f"no admin token {token_id}")
    note("token_revoke", f"token:{token_id}", label=row.label)
    return jsonify({"revoked": token_id})


# --- client tokens ---


def _replace_client_token(client_id: str, secret: str | None) -> bool:
    """Store the client's new token (or none) and end its connection, if it has one: its web
    process closes the socket at its next pass (``superseded``, close 1008), and registering
    again with the old token is ``auth_failed``. Returns whether it was connected."""
    grace = current_app.config["SETTINGS"].RECONNECT_GRACE

    def replace(s: Session) -> str | None:
        conn_id = set_client_token(s, client_id, secret)
        if conn_id is not None:
            clients.disconnect(s, client_id, conn_id, utcnow(), grace=grace)
        return conn_id

    try:
        conn_id = db().run(replace)
    except KeyError:
        raise ApiError(404, f"no client {client_id}") from None
    if conn_id is not None:
        get_bus().publish([client_id])  # its web process reconciles it now
    return conn_id is not None


@bp.post("/clients/<client_id>/token")
@admin_required
def rotate_client_token(client_id: str) -> Response:
    secret = new_token()
    connected = _replace_client_token(client_id, secret)
    note("client_token_rotate", f"client:{client_id}", disconnected=connected)
    return jsonify({"client_id": client_id, "token": secret, "disconnected": connected})


@bp.delete("/clients/<client_id>/token")
@admin_required
def revoke_client_token(client_id: str) -> Response:
    connected = _replace_client_token(client_id, None)
    note("client_token_revoke", f"client:{client_id}", disconnected=connected)
    return jsonify({"client_id": client_id, "revoked": True, "disconnected": connected})


# --- the audit log ---


@bp.get("/audit")
@admin_required
def list_audit() -> Response:
    page, per_page = validation.page_args()
    items, total = db().run(lambda s: audit.page(s, page_no=page, per_page=per_page))
    return paged([audit_json(e) for e in items], total, page, per_page)


def _derived() -> dict[str, Any] | None:
    """What an admin write of another module did, from its endpoint, path and body."""
    if request.method not in WRITES or g.get("actor") is None or request.endpoint is None:
        return None
    args = request.view_args or {}
    target = None
    if "task_id" in args:
        target = f"task:{args['task_id']}"
    elif "token_id" in args:
        target = f"token:{args['token_id']}"
    elif "client_id" in args:
        target = f"client:{args['client_id']}"
    detail: dict[str, Any] = {}
    try:
        body = request.get_json(silent=True) if request.is_json else None
    except HTTPException:  # over MAX_BODY_SIZE: the answer says so, the audit row says 413
        body = None
    if isinstance(body, dict) and isinstance(body.get("status"), str):
        detail["status"] = body["status"][:32]
    return {"action": ACTIONS.get(request.endpoint, request.endpoint), "target": target, "detail": detail}


def audit_after_request(response: Response) -> Response:
    """Write the audit row and log line of an admin write or a sign-in, whatever its answer."""
    entry = g.get("audit") or _derived()
    if entry is None:
        return response
    actor = g.get("actor") or "anonymous"
    target = entry["target"]
    if target is None and request.endpoint == "api.create_task" and response.status_code == 201:
        created = response.get_json(silent=True) or {}
        target = f"task:{created.get('id')}"
        entry["detail"]["type"] = created.get("type")
    detail = {**entry["detail"], "http_status": response.status_code}
    remote = request.remote_addr
    log.info(
        "event=audit action=%s actor=%s target=%s status=%d remote=%s detail=%s",
        entry["action"], actor, target or "-", response.status_code, remote,
        json.dumps(detail, separators=(",", ":"), sort_keys=True),
    )  # fmt: skip
    try:
        db().run(
            lambda s: audit.record(
                s,
                at=utcnow(),
                actor=actor,
                action=entry["action"],
                target=target,
                detail=detail,
                remote=remote,
            )
        )
    except Exception as error:  # the action is done; the log line above still tells it
        log.error("event=audit state=write_failed action=%s error=%s", entry["action"], type(error).__name__)
    return response


#: Refused requests that are security events (to audit.log only: they are not admin acts).
SECURITY_STATUSES = {401: "token_refused", 403: "forbidden", 429: "rate_limited"}
UPLOAD_ENDPOINT = "models.upload_update"


def _printable(text: str | None, limit: int = 128) -> str | None:
    """A caller-chosen value made safe for one log line (no spaces, controls or length)."""
    if text is None:
        return None
    return "".join(c if c.isprintable() and not c.isspace() else "?" for c in text[:limit])


def security_after_request(response: Response) -> Response:
    """One ``event=security`` line in audit.log (and server.log) for every refused token, 403,
    429 and refused upload: who (the admin, or ``anonymous`` and the claimed client id), what
    (the action, the endpoint and the answer's error code), when (the line's time) and from
    where (the address; behind PROXY_HOPS proxies, the forwarded one). Never a token: the
    Authorization header is not read here, and paths and ids carry none."""
    status = response.status_code
    upload = request.endpoint == UPLOAD_ENDPOINT and 400 <= status < 500
    if g.get("audit") is not None or not (upload or status in SECURITY_STATUSES):
        return response  # sign-in failures are admin-audited already
    action = "upload_refused" if upload and status not in (401, 429) else SECURITY_STATUSES[status]
    body = response.get_json(silent=True) if response.is_json else None
    detail = {
        "method": request.method,
        "path": _printable(request.path, 256),
        "endpoint": request.endpoint,
        "error": body.get("error") if isinstance(body, dict) else None,
        "claimed_client": _printable(request.headers.get("X-Client-Id"), 64),
    }
    log.warning(
        "event=security action=%s actor=%s status=%d remote=%s detail=%s",
        action, g.get("actor") or "anonymous", status, request.remote_addr,
        json.dumps(detail, separators=(",", ":"), sort_keys=True),
    )  # fmt: skip
    return response


bp.after_app_request(audit_after_request)
bp.after_app_request(security_after_request)
