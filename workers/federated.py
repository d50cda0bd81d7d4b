"""Federated rounds: the initial global model, aggregation, evaluation, checkpoints.

A round is aggregated in three steps: :func:`take` (read the inputs, take the round's lease),
run the plan (here, or as chords of ``aggregate_slice`` jobs), and :func:`complete` (evaluate,
write the model, commit with a compare-and-set). Everything is on disk before a row points at
it, so a dead worker or server resumes from the last finished round. The design is in
docs/architecture.md, "Federated rounds".
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, TypedDict

from prometheus_client import Histogram
from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

import server_settings
from store import blobs as paths
from store.blobs import BlobStore
from store.db import Database, affected
from store.models import Task, TaskAssignment, TaskRound, TaskShard, new_noise_secret, utcnow
from store.states import (
    LIVE_TASK,
    OPEN_ASSIGNMENT,
    UNSETTLED_SHARD,
    AssignmentState,
    RoundState,
    ShardState,
    TaskState,
)
from training.spec import quorum
from workers.lifecycle import create_shards, fail_task, has_shards, round_deadline

if TYPE_CHECKING:
    from aggregation import RoundResult

log = logging.getLogger(__name__)

# Observed once per round that produced a model, by the worker whose commit won (GET /metrics).
ROUND_SECONDS = Histogram(
    "aifarm_round_duration_seconds",
    "Federated rounds, from the round's start to its committed aggregation",
    buckets=(1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600),
)
AGGREGATION_SECONDS = Histogram(
    "aifarm_aggregation_seconds",
    "Federated rounds: aggregating the updates (planned, run here or as slice jobs), before evaluation",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
)


class UpdateRow(TypedDict):
    """An accepted update of the round, as the aggregation job carries it."""

    assignment_id: int
    client_id: str
    rank: int
    path: str
    num_examples: int
    metrics: dict[str, Any]


class Job(TypedDict, total=False):
    """What a round's aggregation needs; JSON-able, passed between jobs as a file."""

    task_id: int
    round: int
    config: dict[str, Any]
    rounds: int
    model_path: str
    state_path: str | None
    noise_secret: int  # the task's DP noise secret (server side only)
    round_started_at: str
    updates: list[UpdateRow]
    started: float  # time.time() when the aggregation began
    step: int  # the phase of a sliced aggregation
    run: dict[str, Any]  # the library's round arguments, as paths and numbers
    plan: dict[str, Any]  # the library's plan of the round
    missing_ranks: list[int]  # ranks the round closed without (quorum at the timeout)
    released: list[str]  # their holders, to be told to stop


def locked_task_at(s: Session, task_id: int, round_no: int) -> Task | None:
    """The task, locked, if it is still running (or paused) at ``round_no``; else None.

    Every step that ends a round checks this first, so a late or duplicate job changes nothing.
    """
    task = s.execute(select(Task).where(Task.id == task_id).with_for_update()).scalar_one_or_none()
    if (
        task is None
        or task.status not in (TaskState.RUNNING, TaskState.PAUSED)
        or task.current_round != round_no
    ):
        return None
    return task


def round_seed(noise_secret: int, round_no: int) -> int:
    """The DP noise seed of a round, from the task's secret (never from its config, which
    every client receives): docs/aggregation.md, "The noise seed"."""
    from aggregation.seeds import secret_round_seed

    return secret_round_seed(noise_secret, round_no)


def prepare(db: Database, blobs: BlobStore, task_id: int, settings: server_settings.Settings) -> bool:
    """Write the round-0 global model (seeded from the config) and queue round 0's shards."""
    from training import build_model, state_to_bytes

    task_config = db.run(lambda s: s.execute(select(Task.config).where(Task.id == task_id)).scalar())
    if task_config is None:
        return False
    rel = paths.global_model_rel(task_id, 0)
    sha = blobs.write(rel, state_to_bytes(build_model(task_config).state_dict()))

    def commit(s: Session) -> bool:
        task = s.execute(select(Task).where(Task.id == task_id).with_for_update()).scalar_one_or_none()
        if task is None or task.status not in LIVE_TASK:
            return False
        if has_shards(s, task_id, 0):
            return False
        now = utcnow()
        first = s.execute(
            select(TaskRound.id).where(TaskRound.task_id == task_id, TaskRound.round == 0)
        ).first()
        if first is None:
            s.add(
                TaskRound(
                    task_id=task_id,
                    round=0,
                    status=RoundState.TRAINING,
                    model_path=rel,
                    model_sha256=sha,
                    started_at=now,
                    deadline_at=round_deadline(task.config or {}, now),
                )
            )
        create_shards(s, task, 0, now)
        task.current_round = 0
        task.status_reason = "waiting for fitting clients"
        task.updated_at = now
        return True

    return db.run(commit)


# --- 1. start ---


class LeaseHeld(Exception):
    """Another job holds the round's aggregation lease and keeps renewing it."""


def _inputs(s: Session, task_id: int, round_no: int, now: datetime, lease: timedelta) -> Job | None:
    task = locked_task_at(s, task_id, round_no)
    if task is None:
        return None
    rnd = s.execute(
        select(TaskRound).where(TaskRound.task_id == task_id, TaskRound.round == round_no)
    ).scalar_one_or_none()
    if rnd is None or rnd.status != RoundState.TRAINING:
        return None
    done = s.execute(
        select(TaskAssignment)
        .where(
            TaskAssignment.task_id == task_id,
            TaskAssignment.round == round_no,
            TaskAssignment.status == AssignmentState.COMPLETED,
        )
        .order_by(TaskAssignment.rank, TaskAssignment.id)
    ).scalars()
    latest: dict[int, TaskAssignment] = {}
    for a in done:
        latest[a.rank] = a  # one completed assignment per rank (its shard's compare-and-set)
    partial = len(latest) < task.num_shards
    if partial and not _closes_on_quorum(s, task, rnd, len(latest), now):
        return None
    took = affected(
        s.execute(
            update(TaskRound)
            .where(
                TaskRound.id == rnd.id,
                TaskRound.status == RoundState.TRAINING,
                or_(TaskRound.aggregating_since.is_(None), TaskRound.aggregating_since < now - lease),
            )
            .values(aggregating_since=now)
        )
    )
    if took != 1:
        raise LeaseHeld(f"task {task_id} round {round_no} is being aggregated since {rnd.aggregating_since}")
    released = _drop_missing_ranks(s, task_id, round_no, now) if partial else []
    if task.noise_secret is None:  # a row inserted without the ORM's default: made once, kept
        task.noise_secret = new_noise_secret()
    return Job(
        task_id=task_id,
        round=round_no,
        config=dict(task.config or {}),
        rounds=int((task.config or {}).get("rounds", 1)),
        model_path=rnd.model_path,
        state_path=rnd.state_path,
        noise_secret=task.noise_secret,
        round_started_at=rnd.started_at.isoformat(),
        updates=[
            UpdateRow(
                assignment_id=a.id,
                client_id=a.client_id,
                rank=a.rank,
                path=a.checkpoint_path or "",
                num_examples=a.num_examples or 0,
                metrics=a.metrics or {},
            )
            for _, a in sorted(latest.items())
        ],
        missing_ranks=sorted(set(range(task.num_shards)) - set(latest)),
        released=released,
    )


def _closes_on_quorum(s: Session, task: Task, rnd: TaskRound, accepted: int, now: datetime) -> bool:
    """A round short of some ranks is aggregated on its quorum once it timed out, or once every
    missing rank failed for good."""
    if accepted < quorum(task.config or {}):
        return False
    if rnd.deadline_at is not None and rnd.deadline_at <= now:
        return True
    unsettled = s.execute(
        select(TaskShard.id)
        .where(
            TaskShard.task_id == task.id,
            TaskShard.round == rnd.round,
            TaskShard.status.in_(UNSETTLED_SHARD),
        )
        .limit(1)
    ).first()
    return unsettled is None


def _drop_missing_ranks(s: Session, task_id: int, round_no: int, now: datetime) -> list[str]:
    """The round closes without its missing ranks: their shards are cancelled and their holders
    released (told to stop). Returns those holders."""
    holders = list(
        s.execute(
            select(TaskAssignment.client_id).where(
                TaskAssignment.task_id == task_id,
                TaskAssignment.round == round_no,
                TaskAssignment.status.in_(OPEN_ASSIGNMENT),
            )
        ).scalars()
    )
    s.execute(
        update(TaskShard)
        .where(
            TaskShard.task_id == task_id,
            TaskShard.round == round_no,
            TaskShard.status.in_(UNSETTLED_SHARD),
        )
        .values(status=ShardState.CANCELLED, updated_at=now)
    )
    s.execute(
        update(TaskAssignment)
        .where(
            TaskAssignment.task_id == task_id,
            TaskAssignment.round == round_no,
            TaskAssignment.status.in_(OPEN_ASSIGNMENT),
        )
        .values(
            status=AssignmentState.RELEASED,
            updated_at=now,
            error=f"round {round_no} closed on its quorum without it",
        )
    )
    return sorted(set(holders))


def renew_lease(db: Database, task_id: int, round_no: int) -> bool:
    """Push the round's lease forward (an aggregation of it is still running here)."""

    def renew(s: Session) -> bool:
        moved = s.execute(
            update(TaskRound)
            .where(
                TaskRound.task_id == task_id,
                TaskRound.round == round_no,
                TaskRound.status == RoundState.TRAINING,
                TaskRound.aggregating_since.is_not(None),
            )
            .values(aggregating_since=utcnow())
        )
        return affected(moved) == 1

    return db.run(renew)


@contextmanager
def lease_kept(db: Database, job: Job, settings: server_settings.Settings) -> Iterator[None]:
    """Renew the round's lease every third of AGGREGATION_LEASE while the block runs."""
    every = settings.AGGREGATION_LEASE / 3
    done = threading.Event()

    def keep() -> None:
        while not done.wait(every):
            try:
                renew_lease(db, job["task_id"], job["round"])
            except Exception as error:  # the next try may work; an expired lease is only a redo
                log.warning("event=lease_renewal state=failed task=%d round=%d error=%s",
                            job["task_id"], job["round"], error)  # fmt: skip

    keeper = threading.Thread(target=keep, name="aggregation-lease", daemon=True)
    keeper.start()
    try:
        yield
    finally:
        done.set()
        keeper.join(timeout=every)


def take(db: Database, task_id: int, round_no: int, settings: server_settings.Settings) -> Job | None:
    """Take the round's lease and read its inputs; None when there is nothing to do.
    Raises LeaseHeld when another job holds a live lease. Keep the lease (:func:`lease_kept`)
    until the round is planned and run."""
    lease = timedelta(seconds=settings.AGGREGATION_LEASE)
    job = db.run(lambda s: _inputs(s, task_id, round_no, utcnow(), lease))
    if job is not None:
        log.info(
            "event=aggregation_started task=%d round=%d updates=%d", task_id, round_no, len(job["updates"])
        )
    return job


def plan(blobs: BlobStore, job: Job, settings: server_settings.Settings) -> Job:
    """Plan the round's aggregation with the library (headers checked, slices cut)."""
    from training import shard_size

    cfg = job["config"]
    job["started"] = time.time()
    job["step"] = 0
    job["run"] = {  # the arguments of the round, the same whichever way it runs
        "global_path": str(blobs.path(job["model_path"])),
        "updates": [
            {
                "path": str(blobs.path(u["path"])),
                "num_examples": int(u["num_examples"]),
                "max_examples": shard_size(cfg, u["rank"]),
                "key": str(u["assignment_id"]),
            }
            for u in job["updates"]
        ],
        "state_path": str(blobs.path(job["state_path"])) if job["state_path"] else None,
        "round_seed": round_seed(job["noise_secret"], job["round"]),
        "max_slice_bytes": settings.AGGREGATION_SLICE_BYTES,
    }
    job["plan"] = _strategy(job).plan_round(**_run_args(job))
    return job


def _strategy(job: Job) -> Any:
    import aggregation

    cfg = job["config"]
    return aggregation.build_strategy(cfg.get("strategy", "fedavg"), cfg.get("strategy_params", {}))


def _run_args(job: Job) -> dict[str, Any]:
    import aggregation

    run = job["run"]
    return {
        "global_path": run["global_path"],
        "updates": [aggregation.UpdateFile(**u) for u in run["updates"]],
        "state_path": run["state_path"],
        "round_seed": run["round_seed"],
        "max_slice_bytes": run["max_slice_bytes"],
    }


def slices(job: Job) -> int:
    return len(job["plan"]["slices"])


# --- 2. run ---


def run_here(job: Job) -> RoundResult:
    """The whole round in this process: the library runs the same phases over the same slices
    as the fan-out would, in order, so the result is the same bit for bit."""
    result: RoundResult = _strategy(job).run_round(**_run_args(job))
    return result


def job_rel(job: Job) -> str:
    return f"{_step_prefix(job)}.json"


def slice_rel(job: Job, index: int) -> str:
    return f"{_step_prefix(job)}-slice-{index:04d}.safetensors"


def _step_prefix(job: Job) -> str:
    return f"{paths.round_dir(job['task_id'], job['round'])}/aggregation/step-{job['step']:03d}"


def save_job(blobs: BlobStore, job: Job) -> str:
    """Write the job where every worker can read it (CHECKPOINT_DIR); returns its relative path."""
    rel = job_rel(job)
    blobs.write(rel, json.dumps(job).encode())
    return rel


def load_job(blobs: BlobStore, rel: str) -> Job:
    job: Job = json.loads(blobs.path(rel).read_bytes())
    return job


# --- 3. complete ---


@dataclass(frozen=True)
class NextModel:
    """The model a round produced, written to disk before any row points at it."""

    model_rel: str
    model_sha: str
    state_rel: str | None
    checkpoint: bool  # also linked as a checkpoint
    final: bool  # the task's last round
    export_sha: str | None = None  # the final round's torch.export program, when it was written


def complete(
    db: Database, blobs: BlobStore, settings: server_settings.Settings, job: Job, result: RoundResult
) -> str:
    """Evaluate, write the next global model, and commit the round; returns what happened.

    ``noop`` (committed already), ``next_round``, ``completed`` or ``failed``.
    """
    from training import evaluate

    task_id, round_no, cfg = job["task_id"], job["round"], job["config"]
    aggregation_s = time.time() - job["started"]
    if not result.ok or result.params is None:
        reason = f"round {round_no} could not be aggregated: {result.reason}"
        return db.run(lambda s: _fail(s, task_id, round_no, reason, result.report))
    clock = time.perf_counter()
    evaluation = evaluate(result.params, cfg)
    evaluation_s = time.perf_counter() - clock
    made = _write_next_model(blobs, settings, job, result)
    now = utcnow()
    metrics = _round_metrics(
        job, result, evaluation, now, aggregation_s=aggregation_s, evaluation_s=evaluation_s
    )
    clock = time.perf_counter()
    outcome = db.run(lambda s: _commit_round(s, job, made, metrics, now))
    commit_s = time.perf_counter() - clock
    if outcome != "noop":
        ROUND_SECONDS.observe(metrics["seconds"])
        AGGREGATION_SECONDS.observe(aggregation_s)
    if outcome != "noop" and round_no > 0:
        blobs.remove(paths.round_dir(task_id, round_no - 1))  # only checkpoints keep older models
    log.info(
        "event=round_aggregated task=%d round=%d outcome=%s updates=%d slices=%d test_accuracy=%.4f "
        "aggregation_s=%.4f evaluation_s=%.4f commit_s=%.4f",
        task_id, round_no, outcome, len(job["updates"]), slices(job),
        evaluation["test_accuracy"], aggregation_s, evaluation_s, commit_s,
    )  # fmt: skip
    return outcome


def _write_next_model(
    blobs: BlobStore, settings: server_settings.Settings, job: Job, result: RoundResult
) -> NextModel:
    from training import state_to_bytes

    assert result.params is not None
    task_id, cfg = job["task_id"], job["config"]
    next_round = job["round"] + 1
    model_rel = paths.global_model_rel(task_id, next_round)
    model_sha = blobs.write(model_rel, state_to_bytes(result.params))
    state_rel = None
    if result.state:
        state_rel = paths.state_rel(task_id, next_round)
        blobs.write(state_rel, _state_bytes(result.state, cfg.get("strategy", "fedavg")))
    final = next_round >= job["rounds"]
    checkpoint = final or (
        settings.CHECKPOINT_FREQUENCY > 0 and next_round % settings.CHECKPOINT_FREQUENCY == 0
    )
    if checkpoint:
        blobs.link(model_rel, paths.checkpoint_rel(task_id, next_round))
    export_sha = _write_export(blobs, task_id, cfg, result.params) if final else None
    return NextModel(model_rel, model_sha, state_rel, checkpoint, final, export_sha)


def _write_export(blobs: BlobStore, task_id: int, cfg: dict[str, Any], params: dict[str, Any]) -> str | None:
    """The final model as a program that runs with torch alone (docs/training.md, "Export"),
    on disk before the commit that completes the task. A failure here must not keep the task
    from completing (its weights are the product): it is logged, and the predict server
    builds the missing export from the final checkpoint when first asked."""
    from training import export, program

    try:
        return blobs.write(export.export_rel(task_id), program.program_bytes(task_id, cfg, params))
    except Exception:
        log.exception("event=export state=failed task=%d", task_id)
        return None


def _round_metrics(
    job: Job,
    result: RoundResult,
    evaluation: dict[str, float],
    now: datetime,
    *,
    aggregation_s: float,
    evaluation_s: float,
) -> dict[str, Any]:
    updates = job["updates"]
    weights = [max(1, int(u["num_examples"])) for u in updates]
    losses = [u["metrics"].get("train_loss") for u in updates]
    known = [(w, float(x)) for w, x in zip(weights, losses, strict=True) if isinstance(x, (int, float))]
    return {
        "round": job["round"],
        "clients": len({u["client_id"] for u in updates}),
        "updates": len(updates),
        "train_loss": sum(w * x for w, x in known) / sum(w for w, _ in known) if known else None,
        "test_loss": evaluation["test_loss"],
        "test_accuracy": evaluation["test_accuracy"],
        "seconds": (now - datetime.fromisoformat(job["round_started_at"])).total_seconds(),
        "aggregation_seconds": round(aggregation_s, 4),
        "evaluation_seconds": round(evaluation_s, 4),
        "slices": slices(job),
        "missing_ranks": job.get("missing_ranks", []),
        "report": result.report,
    }


def _commit_round(s: Session, job: Job, made: NextModel, metrics: dict[str, Any], now: datetime) -> str:
    """Close the round (compare-and-set on its status) and open the next, or complete the task."""
    task_id, round_no = job["task_id"], job["round"]
    task = locked_task_at(s, task_id, round_no)
    if task is None:
        return "noop"
    won = affected(
        s.execute(
            update(TaskRound)
            .where(
                TaskRound.task_id == task_id,
                TaskRound.round == round_no,
                TaskRound.status == RoundState.TRAINING,
            )
            .values(status=RoundState.DONE, metrics=metrics, finished_at=now)
        )
    )
    if won != 1:
        return "noop"
    next_round = round_no + 1
    if made.checkpoint:
        task.checkpoint_path = paths.checkpoint_rel(task_id, next_round)
        task.checkpoint_sha256 = made.model_sha  # a link to the model: the same bytes
    task.updated_at = now
    if made.final:
        task.status = TaskState.COMPLETED
        task.status_reason = None
        result: dict[str, Any] = {
            "rounds": _history(s, task_id),
            "final": {"test_accuracy": metrics["test_accuracy"], "test_loss": metrics["test_loss"]},
            "model_sha256": made.model_sha,
        }
        if made.export_sha is not None:  # downloads serve it instead of hashing the file
            result["export_sha256"] = made.export_sha
        task.result = result
        return "completed"
    s.add(
        TaskRound(
            task_id=task_id,
            round=next_round,
            status=RoundState.TRAINING,
            model_path=made.model_rel,
            model_sha256=made.model_sha,
            state_path=made.state_rel,
            started_at=now,
            deadline_at=round_deadline(task.config or {}, now),
        )
    )
    task.current_round = next_round
    task.status_reason = f"round {next_round}: 0 of {task.num_shards} updates; shards queued"
    create_shards(s, task, next_round, now)
    return "next_round"


def _state_bytes(state: dict[str, Any], strategy: str) -> bytes:
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in state.items()}, metadata={"aggregation.strategy": strategy})


def _history(s: Session, task_id: int) -> list[dict[str, Any]]:
    rounds = s.execute(
        select(TaskRound.metrics)
        .where(TaskRound.task_id == task_id, TaskRound.status == RoundState.DONE)
        .order_by(TaskRound.round)
    ).scalars()
    return [{k: v for k, v in (m or {}).items() if k != "report"} for m in rounds]


def _fail(s: Session, task_id: int, round_no: int, reason: str, report: dict[str, Any]) -> str:
    task = locked_task_at(s, task_id, round_no)
    if task is None:
        return "noop"
    s.execute(
        update(TaskRound)
        .where(
            TaskRound.task_id == task_id, TaskRound.round == round_no, TaskRound.status == RoundState.TRAINING
        )
        .values(status=RoundState.FAILED, metrics={"round": round_no, "report": report}, finished_at=utcnow())
    )
    fail_task(s, task, utcnow(), reason)
    log.warning("event=round_failed task=%d round=%d reason=%s", task_id, round_no, reason)
    return "failed"
