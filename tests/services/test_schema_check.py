"""A production process that finds the schema missing or older than its code refuses to start with
one line naming ``python -m app init-db`` (store/schema_check.py): gunicorn (its master runs
``python -m app bootstrap-token`` first), ``python -m app`` serving the web tier alone, and a
Celery worker. After init-db the same database passes.

Each case has a database of its own on the session's MariaDB (``aifarm_schema_<pid>``)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from launch import ROOT, python
from store.models import Base
from tests.conftest import MYSQL_HOST, MYSQL_PORT, apply_schema, mysql_connect, service_env
from tests.helpers import free_port

EXIT_TIMEOUT = 60.0  # a process imports its code, checks the schema, exits
INIT_DB = "run `python -m app init-db` with this DATABASE_URL"


@pytest.fixture
def empty_database(services: None, redis_url: str, tmp_path: Path) -> Iterator[dict[str, str]]:
    """The environment of a production process on a database that exists and has no tables."""
    name = f"aifarm_schema_{os.getpid()}"
    conn = mysql_connect()
    with conn.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS {name}")
        cur.execute(f"CREATE DATABASE {name} CHARACTER SET utf8mb4 COLLATE utf8mb4_general_ci")
    env = service_env(
        tmp_path, DATABASE_URL=f"mysql+pymysql://root@{MYSQL_HOST}:{MYSQL_PORT}/{name}", REDIS_URL=redis_url
    )
    try:
        yield env
    finally:
        with conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS {name}")
        conn.close()


def run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run a server process to its end (it must end by itself: it refuses to start)."""
    try:
        return subprocess.run(
            args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=EXIT_TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"{' '.join(args[:4])} started on a database without the schema: {error}", pytrace=False)


def refusal(result: subprocess.CompletedProcess[str]) -> str:
    """The one line the process refused with; nothing else said about it, no traceback."""
    output = result.stdout + result.stderr
    assert result.returncode == 3, output
    lines = [line for line in output.splitlines() if INIT_DB in line]
    assert len(lines) == 1, output
    assert "Traceback" not in output, output
    return lines[0]


GUNICORN = [python(), "-m", "gunicorn", "app:create_app()", "--workers", "1", "--worker-class", "gevent"]
WORKER = [python(), "-m", "celery", "-A", "workers", "worker", "--loglevel", "INFO", "--without-mingle"]


def test_web_and_worker_refuse_an_empty_database(empty_database: dict[str, str]) -> None:
    gunicorn = run([*GUNICORN, "--bind", f"127.0.0.1:{free_port()}"], empty_database)
    line = refusal(gunicorn)
    assert line.startswith("FATAL: the database has no schema (missing table "), line
    assert line.endswith("then start the web tier again"), line
    assert "Booting worker" not in gunicorn.stderr  # the master stopped before its workers

    worker = run([*WORKER, "--hostname", f"schema-{os.getpid()}@%h"], empty_database)
    assert refusal(worker).endswith("then start the worker again")
    assert "ready." not in worker.stdout + worker.stderr


def test_an_older_schema_is_refused_until_init_db_adds_what_it_lacks(empty_database: dict[str, str]) -> None:
    database = empty_database["DATABASE_URL"].rsplit("/", 1)[1]
    apply_schema(database)
    table, column = next(
        (t.name, c.name)
        for t in Base.metadata.sorted_tables
        for c in t.columns
        if c.nullable and not c.primary_key
    )
    conn = mysql_connect(database)
    with conn.cursor() as cur:
        cur.execute(f"ALTER TABLE {table} DROP COLUMN {column}")  # as a database of an older version
    conn.close()

    web = [python(), "-m", "app"]  # the web tier alone (REDIS_URL set), gevent's WSGIServer
    line = refusal(run(web, {**empty_database, "SERVER_HOST": "127.0.0.1", "SERVER_PORT": str(free_port())}))
    assert f"has an older schema (missing column {table}.{column})" in line, line

    init_db = run([python(), "-m", "app", "init-db"], empty_database)
    assert init_db.returncode == 0 and f"added column {table}.{column}" in init_db.stdout, init_db
    # gunicorn's check, alone: it passes now and prints the first admin token
    check = run([python(), "-m", "app", "bootstrap-token"], empty_database)
    assert check.returncode == 0 and INIT_DB not in check.stdout + check.stderr, check
