"""Clients: registration, connection, requests for work, liveness, admin enable/disable."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import Table, bindparam, case, func, select, update
from sqlalchemy.orm import Session

from store import assignments
from store.auth import hash_token, new_client_id, new_token, token_matches
from store.db import affected
from store.models import Client, Task, TaskAssignment, TaskShard
from store.states import OPEN_ASSIGNMENT, ClientState


class AuthFailed(Exception):
    pass


class ServerFull(Exception):
    pass


@dataclass(frozen=True)
class Hardware:
    cpu_info: dict[str, Any]
    ram_info: dict[str, Any]
    gpu_info: list[dict[str, Any]]
    cores: int
    ram_gb: float
    gpu_count: int
    gpu_memory_gb: float
    task_types: list[str] | None


def connect(
    s: Session,
    hw: Hardware,
    client_id: str | None,
    token: str | None,
    conn_id: str,
    now: datetime,
    *,
    max_clients: int,
    remote: str,
    web: str | None = None,
) -> tuple[str, str | None, bool]:
    """Register a new client or reconnect a known one on connection ``conn_id``, held by web
    process ``web`` (``host:pid``, kept in ``session_info``).

    Returns (client_id, token or None when not newly issued, disabled).
    """
    connected = s.execute(
        select(func.count())
        .select_from(Client)
        .where(Client.conn_id.is_not(None), Client.id != (client_id or ""))
    ).scalar_one()
    if connected >= max_clients:
        raise ServerFull()
    session_info = {"remote": remote, "connected_at": now.isoformat(), "conn_id": conn_id}
    if web is not None:
        session_info["web"] = web
    hardware = {
        "cpu_info": hw.cpu_info,
        "ram_info": hw.ram_info,
        "gpu_info": hw.gpu_info,
        "cpu_cores": hw.cores,
        "ram_gb": hw.ram_gb,
        "gpu_count": hw.gpu_count,
        "gpu_memory_gb": hw.gpu_memory_gb,
        "task_types": hw.task_types,
    }
    if client_id is None:
        issued = new_token()
        new_id = new_client_id()
        s.add(
            Client(
                id=new_id,
                token_hash=hash_token(issued),
                status=ClientState.ACTIVE,
                last_seen=now,
                created_at=now,
                conn_id=conn_id,
                session_info=session_info,
                pending_requests=0,
                disabled=False,
                **hardware,
            )
        )
        return new_id, issued, False
    row = s.execute(select(Client).where(Client.id == client_id).with_for_update()).scalar_one_or_none()
    if row is None or not token or not token_matches(token, row.token_hash):
        raise AuthFailed()
    for key, value in hardware.items():
        setattr(row, key, value)
    row.status = ClientState.ACTIVE
    row.last_seen = now
    row.conn_id = conn_id  # a newer connection takes over; the old one is closed by its web process
    row.session_info = session_info
    return row.id, None, row.disabled


def disconnect(
    s: Session, client_id: str, conn_id: str, now: datetime, *, grace: float | None = None
) -> None:
    """The socket closed (:func:`disconnect_batch` for one socket)."""
    disconnect_batch(s, [(client_id, conn_id)], now, grace=grace)


def disconnect_batch(
    s: Session, sockets: Sequence[tuple[str, str]], now: datetime, *, grace: float | None = None
) -> set[tuple[str, str]]:
    """Sockets closed, as (client id, conn id) pairs, in one transaction (the web tier's group
    commit: when every client of a web process leaves at once, one transaction a socket kept
    its database connections busy for half a minute at 10,000 clients). A client whose current
    connection closed is no longer connected. Its assignments stay until CONNECTION_TIMEOUT, so
    a quick reconnect keeps them; with ``grace`` (RECONNECT_GRACE) their deadlines are also
    brought forward to at most ``grace`` seconds from now, after which the sweep reissues them
    (a late result may still win). A client that registered again on another socket meanwhile
    is left as it is. Returns the pairs that were their client's current connection."""
    gone: set[tuple[str, str]] = set()
    pairs = sorted(set(sockets))  # one lock order, whoever writes
    for start in range(0, len(pairs), 500):
        chunk = pairs[start : start + 500]
        rows = s.execute(select(Client.id, Client.conn_id).where(_MINE_ANY).with_for_update(), _mine(chunk))
        found = set(chunk) & {(client_id, conn_id) for client_id, conn_id in rows}
        if not found:
            continue
        ids = sorted(client_id for client_id, _ in found)
        s.execute(
            update(Client)
            .where(Client.id.in_(ids))
            .values(conn_id=None, last_seen=now, pending_requests=0, requested_at=None)
            .execution_options(synchronize_session=False)
        )
        if grace is not None:
            cap = now + timedelta(seconds=grace)
            s.execute(
                update(TaskAssignment)
                .where(TaskAssignment.client_id.in_(ids), TaskAssignment.status.in_(OPEN_ASSIGNMENT))
                .values(
                    deadline_at=case(
                        (TaskAssignment.deadline_at.is_(None), cap),
                        (TaskAssignment.deadline_at > cap, cap),
                        else_=TaskAssignment.deadline_at,
                    )
                )
                .execution_options(synchronize_session=False)
            )
        gone |= found
    return gone


def request_work_batch(
    s: Session, requests: Sequence[tuple[str, str]], now: datetime, *, max_tasks: int
) -> set[str]:
    """Remember ``task_request`` messages, as (client id, conn id) pairs, in one transaction
    (the web tier's group commit). Each raises the client's ``pending_requests`` by one, up to
    MAX_TASKS_PER_CLIENT. Returns the conn ids that were allowed: a request is refused when the
    client is disabled or the connection is no longer the client's current one.

    One UPDATE per distinct number of requests per connection (nearly always just one), and a
    read of which were allowed only when the UPDATEs matched fewer rows than connections."""
    counts = Counter(requests)
    by_count: dict[int, list[tuple[str, str]]] = defaultdict(list)
    for pair, n in counts.items():
        by_count[n].append(pair)

    matched = 0
    for n, pairs in sorted(by_count.items()):
        for start in range(0, len(pairs), 500):
            chunk = pairs[start : start + 500]
            matched += affected(
                s.execute(_REQUEST, {**_mine(chunk), "n": n, "most": max_tasks, "now": now})
            )  # matched rows (found rows), as every dialect here counts them
    if matched == len(counts):  # every connection is its client's own: all allowed
        return {conn_id for _, conn_id in counts}
    accepted: set[str] = set()
    pairs = list(counts)
    for start in range(0, len(pairs), 500):
        chunk = pairs[start : start + 500]
        accepted.update(
            conn_id
            for client_id, conn_id in s.execute(select(Client.id, Client.conn_id).where(_MINE), _mine(chunk))
            if conn_id is not None and (client_id, conn_id) in counts
        )
    return accepted


# conn ids are unique: the id test only keeps a connection to its own client
_MINE_ANY = Client.id.in_(bindparam("ids", expanding=True)) & Client.conn_id.in_(
    bindparam("conns", expanding=True)
)
_MINE = _MINE_ANY & Client.disabled.is_(False)


def _mine(chunk: Sequence[tuple[str, str]]) -> dict[str, Any]:
    """The parameters of :data:`_MINE` for these (client id, conn id) pairs."""
    return {"ids": [c for c, _ in chunk], "conns": [k for _, k in chunk]}


# Built once (building it cost as much CPU as the round trip): n more requests, at most ``most``
_more = Client.pending_requests + bindparam("n")
_REQUEST = (
    update(Client)
    .where(_MINE)
    .values(
        pending_requests=case(
            (_more < bindparam("most"), _more),
            else_=bindparam("most"),
        ),
        requested_at=func.coalesce(Client.requested_at, bindparam("now")),
        last_seen=bindparam("now"),
    )
    .execution_options(synchronize_session=False)
)


def touch(s: Session, conn_ids: Sequence[str], now: datetime) -> set[str]:
    """Refresh ``last_seen`` of live connections; returns the ones the database still knows.

    A connection missing from the answer was superseded (the client connected elsewhere) or
    timed out by the sweep; its web process closes it.
    """
    alive: set[str] = set()
    for start in range(0, len(conn_ids), 500):
        chunk = list(conn_ids[start : start + 500])
        s.execute(
            update(Client)
            .where(Client.conn_id.in_(chunk))
            .values(last_seen=now)
            .execution_options(synchronize_session=False)
        )
        alive.update(
            c for c in s.execute(select(Client.conn_id).where(Client.conn_id.in_(chunk))).scalars() if c
        )
    return alive


def record_utilization(s: Session, reports: Mapping[str, dict[str, Any]], now: datetime) -> None:
    """Store the resource use each live connection (by conn id) last reported: one statement
    for all of them (the web tier's batched flush). A connection the database no longer knows
    changes nothing."""
    if not reports:
        return
    table = cast(Table, Client.__table__)  # Core: an executemany by conn id (the ORM's is by primary key)
    s.execute(
        update(table)
        .where(table.c.conn_id == bindparam("report_conn"))
        .values(utilization=bindparam("report_value"), utilization_at=now),
        [{"report_conn": conn_id, "report_value": value} for conn_id, value in reports.items()],
    )


def connected_count(s: Session) -> int:
    """Clients with a live connection on any web process."""
    return int(
        s.execute(select(func.count()).select_from(Client).where(Client.conn_id.is_not(None))).scalar_one()
    )


def reported_utilization(s: Session, *, limit: int) -> list[tuple[str, dict[str, Any]]]:
    """(client id, last reported utilization) of up to ``limit`` connected clients, by id."""
    rows = s.execute(
        select(Client.id, Client.utilization)
        .where(Client.conn_id.is_not(None), Client.utilization.is_not(None))
        .order_by(Client.id)
        .limit(limit)
    )
    return [(client_id, value) for client_id, value in rows if isinstance(value, dict)]


@dataclass(frozen=True)
class StateCounts:
    connected: int
    clients: dict[str, int]  # by status
    tasks: dict[str, int]  # by status
    assignments: dict[str, int]  # by status
    shards: dict[str, int]  # by status


def state_counts(s: Session) -> StateCounts:
    """What ``GET /metrics`` counts: rows by status, and the connected clients."""

    def by_status(column: Any) -> dict[str, int]:
        return {str(status): int(n) for status, n in s.execute(select(column, func.count()).group_by(column))}

    return StateCounts(
        connected=connected_count(s),
        clients=by_status(Client.status),
        tasks=by_status(Task.status),
        assignments=by_status(TaskAssignment.status),
        shards=by_status(TaskShard.status),
    )


def set_disabled(
    s: Session, client_id: str, disabled: bool, now: datetime, *, max_attempts: int
) -> list[int]:
    """Disable (no work; its assignments are released) or enable a client. Returns tasks touched."""
    row = s.execute(select(Client).where(Client.id == client_id).with_for_update()).scalar_one()
    row.disabled = disabled
    if not disabled:
        return []
    row.pending_requests = 0
    row.requested_at = None
    return assignments.release_client(s, client_id, now, max_attempts=max_attempts)


def expire(
    s: Session, cutoff: datetime, now: datetime, *, limit: int, max_attempts: int
) -> list[tuple[str, list[int]]]:
    """The timeout sweep: active clients not heard from since ``cutoff`` become inactive.

    Each expiry is a compare-and-set on (status, last_seen), so two sweeps never release the
    same assignment twice. Returns (client id, task ids touched) per client expired.
    """
    stale = (
        s.execute(
            select(Client.id)
            .where(Client.status == ClientState.ACTIVE, Client.last_seen < cutoff)
            .order_by(Client.last_seen)
            .limit(limit)
        )
        .scalars()
        .all()
    )
    expired = []
    for client_id in stale:
        won = affected(
            s.execute(
                update(Client)
                .where(Client.id == client_id, Client.status == ClientState.ACTIVE, Client.last_seen < cutoff)
                .values(status=ClientState.INACTIVE, conn_id=None, pending_requests=0, requested_at=None)
            )
        )
        if won == 1:
            expired.append(
                (client_id, assignments.release_client(s, client_id, now, max_attempts=max_attempts))
            )
    return expired
