"""``/admin``: a small dashboard over the REST API (the browser keeps the admin token)."""

from __future__ import annotations

from flask import Blueprint, Response, current_app

bp = Blueprint("dashboard", __name__)


@bp.get("/admin")
def admin_page() -> Response:
    return current_app.send_static_file("admin.html")


@bp.get("/")
def index() -> Response:
    return current_app.send_static_file("admin.html")
