"""The Celery app and its tasks: scheduling, sweeps, aggregation, beat targets. Never imports Flask.

Run with ``celery -A workers worker``, exactly one ``celery -A workers beat``, and
``celery -A workers flower``. The web tier sends tasks by name (``workers.tasks.*``).
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from celery.signals import worker_process_init

celery = Celery("aifarm", include=["workers.tasks"])
celery.config_from_object("celeryconfig")


@worker_process_init.connect
def _dispose_inherited_pool(**_: Any) -> None:
    """A forked pool child must not reuse the parent's database connections."""
    from store.db import get_db

    get_db().dispose(close=False)


__all__ = ["celery"]
