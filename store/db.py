"""Engine and sessions, shared by the web tier and the workers. No Flask here.

One :class:`Database` per process (:func:`get_db`). Workers dispose the inherited pool after
fork; the web tier and workers open short transactions with :meth:`Database.session`.

On MySQL, at most ``pool_size`` transactions of one process run at once: the others wait
their turn (in FIFO order, the web tier's batched passes first, up to :data:`QUEUE_TIMEOUT`
seconds) instead of failing. A web
process with thousands of sockets would otherwise empty the pool in a burst, and
SQLAlchemy's ``pool_timeout`` would report a healthy database unavailable. Under gevent the
wait is a greenlet's (``threading`` is patched), not the process's.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar, cast

from pymysql.constants import SERVER_STATUS
from pymysql.constants.CLIENT import FOUND_ROWS, MULTI_STATEMENTS
from sqlalchemy import CursorResult, Engine, create_engine, event, exc, inspect
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.schema import CreateColumn

import server_settings
from store.models import Base

log = logging.getLogger(__name__)
T = TypeVar("T")

_local_locks: dict[str, threading.Lock] = {}  # Database.exclusive without MariaDB
QUEUE_TIMEOUT = 60.0  # seconds a transaction waits for its turn (see the module's docstring)
PING_IDLE_S = 1.0  # a pooled connection unused for longer is pinged before it is handed out


class Unavailable(RuntimeError):
    """The database (or the broker) cannot be reached; nothing was changed.

    ``retry_safe``: the connection broke in the middle of a transaction, before its COMMIT was
    sent, so the server rolled it back and running it again on a new connection is safe.
    """

    def __init__(self, message: str = "", *, retry_safe: bool = False) -> None:
        super().__init__(message)
        self.retry_safe = retry_safe


# MySQL error numbers that mean "try the transaction again": deadlock, lock wait timeout.
_RETRYABLE_ERRNOS = frozenset({1213, 1205})
# The connection died under a transaction: "server has gone away", "lost connection during query".
_LOST_ERRNOS = frozenset({2006, 2013})


def _errno(error: BaseException) -> int | None:
    orig = getattr(error, "orig", None)
    args = getattr(orig, "args", ())
    return args[0] if args and isinstance(args[0], int) else None


def affected(result: Any) -> int:
    """Rows matched by an UPDATE or DELETE (the compare-and-set's verdict)."""
    return int(cast(CursorResult[Any], result).rowcount)


def is_retryable(error: BaseException) -> bool:
    """A deadlock or lock timeout (MySQL) or a busy database (SQLite): run it again."""
    if not isinstance(error, exc.OperationalError):
        return False
    if _errno(error) in _RETRYABLE_ERRNOS:
        return True
    return "database is locked" in str(getattr(error, "orig", error))


def is_outage(error: BaseException) -> bool:
    """The database cannot be reached (as opposed to a bug in a query or a conflict)."""
    if isinstance(error, Unavailable):
        return True
    if isinstance(error, exc.DBAPIError) and error.connection_invalidated:
        return True
    if isinstance(error, (exc.TimeoutError, exc.DisconnectionError, exc.InterfaceError)):
        return True
    return isinstance(error, exc.OperationalError) and not is_retryable(error)


def is_lost_connection(error: BaseException) -> bool:
    """The connection died (2006, 2013: a restarted server, a cut network), as opposed to a server
    that does not answer in time (a read timeout, also reported as 2013): running the
    transaction again at once can only help in the first case."""
    if "timed out" in str(getattr(error, "orig", error)):
        return False
    if _errno(error) in _LOST_ERRNOS:
        return True
    return isinstance(error, exc.DBAPIError) and error.connection_invalidated


class Busy(Unavailable):
    """Every pooled connection stayed busy for ``QUEUE_TIMEOUT`` seconds; nothing was changed."""


def _note_idle(dbapi_connection: Any, record: Any) -> None:
    record.info["idle_since"] = time.monotonic()


def _ping_if_idle(dbapi_connection: Any, record: Any, proxy: Any) -> None:
    """Ping a pooled connection before use only when it sat idle for over PING_IDLE_S.

    SQLAlchemy's ``pool_pre_ping`` pings on every checkout: one more round trip per
    transaction, a fifth of a scheduling pass's and a third of a request's group commit. A
    connection in steady use is not pinged; one that breaks anyway (the server restarted)
    fails its first statement, which :meth:`Database.run` runs again on a new connection
    (the transaction was rolled back), and SQLAlchemy then drops the pool's other
    connections. Raising ``DisconnectionError`` here makes the pool take a fresh one."""
    since = record.info.get("idle_since")
    if since is None or time.monotonic() - since < PING_IDLE_S:
        return
    try:
        dbapi_connection.ping(reconnect=False)
    except Exception as error:
        idle = time.monotonic() - since
        raise exc.DisconnectionError(f"pooled connection dead after {idle:.0f}s idle") from error


def _reset_if_open(dbapi_connection: Any, record: Any, state: Any) -> None:
    """A connection back in the pool: roll back only a transaction still open.

    SQLAlchemy's pool rolls back every connection it takes back (``reset_on_return``), though
    nearly every one comes back right after its COMMIT: a round trip per transaction for
    nothing, one of a scheduling pass's seven and a third of a request's group commit. MySQL
    says in every reply whether a transaction is open (``SERVER_STATUS_IN_TRANS``); after a
    COMMIT or ROLLBACK it is not, and a connection that died is discarded, not reset."""
    if state.terminate_only:
        return
    if dbapi_connection.server_status & SERVER_STATUS.SERVER_STATUS_IN_TRANS:
        dbapi_connection.rollback()


class _Turns:
    """At most ``size`` holders at once; the others wait in arrival order (FIFO, unlike a
    ``threading.Semaphore``, so a burst of thousands is served first come, first served).
    Re-entrant per thread (per greenlet under gevent): a transaction opened inside another
    one of the same thread does not wait for itself."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._lock = threading.Lock()
        self._busy = 0
        self._waiting: deque[threading.Event] = deque()
        self._mine = threading.local()
        self.waited = 0  # transactions that had to wait (for logs and the load benchmark)

    @contextmanager
    def turn(self, timeout: float, *, first: bool = False) -> Iterator[None]:
        """Hold a turn for the block; ``first``: wait at the head of the line, not its end."""
        depth = getattr(self._mine, "depth", 0)
        if depth == 0:
            self._acquire(timeout, first)
        self._mine.depth = depth + 1
        try:
            yield
        finally:
            self._mine.depth = depth
            if depth == 0:
                self._release()

    def _acquire(self, timeout: float, first: bool) -> None:
        with self._lock:
            if self._busy < self.size and not self._waiting:
                self._busy += 1
                return
            ready = threading.Event()
            if first:
                self._waiting.appendleft(ready)
            else:
                self._waiting.append(ready)
            self.waited += 1
        if ready.wait(timeout):
            return  # the releasing holder handed its turn over (busy stays counted)
        with self._lock:
            if ready.is_set():  # handed over just as the wait ended
                return
            self._waiting.remove(ready)
        raise Busy(f"no database connection free for {timeout:.0f}s")

    def _release(self) -> None:
        with self._lock:
            if self._waiting:
                self._waiting.popleft().set()  # the turn passes on; busy is unchanged
            else:
                self._busy -= 1


class Database:
    def __init__(
        self,
        url: str,
        *,
        pool_size: int = 20,
        timeout: int = 10,
        queue_timeout: float = QUEUE_TIMEOUT,
        multi_statements: bool = False,
    ) -> None:
        """``multi_statements``: MySQL connections that may run several statements sent as
        one string (the workers', for the scheduler's writes: see
        :func:`workers.scheduling.write_assignments`). Everything else sends one at a time."""
        self.url = url
        self.queue_timeout = queue_timeout
        self.turns: _Turns | None = None
        self.is_sqlite = url.startswith("sqlite")
        self.is_mysql = url.startswith("mysql")
        kwargs: dict[str, Any] = {"future": True}
        if self.is_sqlite:
            path = url.split("///", 1)[-1]
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            kwargs["connect_args"] = {"timeout": 30, "check_same_thread": False}
        elif self.is_mysql:
            connect_args: dict[str, Any] = {
                "connect_timeout": 3,
                "read_timeout": timeout,
                "write_timeout": timeout,
            }
            if multi_statements:
                # This replaces the flags SQLAlchemy's dialect sets, FOUND_ROWS among them: an
                # UPDATE's rowcount is the rows it matched, which every compare-and-set here reads
                connect_args["client_flag"] = MULTI_STATEMENTS | FOUND_ROWS
            if "ssl" not in url:
                # PyMySQL otherwise builds an SSL context for every new connection ("preferred"
                # TLS), which loads the CA bundle: ~20 ms of CPU per connection. TLS to MySQL
                # is asked for in the URL: ?ssl_ca=/path/to/ca.pem (see docs/operations.md).
                connect_args["ssl_disabled"] = True
            kwargs.update(
                isolation_level="READ COMMITTED",
                pool_recycle=1800,
                pool_size=pool_size,
                max_overflow=pool_size // 2,
                pool_timeout=5,
                pool_reset_on_return=None,  # _reset_if_open instead
                connect_args=connect_args,
            )
            # The overflow is left to what uses the engine directly (health pings, tests' reads).
            self.turns = _Turns(pool_size)
        self.engine: Engine = create_engine(url, **kwargs)
        if self.is_sqlite:
            event.listen(self.engine, "connect", _sqlite_pragmas)
        if self.is_mysql:
            event.listen(self.engine, "checkin", _note_idle)
            event.listen(self.engine, "checkout", _ping_if_idle)
            event.listen(self.engine, "reset", _reset_if_open)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def session(self, *, first: bool = False) -> Iterator[Session]:
        """A transaction: commits when the block ends, rolls back on an exception.

        Raises :class:`Unavailable` when the database cannot be reached; its ``retry_safe``
        says whether the connection, open when the transaction began, broke before the
        COMMIT (not while connecting, not during the COMMIT, whose outcome is unknown).

        ``first``: when every turn is taken, wait at the head of the line (the hub's batched
        passes, which serve every socket of the process, go before single messages).
        """
        if self.turns is None:
            with self._session() as s:
                yield s
        else:
            with self.turns.turn(self.queue_timeout, first=first), self._session() as s:
                yield s

    @contextmanager
    def _session(self) -> Iterator[Session]:
        s = self._sessions()
        stage = "connect"
        try:
            s.connection()  # check a connection out (the pool pings it, or opens a new one)
            stage = "work"
            yield s
            stage = "commit"
            s.commit()
        except BaseException as error:
            s.rollback()
            if is_outage(error) and not isinstance(error, Unavailable):
                safe = stage == "work" and is_lost_connection(error)
                raise Unavailable(f"database unavailable: {type(error).__name__}", retry_safe=safe) from error
            raise
        finally:
            s.close()

    def run(self, fn: Callable[[Session], T], *, attempts: int = 4, first: bool = False) -> T:
        """Run ``fn`` in a transaction, again (at most ``attempts`` runs in all, with a short
        backoff) on a deadlock or lock wait timeout (1213, 1205; SQLite: busy), or when the
        connection died under it before its COMMIT (2006, 2013: the server rolled it back).
        Raises :class:`Unavailable` (a 503; a Celery task retries with backoff) when the last
        run fails so too.

        A server that is down or hung is not waited for: connecting fails at once (or after
        ``connect_timeout``), a read times out after ``DB_TIMEOUT``, and :class:`Unavailable`
        goes to the caller. Neither is a connection lost during the COMMIT retried: it may
        have committed."""
        for attempt in range(1, attempts + 1):
            try:
                with self.session(first=first) as s:
                    return fn(s)
            except exc.OperationalError as error:
                if not is_retryable(error):
                    raise
                if attempt == attempts:  # still contended: a 503 (the caller may try again), not a 500
                    raise Unavailable(f"database busy: errno {_errno(error)} {attempts} times") from error
                log.info("event=db_retry attempt=%d errno=%s", attempt, _errno(error))
                time.sleep(random.uniform(0.005, 0.05) * attempt)
            except Unavailable as error:
                if attempt == attempts or not error.retry_safe:
                    raise
                log.warning("event=db_retry attempt=%d errno=%s reason=lost_connection",
                            attempt, _errno(error.__cause__ or error))  # fmt: skip
                time.sleep(random.uniform(0.05, 0.2) * attempt)
        raise AssertionError("unreachable")

    @contextmanager
    def exclusive(self, name: str) -> Iterator[bool]:
        """Hold the named lock ``name`` for the block, without waiting for it: yields whether
        this caller got it (False: someone else holds it now).

        MariaDB: ``GET_LOCK(name, 0)`` on a connection of its own, held for the block; the
        server releases it when the block ends, or when the holder's connection dies (a killed
        worker does not keep it). A named lock is the server's, not a database's: the name is
        taken in this database's (two deployments, or two test runs, on one server each have
        their own). SQLite (embedded, one process): a lock of this process."""
        if not self.is_mysql:
            lock = _local_locks.setdefault(name, threading.Lock())
            got = lock.acquire(blocking=False)
            try:
                yield got
            finally:
                if got:
                    lock.release()
            return
        try:
            conn = self.engine.connect()
            name = f"{self.engine.url.database}.{name}"[-64:]  # MariaDB's longest lock name
            got = bool(conn.exec_driver_sql("SELECT GET_LOCK(%s, 0)", (name,)).scalar())
        except exc.DBAPIError as error:
            if is_outage(error):
                raise Unavailable(f"database unavailable: {type(error).__name__}") from error
            raise
        try:
            yield got
        finally:
            try:
                if got:
                    conn.exec_driver_sql("SELECT RELEASE_LOCK(%s)", (name,))
                conn.rollback()
            except Exception:  # its lock may still be held: never hand this connection out again
                conn.invalidate()
            conn.close()

    def create_all(self) -> None:
        """Create missing tables from the models (SQLite and tests; MySQL uses schema.sql),
        and add missing columns to existing ones (:meth:`add_missing_columns`)."""
        Base.metadata.create_all(self.engine)
        self.add_missing_columns()

    def add_missing_columns(self) -> list[str]:
        """Bring a database made by an older version up to the models, additively: add the
        columns an existing table lacks (nullable, or NOT NULL with a default), the indexes
        it lacks, and, on MySQL, the enum values added at the end of an enum. Returns what
        was added (``column t.c``, ``index t.i``, ``enum values t.c``). A missing NOT
        NULL column without a default is an error (its rows need a value: migrate by hand);
        on SQLite an enum cannot widen (its CHECK constraint is part of the table)."""
        inspector = inspect(self.engine)
        tables = set(inspector.get_table_names())
        added: list[str] = []
        with self.engine.begin() as conn:
            for table in Base.metadata.sorted_tables:
                if table.name not in tables:
                    continue
                present = {c["name"]: c for c in inspector.get_columns(table.name)}
                for column in table.columns:
                    if column.name in present:
                        if self.is_mysql and _enum_widened(column, present[column.name]):
                            ddl = CreateColumn(column).compile(dialect=self.engine.dialect)
                            conn.exec_driver_sql(f"ALTER TABLE {table.name} MODIFY COLUMN {ddl}")
                            added.append(f"enum values {table.name}.{column.name}")
                        continue
                    if not column.nullable and column.server_default is None:
                        missing = f"{table.name}.{column.name}"
                        raise RuntimeError(f"{missing} is missing and NOT NULL: migrate by hand")
                    ddl = CreateColumn(column).compile(dialect=self.engine.dialect)
                    conn.exec_driver_sql(f"ALTER TABLE {table.name} ADD COLUMN {ddl}")
                    added.append(f"column {table.name}.{column.name}")
                indexes = {i["name"] for i in inspector.get_indexes(table.name)}
                for index in table.indexes:
                    if index.name not in indexes:
                        index.create(conn)
                        added.append(f"index {table.name}.{index.name}")
        for name in added:
            log.warning("event=schema_upgrade added=%s", name.replace(" ", ":"))
        return added

    def ping(self) -> bool:
        try:
            with self.engine.connect() as conn:
                conn.exec_driver_sql("SELECT 1")
            return True
        except Exception as error:  # any failure means "not reachable" for health checks
            log.warning("event=db_ping state=failed error=%s", type(error).__name__)
            return False

    def dispose(self, *, close: bool = True) -> None:
        self.engine.dispose(close=close)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


_db: Database | None = None
_lock = threading.Lock()


def get_db() -> Database:
    """The process's database, built from the environment on first use."""
    global _db
    if _db is None:
        with _lock:
            if _db is None:
                settings = server_settings.load()
                _db = Database(
                    settings.database_url,
                    pool_size=settings.DB_POOL_SIZE,
                    timeout=settings.DB_TIMEOUT,
                    multi_statements=True,  # the workers' (the app builds its own)
                )
    return _db


def set_db(db: Database | None) -> None:
    """Install the process's database (the app factory and tests do this)."""
    global _db
    _db = db


def _enum_widened(column: Any, present: Any) -> bool:
    """The model's enum has values (added at its end) that the database's column lacks."""
    wanted = getattr(column.type, "enums", None)
    have = getattr(present["type"], "enums", None)
    return bool(
        wanted and have is not None and list(wanted[: len(have)]) == list(have) and len(wanted) > len(have)
    )
