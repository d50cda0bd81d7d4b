"""SQLAlchemy models. They mirror ``schema.sql`` exactly (a test compares the two on MariaDB).

The specification's three tables keep their names, columns and enum values; what we add is
additive: columns, enum values, and the tables ``task_shards``, ``task_rounds``,
``admin_tokens`` and ``audit_log``. Timestamps are naive UTC.
"""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Double,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.dialects import mysql
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from store.states import (
    AssignmentState,
    ClientState,
    RoundState,
    ShardState,
    TaskState,
)

TASK_STATUSES = tuple(state.value for state in TaskState)
ASSIGNMENT_STATUSES = tuple(state.value for state in AssignmentState)
CLIENT_STATUSES = tuple(state.value for state in ClientState)
SHARD_STATUSES = tuple(state.value for state in ShardState)
ROUND_STATUSES = tuple(state.value for state in RoundState)

FEDERATED = "federated_training"  # the task type whose rounds exchange models


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def new_noise_secret() -> int:
    """A task's DP noise secret: 63 random bits (a non-negative BIGINT)."""
    return secrets.randbits(63)


# DATETIME(6) on MySQL: our own timestamps keep microseconds (latency measurements need them).
Micro = DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
Json = JSON().with_variant(mysql.JSON(), "mysql", "mariadb")


class Base(DeclarativeBase):
    pass


def _enum(name: str, values: tuple[str, ...]) -> Enum:
    return Enum(*values, name=name, native_enum=True, create_constraint=True, validate_strings=True)


class Task(Base):
    __tablename__ = "tasks"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    type: Mapped[str] = mapped_column(String(255), nullable=False)
    requirements: Mapped[dict[str, Any]] = mapped_column(Json, nullable=False)
    status: Mapped[str] = mapped_column(_enum("task_status", TASK_STATUSES), nullable=False)
    client_id: Mapped[str | None] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(DateTime, nullable=False)
    updated_at: Mapped[datetime] = mapped_column(DateTime, nullable=False)
    result: Mapped[dict[str, Any] | None] = mapped_column(Json)
    error_log: Mapped[str | None] = mapped_column(Text)
    priority: Mapped[int | None] = mapped_column(Integer, server_default=text("0"))
    config: Mapped[dict[str, Any] | None] = mapped_column(Json)
    checkpoint_path: Mapped[str | None] = mapped_column(String(255))
    # additive
    num_shards: Mapped[int] = mapped_column(Integer, nullable=False, server_default=text("1"))
    current_round: Mapped[int] = mapped_column(Integer, nullable=False, server_default=text("0"))
    status_reason: Mapped[str | None] = mapped_column(String(255))
    # The secret of the task's central-DP noise (aggregation.seeds.secret_round_seed): random,
    # made on insert, never sent to a client; an admin reproduces a round with it.
    noise_secret: Mapped[int | None] = mapped_column(BigInteger, default=new_noise_secret)
    # The SHA-256 of the file at checkpoint_path, stored when it is written (downloads serve it).
    checkpoint_sha256: Mapped[str | None] = mapped_column(String(64))

    __table_args__ = (Index("ix_tasks_status_priority", "status", text("priority DESC"), "id"),)


class TaskAssignment(Base):
    __tablename__ = "task_assignments"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"), nullable=False)
    client_id: Mapped[str] = mapped_column(String(255), nullable=False)
    assigned_at: Mapped[datetime] = mapped_column(DateTime, nullable=False)
    status: Mapped[str] = mapped_column(_enum("assignment_status", ASSIGNMENT_STATUSES), nullable=False)
    rank: Mapped[int] = mapped_column(Integer, nullable=False)
    # For federated rounds: the uploaded update (a safetensors file under CHECKPOINT_DIR).
    checkpoint_path: Mapped[str | None] = mapped_column(String(255))
    # additive
    round: Mapped[int] = mapped_column(Integer, nullable=False, server_default=text("0"))
    shard_id: Mapped[int] = mapped_column(Integer, nullable=False)
    updated_at: Mapped[datetime] = mapped_column(Micro, nullable=False)
    progress: Mapped[float | None] = mapped_column(Float)
    metrics: Mapped[dict[str, Any] | None] = mapped_column(Json)
    error: Mapped[str | None] = mapped_column(Text)
    update_sha256: Mapped[str | None] = mapped_column(String(64))
    num_examples: Mapped[int | None] = mapped_column(Integer)
    deadline_at: Mapped[datetime | None] = mapped_column(Micro)

    __table_args__ = (
        Index("ix_assignments_client_status", "client_id", "status"),
        Index("ix_assignments_task_round", "task_id", "round", "rank"),
        Index("ix_assignments_deadline", "status", "deadline_at"),
    )


class Client(Base):
    __tablename__ = "clients"

    id: Mapped[str] = mapped_column(String(255), primary_key=True)
    cpu_info: Mapped[dict[str, Any]] = mapped_column(Json, nullable=False)
    ram_info: Mapped[dict[str, Any]] = mapped_column(Json, nullable=False)
    gpu_info: Mapped[list[dict[str, Any]] | None] = mapped_column(Json)
    session_info: Mapped[dict[str, Any] | None] = mapped_column(Json)
    last_seen: Mapped[datetime] = mapped_column(DateTime, nullable=False)
    status: Mapped[str] = mapped_column(_enum("client_status", CLIENT_STATUSES), nullable=False)
    # additive
    token_hash: Mapped[str] = mapped_column(String(64), nullable=False)
    created_at: Mapped[datetime] = mapped_column(DateTime, nullable=False)
    disabled: Mapped[bool] = mapped_column(Boolean, nullable=False, server_default=text("0"))
    cpu_cores: Mapped[int] = mapped_column(Integer, nullable=False, server_default=text("0"))
    ram_gb: Mapped[float] = mapped_column(Double, nullable=False, server_default=text("0"))
    gpu_count: Mapped[int] = mapped_column(Integer, nullable=False, server_default=text("0"))
    gpu_memory_gb: Mapped[float] = mapped_column(Double, nullable=False, server_default=text("0"))
    task_types: Mapped[list[str] | None] = mapped_column(Json)
    conn_id: Mapped[str | None] = mapped_column(String(64))
    pending_requests: Mapped[int] = mapped_column(Integer, nullable=False, server_default=text("0"))
    requested_at: Mapped[datetime | None] = mapped_column(Micro)
    valid_results: Mapped[int] = mapped_column(Integer, nullable=False, server_default=text("0"))
    error_results: Mapped[int] = mapped_column(Integer, nullable=False, server_default=text("0"))
    timeouts: Mapped[int] = mapped_column(Integer, nullable=False, server_default=text("0"))
    refused_updates: Mapped[int] = mapped_column(Integer, nullable=False, server_default=text("0"))
    turnaround_s: Mapped[float] = mapped_column(Double, nullable=False, server_default=text("0"))
    throughput: Mapped[float | None] = mapped_column(Double)
    task_quota: Mapped[int | None] = mapped_column(Integer)
    # The resource use it last reported (heartbeat, task_progress): cpu_utilization,
    # ram_utilization, gpu_utilization [{id, utilization, memory_used}], and when.
    utilization: Mapped[dict[str, Any] | None] = mapped_column(Json)
    utilization_at: Mapped[datetime | None] = mapped_column(Micro)

    __table_args__ = (
        Index("ix_clients_conn", "conn_id", unique=True),
        Index("ix_clients_status_seen", "status", "last_seen"),
        Index("ix_clients_waiting", "pending_requests", "requested_at"),
    )


class TaskShard(Base):
    """One unit of claimable work: rank ``rank`` of round ``round`` of a task.

    The claim reads ``status='queued' ORDER BY priority DESC, id``; the index below matches
    that order exactly (with ``priority ASC`` it runs hundreds of times slower on MariaDB).
    """

    __tablename__ = "task_shards"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"), nullable=False)
    round: Mapped[int] = mapped_column(Integer, nullable=False)
    rank: Mapped[int] = mapped_column(Integer, nullable=False)
    status: Mapped[str] = mapped_column(_enum("shard_status", SHARD_STATUSES), nullable=False)
    priority: Mapped[int] = mapped_column(Integer, nullable=False, server_default=text("0"))
    task_type: Mapped[str] = mapped_column(String(255), nullable=False)
    req_cpu_cores: Mapped[int] = mapped_column(Integer, nullable=False, server_default=text("0"))
    req_ram_gb: Mapped[float] = mapped_column(Double, nullable=False, server_default=text("0"))
    req_gpu_count: Mapped[int] = mapped_column(Integer, nullable=False, server_default=text("0"))
    req_gpu_memory_gb: Mapped[float] = mapped_column(Double, nullable=False, server_default=text("0"))
    assignment_id: Mapped[int | None] = mapped_column(Integer)
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, server_default=text("0"))
    created_at: Mapped[datetime] = mapped_column(Micro, nullable=False)
    updated_at: Mapped[datetime] = mapped_column(Micro, nullable=False)

    __table_args__ = (
        UniqueConstraint("task_id", "round", "rank", name="uq_task_shards_task_round_rank"),
        Index("ix_task_shards_claim", "status", text("priority DESC"), "id"),
    )


class TaskRound(Base):
    """A federated round: the global model it trains from, and its metrics once aggregated."""

    __tablename__ = "task_rounds"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"), nullable=False)
    round: Mapped[int] = mapped_column(Integer, nullable=False)
    status: Mapped[str] = mapped_column(_enum("round_status", ROUND_STATUSES), nullable=False)
    model_path: Mapped[str] = mapped_column(String(255), nullable=False)
    model_sha256: Mapped[str] = mapped_column(String(64), nullable=False)
    state_path: Mapped[str | None] = mapped_column(String(255))
    metrics: Mapped[dict[str, Any] | None] = mapped_column(Json)
    started_at: Mapped[datetime] = mapped_column(Micro, nullable=False)
    finished_at: Mapped[datetime | None] = mapped_column(Micro)
    # A lease: an aggregation of this round began then; others wait for it or for its expiry.
    aggregating_since: Mapped[datetime | None] = mapped_column(Micro)
    deadline_at: Mapped[datetime | None] = mapped_column(Micro)
    retries: Mapped[int] = mapped_column(Integer, nullable=False, server_default=text("0"))

    __table_args__ = (UniqueConstraint("task_id", "round", name="uq_task_rounds_task_round"),)


class AdminToken(Base):
    __tablename__ = "admin_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    token_hash: Mapped[str] = mapped_column(String(64), nullable=False, unique=True)
    label: Mapped[str] = mapped_column(String(255), nullable=False)
    created_at: Mapped[datetime] = mapped_column(DateTime, nullable=False)
    expires_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)


class AuditEntry(Base):
    """One admin write or panel sign-in (``store/audit.py``)."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(Micro, nullable=False)
    actor: Mapped[str] = mapped_column(String(255), nullable=False)
    action: Mapped[str] = mapped_column(String(64), nullable=False)
    target: Mapped[str | None] = mapped_column(String(255))
    detail: Mapped[dict[str, Any] | None] = mapped_column(Json)
    remote: Mapped[str | None] = mapped_column(String(64))
