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
worker_connections = int(os.environ.get("WORKER_CONNECTIONS", "10000"))
graceful_timeout = 10
accesslog = None  # the app writes LOG_DIR/access.log itself


def on_starting(server):
    # In a subprocess, so the master imports nothing the gevent workers must patch first.
    subprocess.run([sys.executable, "-m", "app", "bootstrap-token"], check=False)
