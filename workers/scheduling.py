"""Matching queued shards to waiting clients: plain functions over a session (``workers.tasks``
wraps them). A shard goes to at most one client however many schedulers run at once:
``FOR UPDATE SKIP LOCKED`` on MariaDB, a compare-and-set on the shard's status everywhere.
:func:`match` decides on plain rows; :func:`serve_batch` locks, matches and writes a batch;
:func:`fill_client` is the per-client claim. The design is in docs/architecture.md, "Scheduling".
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence, Set
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import cache
from typing import Any

import pymysql
from pymysql.constants.CLIENT import MULTI_STATEMENTS
from sqlalchemy import Connection, Select, bindparam, case, exc, insert, or_, select, update
from sqlalchemy.orm import Session

import server_settings
from store.assignments import Made
from store.db import affected
from store.models import Client, Task, TaskAssignment, TaskShard
from store.reliability import quota, score
from store.states import OPEN_ASSIGNMENT, AssignmentState, ClientState, ShardState, TaskState
from workers.deadlines import deadline_seconds

log = logging.getLogger(__name__)

DEFAULTS = server_settings.Settings()  # deadlines when a caller passes no settings (tests)
MIN_WINDOW = 8  # queued shards a pass reads at least (see serve_batch)
Left = tuple[int, datetime | None]  # a client's pending requests after a pass, and requested_at


def _candidates(client: Client, exclude_tasks: set[int]) -> Select[TaskShard]:
    query = select(TaskShard).where(
        TaskShard.status == ShardState.QUEUED,
        TaskShard.req_cpu_cores <= client.cpu_cores,
        TaskShard.req_ram_gb <= client.ram_gb,
        TaskShard.req_gpu_count <= client.gpu_count,
        or_(TaskShard.req_gpu_count == 0, TaskShard.req_gpu_memory_gb <= client.gpu_memory_gb),
    )
    if exclude_tasks:
        query = query.where(TaskShard.task_id.not_in(sorted(exclude_tasks)))
    if client.task_types is not None:
        query = query.where(TaskShard.task_type.in_(client.task_types))
    timed_out_here = select(TaskAssignment.shard_id).where(
        TaskAssignment.client_id == client.id, TaskAssignment.status == AssignmentState.TIMED_OUT
    )
    query = query.where(or_(TaskShard.attempts == 0, TaskShard.id.not_in(timed_out_here)))
    return query.order_by(TaskShard.priority.desc(), TaskShard.id)


def claim(s: Session, client: Client, exclude_tasks: set[int], *, skip_locked: bool) -> TaskShard | None:
    """Take the best queued shard that fits ``client``, or None. The shard comes back 'assigned'."""
    query = _candidates(client, exclude_tasks)
    if skip_locked:
        shard = s.execute(query.limit(1).with_for_update(skip_locked=True)).scalar_one_or_none()
        if shard is not None:
            shard.status = ShardState.ASSIGNED
        return shard
    for shard_id in s.execute(query.with_only_columns(TaskShard.id).limit(8)).scalars().all():
        won = affected(
            s.execute(
                update(TaskShard)
                .where(TaskShard.id == shard_id, TaskShard.status == ShardState.QUEUED)
                .values(status=ShardState.ASSIGNED)
            )
        )
        if won == 1:
            return s.get(TaskShard, shard_id, populate_existing=True)
    return None


def fill_client(
    s: Session,
    client_id: str,
    now: datetime,
    *,
    max_tasks: int,
    skip_locked: bool,
    settings: server_settings.Settings = DEFAULTS,
) -> list[Made]:
    """Give a waiting client as much fitting work as it asked for and may hold; returns the
    new assignments.

    The client row is locked first, so two schedulers serving the same client cannot both
    fill its last slot, nor give it two ranks of one task.
    """
    client = s.execute(select(Client).where(Client.id == client_id).with_for_update()).scalar_one_or_none()
    if (
        client is None
        or client.status != ClientState.ACTIVE
        or client.conn_id is None
        or client.disabled
        or client.pending_requests <= 0
    ):
        return []
    held = set(
        s.execute(
            select(TaskAssignment.task_id).where(
                TaskAssignment.client_id == client_id, TaskAssignment.status.in_(OPEN_ASSIGNMENT)
            )
        ).scalars()
    )
    slots = min(client.pending_requests, quota(client.task_quota, max_tasks) - len(held))
    claimed: list[TaskShard] = []
    while len(claimed) < slots:
        shard = claim(s, client, held, skip_locked=skip_locked)
        if shard is None:
            break
        held.add(shard.task_id)
        claimed.append(shard)
    if not claimed:
        return []
    made = write_assignments(s, [(client_id, shard) for shard in claimed], now, settings)
    client.pending_requests -= len(claimed)
    if client.pending_requests <= 0:
        client.pending_requests = 0
        client.requested_at = None
    return made


def fits(client: Any, shard: Any) -> bool:
    """The same test as the claim query's WHERE clause, for the batch matcher (rows or models)."""
    if client.task_types is not None and shard.task_type not in client.task_types:
        return False
    return bool(
        shard.req_cpu_cores <= client.cpu_cores
        and shard.req_ram_gb <= client.ram_gb
        and shard.req_gpu_count <= client.gpu_count
        and (shard.req_gpu_count == 0 or shard.req_gpu_memory_gb <= client.gpu_memory_gb)
    )


WAITING_COLUMNS = (
    Client.id,
    Client.pending_requests,
    Client.requested_at,
    Client.cpu_cores,
    Client.ram_gb,
    Client.gpu_count,
    Client.gpu_memory_gb,
    Client.task_types,
    Client.task_quota,
    Client.valid_results,
    Client.error_results,
    Client.timeouts,
    Client.throughput,
)
SHARD_COLUMNS = (
    TaskShard.id,
    TaskShard.task_id,
    TaskShard.round,
    TaskShard.rank,
    TaskShard.task_type,
    TaskShard.req_cpu_cores,
    TaskShard.req_ram_gb,
    TaskShard.req_gpu_count,
    TaskShard.req_gpu_memory_gb,
    TaskShard.attempts,
)


# The statements of a pass are built once: building one (and its cache key) took about a tenth
# of a millisecond, as long as the database took to run it.
@cache
def _waiting(batch: int) -> Select[*tuple[Any, ...]]:
    """Clients that asked for work and may get it now, longest-waiting first."""
    return (
        select(*WAITING_COLUMNS)
        .where(
            Client.pending_requests > 0,
            Client.status == ClientState.ACTIVE,
            Client.conn_id.is_not(None),  # connected now
            Client.disabled.is_(False),
        )
        .order_by(Client.requested_at)
        .limit(batch)
    )


@cache
def _queued(window: int) -> Select[*tuple[Any, ...]]:
    """The first ``window`` queued shards, in claim order."""
    return (
        select(*SHARD_COLUMNS)
        .where(TaskShard.status == ShardState.QUEUED)
        .order_by(TaskShard.priority.desc(), TaskShard.id)
        .limit(window)
    )


@cache
def _locking(query: Select[*tuple[Any, ...]]) -> Select[*tuple[Any, ...]]:
    return query.with_for_update(skip_locked=True)


HELD = select(TaskAssignment.client_id, TaskAssignment.task_id).where(  # ids: the clients
    TaskAssignment.client_id.in_(bindparam("ids", expanding=True)),
    TaskAssignment.status.in_(OPEN_ASSIGNMENT),
)


@dataclass
class Matched:
    """What :func:`match` decided: (client, shard) pairs, and the clients that got nothing."""

    pairs: list[tuple[Any, Any]] = field(default_factory=list)
    unserved: list[str] = field(default_factory=list)  # had free slots and fit no shard given


def match(
    clients: Sequence[Any],
    shards: Sequence[Any],
    held: dict[str, set[int]],
    max_tasks: int,
    excluded: Set[tuple[str, int]] = frozenset(),
) -> Matched:
    """Pair waiting clients with queued shards; pure (no database), rows or plain objects in.

    Reissued shards (``attempts`` > 0) go first, each to the most reliable client that can
    take it. Then clients are served in the order given (longest waiting first), each with
    the first shards (priority order) that fit its hardware and task types. A client gets at
    most one rank of a task, no more than it asked for (``pending_requests``) and may hold
    (its quota, at most ``max_tasks``, minus the task ids it ``held``), and never a shard it
    timed out on (``excluded`` (client id, shard id) pairs). ``held`` is not modified.
    """
    matched = Matched()
    holding = {c.id: set(held.get(c.id, ())) for c in clients}
    free = {
        c.id: min(c.pending_requests, quota(c.task_quota, max_tasks) - len(holding[c.id])) for c in clients
    }
    wanted = {c.id for c in clients if free[c.id] > 0}
    taken: set[int] = set()

    def give(client: Any, shard: Any) -> bool:
        if (
            free[client.id] <= 0
            or shard.id in taken
            or shard.task_id in holding[client.id]
            or (client.id, shard.id) in excluded
            or not fits(client, shard)
        ):
            return False
        taken.add(shard.id)
        holding[client.id].add(shard.task_id)
        free[client.id] -= 1
        matched.pairs.append((client, shard))
        return True

    most_reliable = sorted(clients, key=lambda c: -score(c.valid_results, c.error_results, c.timeouts))
    for shard in shards:
        if shard.attempts > 0:
            any(give(client, shard) for client in most_reliable)
    for client in clients:
        for shard in shards:
            if free[client.id] <= 0:
                break
            give(client, shard)
    served = {client.id for client, _ in matched.pairs}
    matched.unserved = [c.id for c in clients if c.id in wanted and c.id not in served]
    return matched


@dataclass
class Served:
    assignments: list[Made] = field(default_factory=list)
    starved: list[str] = field(default_factory=list)  # fit nothing in the window; more shards wait
    clients_seen: int = 0
    skipped: bool = False  # waiting clients or queued shards were locked by someone else


class TaskInfo:
    """What the scheduler needs of a task to write its assignments (type, config, shard count),
    remembered for tasks seen past 'pending': none of it changes after creation, and a task
    never goes back to pending. A scheduler keeps one while it holds the scheduler lock (seconds;
    a fresh one sees a database recreated under the same ids, as tests do). Saves a read per pass."""

    def __init__(self) -> None:
        self.known: dict[int, tuple[str, dict[str, Any], int]] = {}


def serve_batch(
    s: Session,
    now: datetime,
    *,
    batch: int,
    max_tasks: int,
    skip_locked: bool,
    settings: server_settings.Settings = DEFAULTS,
    tasks: TaskInfo | None = None,
    owed: Callable[[], bool] | None = None,
) -> Served:
    """Serve up to ``batch`` waiting clients in one transaction (see the module doc).

    Reads plain rows (no ORM objects), matches them with :func:`match`, and writes in bulk:
    one INSERT for the assignments, one UPDATE each for the shards and the clients.

    ``owed()`` True: another pass follows this one anyway (a ring came meanwhile), so the look
    for rows that ``SKIP LOCKED`` skipped (``Served.skipped``) is left to it: a statement less
    per pass under load."""
    served = Served()
    waiting = _waiting(batch)
    clients = s.execute(_locking(waiting) if skip_locked else waiting).all()
    served.clients_seen = len(clients)
    if not clients:
        if skip_locked and not (owed and owed()):
            served.skipped = _skipped(s, waiting, clients)
        return served
    held: dict[str, set[int]] = defaultdict(set)
    for client_id, task_id in s.execute(HELD, {"ids": [c.id for c in clients]}):
        held[client_id].add(task_id)
    # Twice the shards asked for, at most twice the batch: the rows read and locked follow the
    # demand (one client asking locked 100 shards, most of a pass's time). A client that fits
    # nothing in the window while more wait beyond it gets the per-client claim (``starved``).
    window = min(2 * batch, max(MIN_WINDOW, 2 * sum(c.pending_requests for c in clients)))
    queued = _queued(window)
    shards = s.execute(_locking(queued) if skip_locked else queued).all()
    if skip_locked and not (owed and owed()):  # late in the pass: a ring by now makes the look needless
        # a full batch or window: the caller makes another pass anyway (``starved`` for the window)
        served.skipped = (len(clients) < batch and _skipped(s, waiting, clients)) or (
            len(shards) < window and _skipped(s, queued, shards)
        )
    matched = match(
        clients, shards, held, max_tasks, timed_out_pairs(s, [r.id for r in shards if r.attempts > 0])
    )
    if len(shards) == window:
        served.starved = matched.unserved
    pairs = matched.pairs
    if not skip_locked:  # no row locks: another scheduler may have taken a shard first
        pairs = [(client, shard) for client, shard in pairs if _compare_and_set(s, shard.id, now)]
        served.skipped = len(pairs) < len(matched.pairs)  # lost some: the caller looks again
    if not pairs:
        return served
    throughput = {client.id: client.throughput for client in clients}
    got = Counter(client.id for client, _ in pairs)
    left = {  # requests still pending, and since when (None once none is)
        c.id: (c.pending_requests - got[c.id], c.requested_at)
        if c.pending_requests > got[c.id]
        else (0, None)
        for c in clients
        if got[c.id]
    }
    served.assignments = write_assignments(
        s, [(client.id, shard) for client, shard in pairs], now, settings, throughput, tasks, left
    )
    return served


def write_assignments(
    s: Session,
    pairs: Sequence[tuple[str, Any]],
    now: datetime,
    settings: server_settings.Settings = DEFAULTS,
    throughput: dict[str, float | None] | None = None,
    info: TaskInfo | None = None,
    requests_left: Mapping[str, Left] | None = None,
) -> list[Made]:
    """Record (client id, shard) pairs as assignments, each with its deadline: one INSERT, the
    shards marked assigned, and their tasks started. Returns the new assignments in order.
    ``throughput``: the clients' measured rates, when the caller read them already; ``info``:
    tasks known to be past pending (only the others are read); ``requests_left``: client id
    -> (pending requests, requested_at) to write with them (a pass's served requests).

    On a connection that runs several statements per round trip (the workers' own, see
    :class:`store.db.Database`) the writes go in one (:func:`_write_in_one_trip`)."""
    known = info.known if info is not None else {}
    tasks = {shard.task_id: known[shard.task_id] for _, shard in pairs if shard.task_id in known}
    pending: list[int] = []
    unknown = {shard.task_id for _, shard in pairs} - tasks.keys()
    rows = (
        s.execute(
            select(Task.id, Task.type, Task.config, Task.status, Task.num_shards).where(Task.id.in_(unknown))
        )
        if unknown
        else ()
    )
    for row in rows:
        tasks[row.id] = (row.type, row.config or {}, row.num_shards)
        if row.status == TaskState.PENDING:
            pending.append(row.id)  # started below; remembered once a later pass reads it running
        else:
            known[row.id] = tasks[row.id]
    if throughput is None:
        throughput = dict(
            s.execute(
                select(Client.id, Client.throughput).where(Client.id.in_({cid for cid, _ in pairs}))
            ).all()
        )

    def deadline(client_id: str, task_id: int) -> datetime:
        task_type, task_config, _ = tasks[task_id]
        return now + timedelta(
            seconds=deadline_seconds(task_type, task_config, throughput.get(client_id), settings)
        )

    new = [
        {
            "task_id": shard.task_id,
            "client_id": client_id,
            "assigned_at": now,
            "updated_at": now,
            "status": AssignmentState.ASSIGNED,
            "rank": shard.rank,
            "round": shard.round,
            "shard_id": shard.id,
            "deadline_at": deadline(client_id, shard.task_id),
        }
        for client_id, shard in pairs
    ]
    if (conn := _multi_statements(s)) is not None:
        ids = _write_in_one_trip(conn, new, now, requests_left or {})
    else:
        ids = list(
            s.scalars(
                insert(TaskAssignment).returning(TaskAssignment.id, sort_by_parameter_order=True), new
            ).all()
        )
        # One statement (an executemany UPDATE is one round trip per row on PyMySQL)
        chosen = {shard.id: aid for (_, shard), aid in zip(pairs, ids, strict=True)}
        s.execute(
            update(TaskShard)
            .where(TaskShard.id.in_(sorted(chosen)))
            .values(
                status=ShardState.ASSIGNED, assignment_id=case(chosen, value=TaskShard.id), updated_at=now
            )
            .execution_options(synchronize_session=False)
        )
        if requests_left:
            s.execute(  # one statement, as for the shards
                update(Client)
                .where(Client.id.in_(sorted(requests_left)))
                .values(
                    pending_requests=case({c: n for c, (n, _) in requests_left.items()}, value=Client.id),
                    requested_at=case({c: at for c, (_, at) in requests_left.items()}, value=Client.id),
                )
                .execution_options(synchronize_session=False)
            )
    _start_tasks(s, pairs, pending, now)
    made = []
    for (client_id, shard), aid in zip(pairs, ids, strict=True):
        task_type, _, num_shards = tasks[shard.task_id]
        made.append(Made(aid, client_id, shard.task_id, shard.round, shard.rank, task_type, num_shards))
    return made


_ASSIGNMENT_COLUMNS = (
    "task_id",
    "client_id",
    "assigned_at",
    "updated_at",
    "status",
    "rank",
    "round",
    "shard_id",
    "deadline_at",
)


def _multi_statements(s: Session) -> Connection | None:
    """The connection of ``s`` when it may send several statements at once (PyMySQL's flag)."""
    if s.get_bind().dialect.name != "mysql":
        return None
    conn = s.connection()
    return conn if getattr(conn.connection.dbapi_connection, "client_flag", 0) & MULTI_STATEMENTS else None


def _write_in_one_trip(
    conn: Connection, rows: list[dict[str, Any]], now: datetime, requests_left: Mapping[str, Left]
) -> list[int]:
    """The INSERT of ``rows`` (RETURNING their ids), the shards marked assigned to them and
    the clients' requests left, sent as one string: one round trip instead of three. At a
    steady 500 requests/s a pass took 5.3 ms (p50) in seven round trips, each waiting for CPU;
    this took 1.5 ms off it. The values are PyMySQL's parameters, quoted as any others.

    A shard's new assignment is found by the join: the only one of that shard with an id
    from ``LAST_INSERT_ID()`` (the INSERT's first id) up; the shard row is locked by this
    transaction, so nobody else inserted one meanwhile."""
    dbapi: Any = conn.connection.dbapi_connection
    one = "(" + ", ".join(["%s"] * len(_ASSIGNMENT_COLUMNS)) + ")"
    args: list[Any] = [row[c] for row in rows for c in _ASSIGNMENT_COLUMNS]
    statements = [
        f"INSERT INTO task_assignments (`{'`, `'.join(_ASSIGNMENT_COLUMNS)}`)"
        f" VALUES {', '.join([one] * len(rows))} RETURNING id",
        "UPDATE task_shards s JOIN task_assignments a ON a.shard_id = s.id AND a.id >= LAST_INSERT_ID()"
        " SET s.status = %s, s.assignment_id = a.id, s.updated_at = %s WHERE s.id IN %s",
    ]
    args += [ShardState.ASSIGNED.value, now, [row["shard_id"] for row in rows]]
    if requests_left:
        cases = " ".join(["WHEN %s THEN %s"] * len(requests_left))
        statements.append(
            f"UPDATE clients SET pending_requests = CASE id {cases} END,"
            f" requested_at = CASE id {cases} END WHERE id IN %s"
        )
        args += [x for client_id, (n, _) in requests_left.items() for x in (client_id, n)]
        args += [x for client_id, (_, at) in requests_left.items() for x in (client_id, at)]
        args.append(list(requests_left))
    sql = ";".join(statements)
    cursor = dbapi.cursor()
    try:
        cursor.execute(sql, args)
        ids = [int(row[0]) for row in cursor.fetchall()]
        while cursor.nextset():  # the UPDATEs' results: an error in one is raised here
            pass
    except pymysql.err.Error as error:
        # As SQLAlchemy raises it for a statement of its own, so that the caller's handling
        # (Database.run: deadlocks run again, a lost connection is an outage) applies alike
        lost = conn.dialect.is_disconnect(error, dbapi, cursor)
        if lost:
            conn.invalidate(error)
        raise exc.DBAPIError.instance(
            sql, args, error, pymysql.err.Error, connection_invalidated=lost
        ) from error
    cursor.close()
    if len(ids) != len(rows):
        raise RuntimeError(f"INSERT RETURNING gave {len(ids)} ids for {len(rows)} rows")
    return ids


def timed_out_pairs(s: Session, shard_ids: Sequence[int]) -> set[tuple[str, int]]:
    """(client id, shard id) of the clients that timed out on these shards: they get them no more."""
    if not shard_ids:
        return set()
    return {
        (row.client_id, row.shard_id)
        for row in s.execute(
            select(TaskAssignment.client_id, TaskAssignment.shard_id).where(
                TaskAssignment.shard_id.in_(shard_ids), TaskAssignment.status == AssignmentState.TIMED_OUT
            )
        )
    }


def _start_tasks(s: Session, pairs: Sequence[tuple[str, Any]], pending: list[int], now: datetime) -> None:
    """A task whose first shard went out is running (``pending``: the tasks read as pending);
    rank 0's holder is its ``client_id``."""
    if pending:
        s.execute(
            update(Task)
            .where(Task.id.in_(sorted(pending)), Task.status == TaskState.PENDING)
            .values(
                status=TaskState.RUNNING,
                updated_at=now,
                status_reason="running: its first shards were handed out",
            )
            .execution_options(synchronize_session=False)
        )
    for client_id, shard in pairs:
        if shard.rank == 0:
            s.execute(
                update(Task)
                .where(Task.id == shard.task_id)
                .values(client_id=client_id)
                .execution_options(synchronize_session=False)
            )


def _skipped(s: Session, query: Select[*tuple[Any, ...]], locked: Sequence[Any]) -> bool:
    """Whether a plain read of ``query`` (its first column is the id) sees rows that the
    ``SKIP LOCKED`` read of it did not get."""
    taken = {row[0] for row in locked}
    return any(
        row_id not in taken
        for row_id in s.execute(query.with_only_columns(query.selected_columns[0])).scalars()
    )


def _compare_and_set(s: Session, shard_id: int, now: datetime) -> bool:
    won = s.execute(
        update(TaskShard)
        .where(TaskShard.id == shard_id, TaskShard.status == ShardState.QUEUED)
        .values(status=ShardState.ASSIGNED, updated_at=now)
    )
    return affected(won) == 1
