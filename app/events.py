"""``GET /admin/events``: the dashboard's push channel (server-sent events).

One stream per open dashboard view. The request carries the admin token in its
``Authorization`` header like any REST call (the page reads the stream with ``fetch()``, not
``EventSource``, which cannot send headers: so no token in a URL, no second credential), is
checked once when the stream opens and again every ``RECHECK_S`` seconds, and spends none of
the REST API's ``RATE_LIMIT``: opening a stream counts against a budget of its own (per admin,
per address without a valid token; ``create_app``), and a stream is one request however long
it lasts. The web process reads what the view shows from the database (the source of
truth) every ``POLL_S`` seconds and sends it only when it changed; a comment line every
``KEEPALIVE_S`` seconds keeps proxies from closing a quiet stream. A stream ends after
``MAX_AGE_S`` seconds (the page opens the next one), or at once with a ``signed_out`` event
when its token has expired or was revoked.

Views (``?view=``): ``overview``; ``tasks`` (``status``, ``type`` filters); ``task`` (``id``);
``client`` (``id``). Each sends one event named after the view, whose data is the JSON below:
once, then the response ends; with ``follow=1`` (the page) again at every change until the stream
ends.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any, cast

from flask import Blueprint, Response, current_app, request, stream_with_context
from sqlalchemy import func, select
from sqlalchemy.orm import Session

import server_settings
from app import validation
from app.api import assignment_json, client_json, iso, task_json
from app.auth import admin_required, bearer, db
from app.errors import ApiError
from store import clients as client_store
from store.auth import admin_principal
from store.models import Client, Task, TaskAssignment, TaskRound, TaskShard, utcnow
from store.states import AssignmentState, RoundState, TaskState

bp = Blueprint("events", __name__)
log = logging.getLogger(__name__)

POLL_S = 1.0  # how often a stream reads its view from the database
KEEPALIVE_S = 15.0
RECHECK_S = 30.0  # how often a stream checks that its token is still valid
MAX_AGE_S = 600.0  # then the stream ends and the page opens a new one
WORKERS_TTL_S = 10.0  # one Celery ping per web process at most this often, shared by its streams
RATE_WINDOW_MIN = 5  # rounds per minute: averaged over the last 5 minutes
RECENT_ERRORS = 10
HISTORY = 50  # assignments shown on a client's page
CLIENTS = 50  # clients listed on the overview, connected ones first
VIEWS = ("overview", "tasks", "task", "client")
FINISHED = (TaskState.COMPLETED, TaskState.FAILED, TaskState.ERROR, TaskState.STOPPED)
BAD_ASSIGNMENT = (AssignmentState.FAILED, AssignmentState.TIMED_OUT)

_workers: dict[str, Any] = {"checked": 0.0, "value": None}


# --- what each view shows ---


def queue_depths(settings: server_settings.Settings) -> dict[str, int] | None:
    """Messages waiting in each Celery queue (Redis LLEN over its priority lists); None when
    embedded (no broker) or when the broker does not answer."""
    if settings.embedded:
        return None
    import redis

    import celeryconfig
    from app.metrics import _priority_keys

    names = [queue.name for queue in celeryconfig.task_queues]
    try:
        client = redis.Redis.from_url(settings.REDIS_URL, socket_connect_timeout=1, socket_timeout=2)
        try:
            pipe = client.pipeline(transaction=False)
            for name in names:
                for key in _priority_keys(name):
                    pipe.llen(key)
            lengths = pipe.execute()
        finally:
            client.close()
    except Exception as error:
        log.warning("event=dashboard_queues state=broker_failed error=%s", type(error).__name__)
        return None
    per_queue = len(_priority_keys(""))
    return {name: sum(lengths[i * per_queue : (i + 1) * per_queue]) for i, name in enumerate(names)}


def workers_online(settings: server_settings.Settings) -> list[str] | None:
    """The Celery workers that answered a ping (cached WORKERS_TTL_S per process); None when
    embedded (the jobs run inside the web process) or when the broker does not answer."""
    if settings.embedded:
        return None
    now = time.monotonic()
    if now - _workers["checked"] < WORKERS_TTL_S:
        return cast(list[str] | None, _workers["value"])
    _workers["checked"] = now
    try:
        from workers import celery

        replies = celery.control.ping(timeout=0.5)
        _workers["value"] = sorted(name for reply in replies for name in reply)
    except Exception as error:
        log.warning("event=dashboard_workers state=ping_failed error=%s", type(error).__name__)
        _workers["value"] = None
    return cast(list[str] | None, _workers["value"])


def overview(s: Session) -> dict[str, Any]:
    counts = client_store.state_counts(s)
    since = utcnow() - timedelta(minutes=RATE_WINDOW_MIN)
    done = s.execute(
        select(func.count())
        .select_from(TaskRound)
        .where(TaskRound.status == RoundState.DONE, TaskRound.finished_at >= since)
    ).scalar_one()
    errors = []
    for a in s.execute(
        select(TaskAssignment)
        .where(TaskAssignment.status.in_(BAD_ASSIGNMENT))
        .order_by(TaskAssignment.updated_at.desc(), TaskAssignment.id.desc())
        .limit(RECENT_ERRORS)
    ).scalars():
        errors.append(
            {
                "at": iso(a.updated_at),
                "task_id": a.task_id,
                "round": a.round,
                "client_id": a.client_id,
                "what": a.status,
                "message": a.error or "",
            }
        )
    for t in s.execute(
        select(Task)
        .where(Task.status.in_((TaskState.FAILED, TaskState.ERROR)))
        .order_by(Task.updated_at.desc())
        .limit(RECENT_ERRORS)
    ).scalars():
        message = t.status_reason or t.error_log or ""
        errors.append(
            {"at": iso(t.updated_at), "task_id": t.id, "round": t.current_round, "client_id": None,
             "what": f"task {t.status}", "message": message[:500]}
        )  # fmt: skip
    errors.sort(key=lambda e: e["at"] or "", reverse=True)
    listed = [
        {
            "id": c.id,
            "status": c.status,
            "disabled": c.disabled,
            "connected": c.conn_id is not None,
            "cores": c.cpu_cores,
            "ram_gb": c.ram_gb,
            "gpus": c.gpu_count,
            "utilization": c.utilization,
            "last_seen": iso(c.last_seen),
        }
        for c in s.execute(
            select(Client)
            .order_by(Client.conn_id.is_(None), Client.last_seen.desc(), Client.id)
            .limit(CLIENTS)
        ).scalars()
    ]
    return {
        "client_list": listed,
        "connected_clients": counts.connected,
        "clients": counts.clients,
        "tasks": counts.tasks,
        "active_tasks": counts.tasks.get(TaskState.RUNNING, 0),
        "rounds_per_minute": round(done / RATE_WINDOW_MIN, 2),
        "recent_errors": errors[:RECENT_ERRORS],
    }


def rounds_done(task: Task, done: int) -> dict[str, Any]:
    """Progress as people read it: rounds finished of rounds configured, and the round now
    trained (None once the task has ended: a finished 3-round task reads 3 / 3, not 2 / 3)."""
    total = (task.config or {}).get("rounds") if task.type == "federated_training" else None
    live = task.status not in FINISHED
    return {
        "rounds_done": done,
        "rounds_total": total,
        "training_round": task.current_round + 1 if live and total is not None else None,
        "finished": not live,
    }


#: The fields of a task list row, taken from the REST API's task (``task_json``).
SUMMARY_FIELDS = (
    "id", "type", "status", "status_reason", "priority", "num_shards", "created_at", "updated_at",
)  # fmt: skip


def task_summary(task: Task, done: int, last: dict[str, Any] | None) -> dict[str, Any]:
    full = task_json(task)
    return {
        **{key: full[key] for key in SUMMARY_FIELDS},
        "last_accuracy": (last or {}).get("test_accuracy"),
        **rounds_done(task, done),
    }


def tasks(s: Session, status: str | None, task_type: str | None) -> dict[str, Any]:
    query = select(Task)
    if status:
        query = query.where(Task.status == status)
    if task_type:
        query = query.where(Task.type == task_type)
    found = list(s.execute(query.order_by(Task.id.desc()).limit(100)).scalars())
    ids = [t.id for t in found]
    done: dict[int, int] = {}
    last: dict[int, dict[str, Any]] = {}
    if ids:
        for task_id, n in s.execute(
            select(TaskRound.task_id, func.count())
            .where(TaskRound.task_id.in_(ids), TaskRound.status == RoundState.DONE)
            .group_by(TaskRound.task_id)
        ):
            done[task_id] = n
        for task_id, metrics in s.execute(
            select(TaskRound.task_id, TaskRound.metrics)
            .where(TaskRound.task_id.in_(ids), TaskRound.status == RoundState.DONE)
            .order_by(TaskRound.task_id, TaskRound.round)
        ):
            last[task_id] = metrics or {}
    types = sorted(t for (t,) in s.execute(select(Task.type).distinct()))
    return {
        "items": [task_summary(t, done.get(t.id, 0), last.get(t.id)) for t in found],
        "types": types,
    }


def task_page(s: Session, task_id: int) -> dict[str, Any] | None:
    task = s.get(Task, task_id)
    if task is None:
        return None
    rounds = []
    for r in s.execute(
        select(TaskRound).where(TaskRound.task_id == task_id).order_by(TaskRound.round)
    ).scalars():
        m = r.metrics or {}
        rounds.append(
            {
                "round": r.round,
                "status": r.status,
                "train_loss": m.get("train_loss"),
                "test_loss": m.get("test_loss"),
                "test_accuracy": m.get("test_accuracy"),
                "updates": m.get("updates"),
                "seconds": m.get("seconds"),
                "started_at": iso(r.started_at),
                "finished_at": iso(r.finished_at),
            }
        )
    done = [r for r in rounds if r["status"] == RoundState.DONE]
    holders = {
        a.id: a
        for a in s.execute(
            select(TaskAssignment).where(
                TaskAssignment.task_id == task_id, TaskAssignment.round == task.current_round
            )
        ).scalars()
    }
    shards = []
    for sh in s.execute(
        select(TaskShard)
        .where(TaskShard.task_id == task_id, TaskShard.round == task.current_round)
        .order_by(TaskShard.rank)
    ).scalars():
        a = holders.get(sh.assignment_id) if sh.assignment_id is not None else None
        shards.append(
            {
                "round": sh.round,
                "rank": sh.rank,
                "state": sh.status,
                "attempts": sh.attempts,
                "holder": a.client_id if a is not None else None,
                "assignment": a.status if a is not None else None,
                "progress": a.progress if a is not None else None,
                "deadline_at": iso(a.deadline_at) if a is not None else None,
            }
        )
    out = task_summary(task, len(done), done[-1] if done else None)
    out.update(
        {
            "config": task.config,
            "requirements": task.requirements,
            "error_log": task.error_log,
            "result_final": (task.result or {}).get("final") if isinstance(task.result, dict) else None,
            "current_round": task.current_round,
            "rounds": rounds,
            "shards": shards,
        }
    )
    return out


def client_page(s: Session, client_id: str) -> dict[str, Any] | None:
    c = s.get(Client, client_id)
    if c is None:
        return None
    out = client_json(c)
    out["history"] = [
        {**assignment_json(a), "task_id": a.task_id}
        for a in s.execute(
            select(TaskAssignment)
            .where(TaskAssignment.client_id == client_id)
            .order_by(TaskAssignment.id.desc())
            .limit(HISTORY)
        ).scalars()
    ]
    return out


# --- the stream ---


def sse(event: str, data: Any) -> str:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def view_args() -> tuple[str, dict[str, Any]]:
    view = request.args.get("view", "overview")
    if view not in VIEWS:
        raise ApiError(400, f"view must be one of {', '.join(VIEWS)}")
    if view == "tasks":
        return view, {"status": validation.task_status_filter(), "type": request.args.get("type") or None}
    if view in ("task", "client"):
        raw = request.args.get("id", "")
        if not raw:
            raise ApiError(400, f"view={view} needs id=")
        if view == "task":
            if not raw.isdigit() or int(raw) > 2**31 - 1:
                raise ApiError(400, "id must be a task id (a positive integer)")
            return view, {"id": int(raw)}
        if len(raw) > 255:
            raise ApiError(400, "id must be a client id (at most 255 characters)")
        return view, {"id": raw}
    return view, {}


def snapshot(view: str, args: dict[str, Any]) -> Any:
    settings = current_app.config["SETTINGS"]
    if view == "overview":
        data: dict[str, Any] = db().run(overview)
        data["queues"] = queue_depths(settings)
        data["workers"] = workers_online(settings)
        data["mode"] = "embedded" if settings.embedded else "production"
        return data
    if view == "tasks":
        return db().run(lambda s: tasks(s, args["status"], args["type"]))
    if view == "task":
        return db().run(lambda s: task_page(s, args["id"]))
    return db().run(lambda s: client_page(s, args["id"]))


@bp.get("/admin/events")
@admin_required
def events() -> Response:
    view, args = view_args()
    follow = request.args.get("follow", "0")
    if follow not in ("0", "1"):
        raise ApiError(400, "follow must be 0 or 1")
    token = bearer()
    assert token is not None  # admin_required
    env_token = current_app.config["SETTINGS"].ADMIN_TOKEN

    def still_signed_in() -> bool:
        return db().run(lambda s: admin_principal(s, token, env_token, utcnow())) is not None

    first = snapshot(view, args)  # an unknown task or client is a 404, before any stream
    if first is None:
        raise ApiError(404, f"no {view} {args.get('id')}")

    def stream() -> Iterator[str]:
        opened = last_check = last_sent = time.monotonic()
        sent = None
        data: Any = first
        while True:
            now = time.monotonic()
            if now - opened > MAX_AGE_S:
                yield sse("reopen", {"after_s": MAX_AGE_S})
                return
            try:
                if now - last_check > RECHECK_S:
                    last_check = now
                    if not still_signed_in():
                        yield sse("signed_out", {"message": "the admin token expired or was revoked"})
                        return
                if data is None:
                    data = snapshot(view, args)
            except Exception as error:  # the database is down: say so, and keep trying
                log.warning("event=dashboard_stream state=read_failed error=%s", type(error).__name__)
                data = {"unavailable": "the database does not answer; retrying"}
            if data is None:  # deleted meanwhile
                yield sse("missing", {"message": f"no {view} {args.get('id')} (deleted)"})
                return
            body = json.dumps(data, sort_keys=True)
            if body != sent:
                sent, last_sent = body, now
                yield f"event: {view}\ndata: {body}\n\n"
                if follow != "1":
                    return
            elif now - last_sent > KEEPALIVE_S:
                last_sent = now
                yield ": keepalive\n\n"
            data = None
            time.sleep(POLL_S)  # cooperative under gevent

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return Response(stream_with_context(stream()), mimetype="text/event-stream", headers=headers)
