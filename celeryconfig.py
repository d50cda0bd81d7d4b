"""Celery settings, from the environment (see server_settings.py). Every beat entry lives here.

Production: ``REDIS_URL`` is the broker and the result backend. Embedded (no ``REDIS_URL``):
an in-memory broker inside the web process, served by an in-process worker and beat.
"""

from __future__ import annotations

from pathlib import Path

from kombu import Queue

import server_settings

_settings = server_settings.load()

broker_url = _settings.broker_url
# Results are only read by chords (sliced aggregation); everything else ignores them.
result_backend = _settings.REDIS_URL or "cache+memory://"
task_ignore_result = True
result_expires = 3600

# JSON only: a message is never unpickled.
task_serializer = "json"
result_serializer = "json"
accept_content = ["json"]
result_accept_content = ["json"]

# A task is acknowledged after it ran; a worker killed mid-task gives it back to the queue.
# Every task is idempotent (compare-and-set updates, round guards), so running twice is safe.
task_acks_late = True
task_reject_on_worker_lost = True
worker_prefetch_multiplier = 1
# Stopping a worker (docs/operations.md): run it with REMAP_SIGTERM=SIGQUIT in its environment,
# so SIGTERM is Celery's soft shutdown: tasks running get this many seconds to finish (the
# short ones do), then the rest are cancelled and their unacknowledged messages go back to the
# broker at once, for another worker, instead of waiting out the visibility timeout. Keep it
# below the supervisor's grace before SIGKILL (docker: 10 s).
worker_soft_shutdown_timeout = 4.0
worker_hijack_root_logger = False
worker_redirect_stdouts = False
# Task events cost three Redis publishes per task; Flower switches them on in the workers it
# watches (``enable_events``), so they are off by default.
worker_send_task_events = False

broker_connection_retry_on_startup = True
broker_connection_timeout = 3
# Publishing to a dead broker fails fast; the row is committed, and beat's safety net
# (below) finds the work again once the broker is back.
task_publish_retry = True
task_publish_retry_policy = {"max_retries": 2, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.5}

if _settings.embedded:
    broker_transport_options = {"polling_interval": 0.005}
else:
    # A message not acknowledged within this many seconds is delivered again: it must be
    # longer than the slowest task (aggregation of a large model).
    broker_transport_options = {
        "visibility_timeout": 3600,
        "socket_connect_timeout": 3,
        "socket_timeout": 10,
    }
    result_backend_transport_options = {"socket_connect_timeout": 3, "socket_timeout": 10}

# Aggregation can take long; it has its own queue so scheduling never waits behind it.
# A plain `celery -A workers worker` consumes both queues.
task_default_queue = "celery"
task_queues = (Queue("celery"), Queue("aggregation"))
task_routes = {
    "workers.tasks.aggregate_round": {"queue": "aggregation"},
    "workers.tasks.aggregate_slice": {"queue": "aggregation"},
    "workers.tasks.finish_sliced_round": {"queue": "aggregation"},
}

beat_schedule_filename = str(Path(_settings.DATA_DIR) / "celerybeat-schedule")
beat_scheduler = "workers:Scheduler"  # PersistentScheduler that creates DATA_DIR first
beat_schedule = {
    # Clients not heard from within CONNECTION_TIMEOUT become inactive; their work is released.
    # The same run re-drives anything a lost message left behind.
    "sweep": {"task": "workers.tasks.sweep", "schedule": _settings.SWEEP_INTERVAL},
    # Safety net for lost doorbells: serve clients still waiting for work.
    "schedule": {"task": "workers.tasks.schedule", "schedule": _settings.SCHEDULE_INTERVAL},
}
