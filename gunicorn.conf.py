"""gunicorn settings for the web tier: ``gunicorn 'app:create_app()'``.

The gevent worker holds thousands of WebSockets per process (flask-sock keeps one greenlet
per socket; PyMySQL and redis-py cooperate with gevent). Each worker process has its own
sockets; pushes reach them through the Redis doorbell.
"""

import os
import subprocess
import sys

bind = f"{os.environ.get('SERVER_HOST', '0.0.0.0')}:{os.environ.get('SERVER_PORT', '8000')}"
worker_class = "gevent"
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
# 10,000 volunteers on one process, and room beside them for the API, the dashboard and health checks
worker_connections = int(os.environ.get("WORKER_CONNECTIONS", "12000"))
graceful_timeout = 10
accesslog = None  # the app writes LOG_DIR/access.log itself


def raise_open_files(needed: int) -> tuple[int, int]:
    """Raise this process's open-files soft limit to ``needed`` (the workers it forks inherit
    it), as far as the hard limit allows; say so in one line when that is not far enough.
    Every WebSocket is a file descriptor. Returns the (soft, hard) limits now."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        soft = want
    if soft < needed:
        print(
            f"gunicorn.conf.py: open-files limit {soft} is below WORKER_CONNECTIONS + 200 = {needed}: "
            "a process refuses sockets beyond it; raise the hard limit (ulimit -Hn, LimitNOFILE=, "
            "ulimits: nofile)",
            file=sys.stderr,
        )
    return soft, hard


def on_starting(server):
    raise_open_files(worker_connections + 200)  # sockets, plus database, Redis and log files
    # Counters and histograms of every worker go to one folder of this master's, emptied now,
    # which each worker's GET /metrics merges (prometheus_client's multiprocess mode; the
    # environment variable must be set before the workers import prometheus_client).
    import server_settings

    server_settings.setup_metrics_dir(server_settings.load(), "web")
    # In a subprocess, so the master imports nothing the gevent workers must patch first. It
    # checks the schema first: missing or older, it prints one line naming `python -m app
    # init-db` and exits 3 (store/schema_check.py EXIT_CODE), and gunicorn does not start.
    if subprocess.run([sys.executable, "-m", "app", "bootstrap-token"], check=False).returncode == 3:
        sys.exit(3)


def child_exit(server, worker):
    """A worker is gone (stopped, crashed, recycled): drop its live gauges; its counters stay."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def post_worker_init(worker):
    """On SIGTERM (a stop, or a reload replacing the workers) tell this worker's clients to
    reconnect at once (close 1012) and write their progress, instead of holding their sockets
    until graceful_timeout and then cutting them. gunicorn's own handler still runs first."""
    import signal

    import gevent

    hub = getattr(worker.wsgi, "extensions", {}).get("aifarm.hub")
    if hub is None:  # the app failed to load
        return
    graceful = worker.handle_exit
    grace = max(1.0, worker.cfg.graceful_timeout - 2.0)

    def handle_exit(sig, frame):
        graceful(sig, frame)
        gevent.spawn(hub.shutdown, grace)  # it waits: in a greenlet, not in the signal handler

    signal.signal(signal.SIGTERM, handle_exit)
    signal.siginterrupt(signal.SIGTERM, False)


def worker_exit(server, worker):
    """Last words of a worker: write the progress its sockets left behind (none is lost)."""
    hub = getattr(getattr(worker, "wsgi", None), "extensions", {}).get("aifarm.hub")
    if hub is not None:
        hub.shutdown(timeout=0)
