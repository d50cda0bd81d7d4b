"""Model exchange over HTTP: the global model of a round (download) and a client's update (upload).

Bytes never travel inside WebSocket JSON or through the broker. Uploads are safetensors only
(the server never unpickles client bytes), streamed to a temporary file under CHECKPOINT_DIR,
checked against the round's global model (names, shapes, dtypes, finite values), renamed into
place, and only then recorded, with a compare-and-set, on the client's open assignment.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request, send_file
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.auth import client_identity, db, is_admin
from app.errors import ApiError
from store import blobs, reliability, updates
from store.assignments import NotAssigned, Superseded, UnknownTask
from store.blobs import BlobStore, Header, InvalidModel, TooLarge
from store.models import FEDERATED, Task, TaskAssignment, TaskRound
from store.states import RoundState, TaskState
from training import export

bp = Blueprint("models", __name__, url_prefix="/api")

CHUNK = 1 << 20


def store() -> BlobStore:
    return BlobStore(current_app.config["SETTINGS"].CHECKPOINT_DIR)


@lru_cache(maxsize=64)
def reference_header(path: str, mtime_ns: int) -> Header:
    return blobs.header_of(Path(path))


@lru_cache(maxsize=256)
def _file_sha256(path: str, mtime_ns: int, size: int) -> str:
    """A file's SHA-256, once per version of the file (path, mtime, size) and process: for
    files written before their digest was stored, or by a process that does not store it."""
    return blobs.sha256_file(Path(path))


def file_digest(path: Path, stored: str | None) -> str:
    """The digest to serve for ``path``: the one stored when it was written, else hashed once."""
    if stored:
        return stored
    st = path.stat()
    return _file_sha256(str(path), st.st_mtime_ns, st.st_size)


def _model_response(rel: str, sha256: str | None, name: str) -> Response:
    """The file ``rel`` under CHECKPOINT_DIR, with its digest (the stored one when known)."""
    path = store().path(rel)
    if not path.exists():
        raise ApiError(404, "the model file is missing on the server", "no_model")
    response = send_file(path, mimetype="application/octet-stream", as_attachment=True, download_name=name)
    response.headers["X-Checksum-Sha256"] = file_digest(path, sha256)
    return response


@bp.get("/tasks/<int:task_id>/rounds/<int:round_no>/model")
def round_model(task_id: int, round_no: int) -> Response:
    """The global model round ``round_no`` trains from. Admins, or a client assigned to that round."""
    client_id = client_identity()
    admin = client_id is None and is_admin()
    if client_id is None and not admin:
        raise ApiError(401, "send X-Client-Id and 'Authorization: Bearer <client token>' (or an admin token)")

    def find(s: Session) -> TaskRound | None:
        if not admin:
            held = s.execute(
                select(TaskAssignment.id).where(
                    TaskAssignment.client_id == client_id,
                    TaskAssignment.task_id == task_id,
                    TaskAssignment.round == round_no,
                )
            ).first()
            if held is None:
                raise ApiError(409, f"you hold no shard of task {task_id} round {round_no}", "not_assigned")
        return s.execute(
            select(TaskRound).where(TaskRound.task_id == task_id, TaskRound.round == round_no)
        ).scalar_one_or_none()

    found = db().run(find)
    if found is None:
        raise ApiError(404, f"no round {round_no} of task {task_id}", "unknown_task")
    return _model_response(found.model_path, found.model_sha256, f"task{task_id}-round{round_no}.safetensors")


@bp.get("/tasks/<int:task_id>/model")
def final_model(task_id: int) -> Response:
    """The task's latest checkpoint (the final model once completed). Admin token."""
    if not is_admin():
        raise ApiError(401, "missing or invalid admin token")

    def find(s: Session) -> tuple[str | None, str | None, str, int] | None:
        task = s.get(Task, task_id)
        if task is None:
            return None
        sha = task.checkpoint_sha256
        if sha is None and task.status == TaskState.COMPLETED:  # completed before the column
            sha = (task.result or {}).get("model_sha256")
        return task.checkpoint_path, sha, task.status, task.current_round

    found = db().run(find)
    if found is None:
        raise ApiError(404, f"no task {task_id}", "unknown_task")
    rel, sha, status, current_round = found
    if rel is None:
        raise ApiError(
            404,
            f"task {task_id} has no model yet ({status}, round {current_round}): a checkpoint is written "
            "every CHECKPOINT_FREQUENCY rounds and at the end",
            "no_model",
        )
    return _model_response(rel, sha, f"task{task_id}.safetensors")


def _completed_task(s: Session, task_id: int) -> Task:
    task = s.get(Task, task_id)
    if task is None:
        raise ApiError(404, f"no task {task_id}", "unknown_task")
    if task.type != FEDERATED:
        raise ApiError(404, f"task {task_id} is a {task.type} task: it has no model", "no_model")
    if task.status != TaskState.COMPLETED:
        raise ApiError(
            404, f"task {task_id} has no final model yet: it is {task.status}, not completed", "no_model"
        )
    return task


@bp.get("/tasks/<int:task_id>/export")
def task_export(task_id: int) -> Response:
    """The completed task's final model as a torch.export program (.pt2), written by the worker
    that completed it. Admin token."""
    if not is_admin():
        raise ApiError(401, "missing or invalid admin token")
    stored = db().run(lambda s: (_completed_task(s, task_id).result or {}).get("export_sha256"))
    path = store().path(export.export_rel(task_id))
    if not path.exists():
        raise ApiError(404, f"task {task_id} has no export (yet)", "no_model")
    response = send_file(
        path,
        mimetype="application/octet-stream",
        as_attachment=True,
        download_name=export.download_name(task_id),
    )
    response.headers["X-Checksum-Sha256"] = file_digest(path, stored)
    return response


@bp.get("/tasks/<int:task_id>/model-card")
def model_card(task_id: int) -> Response:
    """The completed task's model card (JSON): config, data, per-round metrics, final accuracy."""
    if not is_admin():
        raise ApiError(401, "missing or invalid admin token")

    def read(s: Session) -> tuple[Task, list[TaskRound]]:
        task = _completed_task(s, task_id)
        rounds = s.execute(
            select(TaskRound)
            .where(TaskRound.task_id == task_id, TaskRound.status == RoundState.DONE)
            .order_by(TaskRound.round)
        ).scalars()
        return task, list(rounds)

    task, rounds = db().run(read)
    path = store().path(export.export_rel(task_id))
    exists = path.exists()
    card = export.model_card(
        task_id=task_id,
        config=task.config or {},
        result=task.result or {},
        rounds=[r.metrics or {"round": r.round} for r in rounds],
        created_at=task.created_at,
        completed_at=max((r.finished_at for r in rounds if r.finished_at), default=task.updated_at),
        export_sha256=file_digest(path, (task.result or {}).get("export_sha256")) if exists else None,
        export_bytes=path.stat().st_size if exists else None,
    )
    return jsonify(card)


def _chunks(stream: Any) -> Iterator[bytes]:
    """A request body, a CHUNK at a time, yielding to the process's other sockets in between
    (``time.sleep(0)``; gevent's, under gunicorn), since from a fast client a read may never
    have to wait."""
    while chunk := stream.read(CHUNK):
        yield chunk
        time.sleep(0)


def _drain(stream: Any = None) -> None:
    """Read what is left of the body and drop it: a client sends it all before it reads the
    answer. Left unread, gunicorn read it after the answer 8 KiB at a time: 300 MiB took over
    30 s on a slow machine, and its arbiter killed the worker with every socket it held."""
    for _ in _chunks(request.stream if stream is None else stream):
        pass


# What a refused upload gets: (HTTP status, error code); the message is the exception's.
UPLOAD_REFUSALS: dict[type[Exception], tuple[int, str]] = {
    UnknownTask: (404, "unknown_task"),  # UnknownRound too
    updates.StaleRound: (409, "stale_round"),
    NotAssigned: (409, "not_assigned"),
    Superseded: (409, "superseded"),  # another copy of the shard was accepted first
}


def _refused(error: Exception) -> ApiError:
    for kind, (status, code) in UPLOAD_REFUSALS.items():
        if isinstance(error, kind):
            return ApiError(status, str(error), code)
    raise error


@bp.put("/tasks/<int:task_id>/rounds/<int:round_no>/updates/<int:rank>")
def upload_update(task_id: int, round_no: int, rank: int) -> tuple[Response, int]:
    """A client's update for its rank of a round: streamed, checked, then recorded (see the module doc)."""
    settings = current_app.config["SETTINGS"]
    request.max_content_length = settings.MAX_UPLOAD_SIZE
    client_id = client_identity()
    if client_id is None:
        raise ApiError(401, "send X-Client-Id and 'Authorization: Bearer <client token>'")
    num_examples = _num_examples()
    if (request.content_length or 0) > settings.MAX_UPLOAD_SIZE:
        _drain(request.environ["wsgi.input"])  # request.stream refuses a body over the limit
        raise ApiError(413, f"an update may be at most {settings.MAX_UPLOAD_SIZE} bytes", "too_large")
    try:
        to = db().run(lambda s: updates.target(s, client_id, task_id, round_no, rank))
    except tuple(UPLOAD_REFUSALS) as error:
        raise _refused(error) from None
    if to.existing_sha256 is not None:
        _drain()
        return jsonify({"status": "duplicate", "sha256": to.existing_sha256}), 200
    try:
        tmp, size, sha = _receive_checked(settings.MAX_UPLOAD_SIZE, to.model_rel, (task_id, round_no, rank))
    except ApiError as error:
        if error.code == "invalid_update":  # counts against the client's reliability
            db().run(
                lambda s: reliability.note(s, client_id, "refused", max_tasks=settings.MAX_TASKS_PER_CLIENT)
            )
        raise
    blob_store = store()
    rel = blobs.update_rel(task_id, round_no, rank, to.assignment_id).replace(
        ".safetensors", f"-{sha[:12]}.safetensors"
    )
    blob_store.adopt(tmp, rel)
    try:
        recorded = db().run(lambda s: updates.record(s, to.assignment_id, rel, sha, num_examples))
    except BaseException:
        blob_store.remove(rel)
        raise
    if recorded.won:
        current_app.logger.info("event=upload state=accepted task=%d round=%d rank=%d bytes=%d sha256=%s",
                                task_id, round_no, rank, size, sha)  # fmt: skip
        return jsonify({"status": "accepted", "sha256": sha}), 201
    if recorded.current_sha256 != sha:
        blob_store.remove(rel)
    if recorded.current_sha256 is not None:
        return jsonify({"status": "duplicate", "sha256": recorded.current_sha256}), 200
    raise ApiError(409, f"you no longer hold rank {rank} of task {task_id} round {round_no}", "not_assigned")


def _num_examples() -> int:
    raw = request.headers.get("X-Num-Examples", "")
    if not raw.isdigit() or not 1 <= int(raw) <= 1_000_000_000:
        raise ApiError(400, "X-Num-Examples must be an integer in 1..1000000000", "invalid_update")
    return int(raw)


def _receive_checked(max_bytes: int, model_rel: str, where: tuple[int, int, int]) -> tuple[Path, int, str]:
    """Stream the body to a temporary file and check it against the round's global model.

    Returns (temporary file, size, sha256); a refused body leaves no file behind.
    """
    blob_store = store()
    try:
        tmp, size, sha = blob_store.receive(_chunks(request.stream), max_bytes)
    except TooLarge:
        _drain(request.environ["wsgi.input"])  # a chunked body: the rest of it
        raise ApiError(413, f"an update may be at most {max_bytes} bytes", "too_large") from None
    try:
        model_path = blob_store.path(model_rel)
        reference = reference_header(str(model_path), model_path.stat().st_mtime_ns)
        blobs.validate_model_file(tmp, reference)
    except InvalidModel as error:
        tmp.unlink(missing_ok=True)
        current_app.logger.info("event=upload state=refused task=%d round=%d rank=%d reason=%s",
                                *where, error)  # fmt: skip
        raise ApiError(400, str(error), "invalid_update") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp, size, sha
