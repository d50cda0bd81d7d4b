"""The audit log: every admin write and panel sign-in, one row each, newest first on reading."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from store.models import AuditEntry


def record(
    s: Session,
    *,
    at: datetime,
    actor: str,
    action: str,
    target: str | None,
    detail: dict[str, Any] | None,
    remote: str | None,
) -> AuditEntry:
    entry = AuditEntry(
        at=at,
        actor=actor[:255],
        action=action[:64],
        target=None if target is None else target[:255],
        detail=detail,
        remote=None if remote is None else remote[:64],
    )
    s.add(entry)
    return entry


def page(s: Session, *, page_no: int, per_page: int) -> tuple[list[AuditEntry], int]:
    """One page of entries, newest first (by id: the order they were written), and the total."""
    total = s.execute(select(func.count()).select_from(AuditEntry)).scalar_one()
    rows = s.execute(
        select(AuditEntry).order_by(AuditEntry.id.desc()).offset((page_no - 1) * per_page).limit(per_page)
    ).scalars()
    return list(rows), total
