"""``python -m app``: serve the web tier with gevent (and, embedded, the worker and beat too).

    python -m app                 serve on SERVER_HOST:SERVER_PORT
    python -m app token [LABEL]   create an admin token and print it
    python -m app init-db         create the tables (schema.sql on MySQL, the models on SQLite)
                                  and add the columns a database of an older version lacks
    python -m app bootstrap-token print a first admin token if none exists (gunicorn runs this);
                                  exits 3 when the schema is missing or older (store/schema_check.py)
    python -m app tasks ...       admin commands over the REST API: submit, list, show, watch,
    python -m app clients ...     pause, resume, stop tasks; list, disable, enable clients
                                  (app/admin_cli.py; --help for each)

With no REDIS_URL this is the embedded default: SQLite under DATA_DIR, an in-memory broker,
and a real Celery worker and beat in this process. With REDIS_URL set it serves the web tier
alone; run ``celery -A workers worker`` and one ``celery -A workers beat`` beside it.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import logging  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import TYPE_CHECKING  # noqa: E402

import server_settings  # noqa: E402
from app import admin_cli  # noqa: E402
from store import schema, schema_check  # noqa: E402
from store.auth import bootstrap_admin_token, create_admin_token  # noqa: E402
from store.db import Database  # noqa: E402

if TYPE_CHECKING:
    from gevent.pywsgi import WSGIServer

    from app.hub import Hub

log = logging.getLogger("aifarm.server")

# Seconds each step of a SIGTERM/SIGINT shutdown may take (9 s in all at most, within the
# 10 s a supervisor usually grants before SIGKILL): sockets to end after their close frame,
# HTTP requests in flight to finish, the in-process worker (embedded) to finish its task.
SOCKETS_GRACE = 4.0
REQUESTS_GRACE = 2.0
WORKER_GRACE = 3.0


def init_db(settings: server_settings.Settings) -> None:
    db = Database(settings.database_url)
    if db.is_mysql:
        from sqlalchemy import create_engine

        url = db.engine.url
        server = create_engine(url.set(database=""), isolation_level="AUTOCOMMIT")
        with server.connect() as conn:
            conn.exec_driver_sql(
                f"CREATE DATABASE IF NOT EXISTS `{url.database}` "
                "CHARACTER SET utf8mb4 COLLATE utf8mb4_general_ci"
            )
        server.dispose()
        with db.engine.begin() as conn:
            existing = {row[0] for row in conn.exec_driver_sql("SHOW TABLES")}
            for statement in schema.statements():
                if schema.table_of(statement) not in existing:
                    conn.exec_driver_sql(statement)
        for name in db.add_missing_columns():
            print(f"added {name}")
    else:
        db.create_all()
    print(f"database ready: {db.engine.url.render_as_string(hide_password=True)}")


def print_bootstrap_token(settings: server_settings.Settings) -> None:
    db = Database(settings.database_url)
    if db.is_sqlite:
        db.create_all()
    with db.session() as s:
        token = bootstrap_admin_token(s, settings.ADMIN_TOKEN)
    if token:
        print(f"ADMIN TOKEN (shown once, stored hashed): {token}", flush=True)


def serve(settings: server_settings.Settings) -> None:
    import gevent
    from gevent.event import Event
    from gevent.pool import Pool
    from gevent.pywsgi import WSGIHandler, WSGIServer

    from app import create_app

    class Handler(WSGIHandler):
        """Close the TCP connection after a WebSocket ends instead of reading it as HTTP again."""

        def run_application(self) -> None:
            upgrade = self.environ.get("HTTP_UPGRADE", "").lower() == "websocket"
            super().run_application()
            if upgrade:
                self.close_connection = True

    schema_check.require(settings.database_url, "web tier")  # SQLite (embedded): makes its own
    app = create_app()
    hub: Hub = app.extensions["aifarm.hub"]
    print_bootstrap_token(settings)
    stop_worker = None
    if settings.embedded:
        from workers.embedded import start

        stop_worker = start(settings)
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.WARNING)
    logging.getLogger().addHandler(console)
    server = WSGIServer(
        (settings.SERVER_HOST, settings.SERVER_PORT),
        app,
        handler_class=Handler,
        spawn=Pool(),  # a pool, so that stop() can wait for the requests in flight
        log=None,
        error_log=logging.getLogger("aifarm.wsgi"),
    )
    # gevent's own signal handling: the handler runs in a greenlet of its own, where waiting is
    # allowed (signal.signal's runs inside the event loop, where it raises BlockingSwitchOutError).
    # It only wakes this greenlet, which does the whole shutdown below.
    stopping = Event()
    gevent.signal_handler(signal.SIGTERM, stopping.set)
    gevent.signal_handler(signal.SIGINT, stopping.set)
    server.start()
    mode = "embedded: SQLite + in-process worker and beat" if settings.embedded else "web tier"
    print(f"AI Farm server on http://{settings.SERVER_HOST}:{settings.SERVER_PORT} ({mode})", flush=True)
    stopping.wait()
    shutdown(server, hub, stop_worker)


def shutdown(server: WSGIServer, hub: Hub, stop_worker: Callable[[float], None] | None) -> None:
    """Stop accepting, tell the connected clients to reconnect, write what they sent, let the
    requests in flight finish, then stop beat and the in-process worker. Each step is bounded."""
    log.info("event=shutdown state=start")
    server.close()  # no new connections; clients retrying get refused and back off
    hub.shutdown(timeout=SOCKETS_GRACE)  # close 1012 (Service Restart); flush their progress
    log.info("event=shutdown state=sockets_closed")
    server.stop(timeout=REQUESTS_GRACE)  # HTTP requests in flight (an upload) may finish
    hub.flush()  # progress of any socket ended by the stop above
    log.info("event=shutdown state=requests_done")
    if stop_worker is not None:
        stop_worker(WORKER_GRACE)
    log.info("event=shutdown state=done")


def main(argv: list[str]) -> int:
    if argv and argv[0] in admin_cli.GROUPS:
        return admin_cli.main(argv)  # a REST client: no server settings, no database
    settings = server_settings.load()
    command = argv[0] if argv else "serve"
    if command == "serve":
        serve(settings)
    elif command == "token":
        label = argv[1] if len(argv) > 1 else "cli"
        db = Database(settings.database_url)
        if db.is_sqlite:
            db.create_all()
        with db.session() as s:
            token = create_admin_token(s, label)
        print(token)
    elif command == "init-db":
        init_db(settings)
    elif command == "bootstrap-token":  # gunicorn's master runs this first (gunicorn.conf.py)
        schema_check.require(settings.database_url, "web tier")
        print_bootstrap_token(settings)
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
