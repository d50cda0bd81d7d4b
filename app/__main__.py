"""``python -m app``: serve the web tier with gevent (and, embedded, the worker and beat too).

    python -m app                 serve on SERVER_HOST:SERVER_PORT
    python -m app token [LABEL]   create an admin token and print it
    python -m app init-db         create the tables (schema.sql on MySQL, the models on SQLite)
                                  and add the columns a database of an older version lacks
    python -m app bootstrap-token print a first admin token if none exists (gunicorn runs this)

With no REDIS_URL this is the embedded default: SQLite under DATA_DIR, an in-memory broker,
and a real Celery worker and beat in this process. With REDIS_URL set it serves the web tier
alone; run ``celery -A workers worker`` and one ``celery -A workers beat`` beside it.
"""

from gevent import monkey

monkey.patch_all()

import logging  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402

import config  # noqa: E402
from store import schema  # noqa: E402
from store.auth import bootstrap_admin_token, create_admin_token  # noqa: E402
from store.db import Database  # noqa: E402


def init_db(settings: config.Settings) -> None:
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


def print_bootstrap_token(settings: config.Settings) -> None:
    db = Database(settings.database_url)
    if db.is_sqlite:
        db.create_all()
    with db.session() as s:
        token = bootstrap_admin_token(s, settings.ADMIN_TOKEN)
    if token:
        print(f"ADMIN TOKEN (shown once, stored hashed): {token}", flush=True)


def serve(settings: config.Settings) -> None:
    from gevent.pywsgi import WSGIHandler, WSGIServer

    from app import create_app

    class Handler(WSGIHandler):
        """Close the TCP connection after a WebSocket ends instead of reading it as HTTP again."""

        def run_application(self) -> None:
            upgrade = self.environ.get("HTTP_UPGRADE", "").lower() == "websocket"
            super().run_application()
            if upgrade:
                self.close_connection = True

    app = create_app()
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
        log=None,
        error_log=logging.getLogger("aifarm.wsgi"),
    )

    def shutdown(*_: object) -> None:
        server.stop(timeout=3)
        if stop_worker is not None:
            stop_worker()

    signal.signal(signal.SIGTERM, shutdown)
    signal.signal(signal.SIGINT, shutdown)
    mode = "embedded: SQLite + in-process worker and beat" if settings.embedded else "web tier"
    print(f"AI Farm server on http://{settings.SERVER_HOST}:{settings.SERVER_PORT} ({mode})", flush=True)
    server.serve_forever()


def main(argv: list[str]) -> int:
    settings = config.load()
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
    elif command == "bootstrap-token":
        print_bootstrap_token(settings)
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
