"""Many clients race for few shards: no shard is ever given to two clients."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from celery import Celery

from store.db import Database
from store.models import Client, Task, utcnow
from tests.conftest import rows
from tests.helpers import Proc, WsClient, request, start_worker, wait_for
from workers import lifecycle, scheduling

pytestmark = pytest.mark.usefixtures("clean")


@pytest.fixture
def second_worker(prod_env: dict[str, str], run_dir: Path) -> Iterator[Proc]:
    """More schedulers at once: a second worker process beside the session's."""
    proc = start_worker(prod_env, run_dir / "procs", name="race-worker", concurrency=4)
    yield proc
    proc.stop()


def assert_no_double_assignment(db: Database) -> None:
    doubled = rows(
        db,
        "SELECT shard_id, COUNT(*) FROM task_assignments "
        "WHERE status IN ('assigned', 'training') GROUP BY shard_id HAVING COUNT(*) > 1",
    )
    assert doubled == []
    mismatched = rows(
        db,
        "SELECT s.id FROM task_shards s JOIN task_assignments a ON a.id = s.assignment_id "
        "WHERE a.shard_id <> s.id OR a.status NOT IN ('assigned', 'training')",
    )
    assert mismatched == []


def test_sixty_sockets_race_for_eight_shards(
    server: int, db: Database, second_worker: Proc, celery_client: Celery
) -> None:
    racers = [WsClient(server).register() for _ in range(60)]
    try:
        wide = request(server, "POST", "/api/tasks", {"type": "echo", "config": {"num_shards": 5}})[1]
        singles = [request(server, "POST", "/api/tasks", {"type": "echo"})[1] for _ in range(3)]
        wait_for(lambda: rows(db, "SELECT COUNT(*) FROM task_shards") == [(8,)], what="8 shards queued")
        # Sixty requests at the same moment, one thread per socket, and scheduling runs on both
        # worker processes (six job slots) at once besides the ones the requests ask for.
        start = threading.Barrier(61, timeout=30)
        errors: list[BaseException] = []

        def ask(r: WsClient) -> None:
            try:
                start.wait()
                r.request_task()
            except BaseException as error:
                errors.append(error)

        threads = [threading.Thread(target=ask, args=(r,)) for r in racers]
        for t in threads:
            t.start()
        start.wait()
        for _ in range(6):
            celery_client.send_task("workers.tasks.schedule")
        for t in threads:
            t.join(30)
        assert errors == []
        wait_for(lambda: rows(db, "SELECT COUNT(*) FROM task_assignments") == [(8,)], what="8 assignments")
        # Every request was handled: a client got a shard, or waits with its request kept.
        wait_for(
            lambda: rows(db, "SELECT COUNT(*) FROM clients WHERE pending_requests = 1") == [(52,)],
            what="the 52 others waiting",
        )
        assert rows(db, "SELECT COUNT(*) FROM task_assignments") == [(8,)]
        assert_no_double_assignment(db)
        assigned = dict(rows(db, "SELECT client_id, shard_id FROM task_assignments"))
        assert len(assigned) == 8  # one shard per client here
        shards = dict(rows(db, "SELECT id, task_id FROM task_shards WHERE status = 'assigned'"))
        assert sorted(assigned.values()) == sorted(shards)  # every shard once
        by_id = {r.client_id: r for r in racers}
        got = [(cid, by_id[cid].next_task(timeout=20)) for cid in assigned]  # each told its own
        assert {(d["id"], d["rank"]) for _, d in got} == {
            (t, rank) for t, rank in rows(db, "SELECT task_id, `rank` FROM task_shards")
        }
        ranks = sorted(d["rank"] for _, d in got if d["id"] == wide["id"])
        assert ranks == [0, 1, 2, 3, 4]
        assert {d["id"] for _, d in got} == {wide["id"], *(t["id"] for t in singles)}
    finally:
        for r in racers:
            r.close()


def test_threads_claiming_directly_never_share_a_shard(db: Database) -> None:
    """The claim itself, 16 threads at once on MariaDB (SKIP LOCKED), 40 clients, 12 shards."""
    now = utcnow()
    with db.session() as s:
        for i in range(40):
            s.add(
                Client(
                    id=f"c-race-{i}",
                    cpu_info={"cores": 4},
                    ram_info={"total_gb": 8},
                    cpu_cores=4,
                    ram_gb=8,
                    token_hash="x" * 64,
                    status="active",
                    last_seen=now,
                    created_at=now,
                    conn_id=f"conn-{i}",
                    pending_requests=3,
                )
            )
        tasks = [
            Task(
                type="echo",
                requirements={},
                status="pending",
                created_at=now,
                updated_at=now,
                num_shards=n,
                priority=0,
                config={},
            )
            for n in (6, 4, 1, 1)
        ]
        s.add_all(tasks)
        s.flush()
        for t in tasks:
            lifecycle.create_shards(s, t, 0, now)

    barrier = threading.Barrier(16)
    errors: list[BaseException] = []

    def run(ids: list[str]) -> None:
        try:
            barrier.wait()
            for cid in ids:
                db.run(
                    lambda s, cid=cid: scheduling.fill_client(s, cid, utcnow(), max_tasks=3, skip_locked=True)
                )
        except BaseException as error:
            errors.append(error)

    ids = [f"c-race-{i}" for i in range(40)]
    threads = [threading.Thread(target=run, args=(ids[i::16],)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert rows(db, "SELECT COUNT(*) FROM task_assignments") == [(12,)]
    assert rows(db, "SELECT COUNT(*) FROM task_shards WHERE status = 'assigned'") == [(12,)]
    per_client_task = Counter(rows(db, "SELECT client_id, task_id FROM task_assignments"))
    assert max(per_client_task.values()) == 1  # distinct clients per task
    assert_no_double_assignment(db)


def test_the_scheduler_lock_has_one_holder_and_dies_with_its_holder(db: Database, mysql_url: str) -> None:
    """workers.tasks.run_scheduler's lock (Database.exclusive): a second taker is told no at
    once; a holder that is SIGKILLed leaves nothing held."""
    import signal
    import subprocess
    import sys

    with db.exclusive("aifarm_test_lock") as first, db.exclusive("aifarm_test_lock") as second:
        assert (first, second) == (True, False)
    with db.exclusive("aifarm_test_lock") as again:
        assert again
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys; from store.db import Database\n"
         "with Database(sys.argv[1]).exclusive('aifarm_test_lock') as got:\n"
         "    print(got, flush=True); sys.stdin.read()  # holds it until killed\n",
         mysql_url],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[2],
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "True"
        with db.exclusive("aifarm_test_lock") as taken:
            assert not taken
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)

        def free() -> bool:
            with db.exclusive("aifarm_test_lock") as mine:
                return mine

        wait_for(free, 10, what="the lock freed with its dead holder's connection")
    finally:
        holder.kill()
        holder.wait(10)
