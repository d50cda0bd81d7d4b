"""The Celery app and its tasks: scheduling, sweeps, aggregation, beat targets. Never imports Flask.

Run with ``celery -A workers worker``, exactly one ``celery -A workers beat``, and
``celery -A workers flower``. The web tier sends tasks by name (``workers.tasks.*``).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from celery import Celery
from celery.beat import PersistentScheduler
from celery.signals import (
    after_setup_logger,
    celeryd_init,
    worker_init,
    worker_process_init,
    worker_process_shutdown,
)


class Scheduler(PersistentScheduler):
    """Beat's default scheduler, creating the folder of its schedule file (under DATA_DIR)
    first: a beat that cannot open the file dies at start, and with it the sweep and the
    scheduling safety net."""

    def setup_schedule(self) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(self.schedule_filename)), exist_ok=True)
        super().setup_schedule()


celery = Celery("aifarm", include=["workers.tasks"])
celery.config_from_object("celeryconfig")


@after_setup_logger.connect
def _log_to_log_dir(loglevel: int | str | None = None, **_: Any) -> None:
    """Besides Celery's own output, workers and beat write LOG_DIR/server.log and error.log too.

    The root level is LOG_LEVEL or ``--loglevel``, whichever is more verbose: a worker started
    with ``--loglevel INFO`` still says ``ready.`` on its console when LOG_LEVEL is WARNING."""
    import server_settings

    server_settings.setup_logging(server_settings.load())
    if loglevel is not None:
        asked = loglevel if isinstance(loglevel, int) else logging.getLevelName(str(loglevel).upper())
        root = logging.getLogger()
        if isinstance(asked, int) and asked < root.level:
            root.setLevel(asked)


@celeryd_init.connect
def _require_schema(**_: Any) -> None:
    """``celery worker``: a database without the schema of this code (never made, or from an
    older version) stops the worker at start with one line naming ``python -m app init-db``
    (store/schema_check.py). SystemExit passes Celery's signal dispatch, which logs Exceptions."""
    import server_settings
    from store import schema_check

    schema_check.require(server_settings.load().database_url, "worker")


@celeryd_init.connect
def _metrics_folder(**_: Any) -> None:
    """``celery worker`` (not the embedded one): this worker and its pool count their round
    and aggregation times into a folder of their own under METRICS_DIR, which the web
    processes of this host serve on ``GET /metrics`` (docs/operations.md, "Metrics"). This
    is the worker's first signal: its metrics (``workers/federated.py``) are made later."""
    import server_settings

    server_settings.setup_metrics_dir(server_settings.load(), "worker")


@worker_process_shutdown.connect
def _metrics_process_dead(pid: int | None = None, **_: Any) -> None:
    """A pool process ends: its live gauges go (counters and histograms stay, as they should)."""
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid or os.getpid())


@worker_init.connect
def _import_before_fork(**_: Any) -> None:
    """Import the heavy modules in the worker's parent, before the pool forks: otherwise each
    pool child pays ~2 s of imports in its first aggregation (measured by bench/federated.py).
    Imports only: no torch computation runs before the fork."""
    import sklearn.datasets  # noqa: F401  (0.8 s: the digits dataset's loader, used to evaluate)

    import aggregation.rounds  # noqa: F401
    import training.data
    import training.loop  # noqa: F401
    import workers.federated  # noqa: F401


@worker_process_init.connect
def _dispose_inherited_pool(**_: Any) -> None:
    """A forked pool child must not reuse the parent's database connections."""
    from store.db import get_db

    get_db().dispose(close=False)


__all__ = ["celery"]
