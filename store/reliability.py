"""What a client's past work says about it, and how much work it may hold (BOINC's host quota).

Per client: valid results, errors, timeouts, refused updates and the summed turnaround of
its valid results. A timeout or an error halves its quota of open assignments (down to 1);
each valid result doubles it back, up to ``MAX_TASKS_PER_CLIENT`` (stored as NULL). The
scheduler hands reissued shards to the most reliable fitting clients first.
"""

from __future__ import annotations

from typing import Any, Literal

from sqlalchemy import BindParameter, Integer, bindparam, case, select, update
from sqlalchemy.orm import Session

from store.models import Client

Outcome = Literal["valid", "error", "timeout", "refused"]

# A valid result, as one statement built once (building it per result cost as much CPU as
# running it): quota_after() as a CASE over quota(), the held count clamped to [1, max].
_MAX: BindParameter[int] = bindparam("max_tasks", type_=Integer)
_HELD = case((Client.task_quota < 1, 1), (Client.task_quota > _MAX, _MAX), else_=Client.task_quota)
_VALID = (
    update(Client)
    .where(Client.id == bindparam("client_id"))
    .values(
        valid_results=Client.valid_results + 1,
        turnaround_s=Client.turnaround_s + bindparam("turnaround_s"),
        task_quota=case((Client.task_quota.is_(None) | (2 * _HELD >= _MAX), None), else_=2 * _HELD),
    )
    .execution_options(synchronize_session=False)
)
_VALID_RATE = _VALID.values(
    throughput=case(
        (Client.throughput.is_(None), bindparam("rate")),
        else_=0.5 * Client.throughput + 0.5 * bindparam("rate"),
    )
)


def score(valid: int, errors: int, timeouts: int) -> float:
    """How likely the client's next result is valid: (valid + 1) / (finished + 2), in (0, 1)."""
    return (valid + 1) / (valid + errors + timeouts + 2)


def quota(task_quota: int | None, max_tasks: int) -> int:
    """Open assignments a client may hold now."""
    return max_tasks if task_quota is None else max(1, min(max_tasks, task_quota))


def quota_after(task_quota: int | None, outcome: Outcome, max_tasks: int) -> int | None:
    """The quota after an outcome: halved on a timeout or an error, doubled on a valid result;
    None when back at ``max_tasks``."""
    now = quota(task_quota, max_tasks)
    if outcome in ("timeout", "error"):
        return max(1, now // 2)
    if outcome == "valid":
        doubled = now * 2
        return None if doubled >= max_tasks else doubled
    return task_quota


def note(
    s: Session,
    client_id: str,
    outcome: Outcome,
    *,
    max_tasks: int,
    turnaround_s: float = 0.0,
    examples_per_s: float | None = None,
) -> None:
    """Count an outcome of the client's work and adjust its quota (and measured throughput).

    A valid result (nearly every result) is one UPDATE computed in SQL, :func:`quota_after`
    written as a CASE: loading the client and flushing it back was a quarter of the web
    tier's CPU while it recorded a burst of results."""
    if outcome == "valid":
        params = {"client_id": client_id, "max_tasks": max_tasks, "turnaround_s": max(0.0, turnaround_s)}
        if examples_per_s is not None and examples_per_s > 0:
            s.execute(_VALID_RATE, {**params, "rate": examples_per_s})
        else:
            s.execute(_VALID, params)
        return
    client = s.execute(
        select(Client)
        .where(Client.id == client_id)
        .with_for_update()
        .execution_options(populate_existing=True)  # a valid result's UPDATE above may have changed it
    ).scalar_one_or_none()
    if client is None:
        return
    if outcome == "valid":
        client.valid_results += 1
        client.turnaround_s += max(0.0, turnaround_s)
        if examples_per_s is not None and examples_per_s > 0:
            old = client.throughput
            client.throughput = examples_per_s if old is None else 0.5 * old + 0.5 * examples_per_s
    elif outcome == "error":
        client.error_results += 1
    elif outcome == "timeout":
        client.timeouts += 1
    else:
        client.refused_updates += 1
    client.task_quota = quota_after(client.task_quota, outcome, max_tasks)


def summary(c: Any, max_tasks: int) -> dict[str, Any]:
    """The reliability fields of a client row, as the API shows them."""
    return {
        "valid_results": c.valid_results,
        "error_results": c.error_results,
        "timeouts": c.timeouts,
        "refused_updates": c.refused_updates,
        "mean_turnaround_s": round(c.turnaround_s / c.valid_results, 3) if c.valid_results else None,
        "throughput": c.throughput,
        "score": round(score(c.valid_results, c.error_results, c.timeouts), 4),
        "task_quota": quota(c.task_quota, max_tasks),
    }
