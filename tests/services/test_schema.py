"""schema.sql and the SQLAlchemy models describe the same tables, column for column, on MariaDB."""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from launch import ROOT, python
from store.auth import admin_token_valid
from store.db import Database
from store.models import ASSIGNMENT_STATUSES, CLIENT_STATUSES, TASK_STATUSES, Base
from tests.conftest import apply_schema, mysql_connect


def show_create(database: str) -> dict[str, list[str]]:
    conn = mysql_connect(database)
    out: dict[str, list[str]] = {}
    with conn.cursor() as cur:
        cur.execute("SHOW TABLES")
        for (table,) in cur.fetchall():
            cur.execute(f"SHOW CREATE TABLE `{table}`")
            ddl = re.sub(r" AUTO_INCREMENT=\d+", "", cur.fetchone()[1])
            out[table] = sorted(line.strip().rstrip(",") for line in ddl.splitlines())
    conn.close()
    return out


@pytest.fixture
def from_models(services: None) -> Iterator[str]:
    name = "aifarm_test_models"
    conn = mysql_connect()
    with conn.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS {name}")
        cur.execute(f"CREATE DATABASE {name} CHARACTER SET utf8mb4 COLLATE utf8mb4_general_ci")
    db = Database(f"mysql+pymysql://root@127.0.0.1:3306/{name}")
    db.create_all()
    db.dispose()
    yield name
    with conn.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS {name}")
    conn.close()


def test_schema_sql_equals_the_models(mysql_url: str, from_models: str) -> None:
    applied = show_create(mysql_url.rsplit("/", 1)[1])
    modelled = show_create(from_models)
    assert sorted(applied) == sorted(modelled) == sorted(Base.metadata.tables)
    for table in applied:
        assert applied[table] == modelled[table], table


def test_the_specification_tables_keep_their_columns_and_enums(mysql_url: str) -> None:
    ddl = show_create(mysql_url.rsplit("/", 1)[1])
    spec = {
        "tasks": [
            "id",
            "type",
            "requirements",
            "status",
            "client_id",
            "created_at",
            "updated_at",
            "result",
            "error_log",
            "priority",
            "config",
            "checkpoint_path",
        ],
        "task_assignments": [
            "id",
            "task_id",
            "client_id",
            "assigned_at",
            "status",
            "rank",
            "checkpoint_path",
        ],
        "clients": ["id", "cpu_info", "ram_info", "gpu_info", "session_info", "last_seen", "status"],
    }
    for table, columns in spec.items():
        present = {line.split("`")[1] for line in ddl[table] if line.startswith("`")}
        assert set(columns) <= present, table
    assert TASK_STATUSES[:5] == ("pending", "running", "completed", "failed", "error")
    assert ASSIGNMENT_STATUSES[:4] == ("assigned", "training", "completed", "failed")
    assert CLIENT_STATUSES == ("active", "inactive")
    assert "KEY `ix_task_shards_claim` (`status`,`priority` DESC,`id`)" in ddl["task_shards"]
    cascade = "FOREIGN KEY (`task_id`) REFERENCES `tasks` (`id`) ON DELETE CASCADE"
    assert any(cascade in line for line in ddl["task_assignments"])


OLD_ROW = "INSERT INTO admin_tokens (token_hash, label, created_at) VALUES (%s, %s, %s)"


def init_db(env: dict[str, str]) -> str:
    done = subprocess.run(
        [python(), "-m", "app", "init-db"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_init_db_adds_the_columns_a_database_of_an_older_version_lacks(from_models: str) -> None:
    name = "aifarm_test_upgrade"
    conn = mysql_connect()
    with conn.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS {name}")
        cur.execute(f"CREATE DATABASE {name} CHARACTER SET utf8mb4 COLLATE utf8mb4_general_ci")
    try:
        apply_schema(name)
        old = mysql_connect(name)
        with old.cursor() as cur:  # admin_tokens as it was before the panel's sign-in
            cur.execute("ALTER TABLE admin_tokens DROP COLUMN expires_at")
            cur.execute(OLD_ROW, ("ab", "ops", "2026-01-01"))
            # and assignments and clients as they were before deadlines and reliability
            cur.execute(
                "ALTER TABLE task_assignments DROP INDEX ix_assignments_deadline, DROP COLUMN deadline_at"
            )
            cur.execute(
                "ALTER TABLE task_assignments MODIFY COLUMN status "
                "ENUM('assigned','training','completed','failed','released') NOT NULL"
            )
            cur.execute("ALTER TABLE clients DROP COLUMN valid_results")
        old.close()
        env = {**os.environ, "DATABASE_URL": f"mysql+pymysql://root@127.0.0.1:3306/{name}"}
        said = init_db(env)
        for added in (
            "column admin_tokens.expires_at",
            "column task_assignments.deadline_at",
            "index task_assignments.ix_assignments_deadline",
            "enum values task_assignments.status",
            "column clients.valid_results",  # NOT NULL DEFAULT 0: the rows get the default
        ):
            assert f"added {added}" in said, said
        assert show_create(name) == show_create(from_models)
        assert "added" not in init_db(env)  # nothing left to add
        check = mysql_connect(name)
        with check.cursor() as cur:
            cur.execute("SELECT token_hash, label, expires_at FROM admin_tokens")
            assert cur.fetchall() == (("ab", "ops", None),)  # the rows are kept
        check.close()
    finally:
        with conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS {name}")
        conn.close()


def test_an_embedded_database_of_an_older_version_gets_its_missing_columns(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    with sqlite3.connect(path) as old:
        old.execute(
            "CREATE TABLE admin_tokens (id INTEGER PRIMARY KEY, token_hash VARCHAR(64) NOT NULL UNIQUE, "
            "label VARCHAR(255) NOT NULL, created_at DATETIME NOT NULL)"
        )
        old.execute(OLD_ROW.replace("%s", "?"), ("ab", "ops", "2026-01-01"))
    db = Database(f"sqlite:///{path}")
    try:
        db.create_all()  # what the embedded server does at start
        with db.session() as s:
            assert s.execute(text("SELECT label, expires_at FROM admin_tokens")).all() == [("ops", None)]
            assert admin_token_valid(s, "not-ab", "") is False
    finally:
        db.dispose()
