"""The admin REST API: tasks and clients. Every route needs an admin bearer token."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, url_for
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app import jobs, validation
from app.auth import admin_required, db
from app.errors import ApiError
from store import clients as client_store
from store import reliability, task_admin
from store.db import Unavailable
from store.models import Client, Task, TaskAssignment, TaskRound, utcnow
from store.states import OPEN_ASSIGNMENT, TaskState

bp = Blueprint("api", __name__, url_prefix="/api")


def iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat(timespec="milliseconds") + "Z"


def task_json(task: Task) -> dict[str, Any]:
    return {
        "id": task.id,
        "type": task.type,
        "status": task.status,
        "status_reason": task.status_reason,
        "priority": task.priority,
        "requirements": task.requirements,
        "config": task.config,
        "num_shards": task.num_shards,
        "current_round": task.current_round,
        "client_id": task.client_id,
        "result": task.result,
        "error_log": task.error_log,
        "checkpoint_path": task.checkpoint_path,
        "created_at": iso(task.created_at),
        "updated_at": iso(task.updated_at),
    }


def assignment_json(a: TaskAssignment) -> dict[str, Any]:
    return {
        "id": a.id,
        "client_id": a.client_id,
        "round": a.round,
        "rank": a.rank,
        "status": a.status,
        "progress": a.progress,
        "metrics": a.metrics,
        "error": a.error,
        "deadline_at": iso(a.deadline_at),
        "assigned_at": iso(a.assigned_at),
        "updated_at": iso(a.updated_at),
    }


def client_json(c: Client) -> dict[str, Any]:
    return {
        "id": c.id,
        "status": c.status,
        "disabled": c.disabled,
        "connected": c.conn_id is not None,
        "cpu_info": c.cpu_info,
        "ram_info": c.ram_info,
        "gpu_info": c.gpu_info,
        "task_types": c.task_types,
        "session_info": c.session_info,
        "pending_requests": c.pending_requests,
        "last_seen": iso(c.last_seen),
        "created_at": iso(c.created_at),
        "reliability": reliability.summary(c, current_app.config["SETTINGS"].MAX_TASKS_PER_CLIENT),
        "utilization": (
            {**c.utilization, "reported_at": iso(c.utilization_at)} if c.utilization is not None else None
        ),
    }


def paged(items: list[dict[str, Any]], total: int, page: int, per_page: int) -> Response:
    return jsonify({"items": items, "total": total, "page": page, "per_page": per_page})


def require_broker() -> None:
    """Refuse a write before anything is written while the broker is down: its jobs and
    doorbell rings could not be sent. (A write that raced the outage is covered anyway: the
    web tier's reconcile tells the holders, and beat's sweep re-drives the jobs.)"""
    if not jobs.broker_ok():
        raise Unavailable("broker unavailable; nothing was changed, try again shortly")


# --- tasks ---


@bp.get("/tasks")
@admin_required
def list_tasks() -> Response:
    args = validation.query(validation.TaskQuery)
    status, task_type = args.get("status"), args.get("type")
    page, per_page = args.get("page", 1), args.get("per_page", 20)
    items, total = db().run(
        lambda s: task_admin.page(s, status=status, type=task_type, page_no=page, per_page=per_page)
    )
    return paged([task_json(t) for t in items], total, page, per_page)


@bp.post("/tasks")
@admin_required
def create_task() -> tuple[Response, int, dict[str, str]]:
    fields = validation.new_task(validation.json_object(), current_app.config["SETTINGS"])
    require_broker()
    task = db().run(lambda s: task_admin.create(s, now=utcnow(), **fields))
    jobs.enqueue("workers.tasks.prepare_task", task.id)
    current_app.logger.info(
        "event=task_created task=%d type=%s shards=%d", task.id, task.type, task.num_shards
    )
    return jsonify(task_json(task)), 201, {"Location": url_for("api.get_task", task_id=task.id)}


def _task_detail(s: Session, task_id: int) -> dict[str, Any] | None:
    task = s.get(Task, task_id)
    if task is None:
        return None
    out = task_json(task)
    out["shards"] = task_admin.open_counts(s, task_id)
    recent = s.execute(
        select(TaskAssignment)
        .where(TaskAssignment.task_id == task_id)
        .order_by(TaskAssignment.id.desc())
        .limit(max(50, 2 * task.num_shards))
    ).scalars()
    out["assignments"] = [assignment_json(a) for a in recent]
    rounds = s.execute(
        select(TaskRound).where(TaskRound.task_id == task_id).order_by(TaskRound.round)
    ).scalars()
    out["rounds"] = [
        {"round": r.round, "status": r.status, "metrics": r.metrics, "finished_at": iso(r.finished_at)}
        for r in rounds
    ]
    return out


@bp.get("/tasks/<int:task_id>")
@admin_required
def get_task(task_id: int) -> Response:
    detail = db().run(lambda s: _task_detail(s, task_id))
    if detail is None:
        raise ApiError(404, f"no task {task_id}")
    return jsonify(detail)


@bp.put("/tasks/<int:task_id>/status")
@admin_required
def set_task_status(task_id: int) -> Response:
    target = validation.status_change(validation.TaskStatusChange)
    require_broker()
    try:
        task, notify = db().run(lambda s: task_admin.set_status(s, task_id, target, utcnow()))
    except KeyError:
        raise ApiError(404, f"no task {task_id}") from None
    except task_admin.IllegalTransition as error:
        raise ApiError(409, str(error)) from None
    _after_status_change(task.id, task.status, notify)
    return jsonify(task_json(task))


def _after_status_change(task_id: int, status: str, notify: list[str]) -> None:
    from store.bus import get_bus

    get_bus().publish(notify)  # holders get pause / resume / stop from their web process
    if status in (TaskState.RUNNING, TaskState.PENDING):
        jobs.request_schedule()
    current_app.logger.info("event=task_status task=%d status=%s notified=%d", task_id, status, len(notify))


@bp.delete("/tasks/<int:task_id>")
@admin_required
def delete_task(task_id: int) -> Response:
    """Stop the task (its holders are told), then delete it and its files."""
    require_broker()
    try:
        task, notify = db().run(lambda s: task_admin.set_status(s, task_id, TaskState.STOPPED, utcnow()))
        _after_status_change(task.id, task.status, notify)
    except KeyError:
        raise ApiError(404, f"no task {task_id}") from None
    except task_admin.IllegalTransition:
        pass  # already final: nothing to stop
    db().run(lambda s: task_admin.delete_task(s, task_id))
    jobs.enqueue("workers.tasks.purge_task_files", task_id)
    current_app.logger.info("event=task_deleted task=%d", task_id)
    return jsonify({"deleted": task_id})


# --- clients ---


@bp.get("/clients")
@admin_required
def list_clients() -> Response:
    args = validation.query(validation.ClientQuery)
    status = args.get("status")
    page, per_page = args.get("page", 1), args.get("per_page", 20)

    def query(s: Session) -> tuple[list[Client], int]:
        q = select(Client)
        if status == "disabled":
            q = q.where(Client.disabled.is_(True))
        elif status:
            q = q.where(Client.status == status)
        total = s.execute(select(func.count()).select_from(q.subquery())).scalar_one()
        rows = s.execute(
            q.order_by(Client.created_at.desc(), Client.id).offset((page - 1) * per_page).limit(per_page)
        )
        return list(rows.scalars()), total

    items, total = db().run(query)
    return paged([client_json(c) for c in items], total, page, per_page)


@bp.get("/clients/<client_id>")
@admin_required
def get_client(client_id: str) -> Response:
    def query(s: Session) -> dict[str, Any] | None:
        c = s.get(Client, client_id)
        if c is None:
            return None
        out = client_json(c)
        held = s.execute(
            select(TaskAssignment)
            .where(TaskAssignment.client_id == client_id, TaskAssignment.status.in_(OPEN_ASSIGNMENT))
            .order_by(TaskAssignment.id)
        ).scalars()
        out["assignments"] = [assignment_json(a) for a in held]
        return out

    detail = db().run(query)
    if detail is None:
        raise ApiError(404, f"no client {client_id}")
    return jsonify(detail)


@bp.put("/clients/<client_id>/status")
@admin_required
def set_client_status(client_id: str) -> Response:
    target = validation.status_change(validation.ClientStatusChange)
    require_broker()
    settings = current_app.config["SETTINGS"]

    def change(s: Session) -> tuple[dict[str, Any], list[int]] | None:
        if s.get(Client, client_id) is None:
            return None
        touched = client_store.set_disabled(
            s, client_id, target == "disabled", utcnow(), max_attempts=settings.MAX_SHARD_ATTEMPTS
        )
        return client_json(s.get(Client, client_id)), touched  # type: ignore[arg-type]

    outcome = db().run(change)
    if outcome is None:
        raise ApiError(404, f"no client {client_id}")
    body, touched = outcome
    from store.bus import get_bus

    get_bus().publish([client_id])  # its web process tells it to stop what it held
    if touched:
        jobs.request_schedule()  # released shards go to someone else
    current_app.logger.info(
        "event=client_status client=%s status=%s released=%d", client_id, target, len(touched)
    )
    return jsonify(body)


@bp.get("/metrics")
@admin_required
def metrics() -> Response:
    """The specification's metrics: this host's CPU and RAM use (a measurement), the GPUs the
    connected clients reported, running tasks, and the clients connected to any web process."""
    from app.sysinfo import cpu_utilization, ram_utilization

    limit = current_app.config["SETTINGS"].METRICS_CLIENT_LIMIT

    def counts(s: Session) -> tuple[int, int, list[tuple[str, dict[str, Any]]]]:
        active = s.execute(
            select(func.count()).select_from(Task).where(Task.status == TaskState.RUNNING)
        ).scalar_one()
        return active, client_store.connected_count(s), client_store.reported_utilization(s, limit=limit)

    active, connected, reports = db().run(counts)
    gpus = [
        {"client_id": client_id, **gpu}
        for client_id, report in reports
        for gpu in report.get("gpu_utilization", [])
    ]
    return jsonify(
        {
            "cpu_utilization": cpu_utilization(),
            "ram_utilization": ram_utilization(),
            "gpu_utilization": gpus,
            "active_tasks": active,
            "connected_clients": connected,
        }
    )
