"""A client's model update for a federated round: which assignment it belongs to, and recording it.

The web tier streams and checks the bytes; these functions decide, in the database, whether
the client may upload (:func:`target`) and record the file on its assignment with a
compare-and-set (:func:`record`). Refusals are exceptions the view maps to HTTP in one table.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from store.assignments import NotAssigned, UnknownTask, find_open
from store.db import affected
from store.models import Task, TaskAssignment, TaskRound
from store.states import OPEN_ASSIGNMENT, AssignmentState, RoundState


class UnknownRound(UnknownTask):
    """The task has no such round."""


class StaleRound(Exception):
    """The round is over (aggregated, or the task moved on)."""


@dataclass(frozen=True)
class Target:
    """Where an upload goes: the client's assignment, an update already recorded, the model to match."""

    assignment_id: int
    existing_sha256: str | None
    model_rel: str


@dataclass(frozen=True)
class Recorded:
    won: bool  # this upload is the assignment's update
    current_sha256: str | None  # the update recorded on the assignment now (None: none)


def target(s: Session, client_id: str, task_id: int, round_no: int, rank: int) -> Target:
    """The assignment an upload of (task, round, rank) by this client goes to: its open one,
    or one that timed out while the shard is unsettled (first valid result wins).

    Raises UnknownTask, UnknownRound, StaleRound, NotAssigned or Superseded, each with the
    message a client is told.
    """
    task = s.get(Task, task_id)
    if task is None:
        raise UnknownTask(f"no task {task_id}")
    rnd = s.execute(
        select(TaskRound).where(TaskRound.task_id == task_id, TaskRound.round == round_no)
    ).scalar_one_or_none()
    if rnd is None:
        raise UnknownRound(f"no round {round_no} of task {task_id}")
    if round_no != task.current_round or rnd.status != RoundState.TRAINING:
        raise StaleRound(f"round {round_no} is over; the task is at round {task.current_round}")
    try:
        held = find_open(s, client_id, task_id, round_no)
    except NotAssigned:
        held = None
    if held is None or held.rank != rank:
        raise NotAssigned(f"you do not hold rank {rank} of task {task_id} round {round_no}")
    return Target(held.id, held.update_sha256, rnd.model_path)


def record(s: Session, assignment_id: int, rel: str, sha256: str, num_examples: int) -> Recorded:
    """Put the update on the assignment if it is still open (or timed out) and has none yet."""
    won = affected(
        s.execute(
            update(TaskAssignment)
            .where(
                TaskAssignment.id == assignment_id,
                TaskAssignment.status.in_((*OPEN_ASSIGNMENT, AssignmentState.TIMED_OUT)),
                TaskAssignment.checkpoint_path.is_(None),
            )
            .values(checkpoint_path=rel, update_sha256=sha256, num_examples=num_examples)
        )
    )
    current = s.execute(
        select(TaskAssignment.update_sha256).where(TaskAssignment.id == assignment_id)
    ).scalar_one_or_none()
    return Recorded(won == 1, current)
