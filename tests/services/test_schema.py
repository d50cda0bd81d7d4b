"""schema.sql and the SQLAlchemy models describe the same tables, column for column, on MariaDB."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest

from store.db import Database
from store.models import ASSIGNMENT_STATUSES, CLIENT_STATUSES, TASK_STATUSES, Base
from tests.conftest import mysql_connect


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
