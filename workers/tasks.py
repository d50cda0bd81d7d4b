"""Celery tasks: thin wrappers that take ids, open a transaction, call a plain function, and
ring the doorbell after the commit. Every one is safe to run twice.

Torch is imported lazily (only aggregation needs it), so the web tier can import this module
to send tasks by name without loading torch.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import Session

import server_settings
from store import assignments
from store import clients as client_store
from store.blobs import BlobStore, task_dir
from store.bus import SCHEDULE_PENDING, get_bus
from store.db import Unavailable, get_db
from store.models import FEDERATED, Task, utcnow
from workers import celery, lifecycle, scheduling

if TYPE_CHECKING:
    from workers.federated import Job

log = logging.getLogger(__name__)

# Transient outages (database down) are retried with backoff; beat's sweep re-drives
# whatever still did not happen after that.
RETRY: dict[str, Any] = {
    "bind": True,
    "autoretry_for": (Unavailable,),
    "retry_backoff": 1,
    "retry_backoff_max": 30,
    "max_retries": 10,
}


@cache
def settings() -> server_settings.Settings:
    return server_settings.load()


def blobs() -> BlobStore:
    return BlobStore(settings().CHECKPOINT_DIR)


def _now(now_ts: float | None) -> datetime:
    return datetime.utcfromtimestamp(now_ts) if now_ts is not None else utcnow()


BATCH = 50  # waiting clients served per transaction
SKIPPED_RETRY_S = 0.02  # when a pass skipped rows locked by someone else, it looks again after this
SKIPPED_POLL_S = 0.002  # ... or sooner, once a ring came (looked for this often meanwhile)
SKIPPED_TRIES = 5  # ... this many times in a row; then a job looks again later
SCHEDULE_LOCK = "aifarm_schedule"  # one scheduler at a time, across every worker
MIN_LISTEN_S = 0.01  # a shorter wait for the next ring is not worth starting
HOLD_S = 10.0  # a scheduler hands over to a new job after this long (worker shutdown, fairness)


@celery.task(name="workers.tasks.schedule", **RETRY)
def schedule(self: Any) -> int:
    """Serve waiting clients while fitting work is queued (:func:`run_scheduler`); then wait
    up to ``SCHEDULE_LISTEN`` seconds for the next request before ending."""
    return run_scheduler(listen=settings().SCHEDULE_LISTEN)


def run_scheduler(listen: float = 0.0) -> int:
    """Serve waiting clients, one scheduler at a time (a named lock in the database).

    Two schedulers at once only got in each other's way: each skipped the rows the other had
    locked and had to look again. A job that finds the lock taken sets ``SCHEDULE_PENDING``
    and ends; the holder clears that flag before each pass and, while it is set again (new
    requests, released shards, a job that found the lock taken), makes another pass, and
    looks at it once more after letting go, so no request is left unserved. The job that found
    the lock taken and set the flag afresh (nobody listening) tries the lock once more (only
    once: a ring is also True when Redis is down): the holder may have let go and looked
    between the two. Jobs that just made work available (a new round's shards) call this
    inline. Returns assignments made.

    With ``listen`` > 0 the holder, once nothing is owed, waits that long for the next ring
    (:meth:`store.bus.Bus.wait_for_ring`) instead of ending: under a steady stream of requests
    each is served by the scheduler already holding the lock, without a job of its own.
    """
    bus = get_bus()
    db = get_db()
    assigned = 0
    tried_again = False
    while True:
        with db.exclusive(SCHEDULE_LOCK) as mine:
            if not mine:
                # The flag was not set (True, as when Redis is down): has the holder looked
                # already? Then the lock is free now, or its holder will see the flag. Once.
                if bus.ring_scheduler() and not tried_again:
                    tried_again = True
                    continue
                return assigned  # the holder makes one more pass
            try:
                served, handover = _hold(bus, listen)
            finally:
                bus.stop_listening()  # before the lock goes: rings send jobs again
            assigned += served
        if handover:  # sent once the lock is free, so the fresh job can take it
            schedule.delay()
            return assigned
        if not bus.is_set(SCHEDULE_PENDING):
            return assigned


def _hold(bus: Any, listen: float) -> tuple[int, bool]:
    """Passes while the scheduler lock is held: until no pass is owed and no ring came within
    ``listen`` seconds, or :data:`HOLD_S` (then True: a fresh job goes on, and this one ends,
    so that its worker can stop)."""
    assigned = 0
    skipped_in_a_row = 0
    handover = False
    until = time.monotonic() + HOLD_S
    tasks = scheduling.TaskInfo()  # for this hold only (seconds)
    bus.clear_flag(SCHEDULE_PENDING)  # cleared before each pass: a ring during it owes another
    while True:
        done = serve_waiting(tasks)
        assigned += done.assigned
        skipped_in_a_row = skipped_in_a_row + 1 if done.skipped and not done.assigned else 0
        if time.monotonic() > until:
            handover = True
            break
        if bus.take_flag(SCHEDULE_PENDING) or done.more:  # taken: cleared for the next pass
            continue
        if not done.skipped:
            wait = min(listen, until - time.monotonic())
            if wait < MIN_LISTEN_S:  # HOLD_S cut listening short: a fresh job listens on
                handover = listen > 0
                break
            if bus.wait_for_ring(wait):
                bus.clear_flag(SCHEDULE_PENDING)
                continue
            break
        if skipped_in_a_row > SKIPPED_TRIES:  # someone holds rows for long: look again later
            schedule.apply_async(countdown=0.5)
            break
        _pause_for_locked_rows(bus)  # rows were locked for a moment: look again once free
        bus.clear_flag(SCHEDULE_PENDING)
    if assigned:
        log.info("task=schedule state=finish assigned=%d", assigned)
    return assigned, handover


def _pause_for_locked_rows(bus: Any) -> None:
    """A pass skipped rows locked by someone else and served nobody: wait SKIPPED_RETRY_S, or
    less once a ring comes. The usual holder is a request's own intake: its transaction holds
    the client's row until its commit, which rings. A plain sleep made every request that
    came during it wait: at a steady 500/s, clusters of requests waited 15 to 19 ms each for
    nothing and set the p99. (A BLPOP with a 20 ms timeout returned after up to 100 ms on an
    idle Redis: blocking timeouts are checked ``hz`` times a second.)"""
    until = time.monotonic() + SKIPPED_RETRY_S
    while time.monotonic() < until:
        time.sleep(min(SKIPPED_POLL_S, max(0.0, until - time.monotonic())))
        if bus.is_set(SCHEDULE_PENDING):
            return


@dataclass
class Pass:
    assigned: int = 0
    more: bool = False  # more clients wait than one pass serves
    skipped: bool = False  # rows locked by someone else were skipped


def serve_waiting(tasks: scheduling.TaskInfo | None = None) -> Pass:
    """One pass: up to SCHEDULE_BATCH waiting clients, a batch per transaction. Call it with
    the scheduler lock held (:func:`run_scheduler`); ``tasks``: what the holder knows of tasks."""
    bus = get_bus()
    db = get_db()
    cfg = settings()
    done = Pass()
    for _ in range(max(1, cfg.SCHEDULE_BATCH // BATCH)):
        served = db.run(
            lambda s: scheduling.serve_batch(
                s,
                utcnow(),
                batch=BATCH,
                max_tasks=cfg.MAX_TASKS_PER_CLIENT,
                skip_locked=db.is_mysql,
                settings=cfg,
                tasks=tasks,
                owed=lambda: bus.is_set(SCHEDULE_PENDING),
            )
        )
        bus.publish(sorted({m.client_id for m in served.assignments}), served.assignments)
        done.assigned += len(served.assignments)
        done.skipped = done.skipped or served.skipped
        for cid in served.starved:  # fit nothing in the window: the per-client claim looks deeper

            def fill(s: Session, cid: str = cid) -> list[assignments.Made]:
                return scheduling.fill_client(
                    s,
                    cid,
                    utcnow(),
                    max_tasks=cfg.MAX_TASKS_PER_CLIENT,
                    skip_locked=db.is_mysql,
                    settings=cfg,
                )

            if made := db.run(fill):
                done.assigned += len(made)
                bus.publish([cid], made)
        if served.clients_seen < BATCH or not served.assignments:
            break
    else:
        done.more = True
    return done


@celery.task(name="workers.tasks.prepare_task", **RETRY)
def prepare_task(self: Any, task_id: int) -> bool:
    """Create the first round's shards (and, for federated training, the initial model)."""
    db = get_db()
    task_type = db.run(lambda s: s.execute(select(Task.type).where(Task.id == task_id)).scalar())
    if task_type is None:
        return False
    if task_type == FEDERATED:
        from workers import federated

        created = federated.prepare(db, blobs(), task_id, settings())
    else:
        created = db.run(lambda s: lifecycle.prepare_generic(s, task_id, utcnow()))
    log.info("event=prepare_task task=%d type=%s created=%s", task_id, task_type, created)
    if created:
        schedule.delay()
    return created


@celery.task(name="workers.tasks.advance_task", **RETRY)
def advance_task(self: Any, task_id: int) -> str:
    """A rank finished: complete or fail the task, or hand a finished round to aggregation."""
    db = get_db()
    outcome, notify = db.run(lambda s: lifecycle.advance(s, task_id, utcnow()))
    get_bus().publish(notify)
    if outcome == "noop":  # still waiting: say for what
        db.run(lambda s: lifecycle.explain_task(s, task_id, utcnow()))
    if outcome == "aggregate":
        round_no = db.run(
            lambda s: s.execute(select(Task.current_round).where(Task.id == task_id)).scalar_one()
        )
        aggregate_round.delay(task_id=task_id, round_no=round_no)
    return outcome


@celery.task(name="workers.tasks.aggregate_round", **RETRY)
def aggregate_round(self: Any, task_id: int, round_no: int) -> str:
    """Aggregate a finished federated round into the next global model (idempotent per round).

    A model of several slices (larger than AGGREGATION_SLICE_BYTES) is aggregated by a chord
    of ``aggregate_slice`` jobs per phase on the production topology; embedded, the same
    phases run here, one after the other.
    """
    from workers import federated

    try:
        job = federated.take(get_db(), task_id, round_no, settings())
    except federated.LeaseHeld as held:  # look again once that lease would have expired
        raise self.retry(exc=held, countdown=settings().AGGREGATION_LEASE) from None
    if job is None:
        return "noop"
    get_bus().publish(job.get("released", []))  # holders of ranks the round closed without: stop
    with federated.lease_kept(get_db(), job, settings()):
        federated.plan(blobs(), job, settings())
        if federated.slices(job) > 1 and not settings().embedded:
            _fan_out(federated.save_job(blobs(), job))
            log.info("event=aggregate_round task=%d round=%d slices=%d state=fanned_out",
                     task_id, round_no, federated.slices(job))  # fmt: skip
            return "sliced"
        result = federated.run_here(job)
        outcome = federated.complete(get_db(), blobs(), settings(), job, result)
    return _completed(outcome, job)


def _fan_out(job_rel: str) -> None:
    """One chord for the plan's current phase: a job per slice, then ``finish_sliced_round``."""
    from celery import chord

    from workers import federated

    job = federated.load_job(blobs(), job_rel)
    header = [aggregate_slice.s(job_rel=job_rel, index=k) for k in range(federated.slices(job))]
    chord(header)(finish_sliced_round.s(job_rel=job_rel))


def _completed(outcome: str, job: Job) -> str:
    log.info("event=aggregate_round task=%d round=%d outcome=%s", job["task_id"], job["round"], outcome)
    if outcome in ("next_round", "failed"):
        run_scheduler()  # the next round's shards are queued: hand them out now
    return outcome


@celery.task(
    name="workers.tasks.aggregate_slice",
    bind=True,
    ignore_result=False,
    autoretry_for=(Unavailable, OSError),  # a file share or the database hiccuped: run it again
    retry_backoff=1,
    retry_backoff_max=10,
    max_retries=5,
)
def aggregate_slice(self: Any, job_rel: str, index: int) -> dict[str, Any]:
    """One slice of one phase of a round; returns its JSON-able partial result."""
    import aggregation
    from workers import federated

    job = federated.load_job(blobs(), job_rel)
    out = blobs().path(federated.slice_rel(job, index))
    with federated.lease_kept(get_db(), job, settings()):
        federated.renew_lease(get_db(), job["task_id"], job["round"])
        part: dict[str, Any] = aggregation.run_slice(job["plan"], index, str(out))
    return part


@celery.task(name="workers.tasks.finish_sliced_round", **RETRY)
def finish_sliced_round(self: Any, parts: list[dict[str, Any]], job_rel: str) -> str:
    """Reduce a phase's slice results (in slice order); start the next phase or complete the round."""
    import aggregation
    from workers import federated

    store = blobs()
    job = federated.load_job(store, job_rel)
    federated.renew_lease(get_db(), job["task_id"], job["round"])
    plan = aggregation.advance_round(job["plan"], parts)
    if plan["phase"] in ("stats", "apply"):
        job["plan"], job["step"] = plan, job["step"] + 1
        _fan_out(federated.save_job(store, job))
        return "sliced"
    last = [str(store.path(federated.slice_rel(job, k))) for k in range(federated.slices(job))]
    with federated.lease_kept(get_db(), job, settings()):
        result = aggregation.finish_round(plan, last)
        outcome = federated.complete(get_db(), store, settings(), job, result)
    return _completed(outcome, job)


@celery.task(name="workers.tasks.sweep", **RETRY)
def sweep(self: Any, now_ts: float | None = None) -> dict[str, int]:
    """Beat's sweep. Bounded per run; every step is a compare-and-set, so overlapping runs are safe."""
    return sweep_once(_now(now_ts))


def sweep_once(now: datetime) -> dict[str, int]:
    db = get_db()
    cfg = settings()
    bus = get_bus()
    cutoff = lifecycle.expired_cutoff(now, cfg.CONNECTION_TIMEOUT)
    expired = db.run(
        lambda s: clients_expire(s, cutoff, now, limit=cfg.SWEEP_LIMIT, max_attempts=cfg.MAX_SHARD_ATTEMPTS)
    )
    released = sum(len(tasks) for _, tasks in expired)
    timed_out = db.run(
        lambda s: assignments.expire_deadlines(
            s,
            now,
            limit=cfg.SWEEP_LIMIT,
            max_attempts=cfg.MAX_SHARD_ATTEMPTS,
            max_tasks=cfg.MAX_TASKS_PER_CLIENT,
        )
    )
    for client_id, task_id in timed_out:
        log.info("event=assignment_timed_out task=%d client=%s", task_id, client_id)
    bus.publish(sorted({client_id for client_id, _ in timed_out}))  # the holders are told to stop
    rounds = {"aggregate": 0, "retry": 0, "failed": 0}
    for task_id, round_no in db.run(lambda s: lifecycle.overdue_rounds(s, now, limit=cfg.SWEEP_LIMIT)):
        outcome = close_round(task_id, round_no, now)
        rounds[outcome] = rounds.get(outcome, 0) + 1
    if released or timed_out or rounds["retry"]:
        schedule.delay()  # freed shards go to waiting clients
    to_prepare, to_advance = db.run(
        lambda s: lifecycle.stalled(s, now, limit=cfg.SWEEP_LIMIT, lease_s=cfg.AGGREGATION_LEASE)
    )
    for task_id in to_prepare:
        prepare_task.delay(task_id=task_id)
    for task_id in sorted(set(to_advance) | {task_id for _, task_id in timed_out}):
        advance_task.delay(task_id=task_id)
    waiting = db.run(lambda s: lifecycle.explain_waiting(s, now, limit=cfg.SWEEP_LIMIT))
    stats = {
        "expired": len(expired),
        "released": released,
        "timed_out": len(timed_out),
        "rounds_closed": rounds["aggregate"],
        "rounds_retried": rounds["retry"],
        "rounds_failed": rounds["failed"],
        "prepared": len(to_prepare),
        "advanced": len(to_advance),
        "waiting": waiting,
    }
    from workers import recovery  # what nothing above finds again: deleted tasks' files, waiting clients

    stats.update(recovery.reconcile(db, blobs(), cfg))
    log.info("task=sweep state=finish %s", " ".join(f"{k}={v}" for k, v in stats.items()))
    return stats


def close_round(task_id: int, round_no: int, now: datetime) -> str:
    """A federated round past its timeout: aggregate it on its quorum, reissue, or fail the task."""
    cfg = settings()

    def close(s: Session) -> tuple[str, list[str]]:
        return lifecycle.close_round(
            s, task_id, round_no, now, max_attempts=cfg.MAX_SHARD_ATTEMPTS, max_tasks=cfg.MAX_TASKS_PER_CLIENT
        )

    outcome, notify = get_db().run(close)
    get_bus().publish(notify)
    if outcome == "aggregate":
        aggregate_round.delay(task_id=task_id, round_no=round_no)
    elif outcome == "retry":
        advance_task.delay(task_id=task_id)  # a reissued rank may have run out of attempts
    log.info("event=round_timeout task=%d round=%d outcome=%s", task_id, round_no, outcome)
    return outcome


def clients_expire(
    s: Session, cutoff: datetime, now: datetime, *, limit: int, max_attempts: int
) -> list[tuple[str, list[int]]]:
    expired = client_store.expire(s, cutoff, now, limit=limit, max_attempts=max_attempts)
    for client_id, tasks in expired:
        log.info("event=client_expired client=%s released_tasks=%s", client_id, lifecycle.ids(tasks))
    return expired


@celery.task(name="workers.tasks.purge_task_files", **RETRY)
def purge_task_files(self: Any, task_id: int) -> None:
    """Delete a deleted task's model files."""
    blobs().remove(task_dir(task_id))


@celery.task(name="workers.tasks.ping", ignore_result=False)
def ping() -> str:
    """A no-op round trip: ``celery -A workers call workers.tasks.ping`` (operators, the benchmark)."""
    return "pong"
