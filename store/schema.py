"""schema.sql as a list of statements (for ``python -m app init-db`` and the tests)."""

from __future__ import annotations

from pathlib import Path

SCHEMA_SQL = Path(__file__).resolve().parent.parent / "schema.sql"


def statements(sql: str | None = None) -> list[str]:
    """The DDL statements of schema.sql, comments removed."""
    text = SCHEMA_SQL.read_text() if sql is None else sql
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("--")]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]


def table_of(statement: str) -> str:
    """The table a ``CREATE TABLE name (...)`` statement creates."""
    return statement.split()[2]
