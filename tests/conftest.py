"""Fixtures over the real services: MariaDB, Redis, a Celery worker, gunicorn, the embedded server.

Tests create their own MariaDB database (``aifarm_test_<pid>``, from schema.sql) and use their
own Redis db (13, or TEST_REDIS_DB for a second run beside it; plus the xdist worker's number),
flushed at the start and the end of the session. If MariaDB or Redis cannot be reached, every
test that needs them errors out loudly: nothing is skipped.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pymysql
import pytest
import redis
from celery import Celery
from sqlalchemy import text

from launch import local_env
from store import schema
from store.db import Database
from tests.helpers import ADMIN, Proc, free_port, start_gunicorn, start_worker

MYSQL_HOST = os.environ.get("TEST_MYSQL_HOST", "127.0.0.1")
MYSQL_PORT = int(os.environ.get("TEST_MYSQL_PORT", "3306"))
REDIS_BASE = os.environ.get("TEST_REDIS", "redis://127.0.0.1:6379")
# Another db lets two test runs share one Redis (TEST_REDIS_DB); pytest-xdist's workers (`make
# test` runs TEST_WORKERS of them) take that db and the ones after it: gw0 the first, gw1 the next.
XDIST_WORKER = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw"))
REDIS_DB = int(os.environ.get("TEST_REDIS_DB", "13")) + XDIST_WORKER
TABLES = ("task_assignments", "task_shards", "task_rounds", "tasks", "clients", "admin_tokens")


def mysql_connect(database: str | None = None) -> pymysql.Connection:  # type: ignore[type-arg]
    return pymysql.connect(
        host=MYSQL_HOST, port=MYSQL_PORT, user="root", password="", database=database, autocommit=True
    )


def apply_schema(database: str) -> None:
    conn = mysql_connect(database)
    with conn.cursor() as cur:
        for statement in schema.statements():
            cur.execute(statement)
    conn.close()


@pytest.fixture(scope="session")
def services() -> None:
    """MariaDB and Redis must answer; if not, fail (never skip)."""
    try:
        mysql_connect().close()
    except pymysql.Error as error:
        pytest.fail(f"MariaDB at {MYSQL_HOST}:{MYSQL_PORT} is unreachable: {error}. Start it (see .ci/run).")
    try:
        redis.Redis.from_url(f"{REDIS_BASE}/{REDIS_DB}", socket_connect_timeout=2).ping()
    except redis.RedisError as error:
        pytest.fail(f"Redis at {REDIS_BASE} is unreachable: {error}. Start it (see .ci/run).")


@contextmanager
def fresh_database(name: str) -> Iterator[str]:
    """A MariaDB database ``name`` made from schema.sql, dropped afterwards; yields its URL."""
    conn = mysql_connect()
    with conn.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS {name}")
        cur.execute(f"CREATE DATABASE {name} CHARACTER SET utf8mb4 COLLATE utf8mb4_general_ci")
    apply_schema(name)
    try:
        yield f"mysql+pymysql://root@{MYSQL_HOST}:{MYSQL_PORT}/{name}"
    finally:
        with conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS {name}")
        conn.close()


@pytest.fixture(scope="session")
def mysql_url(services: None) -> Iterator[str]:
    with fresh_database(f"aifarm_test_{os.getpid()}") as url:
        yield url


@pytest.fixture(scope="session")
def redis_url(services: None) -> Iterator[str]:
    url = f"{REDIS_BASE}/{REDIS_DB}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield url
    client.flushdb()
    client.close()


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("run")


ADMIN_PASSWORD = "test-admin-password"  # the admin panel's password in test servers


def service_env(run_dir: Path, **extra: str) -> dict[str, str]:
    env = local_env(
        run_dir,
        ADMIN,
        PYTHONUNBUFFERED="1",
        CLIENT_RATE_LIMIT="100000/minute",
        ADMIN_PASSWORD=ADMIN_PASSWORD,
        ADMIN_LOGIN_RATE_LIMIT="100000/minute",
        RECONCILE_INTERVAL="1",
        SWEEP_INTERVAL="3600",
        SCHEDULE_INTERVAL="3600",
    )
    env.pop("REDIS_URL", None)
    env.pop("DATABASE_URL", None)
    env.update(extra)
    return env


@pytest.fixture(scope="session")
def prod_env(mysql_url: str, redis_url: str, run_dir: Path) -> dict[str, str]:
    # Slices of 64 KiB: every federated round here is aggregated by Celery chords of slice jobs
    # (the embedded tests cover the single-job path).
    return service_env(run_dir, DATABASE_URL=mysql_url, REDIS_URL=redis_url, AGGREGATION_SLICE_BYTES="65536")


@pytest.fixture(scope="session")
def worker(prod_env: dict[str, str], run_dir: Path) -> Iterator[Proc]:
    proc = start_worker(prod_env, run_dir / "procs")
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def server(prod_env: dict[str, str], worker: Proc, run_dir: Path) -> Iterator[int]:
    """gunicorn (gevent workers) with the production settings; yields its port."""
    port = free_port()
    proc = start_gunicorn(prod_env, port, run_dir / "procs")
    yield port
    proc.stop()


@pytest.fixture(scope="session")
def db(mysql_url: str) -> Iterator[Database]:
    database = Database(mysql_url, pool_size=4)
    yield database
    database.dispose()


@pytest.fixture
def clean(mysql_url: str) -> Iterator[None]:
    """Empty every table (but the admin tokens) before the test."""
    conn = mysql_connect(mysql_url.rsplit("/", 1)[1])
    with conn.cursor() as cur:
        # A lock left behind by a previous test fails this one loudly instead of hanging it.
        cur.execute("SET SESSION lock_wait_timeout = 30, innodb_lock_wait_timeout = 30")
        cur.execute("SET FOREIGN_KEY_CHECKS=0")
        for table in TABLES[:-1]:
            cur.execute(f"DELETE FROM {table}")
        cur.execute("SET FOREIGN_KEY_CHECKS=1")
    conn.close()
    yield


@pytest.fixture(scope="session")
def celery_client(redis_url: str) -> Iterator[Celery]:
    """A Celery producer on the test broker, to send tasks to the real worker by name."""
    app = Celery("tests", broker=redis_url)
    app.conf.update(task_serializer="json", accept_content=["json"], task_ignore_result=True)
    yield app
    app.close()


def rows(db: Database, sql: str, **params: Any) -> list[tuple[Any, ...]]:
    """Run a read in its own connection (fresh data, no ORM cache)."""
    with db.engine.connect() as conn:
        return [tuple(r) for r in conn.execute(text(sql), params)]
