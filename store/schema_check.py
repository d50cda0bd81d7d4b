"""Does the database hold the schema this code needs? Checked once when a production process starts.

The web tier (gunicorn's master, through ``python -m app bootstrap-token``; ``python -m app``
serving the web tier alone) and each Celery worker compare the live database with the models
(store/models.py): every table there, every column of each. A database that was never made or
comes from an older version makes the process exit with one line that names ``python -m app
init-db``, instead of serving requests that fail with ``Table ... doesn't exist`` while
``/healthz`` says ok. No version number to keep by hand: a column added to the models is
checked from then on.

The embedded default (SQLite) makes its own schema and is not checked. A database that does not
answer is not this check's business: the process starts, and its own outage handling applies
(503s, retries), as it does when the database goes away later.
"""

from __future__ import annotations

import logging
import sys

from sqlalchemy import create_engine, inspect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import NullPool

from store.models import Base

log = logging.getLogger("aifarm.schema")

UNKNOWN_DATABASE = 1049  # MySQL: the database itself was never made (init-db makes it)
EXIT_CODE = 3  # the process's exit status when the schema is missing or older (gunicorn.conf.py)


def missing(database_url: str) -> list[str]:
    """What the models have and the database lacks: ``table t`` or ``column t.c``, in the models'
    order; empty when the schema is complete. Raises DBAPIError when the database does not answer."""
    engine = create_engine(database_url, poolclass=NullPool, connect_args=_connect_args(database_url))
    try:
        with engine.connect() as conn:
            inspector = inspect(conn)
            tables = set(inspector.get_table_names())
            lacking: list[str] = []
            for table in Base.metadata.sorted_tables:
                if table.name not in tables:
                    lacking.append(f"table {table.name}")
                    continue
                present = {column["name"] for column in inspector.get_columns(table.name)}
                lacking += [f"column {table.name}.{c.name}" for c in table.columns if c.name not in present]
            return lacking
    finally:
        engine.dispose()


def require(database_url: str, role: str) -> None:
    """Exit (status EXIT_CODE) with one line when the database lacks part of the schema."""
    if database_url.startswith("sqlite"):
        return
    try:
        lacking = missing(database_url)
    except DBAPIError as error:
        if _error_code(error) != UNKNOWN_DATABASE:
            reason = str(error.orig).splitlines()[0] if str(error.orig) else type(error.orig).__name__
            log.warning("event=schema_check state=skipped role=%s error=%s", role, reason)
            return
        lacking = [f"table {table.name}" for table in Base.metadata.sorted_tables]
    if lacking:
        print(message(lacking, role), file=sys.stderr, flush=True)
        raise SystemExit(EXIT_CODE)


def message(lacking: list[str], role: str) -> str:
    """The one line a process refused to start with."""
    shown = ", ".join(lacking[:4]) + (f" and {len(lacking) - 4} more" if len(lacking) > 4 else "")
    tables = sum(1 for item in lacking if item.startswith("table "))
    what = "has no schema" if tables == len(Base.metadata.tables) else "has an older schema"
    return (
        f"FATAL: the database {what} (missing {shown}): run `python -m app init-db` "
        f"with this DATABASE_URL, then start the {role} again"
    )


def _error_code(error: DBAPIError) -> int | None:
    args = getattr(error.orig, "args", ())
    return args[0] if args and isinstance(args[0], int) else None


def _connect_args(database_url: str) -> dict[str, int]:
    return {"connect_timeout": 10} if database_url.startswith("mysql+pymysql") else {}
