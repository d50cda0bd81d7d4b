"""The reference both dispatch benchmarks compare against: MariaDB's claim transaction alone.

``SELECT ... FOR UPDATE SKIP LOCKED`` + ``UPDATE`` + ``COMMIT`` on ``rows`` queued shards of the
real schema (its index on status, priority, id), one connection, ``claims`` times. No gevent and
no asyncio here, so bench/dispatch.py (gevent) and bench/load.py (asyncio) both import it.
"""

from __future__ import annotations

import time

import pymysql


def claims_per_second(database: str, rows: int, claims: int) -> float:
    """Claims per second on one connection; the rows it made are deleted again."""
    conn = pymysql.connect(host="127.0.0.1", user="root", database=database, autocommit=False)
    try:
        with conn.cursor() as cur:
            cur.execute("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
            cur.execute(
                "INSERT INTO tasks (type, requirements, status, created_at, updated_at, num_shards) "
                "VALUES ('bare', '{}', 'running', NOW(), NOW(), 1)"
            )
            task_id = cur.lastrowid
            for start in range(0, rows, 10_000):
                values = ",".join(
                    f"({task_id}, 0, {i}, 'queued', {i % 7}, 'bare', NOW(6), NOW(6))"
                    for i in range(start, min(start + 10_000, rows))
                )
                cur.execute(
                    "INSERT INTO task_shards (task_id, round, `rank`, status, priority, task_type, "
                    f"created_at, updated_at) VALUES {values}"
                )
            conn.commit()
            cur.execute("ANALYZE TABLE task_shards")
            cur.fetchall()
            t0 = time.perf_counter()
            for _ in range(claims):
                cur.execute(
                    "SELECT id FROM task_shards WHERE status = 'queued' ORDER BY priority DESC, id "
                    "LIMIT 1 FOR UPDATE SKIP LOCKED"
                )
                (shard_id,) = cur.fetchone()
                cur.execute("UPDATE task_shards SET status = 'assigned' WHERE id = %s", (shard_id,))
                conn.commit()
            elapsed = time.perf_counter() - t0
            cur.execute("DELETE FROM task_shards WHERE task_id = %s", (task_id,))
            cur.execute("DELETE FROM tasks WHERE id = %s", (task_id,))
            conn.commit()
    finally:
        conn.close()
    return claims / elapsed
