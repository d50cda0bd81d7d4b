"""The web tier: ``create_app()`` is the only place Flask is configured.

It validates, authenticates, does at most a cheap write, and hands anything heavier to
Celery by task name. It never imports torch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from flask import Flask, Response, g, jsonify, request
from flask_limiter import Limiter
from flask_limiter.util import get_remote_address
from flask_sock import Sock
from werkzeug.middleware.proxy_fix import ProxyFix

import server_settings
from app import (
    admin_api,
    api,
    auth,
    dashboard,
    errors,
    events,
    jobs,
    metrics,
    models_api,
    openapi,
    protocol,
    validation,
)
from app.hub import Hub
from app.intake import Departures, Intake, Results
from app.ws import Connection, origin_allowed
from store import clients
from store.bus import Bus, LocalBus, RedisBus, set_bus
from store.db import Database, set_db

access_log = logging.getLogger("aifarm.access")
log = logging.getLogger(__name__)


def create_app(test_config: dict[str, Any] | None = None) -> Flask:
    """Build the app. ``test_config`` overrides settings by name (tests use it)."""
    settings = server_settings.load(**(test_config or {}))
    server_settings.setup_logging(settings)

    app = Flask(__name__)
    app.json = validation.JSONProvider(app)  # a body nested too deeply is a 400, not a 500
    app.config["SETTINGS"] = settings
    app.config["MAX_CONTENT_LENGTH"] = settings.MAX_BODY_SIZE
    app.config["SOCK_SERVER_OPTIONS"] = {
        "max_message_size": settings.WS_MAX_MESSAGE_SIZE,
        "ping_interval": None,  # the hub pings every WS_PING_INTERVAL (app/hub.py, _ping_loop)
    }
    if settings.PROXY_HOPS > 0:  # the client address from X-Forwarded-For, this many proxies back
        hops = settings.PROXY_HOPS
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=hops, x_proto=hops)  # type: ignore[method-assign]

    db = Database(settings.database_url, pool_size=settings.DB_POOL_SIZE, timeout=settings.DB_TIMEOUT)
    if db.is_sqlite:
        db.create_all()
    set_db(db)  # workers in this process (embedded mode) use the same engine
    bus = RedisBus(settings.REDIS_URL) if settings.REDIS_URL else LocalBus()
    set_bus(bus)
    intake = Intake(db, max_tasks=settings.MAX_TASKS_PER_CLIENT, written=jobs.request_schedule)
    results = Results(db, settings, advance=jobs.advance_task, written=jobs.request_schedule)
    hub = Hub(
        db,
        bus,
        interval=settings.RECONCILE_INTERVAL,
        intake=intake,
        results=results,
        departures=Departures(db, grace=settings.RECONNECT_GRACE),
        connection_timeout=settings.CONNECTION_TIMEOUT,
        ping_interval=settings.WS_PING_INTERVAL,
    )
    app.extensions["aifarm.db"] = db
    app.extensions["aifarm.hub"] = hub

    metrics.init_app(app, db, settings)  # before the limiter: a 429 is timed and counted too
    limiter = Limiter(
        get_remote_address,
        app=app,
        storage_uri=settings.REDIS_URL or "memory://",
        strategy="moving-window",
        swallow_errors=True,  # a Redis hiccup must not turn every request into a 500
        headers_enabled=True,  # Retry-After on a 429, X-RateLimit-* on every limited answer
    )
    # Per admin for a valid admin token, per address otherwise; per client id only for that
    # client's own token (docs/security.md, "Limits"). One budget over both admin blueprints.
    admin_limit = limiter.shared_limit(settings.RATE_LIMIT, scope="admin_api", key_func=auth.admin_rate_key)
    admin_limit(api.bp)
    admin_limit(admin_api.bp)
    limiter.limit(settings.CLIENT_RATE_LIMIT, key_func=auth.exchange_rate_key)(models_api.bp)
    limiter.limit(settings.ADMIN_LOGIN_RATE_LIMIT)(dashboard.session_bp)
    # The dashboard's event streams: a budget of their own (opening one spends none of the REST
    # API's), per admin, and per address for a missing or wrong token.
    limiter.limit(settings.RATE_LIMIT, key_func=auth.admin_rate_key)(events.bp)

    errors.register(app)
    app.url_value_preprocessor(validation.ids_in_bounds)
    app.register_blueprint(api.bp)
    app.register_blueprint(admin_api.bp)
    app.register_blueprint(models_api.bp)
    app.register_blueprint(dashboard.bp)
    app.register_blueprint(dashboard.session_bp)
    app.register_blueprint(events.bp)  # the dashboard's push channel (its own budget, above)

    app.add_url_rule("/healthz", "healthz", healthz_view(db, bus, settings))

    @app.get("/api/openapi.json")
    def openapi_json() -> Response:
        return jsonify(openapi.document(max_clients=settings.MAX_CLIENTS))

    @app.get("/api/protocol.json")
    def protocol_json() -> Response:
        """The WebSocket messages a client sends, as JSON Schema (app/protocol.py)."""
        return jsonify(protocol.describe())

    @app.before_request
    def _ws_origin() -> tuple[Response, int] | None:
        """A browser handshake from a foreign origin gets a 403 before the upgrade."""
        if request.endpoint != "ws":
            return None
        # No permessage-deflate: simple-websocket accepts it whenever a client offers it
        # (browsers and most libraries do), and each socket then keeps a zlib compressor of
        # 256 KB for messages of a few hundred bytes (docs/operations.md, "Scale").
        request.environ.pop("HTTP_SEC_WEBSOCKET_EXTENSIONS", None)
        origin = request.headers.get("Origin")
        if origin_allowed(origin, request.host, settings.WS_ALLOWED_ORIGINS):
            return None
        return errors.error_response(
            403, f"origin {origin!r} may not open /ws (WS_ALLOWED_ORIGINS)", "origin_not_allowed"
        )

    sock = Sock(app)

    @sock.route("/ws")
    def ws(socket: Any) -> None:
        hub.start()
        Connection(socket, hub, db, settings, request.remote_addr or "?").serve()

    add_access_log(app)
    return app


def healthz_view(
    db: Database, bus: Bus, settings: server_settings.Settings
) -> Callable[[], tuple[Response, int]]:
    """``GET /healthz``: the database and the broker answer, and how many clients are connected
    to any web process (the database's view; None when it is down). 503 when either is down."""

    def healthz() -> tuple[Response, int]:
        db_ok = db.ping()
        broker_ok = bus.ping()
        connected = None
        if db_ok:
            try:
                connected = db.run(clients.connected_count)
            except Exception as error:  # it went down since the ping
                log.warning("event=healthz state=count_failed error=%s", type(error).__name__)
                db_ok = False
        body = {
            "status": "ok" if db_ok and broker_ok else "degraded",
            "database": db_ok,
            "broker": broker_ok,
            "mode": "embedded" if settings.embedded else "production",
            "connected_clients": connected,
        }
        return jsonify(body), 200 if db_ok and broker_ok else 503

    return healthz


def add_access_log(app: Flask) -> None:
    """One ``aifarm.access`` line per HTTP request: address, method, path, status, bytes, ms."""

    @app.before_request
    def _start_timer() -> None:
        g.started = time.perf_counter()

    @app.after_request
    def _access(response: Response) -> Response:
        elapsed = (time.perf_counter() - g.get("started", time.perf_counter())) * 1000
        access_log.info(
            'remote=%s method=%s path="%s" status=%d bytes=%s ms=%.1f',
            request.remote_addr, request.method, request.path, response.status_code,
            response.content_length if response.content_length is not None else "-", elapsed,
        )  # fmt: skip
        return response
