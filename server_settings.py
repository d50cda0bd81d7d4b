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
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any


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
    # WEBSOCKET_PORT and MODEL_SERVER_PORT are read for compatibility and otherwise unused.
    WEBSOCKET_PORT: int = 8765
    MODEL_SERVER_PORT: int = 5000
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
    RATE_LIMIT: str = "60/minute"  # admin REST API, per remote address
    CLIENT_RATE_LIMIT: str = "600/minute"  # model exchange, per client id
    MAX_BODY_SIZE: int = 1 << 20  # JSON request bodies
    MAX_UPLOAD_SIZE: int = 256 << 20  # model updates
    WS_MAX_MESSAGE_SIZE: int = 64 << 10  # larger frames close the socket with 1009
    WS_PING_INTERVAL: int = 25  # seconds; a peer that stops answering is dropped
    WS_MESSAGES_PER_MINUTE: int = 600  # per connection; beyond it: error rate_limited

    # --- Scheduling and sweeps ---
    MAX_SHARD_ATTEMPTS: int = 3  # failed tries of one shard before the task fails
    SWEEP_INTERVAL: float = 10.0  # seconds between beat's timeout sweeps
    SWEEP_LIMIT: int = 500  # clients released per sweep run
    SCHEDULE_INTERVAL: float = 5.0  # beat's safety-net scheduling pass
    SCHEDULE_BATCH: int = 500  # waiting clients served per scheduling run
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

    LOG_LEVEL: str = "INFO"

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
    """Send logs to LOG_DIR: server.log (everything), error.log (errors), access.log (HTTP).

    Log lines are key=value (``task=sweep state=finish expired=3``). Idempotent per process.
    """
    global _configured_dir
    if _configured_dir == settings.LOG_DIR:
        return
    log_dir = Path(settings.LOG_DIR)
    log_dir.mkdir(parents=True, exist_ok=True)
    fmt = logging.Formatter(_LOG_FORMAT, datefmt="%Y-%m-%dT%H:%M:%S")

    def handler(name: str, level: int) -> logging.Handler:
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
    _configured_dir = settings.LOG_DIR
