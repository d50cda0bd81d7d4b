"""Volunteers that hang, stall or come back late never stall a task (issue "Volunteers that hang").

The hung client is a real socket that took a shard and then says nothing while staying
connected, so the web tier keeps refreshing its ``last_seen``: only the assignment's deadline
can free the shard. Every test ends by reading the database.
"""

from __future__ import annotations

import socket
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from safetensors.numpy import save as save_np

from store.db import Database
from tests.conftest import rows, service_env
from tests.helpers import Proc, WsClient, free_port, request, start_embedded, wait_for
from tests.services.test_federated import (
    detail,
    fetch_model,
    start_clients,
    submit,
    upload,
    wait_status,
)

pytestmark = pytest.mark.usefixtures("clean")

FEDERATED = {"task_types": ["federated_training"]}


@pytest.fixture
def sockets() -> Iterator[list[WsClient]]:
    made: list[WsClient] = []
    yield made
    for c in made:
        c.close()


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    made: list[Proc] = []
    yield made
    for p in made:
        p.stop()


def connect(port: int, sockets: list[WsClient], **hardware: Any) -> WsClient:
    c = WsClient(port).register(**hardware)
    sockets.append(c)
    return c


def wait_for_assignment(db: Database, client_id: str | None, task_id: int, condition: str, what: str) -> None:
    """Wait until the client has exactly one assignment of the task matching ``condition``."""
    query = f"SELECT COUNT(*) FROM task_assignments WHERE client_id = :c AND task_id = :t AND {condition}"
    wait_for(lambda: rows(db, query, c=client_id, t=task_id) == [(1,)], 30, 0.1, what)


def overdue(db: Database, client_id: str | None, task_id: int) -> None:
    """Wait until the client's open assignment of the task is past its deadline."""
    open_and_late = "status IN ('assigned', 'training') AND deadline_at < UTC_TIMESTAMP(6)"
    wait_for_assignment(db, client_id, task_id, open_and_late, "the deadline to pass")


def sweep_times_out(db: Database, celery_client: Celery, client_id: str | None, task_id: int) -> None:
    """Run beat's sweep once and wait until it timed the client's assignment out."""
    celery_client.send_task("workers.tasks.sweep")
    wait_for_assignment(db, client_id, task_id, "status = 'timed_out'", "the assignment timed out")


def sweep_after_deadline(db: Database, celery_client: Celery, client_id: str | None, task_id: int) -> None:
    overdue(db, client_id, task_id)
    sweep_times_out(db, celery_client, client_id, task_id)


def reliability(port: int, client_id: str | None) -> dict[str, Any]:
    status, body = request(port, "GET", f"/api/clients/{client_id}")
    assert status == 200, body
    return dict(body["reliability"])


def one_result_per_shard(db: Database, task_id: int) -> None:
    """No shard counted twice: exactly one completed assignment per (round, rank) that is done."""
    counted = rows(
        db,
        "SELECT round, `rank`, COUNT(*) FROM task_assignments WHERE task_id = :t AND status = 'completed' "
        "GROUP BY round, `rank` HAVING COUNT(*) > 1",
        t=task_id,
    )
    assert counted == []
    done = rows(
        db,
        "SELECT s.round, s.rank FROM task_shards s JOIN task_assignments a ON a.id = s.assignment_id "
        "WHERE s.task_id = :t AND s.status = 'done' AND a.status <> 'completed'",
        t=task_id,
    )
    assert done == []


# --- the case, as a new user meets it: embedded default, beat sweeping every second ---


def test_a_client_that_hangs_holding_a_shard_stalls_nothing_on_the_embedded_default(
    tmp_path: Path, sockets: list[WsClient]
) -> None:
    env = service_env(tmp_path, SWEEP_INTERVAL="1", CONNECTION_TIMEOUT="5")
    port = free_port()
    server = start_embedded(env, port, tmp_path / "procs")
    try:
        hung, busy = connect(port, sockets), connect(port, sockets)
        status, task = request(
            port, "POST", "/api/tasks", {"type": "echo", "config": {"num_shards": 2, "deadline_s": 2}}
        )
        assert status == 201, task
        hung.request_task()
        busy.request_task()
        held, mine = hung.next_task(), busy.next_task()
        busy.result(mine, score=1.0)
        busy.request_task()
        # the hung socket stays open (its last_seen stays fresh): only the deadline frees its shard
        again = busy.next_task(timeout=30)
        assert (again["id"], again["rank"]) == (held["id"], held["rank"])
        hung.expect("stop", timeout=30, task_id=task["id"])
        busy.result(again, score=3.0)
        done = wait_for(
            lambda: (t := request(port, "GET", f"/api/tasks/{task['id']}")[1])["status"] == "completed" and t,
            30,
            0.1,
            "completion",
        )
        assert done["result"]["metrics"] == {"score": 2.0}
        assert reliability(port, hung.client_id)["timeouts"] == 1
        assert reliability(port, hung.client_id)["task_quota"] == 1  # halved from 3
        assert reliability(port, busy.client_id)["valid_results"] == 2
    finally:
        server.stop()
    with sqlite3.connect(tmp_path / "data" / "aifarm.sqlite3") as conn:
        history = conn.execute(
            "SELECT client_id, `rank`, status FROM task_assignments WHERE task_id = ? ORDER BY id",
            (task["id"],),
        ).fetchall()
        shards = conn.execute(
            "SELECT `rank`, status, attempts FROM task_shards WHERE task_id = ? ORDER BY `rank`",
            (task["id"],),
        ).fetchall()
    assert sorted(history) == sorted(
        [
            (hung.client_id, held["rank"], "timed_out"),
            (busy.client_id, mine["rank"], "completed"),
            (busy.client_id, held["rank"], "completed"),
        ]
    )
    assert shards == [(r, "done", 1 if r == held["rank"] else 0) for r in (0, 1)]


# --- a federated round: the same hang, with real client processes ---


def test_a_silent_client_stalls_no_federated_round(
    server: int,
    run_dir: Path,
    prod_env: dict[str, str],
    procs: list[Proc],
    sockets: list[WsClient],
    db: Database,
    celery_client: Celery,
) -> None:
    task = submit(server, num_shards=2, rounds=2, deadline_s=3)
    hung = connect(server, sockets, **FEDERATED)
    hung.request_task()
    held = hung.next_task(timeout=30)
    procs.extend(start_clients(server, run_dir, 1, prod_env))
    # while it waits, the task says for what, and who holds the missing rank until when
    waiting = wait_for(
        lambda: "1 of 2 updates" in ((d := detail(server, task["id"]))["status_reason"] or "") and d,
        60,
        0.2,
        "the other rank done",
    )
    assert f"rank {held['rank']} held by {hung.client_id}, deadline in" in waiting["status_reason"]
    sweep_after_deadline(db, celery_client, hung.client_id, task["id"])
    hung.expect("stop", timeout=30, task_id=task["id"])
    done = wait_status(server, task["id"], "completed")
    assert [r["updates"] for r in done["result"]["rounds"]] == [2, 2]
    assert rows(
        db, "SELECT round, status FROM task_rounds WHERE task_id = :t ORDER BY round", t=task["id"]
    ) == [
        (0, "done"),
        (1, "done"),
    ]
    assert rows(
        db,
        "SELECT status, checkpoint_path FROM task_assignments WHERE client_id = :c",
        c=hung.client_id,
    ) == [("timed_out", None)]
    one_result_per_shard(db, task["id"])
    assert reliability(server, hung.client_id)["timeouts"] == 1


# --- first valid result wins ---


def reissued_after_timeout(
    server: int, sockets: list[WsClient], db: Database, celery_client: Celery
) -> tuple[dict[str, Any], tuple[WsClient, dict[str, Any]], tuple[WsClient, dict[str, Any]]]:
    """An echo task whose one shard timed out on ``late`` and went to ``second``:
    (task, (late, what it held), (second, what it was given))."""
    late, second = connect(server, sockets), connect(server, sockets)
    status, task = request(server, "POST", "/api/tasks", {"type": "echo", "config": {"deadline_s": 1}})
    assert status == 201
    late.request_task()
    held = late.next_task()
    second.request_task()
    sweep_after_deadline(db, celery_client, late.client_id, task["id"])
    reissued = second.next_task()
    assert reissued["id"] == held["id"]
    return task, (late, held), (second, reissued)


def test_a_late_result_wins_when_the_reissued_copy_has_not_finished(
    server: int, sockets: list[WsClient], db: Database, celery_client: Celery
) -> None:
    task, (late, held), (second, reissued) = reissued_after_timeout(server, sockets, db, celery_client)
    late.result(held, score=7.0)  # it was slow, not gone: its result is the first one
    second.expect("stop", task_id=task["id"])
    second.result(reissued, score=1.0)
    refused = second.expect_error("superseded")
    assert "was accepted" in refused["message"]
    done = wait_for(
        lambda: (d := detail(server, task["id"]))["status"] == "completed" and d, 30, 0.1, "completion"
    )
    assert done["result"]["metrics"] == {"score": 7.0}
    history = rows(
        db, "SELECT client_id, status FROM task_assignments WHERE task_id = :t ORDER BY id", t=task["id"]
    )
    assert history == [(late.client_id, "completed"), (second.client_id, "released")]
    one_result_per_shard(db, task["id"])


def test_a_late_result_after_the_reissued_copy_won_is_refused_and_changes_nothing(
    server: int, sockets: list[WsClient], db: Database, celery_client: Celery
) -> None:
    task, (late, held), (second, reissued) = reissued_after_timeout(server, sockets, db, celery_client)
    second.result(reissued, score=1.0)
    wait_for(lambda: detail(server, task["id"])["status"] == "completed", 30, 0.1, "completion")
    late.result(held, score=7.0)
    assert "nothing was recorded" in late.expect_error("superseded")["message"]
    late.result(held, status="failed")  # a late failure: also refused, also nothing
    late.expect_error("superseded")
    assert detail(server, task["id"])["result"]["metrics"] == {"score": 1.0}
    history = rows(
        db, "SELECT client_id, status FROM task_assignments WHERE task_id = :t ORDER BY id", t=task["id"]
    )
    assert history == [(late.client_id, "timed_out"), (second.client_id, "completed")]
    assert reliability(server, late.client_id)["valid_results"] == 0


def _upload_same(server: int, c: WsClient, task: dict[str, Any]) -> tuple[int, Any]:
    return upload(server, c, task, save_np(fetch_model(server, c, task)))


def test_a_late_upload_after_the_reissued_copy_won_gets_409_and_stores_nothing(
    server: int, sockets: list[WsClient], db: Database, celery_client: Celery
) -> None:
    task = submit(server, num_shards=3, rounds=1, deadline_s=3)
    late, fast = connect(server, sockets, **FEDERATED), connect(server, sockets, **FEDERATED)
    late.request_task()
    fast.request_task()
    held, first = late.next_task(timeout=30), fast.next_task(timeout=30)
    model = save_np(fetch_model(server, late, held))  # the late one downloaded before it stalled
    assert _upload_same(server, fast, first)[0] == 201
    fast.result(first)
    overdue(db, late.client_id, task["id"])
    keeper = connect(server, sockets, **FEDERATED)  # holds the third rank: the round stays open
    keeper.request_task()
    third = keeper.next_task(timeout=30)
    sweep_times_out(db, celery_client, late.client_id, task["id"])
    fast.request_task()
    reissued = fast.next_task(timeout=30)
    assert reissued["rank"] == held["rank"]
    assert _upload_same(server, fast, reissued)[0] == 201
    fast.result(reissued)
    wait_for(
        lambda: (
            rows(
                db,
                "SELECT status FROM task_shards WHERE task_id = :t AND `rank` = :r",
                t=task["id"],
                r=held["rank"],
            )
            == [("done",)]
        ),
        30,
        0.1,
        "the reissued copy accepted",
    )
    status, body = upload(server, late, held, model)
    assert (status, body["error"]) == (409, "superseded"), body
    late.result(held)
    late.expect_error("superseded")
    assert rows(
        db, "SELECT checkpoint_path FROM task_assignments WHERE client_id = :c", c=late.client_id
    ) == [(None,)]
    assert _upload_same(server, keeper, third)[0] == 201
    keeper.result(third)
    done = wait_status(server, task["id"], "completed")
    assert done["result"]["rounds"][0]["updates"] == 3
    one_result_per_shard(db, task["id"])


def test_a_late_upload_wins_while_the_reissued_copy_still_trains(
    server: int, sockets: list[WsClient], db: Database, celery_client: Celery
) -> None:
    task = submit(server, num_shards=2, rounds=1, deadline_s=3)
    late = connect(server, sockets, **FEDERATED)
    late.request_task()
    held = late.next_task(timeout=30)
    model = save_np(fetch_model(server, late, held))
    overdue(db, late.client_id, task["id"])
    keeper = connect(server, sockets, **FEDERATED)  # holds the other rank: the round stays open
    keeper.request_task()
    other = keeper.next_task(timeout=30)
    second = connect(server, sockets, **FEDERATED)
    second.request_task()
    sweep_times_out(db, celery_client, late.client_id, task["id"])
    reissued = second.next_task(timeout=30)
    assert reissued["rank"] == held["rank"]
    assert upload(server, late, held, model)[0] == 201  # the shard is unsettled: the late update is taken
    late.result(held)
    second.expect("stop", timeout=30, task_id=task["id"])
    status, body = _upload_same(server, second, reissued)  # it trained on anyway
    assert (status, body["error"]) == (409, "superseded"), body
    assert _upload_same(server, keeper, other)[0] == 201
    keeper.result(other)
    done = wait_status(server, task["id"], "completed")
    assert done["result"]["rounds"][0]["updates"] == 2
    assert rows(
        db,
        "SELECT client_id, status, checkpoint_path IS NULL FROM task_assignments "
        "WHERE `rank` = :r ORDER BY id",
        r=held["rank"],
    ) == [(late.client_id, "completed", 0), (second.client_id, "released", 1)]
    one_result_per_shard(db, task["id"])


# --- quorum rounds with a timeout ---


def round_overdue(db: Database, task_id: int) -> None:
    wait_for(
        lambda: (
            rows(
                db,
                "SELECT COUNT(*) FROM task_rounds WHERE task_id = :t AND status = 'training' "
                "AND deadline_at < UTC_TIMESTAMP(6)",
                t=task_id,
            )
            == [(1,)]
        ),
        30,
        0.1,
        "the round timeout to pass",
    )


def test_a_round_closes_on_its_quorum_at_the_timeout_and_records_the_missing_rank(
    server: int,
    run_dir: Path,
    prod_env: dict[str, str],
    procs: list[Proc],
    sockets: list[WsClient],
    db: Database,
    celery_client: Celery,
) -> None:
    task = submit(server, num_shards=2, rounds=1, round_timeout_s=3, min_fit_fraction=0.5)
    hung = connect(server, sockets, **FEDERATED)
    hung.request_task()
    held = hung.next_task(timeout=30)
    procs.extend(start_clients(server, run_dir, 1, prod_env))
    wait_for(
        lambda: (
            rows(
                db,
                "SELECT COUNT(*) FROM task_assignments WHERE task_id = :t AND status = 'completed'",
                t=task["id"],
            )
            == [(1,)]
        ),
        60,
        0.2,
        "the other rank done",
    )
    round_overdue(db, task["id"])
    celery_client.send_task("workers.tasks.sweep")
    hung.expect("stop", timeout=30, task_id=task["id"])
    done = wait_status(server, task["id"], "completed")
    (only,) = done["result"]["rounds"]
    assert (only["updates"], only["missing_ranks"]) == (1, [held["rank"]])
    assert rows(db, "SELECT status FROM task_assignments WHERE client_id = :c", c=hung.client_id) == [
        ("released",)
    ]
    shards = dict(rows(db, "SELECT `rank`, status FROM task_shards WHERE task_id = :t", t=task["id"]))
    assert shards == {held["rank"]: "cancelled", 1 - held["rank"]: "done"}
    one_result_per_shard(db, task["id"])


def test_a_round_short_of_its_quorum_is_retried_then_fails_with_the_reason(
    server: int, sockets: list[WsClient], db: Database, celery_client: Celery
) -> None:
    task = submit(server, num_shards=2, rounds=1, round_timeout_s=2, max_round_retries=1)
    hung = connect(server, sockets, **FEDERATED)
    hung.request_task()
    hung.next_task(timeout=30)
    round_overdue(db, task["id"])
    celery_client.send_task("workers.tasks.sweep")
    hung.expect("stop", timeout=30, task_id=task["id"])  # its rank is reissued
    assert rows(db, "SELECT retries FROM task_rounds WHERE task_id = :t", t=task["id"]) == [(1,)]
    assert rows(db, "SELECT status FROM task_assignments WHERE client_id = :c", c=hung.client_id) == [
        ("timed_out",)
    ]
    round_overdue(db, task["id"])
    celery_client.send_task("workers.tasks.sweep")
    failed = wait_status(server, task["id"], "failed")
    assert failed["error_log"] == "round 0 timed out 2 time(s) with 0 of 2 updates; its quorum is 2"
    assert rows(
        db,
        "SELECT COUNT(*) FROM task_assignments WHERE task_id = :t AND status IN ('assigned', 'training')",
        t=task["id"],
    ) == [(0,)]
    assert rows(db, "SELECT status FROM task_rounds WHERE task_id = :t", t=task["id"]) == [("training",)]


# --- settings that cannot work ---


@pytest.mark.parametrize(
    ("config", "says"),
    [
        ({"deadline_s": 0}, "config.deadline_s must be in (0.0"),
        ({"round_timeout_s": -3}, "config.round_timeout_s must be in (0.0"),
        ({"min_fit_fraction": 0}, "config.min_fit_fraction must be in (0.0, 1.0]"),
        ({"num_shards": 2, "min_fit_clients": 3}, "min_fit_clients=3 is more than num_shards=2"),
        ({"max_round_retries": 1000}, "config.max_round_retries must be in 0..100"),
    ],
)
def test_deadline_and_quorum_settings_that_cannot_work_get_400(
    server: int, db: Database, config: dict[str, Any], says: str
) -> None:
    status, body = request(
        server, "POST", "/api/tasks", {"type": "federated_training", "config": {"num_shards": 2, **config}}
    )
    assert status == 400 and says in body["message"], body
    assert rows(db, "SELECT COUNT(*) FROM tasks") == [(0,)]


def test_an_opaque_task_deadline_that_cannot_work_gets_400(server: int, db: Database) -> None:
    for bad in (0, -1, "soon", 10**9):
        status, body = request(server, "POST", "/api/tasks", {"type": "echo", "config": {"deadline_s": bad}})
        assert status == 400 and "config.deadline_s must be" in body["message"], body
    assert rows(db, "SELECT COUNT(*) FROM tasks") == [(0,)]


# --- volunteers killed mid-training and mid-upload ---


def test_a_client_killed_mid_training_has_its_shard_reissued_after_the_reconnect_grace(
    tmp_path: Path, procs: list[Proc]
) -> None:
    """A real client process is SIGKILLed while it trains: its socket closes, RECONNECT_GRACE=0
    brings its deadline to now, and beat's next sweep reissues the shard to the other client."""
    env = service_env(tmp_path, SWEEP_INTERVAL="1", RECONNECT_GRACE="0")
    port = free_port()
    procs.append(start_embedded(env, port, tmp_path / "procs"))
    doomed = start_clients(port, tmp_path, 1, env)[0]
    procs.append(doomed)
    long = {"dataset": "digits", "num_shards": 1, "rounds": 1, "local_epochs": 400}  # a few seconds
    task = submit(port, **long)
    training = wait_for(
        lambda: [
            a for a in detail(port, task["id"])["assignments"] if a["status"] == "training" and a["progress"]
        ],
        60,
        0.1,
        "the client training (progress reported)",
    )
    doomed.kill()  # SIGKILL mid-training
    survivor = start_clients(port, tmp_path / "second", 1, env)[0]
    procs.append(survivor)
    done = wait_status(port, task["id"], "completed", timeout=120)
    history = [(a["client_id"], a["status"]) for a in sorted(done["assignments"], key=lambda a: a["id"])]
    assert history[0] == (training[0]["client_id"], "timed_out")
    assert [status for _, status in history[1:]] == ["completed"]
    assert reliability(port, training[0]["client_id"])["timeouts"] == 1


def test_a_client_killed_mid_upload_leaves_nothing_and_can_upload_again(
    server: int, sockets: list[WsClient], db: Database, run_dir: Path
) -> None:
    task = submit(server, num_shards=1, rounds=1)
    c = connect(server, sockets, **FEDERATED)
    c.request_task()
    held = c.next_task(timeout=30)
    body = save_np(fetch_model(server, c, held))
    assert c.token and c.client_id
    # half the body, then the connection drops: the process died mid-upload
    raw = socket.create_connection(("127.0.0.1", server), timeout=10)
    head = (
        f"PUT {held['update_url']} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {c.token}\r\n"
        f"X-Client-Id: {c.client_id}\r\nX-Num-Examples: 10\r\nContent-Type: application/octet-stream\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    raw.sendall(head + body[: len(body) // 2])
    raw.close()
    tmp = run_dir / "checkpoints" / "tmp"
    wait_for(lambda: not tmp.exists() or not list(tmp.iterdir()), 30, 0.1, "the partial upload removed")
    assert rows(db, "SELECT checkpoint_path FROM task_assignments WHERE task_id = :t", t=task["id"]) == [
        (None,)
    ]
    assert detail(server, task["id"])["current_round"] == 0  # the round is unaffected
    assert upload(server, c, held, body)[0] == 201  # the restarted client uploads again
    c.result(held)
    assert wait_status(server, task["id"], "completed")["result"]["rounds"][0]["updates"] == 1
