"""Enqueue Celery jobs by name, after the transaction that made them necessary has committed.

A job is a doorbell: the rows it acts on are already committed, so a publish that fails
(broker down) loses nothing; beat's sweep and scheduling pass find the work again.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import server_settings

log = logging.getLogger(__name__)

_health: dict[str, Any] = {"checked": -1e9, "ok": True, "client": None, "url": None}


def enqueue(name: str, *args: Any) -> bool:
    from workers import celery

    try:
        # ignore_result: nothing here reads a job's result. Without it the result backend (Redis)
        # subscribes to each job's result channel at send: a fifth of a busy web process's CPU.
        celery.send_task(name, args=list(args), ignore_result=True)
        return True
    except Exception as error:  # recovered by beat's safety net once the broker is back
        log.warning("event=enqueue task=%s state=failed error=%s", name, type(error).__name__)
        _health.update(checked=time.monotonic(), ok=False)
        return False


def advance_task(task_id: int) -> None:
    """Ask a worker to look at a task whose shards changed (results came in)."""
    enqueue("workers.tasks.advance_task", task_id)


def request_schedule() -> None:
    """Ask for a scheduling run unless one is already queued (a burst of requests -> one run)
    or the scheduler is waiting for this ring (then Redis carries it, and no job is sent)."""
    from store.bus import get_bus

    if get_bus().ring_scheduler():
        enqueue("workers.tasks.schedule")


def broker_ok(max_age: float = 1.0) -> bool:
    """Whether the broker answers (cached for ``max_age`` seconds). Always true when embedded.

    Called for every ``task_request``: within ``max_age`` it costs one clock read (reading the
    whole configuration each time took a fifth of a busy web process's CPU)."""
    now = time.monotonic()
    if now - _health["checked"] < max_age:
        return bool(_health["ok"])
    url = server_settings.load().REDIS_URL
    if not url:  # embedded: the broker lives in this process
        _health.update(checked=now, ok=True)
        return True
    if _health["client"] is None or _health.get("url") != url:
        import redis

        _health["client"] = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=2)
        _health["url"] = url
    try:
        ok = bool(_health["client"].ping())
    except Exception:
        ok = False
    _health.update(checked=now, ok=ok)
    return ok
