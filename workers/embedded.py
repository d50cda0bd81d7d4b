"""The embedded default: a real Celery worker and beat inside the web process.

Used by ``python -m app`` when no ``REDIS_URL`` is set. The broker is Celery's in-memory
transport, so producer and consumer must share the process. The worker uses the ``solo``
pool: tasks run one at a time in the worker's own (green) thread.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

from celery.beat import EmbeddedService
from celery.worker import WorkController

import server_settings
from workers import celery

log = logging.getLogger(__name__)


def start(settings: server_settings.Settings) -> Callable[[float], None]:
    """Start the worker and beat in background threads; returns ``stop(timeout)``, which stops
    both (not from a signal handler: it waits)."""
    Path(settings.DATA_DIR).mkdir(parents=True, exist_ok=True)
    worker = WorkController(
        app=celery,
        hostname="embedded@aifarm",
        pool_cls="solo",
        concurrency=1,
        loglevel=settings.LOG_LEVEL,
        without_heartbeat=True,
        without_mingle=True,
        without_gossip=True,
    )
    thread = threading.Thread(target=worker.start, daemon=True, name="celery-worker")
    thread.start()
    beat = EmbeddedService(celery, thread=True)
    beat.start()
    # The in-memory broker starts empty: whatever was queued when the last process died is
    # gone, so sweep at once (it re-drives every stalled task and round) and serve waiters.
    celery.send_task("workers.tasks.sweep")
    celery.send_task("workers.tasks.schedule")
    log.info("event=embedded_worker state=started broker=%s", settings.broker_url)

    def stop(timeout: float) -> None:
        """Stop beat, then the worker: a warm stop, so a task running finishes, up to ``timeout``
        seconds. A task cut short when the process then exits is safe: every task is idempotent,
        and the next start sweeps and schedules (the in-memory broker keeps nothing anyway)."""
        beat.stop()
        worker.stop(in_sighandler=False)
        thread.join(timeout)
        if thread.is_alive():
            log.warning("event=embedded_worker state=stop_timeout seconds=%.0f", timeout)
        else:
            log.info("event=embedded_worker state=stopped")

    return stop
