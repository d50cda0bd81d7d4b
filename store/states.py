"""The states of a task, a shard, an assignment, a round and a client: one name for each.

The values are the database's enum values (``schema.sql``). The members are ``StrEnum``s, so
they are plain strings: they equal what a query returns, and JSON and logs show the value.
"""

from __future__ import annotations

from enum import StrEnum


class TaskState(StrEnum):
    PENDING = "pending"  # submitted; its first shards are not handed out yet
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"  # a shard or a round failed for good; status_reason says why
    ERROR = "error"  # the specification's value; nothing here sets it
    PAUSED = "paused"  # by an admin: queued shards wait, held ones pause
    STOPPED = "stopped"  # by an admin, for good


class ShardState(StrEnum):
    QUEUED = "queued"  # claimable
    ASSIGNED = "assigned"  # held by an open assignment
    DONE = "done"  # a result was accepted
    FAILED = "failed"  # out of attempts
    PAUSED = "paused"  # its task is paused
    CANCELLED = "cancelled"  # its task or round ended without it


class AssignmentState(StrEnum):
    ASSIGNED = "assigned"
    TRAINING = "training"  # progress was reported
    COMPLETED = "completed"
    FAILED = "failed"
    RELEASED = "released"  # the client went away or was disabled, or another copy won
    TIMED_OUT = "timed_out"  # past deadline_at; the shard was reissued, a late result may still win


class RoundState(StrEnum):
    TRAINING = "training"
    DONE = "done"  # aggregated
    FAILED = "failed"


class ClientState(StrEnum):
    ACTIVE = "active"
    INACTIVE = "inactive"


OPEN_ASSIGNMENT = (AssignmentState.ASSIGNED, AssignmentState.TRAINING)
UNSETTLED_SHARD = (ShardState.QUEUED, ShardState.ASSIGNED, ShardState.PAUSED)  # no result yet, may get one
LIVE_TASK = (TaskState.PENDING, TaskState.RUNNING, TaskState.PAUSED)  # not ended
