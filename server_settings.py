"""Server settings, read from the environment with embedded defaults.

One variable per concern. The specification's names keep their meaning and defaults; the rest
are ours. With nothing set, the server runs embedded: SQLite under ``DATA_DIR`` and an
in-memory Celery broker inside the web process. Setting ``DATABASE_URL`` and ``REDIS_URL``
selects the production topology; the code is the same.

Settings are read when :func:`load` is called (the app factory, the Celery app and the
scripts call it once), so tests can set the environment first.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import shutil
import socket
import sys
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from training.version import MIN_CLIENT_VERSION


def env_str(name: str, default: str) -> str:
    return os.environ.get(name, default)


def env_int(name: str, default: int, *, minimum: int = 0) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SystemExit(f"config: {name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise SystemExit(f"config: {name} must be >= {minimum}, got {value}")
    return value


def env_float(name: str, default: float, *, minimum: float = 0.0) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SystemExit(f"config: {name} must be a number, got {raw!r}") from None
    if value < minimum:
        raise SystemExit(f"config: {name} must be >= {minimum}, got {value}")
    return value


@dataclass(frozen=True)
class Settings:
    # --- The specification's names and defaults ---
    SERVER_HOST: str = "0.0.0.0"
    SERVER_PORT: int = 8000
    # The WebSocket is served on SERVER_PORT at /ws, and models over HTTP on the same port;
    # WEBSOCKET_PORT is read for compatibility and otherwise unused.
    WEBSOCKET_PORT: int = 8765
    MODEL_SERVER_PORT: int = 5000  # the predict server, python -m training.serve (docs/operations.md)
    MAX_CLIENTS: int = 100  # clients connected at once; the next one gets `server_full`
    MAX_TASKS_PER_CLIENT: int = 3  # open assignments one client may hold
    CONNECTION_TIMEOUT: int = 60  # seconds without a sign of life before a client is inactive
    DEFAULT_BATCH_SIZE: int = 32
    DEFAULT_EPOCHS: int = 10  # local epochs of a federated round when the task does not say
    CHECKPOINT_FREQUENCY: int = 5  # rounds between checkpoints of the global model
    LOG_DIR: str = "logs"
    CHECKPOINT_DIR: str = "checkpoints"
    MODEL_CACHE_DIR: str = "model_cache"

    # --- Topology ---
    DATA_DIR: str = "data"  # the embedded SQLite file lives here
    DATABASE_URL: str = ""  # empty: sqlite:///DATA_DIR/aifarm.sqlite3
    REDIS_URL: str = ""  # empty: embedded (in-memory broker, in-process doorbell)
    DB_TIMEOUT: int = 10  # seconds a MySQL read or write may take before the request gets a 503
    DB_POOL_SIZE: int = 20  # connections kept per process (plus half as many more in a burst)

    # --- Security and limits ---
    ADMIN_TOKEN: str = ""  # empty: a token is generated, stored hashed, and printed once
    ADMIN_USERNAME: str = "admin"  # the admin panel's sign-in name
    ADMIN_PASSWORD: str = ""  # the panel's password, or its werkzeug hash; empty: no password sign-in
    ADMIN_SESSION_TTL: int = 8 * 3600  # seconds a panel sign-in lasts
    ADMIN_LOGIN_RATE_LIMIT: str = "10/minute"  # sign-in attempts per remote address
    RATE_LIMIT: str = "60/minute"  # admin REST API, per admin token (per address for a wrong one)
    CLIENT_RATE_LIMIT: str = "600/minute"  # model exchange, per client id
    MAX_BODY_SIZE: int = 1 << 20  # JSON request bodies
    MAX_UPLOAD_SIZE: int = 256 << 20  # model updates
    WS_MAX_MESSAGE_SIZE: int = 64 << 10  # larger frames close the socket with 1009
    WS_PING_INTERVAL: int = 25  # seconds; a peer that stops answering is dropped
    WS_MESSAGES_PER_MINUTE: int = 600  # per connection; beyond it: error rate_limited
    # Origins (scheme://host[:port], comma-separated) whose browser pages may open /ws besides
    # this server's own pages; "*" allows any. A handshake without an Origin header (not a
    # browser: the reference client, scripts) is always allowed; a foreign one gets a 403.
    WS_ALLOWED_ORIGINS: str = ""
    # Reverse proxies in front of the server that append to X-Forwarded-For (and set
    # X-Forwarded-Proto): the client address of rate limits, the audit log and the access log
    # is read from that header only when this is > 0, and then the address this many hops back.
    # 0: the header is ignored (a caller could write anything in it). docs/security.md.
    PROXY_HOPS: int = 0
    # The oldest client version accepted at register (docs/protocol.md, "Versions"); default:
    # the oldest whose training/ code computes what this server's workers expect.
    MIN_CLIENT_VERSION: str = MIN_CLIENT_VERSION

    # --- Scheduling and sweeps ---
    MAX_SHARD_ATTEMPTS: int = 3  # failed tries of one shard before the task fails
    SWEEP_INTERVAL: float = 10.0  # seconds between beat's timeout sweeps
    SWEEP_LIMIT: int = 500  # clients released per sweep run
    SCHEDULE_INTERVAL: float = 5.0  # beat's safety-net scheduling pass
    SCHEDULE_BATCH: int = 500  # waiting clients served per scheduling run
    # A scheduling job with nothing left to do waits this many seconds (at most 4) for the next
    # request before it ends; requests in that time reach it through Redis, not a Celery job of
    # their own. It keeps one worker process busy meanwhile. 0: end at once.
    SCHEDULE_LISTEN: float = 0.2
    RECONCILE_INTERVAL: float = 5.0  # web: re-read open assignments of local sockets, flush last_seen
    AGGREGATION_SLICE_BYTES: int = 256 << 20  # models larger than this aggregate in parallel slices
    # An aggregation holds its round's lease and renews it every third of this many seconds; a
    # worker killed mid-aggregation leaves it to expire, and the sweep's re-drive retakes it.
    AGGREGATION_LEASE: int = 30

    # --- Deadlines (an assignment not finished by then is timed out and its shard reissued) ---
    DEADLINE_DEFAULT: float = 3600.0  # seconds, for a task that is not federated and gives no deadline_s
    DEADLINE_MIN: float = 60.0  # floor of a federated assignment's derived deadline
    DEADLINE_MAX: float = 6 * 3600.0  # ceiling of a federated assignment's derived deadline
    DEADLINE_RATE: float = 50.0  # training examples/s assumed of a client not measured yet
    DEADLINE_SLACK: float = 4.0  # a derived deadline allows this many times the expected time
    # A client whose socket closes keeps its assignments for at most this many seconds more
    # (their deadlines are brought forward); then they are reissued, and its late result may
    # still win. Lower it where volunteers crash more often than they roam.
    RECONNECT_GRACE: float = 60.0

    # --- Metrics (GET /metrics, Prometheus text; docs/operations.md, "Metrics") ---
    # Where this host's web processes and Celery workers keep their counters and histograms
    # (prometheus_client's multiprocess files), a folder per gunicorn or Celery worker; empty:
    # DATA_DIR/metrics. A local disk shared by the web tier and the workers of one host.
    METRICS_DIR: str = ""
    METRICS_TOKEN: str = ""  # empty: GET /metrics is open (like /healthz); set: it needs this bearer token
    METRICS_CLIENT_LIMIT: int = 1000  # connected clients with their own utilization series on /metrics

    LOG_LEVEL: str = "INFO"
    # server.log, error.log and access.log each roll over at this size into .1 .. .N (N =
    # LOG_BACKUP_COUNT), safely with every process of the host writing (a lock file beside
    # them). 0: never; use an external logrotate instead (the files are reopened when moved).
    LOG_MAX_BYTES: int = 100 * 1024 * 1024
    LOG_BACKUP_COUNT: int = 5

    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def embedded(self) -> bool:
        """True when no Redis is configured: broker and doorbell live inside the process."""
        return not self.REDIS_URL

    @property
    def database_url(self) -> str:
        if self.DATABASE_URL:
            return self.DATABASE_URL
        return f"sqlite:///{Path(self.DATA_DIR).resolve() / 'aifarm.sqlite3'}"

    @property
    def broker_url(self) -> str:
        return self.REDIS_URL or "memory://"

    @property
    def metrics_dir(self) -> Path:
        return Path(self.METRICS_DIR or Path(self.DATA_DIR) / "metrics").resolve()


def load(**overrides: Any) -> Settings:
    """Read every setting from the environment; keyword overrides win (tests use them)."""
    values: dict[str, Any] = {}
    defaults = Settings()
    for f in fields(Settings):
        if f.name == "extra":
            continue
        default = getattr(defaults, f.name)
        if isinstance(default, bool):
            values[f.name] = os.environ.get(f.name, str(default)).lower() in ("1", "true", "yes")
        elif isinstance(default, int):
            values[f.name] = env_int(f.name, default)
        elif isinstance(default, float):
            values[f.name] = env_float(f.name, default)
        else:
            values[f.name] = env_str(f.name, default)
    return replace(Settings(**values), **overrides)


_LOG_FORMAT = "%(asctime)s.%(msecs)03d %(levelname)s %(name)s %(message)s"
_configured_dir: str | None = None


def setup_logging(settings: Settings) -> None:
    """Send logs to LOG_DIR: server.log (everything), error.log (errors), access.log (HTTP),
    audit.log (admin actions and security events, also in server.log), rotated by size
    (LOG_MAX_BYTES, LOG_BACKUP_COUNT).

    Log lines are key=value (``task=sweep state=finish expired=3``). Idempotent per process.
    """
    global _configured_dir
    if _configured_dir == settings.LOG_DIR:
        return
    log_dir = Path(settings.LOG_DIR)
    log_dir.mkdir(parents=True, exist_ok=True)
    fmt = logging.Formatter(_LOG_FORMAT, datefmt="%Y-%m-%dT%H:%M:%S")

    def handler(name: str, level: int) -> logging.Handler:
        h: logging.Handler
        (log_dir / name).touch()  # every log exists from the start, as the docs say
        if settings.LOG_MAX_BYTES > 0:
            # imported here: it imports redis (through portalocker), which imports ssl, and
            # `python -m app` must monkey-patch ssl for gevent before that happens
            from concurrent_log_handler import ConcurrentRotatingFileHandler

            h = ConcurrentRotatingFileHandler(
                log_dir / name, maxBytes=settings.LOG_MAX_BYTES, backupCount=settings.LOG_BACKUP_COUNT
            )
        else:
            h = logging.handlers.WatchedFileHandler(log_dir / name)
        h.setLevel(level)
        h.setFormatter(fmt)
        return h

    root = logging.getLogger()
    root.setLevel(settings.LOG_LEVEL.upper())
    for h in list(root.handlers):
        if getattr(h, "_aifarm", False):
            root.removeHandler(h)
    for h in (handler("server.log", logging.DEBUG), handler("error.log", logging.ERROR)):
        h._aifarm = True  # type: ignore[attr-defined]
        root.addHandler(h)
    access = logging.getLogger("aifarm.access")
    access.propagate = False
    access.setLevel(logging.INFO)
    for h in list(access.handlers):
        access.removeHandler(h)
    access.addHandler(handler("access.log", logging.INFO))
    # audit.log: admin actions and security events (aifarm.audit), in server.log too
    audit = logging.getLogger("aifarm.audit")
    audit.setLevel(logging.INFO)
    for h in list(audit.handlers):
        audit.removeHandler(h)
    audit.addHandler(handler("audit.log", logging.INFO))
    _configured_dir = settings.LOG_DIR


def metrics_folder_owner(folder: Path) -> tuple[str, int] | None:
    """(host, pid) of a folder made by :func:`setup_metrics_dir`, or None for another name."""
    head, at, host = folder.name.rpartition("@")
    _, dash, pid = head.rpartition("-")
    if not at or not dash or not pid.isdigit():
        return None
    return host, int(pid)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def setup_metrics_dir(settings: Settings, role: str) -> Path:
    """Give this process and its children (a gunicorn master and its workers, a Celery worker
    and its pool) an empty folder of their own for prometheus_client's multiprocess files,
    ``METRICS_DIR/<role>-<pid>@<host>``, and point ``PROMETHEUS_MULTIPROC_DIR`` at it.

    Call it before the process creates its metrics: prometheus_client picks its storage when
    imported, and is picked again here if it was imported already (the ``celery`` command
    loads Flower's plugin, which imports it). Folders of this host's processes that no longer
    run are removed: their counts ended with them (a counter reset, which Prometheus expects
    after a restart). ``GET /metrics`` merges the folders of the processes still running
    (``app/metrics.py``)."""
    base = settings.metrics_dir
    base.mkdir(parents=True, exist_ok=True)
    host = socket.gethostname()
    for folder in base.iterdir():
        owner = metrics_folder_owner(folder)
        if owner is not None and owner[0] == host and not process_alive(owner[1]):
            shutil.rmtree(folder, ignore_errors=True)
    mine = base / f"{role}-{os.getpid()}@{host}"
    shutil.rmtree(mine, ignore_errors=True)  # a pid used before by a process of the same role
    mine.mkdir()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(mine)
    values: Any = sys.modules.get("prometheus_client.values")
    if values is not None:  # metrics made from now on count into the folder
        values.ValueClass = values.get_value_class()
    return mine
