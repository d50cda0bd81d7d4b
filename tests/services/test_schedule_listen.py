"""The scheduler waits a moment for the next request instead of ending (``SCHEDULE_LISTEN``).

Over a real Redis (a redis-server of this test's own, so that the session's worker, which
listens on the shared one, cannot take the rings) and a MariaDB database of its own (the
scheduler's named lock is per database).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import pytest
import redis
from sqlalchemy import event, text

import store.bus
import store.db
from store.bus import SCHEDULE_LISTENING, SCHEDULE_PENDING, RedisBus
from store.db import Database
from store.models import Client, Task, utcnow
from tests.conftest import fresh_database
from tests.helpers import free_port, wait_for
from workers import lifecycle


@pytest.fixture
def own_redis(services: None) -> Iterator[str]:
    exe = shutil.which("redis-server")
    assert exe, "redis-server must be installed"
    port = free_port()
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"

    def up() -> bool:
        try:
            return bool(redis.Redis.from_url(url, socket_connect_timeout=0.5).ping())
        except redis.RedisError:
            return False

    try:
        wait_for(up, 10, what="a redis-server of this test's own")
        yield url
    finally:
        proc.kill()
        proc.wait(10)


@pytest.fixture
def own_db(services: None) -> Iterator[Database]:
    with fresh_database(f"aifarm_test_{os.getpid()}_listen") as url:
        db = Database(url)
        yield db
        db.engine.dispose()


def use(monkeypatch: pytest.MonkeyPatch, db: Database, bus: store.bus.Bus) -> None:
    """This test's database and bus are the process's (``get_db``, ``get_bus``) until it ends."""
    monkeypatch.setattr(store.db, "_db", db)
    monkeypatch.setattr(store.bus, "_bus", bus)


def add_client(db: Database, client_id: str, *, ram_gb: float, waiting: int) -> None:
    now = utcnow()
    with db.session() as s:
        s.add(
            Client(
                id=client_id, cpu_info={"cores": 4}, ram_info={"total_gb": ram_gb}, cpu_cores=4,
                ram_gb=ram_gb, token_hash="x" * 64, status="active", last_seen=now, created_at=now,
                conn_id=f"conn-{client_id}", pending_requests=waiting, requested_at=now if waiting else None,
            )
        )  # fmt: skip


def add_task(db: Database, *, shards: int, priority: int = 0, ram_gb: float = 0) -> int:
    now = utcnow()
    with db.session() as s:
        task = Task(
            type="echo", requirements={"ram_gb": ram_gb}, status="pending", created_at=now,
            updated_at=now, num_shards=shards, priority=priority, config={},
        )  # fmt: skip
        s.add(task)
        s.flush()
        lifecycle.create_shards(s, task, 0, now)
        return int(task.id)


def test_a_client_that_fits_nothing_in_the_window_gets_a_shard_beyond_it(
    own_redis: str, own_db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pass reads twice as many queued shards as were asked for (at least MIN_WINDOW). One
    small client, ahead of it in priority order more shards than that which it cannot run:
    the per-client claim finds the one it can."""
    from workers.scheduling import MIN_WINDOW
    from workers.tasks import serve_waiting

    add_task(own_db, shards=MIN_WINDOW + 4, priority=5, ram_gb=64)  # first in order; too big for it
    small = add_task(own_db, shards=1, priority=0, ram_gb=2)
    add_client(own_db, "c-small", ram_gb=8, waiting=1)
    use(monkeypatch, own_db, RedisBus(own_redis))
    done = serve_waiting()
    assert done.assigned == 1
    with own_db.session() as s:
        got = s.execute(text("SELECT task_id FROM task_assignments WHERE client_id = 'c-small'")).all()
    assert got == [(small,)]


def test_a_ring_goes_to_the_listening_scheduler_and_sends_a_job_otherwise(own_redis: str) -> None:
    bus = RedisBus(own_redis)
    assert bus.ring_scheduler() is True  # nothing owed, nobody listening: send a job
    assert bus.ring_scheduler() is False  # that job is owed already: one is enough
    assert bus.wait_for_ring(3.0) is True  # owed before the scheduler listened: at once

    bus.clear_flag(SCHEDULE_PENDING)
    assert bus.wait_for_ring(0.05) is False  # nothing came
    got: list[bool] = []
    listener = threading.Thread(target=lambda: got.append(bus.wait_for_ring(3.9)))
    listener.start()
    wait_for(lambda: bus.is_set(SCHEDULE_LISTENING), 5, what="the scheduler listening")
    assert bus.ring_scheduler() is False  # the listener takes it: no job
    listener.join(10)
    assert got == [True]  # woken by the ring, not by its timeout (which returns False)

    bus.stop_listening()
    bus.clear_flag(SCHEDULE_PENDING)
    assert bus.ring_scheduler() is True  # nobody listens any more: jobs again


def test_a_listening_scheduler_serves_a_request_without_a_job(
    own_redis: str, own_db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    from workers.tasks import run_scheduler

    add_client(own_db, "c-listen", ram_gb=8, waiting=0)  # connected, not asking yet
    add_task(own_db, shards=1)
    bus = RedisBus(own_redis)
    use(monkeypatch, own_db, bus)
    served: list[int] = []
    scheduler = threading.Thread(target=lambda: served.append(run_scheduler(listen=3.0)))
    scheduler.start()  # nobody waits: one empty pass, then it listens
    wait_for(lambda: bus.is_set(SCHEDULE_LISTENING), 10, what="the scheduler listening")
    with own_db.session() as s:  # the client asks, as the web tier's intake writes it
        s.get(Client, "c-listen").pending_requests = 1  # type: ignore[union-attr]
        s.get(Client, "c-listen").requested_at = utcnow()  # type: ignore[union-attr]
    assert bus.ring_scheduler() is False  # what the web tier does next: no job is sent
    scheduler.join(30)
    assert not scheduler.is_alive()
    assert served == [1]  # the one run served the request it was rung for, then ended
    with own_db.session() as s:
        assert s.get(Client, "c-listen").pending_requests == 0  # type: ignore[union-attr]
    assert not bus.is_set(SCHEDULE_LISTENING)  # it said so when it ended: rings send jobs again
    assert bus.ring_scheduler() is True


def test_a_scheduler_hands_over_after_hold_s_with_the_lock_free(
    own_redis: str, own_db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under requests that never stop, a holder ends after HOLD_S so its worker can stop: it
    stops listening and lets go of the lock before it sends the fresh job, which can take it."""
    import workers.tasks
    from workers.tasks import SCHEDULE_LOCK, run_scheduler

    bus = RedisBus(own_redis)
    sent: list[tuple[bool, bool]] = []

    def send_fresh_job() -> None:  # Celery's send, observed: where are the lock and the listening mark?
        with own_db.exclusive(SCHEDULE_LOCK) as free:
            sent.append((free, bus.is_set(SCHEDULE_LISTENING)))

    monkeypatch.setattr(workers.tasks, "HOLD_S", 0.5)
    monkeypatch.setattr(workers.tasks.schedule, "delay", send_fresh_job)
    use(monkeypatch, own_db, bus)
    stop = threading.Event()

    def ring_forever() -> None:  # a request every 10 ms, as a steady stream would
        while not stop.wait(0.01):
            bus.ring_scheduler()

    ringer = threading.Thread(target=ring_forever)
    try:
        ringer.start()
        assert run_scheduler(listen=3.0) == 0  # nothing to assign; it ends by handing over
    finally:
        stop.set()
        ringer.join(10)
    assert sent == [(True, False)]  # one fresh job, sent with the lock free and nobody listening


def test_a_ring_is_heard_only_by_web_processes_on_the_same_redis_db(own_redis: str) -> None:
    """Redis pub/sub ignores the db number: two deployments (or test runs) on one Redis, each on
    its own db, must not hear each other's doorbell."""
    ours, theirs = RedisBus(own_redis), RedisBus(own_redis.removesuffix("/0") + "/1")
    heard = redis.Redis.from_url(own_redis).pubsub(ignore_subscribe_messages=True)
    heard.subscribe(ours.channel)  # what RedisBus.listen subscribes to
    wait_for(lambda: heard.get_message(timeout=0.1) is None and heard.subscribed, 5, what="subscribed")
    theirs.publish(["their-client"])  # published first: if it reached us, it would come first
    ours.publish(["our-client"])
    got = None
    for _ in range(50):
        got = heard.get_message(timeout=0.1)
        if got is not None:
            break
    heard.close()
    assert got is not None, "our own ring never came"
    assert store.bus.parse_ring(got["data"]) == (["our-client"], [])


def test_a_job_that_finds_the_lock_taken_as_its_holder_ends_serves_the_request_itself(
    own_redis: str, own_db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race a loaded machine showed: a job finds the scheduler lock taken; before it sets
    the flag, the holder lets go and looks at the flag one last time (not set yet: it ends).
    Nobody would then serve the request until beat's next pass. The job, whose ring found the
    flag unset, tries the lock again and serves it."""
    from workers.tasks import SCHEDULE_LOCK, run_scheduler

    add_client(own_db, "c-raced", ram_gb=8, waiting=1)
    add_task(own_db, shards=1)
    bus = RedisBus(own_redis)
    holder = ExitStack()
    assert holder.enter_context(own_db.exclusive(SCHEDULE_LOCK))  # the holder, in its last moment
    ring = bus.ring_scheduler

    def holder_ends_first() -> bool:  # between the job's try of the lock and its ring
        holder.close()  # it lets go, finds no flag, and ends
        return ring()

    monkeypatch.setattr(bus, "ring_scheduler", holder_ends_first)
    use(monkeypatch, own_db, bus)
    try:
        assigned = run_scheduler()
    finally:
        holder.close()
    assert assigned == 1
    with own_db.session() as s:
        assert s.get(Client, "c-raced").pending_requests == 0  # type: ignore[union-attr]


def test_a_job_that_finds_the_lock_taken_with_redis_down_tries_again_once_and_ends(
    own_db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ring is True when Redis cannot be reached ("send a job anyway"): the job tries the lock
    once more, not for as long as the holder holds it."""
    from workers.tasks import SCHEDULE_LOCK, run_scheduler

    bus = RedisBus(f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    rings: list[bool] = []
    ring = bus.ring_scheduler

    def counted() -> bool:
        rings.append(ring())
        return rings[-1]

    monkeypatch.setattr(bus, "ring_scheduler", counted)
    use(monkeypatch, own_db, bus)
    with own_db.exclusive(SCHEDULE_LOCK) as held:  # held throughout by another scheduler
        assert held
        assert run_scheduler() == 0
    assert rings == [True, True]  # Redis down both times; the lock tried twice, then it ended


def test_take_flag_clears_the_flag_and_says_whether_it_was_set(own_redis: str) -> None:
    """The holder's one step between passes: was a pass owed, and owe none now."""
    for bus in (RedisBus(own_redis), store.bus.LocalBus()):
        assert bus.take_flag(SCHEDULE_PENDING) is False  # nothing owed
        bus.ring_scheduler()
        assert bus.take_flag(SCHEDULE_PENDING) is True
        assert not bus.is_set(SCHEDULE_PENDING)  # taken: cleared
        assert bus.take_flag(SCHEDULE_PENDING) is False
    down = RedisBus(f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    assert down.take_flag(SCHEDULE_PENDING) is False  # as is_set: no pass owed that it can tell


def statements_on(db: Database, found: list[str]) -> None:
    @event.listens_for(db.engine, "before_cursor_execute")
    def noted(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        found.append(" ".join(statement.split()))


def test_a_holder_reads_a_task_until_it_has_seen_it_past_pending(own_db: Database) -> None:
    """TaskInfo: a task's type, config and shard count are read while it may still be pending
    (the pass starts it); once a read shows it running they come from memory."""
    from workers.scheduling import TaskInfo, serve_batch

    task_id = add_task(own_db, shards=3)
    for n in range(3):
        add_client(own_db, f"c-{n}", ram_gb=8, waiting=0)
    info = TaskInfo()
    found: list[str] = []
    statements_on(own_db, found)
    reads = []
    for n in range(3):
        with own_db.session() as s:
            s.execute(
                text("UPDATE clients SET pending_requests = 1, requested_at = NOW() WHERE id = :c"),
                {"c": f"c-{n}"},
            )
        found.clear()
        made = own_db.run(
            lambda s: serve_batch(
                s, utcnow(), batch=50, max_tasks=3, skip_locked=True, tasks=info, owed=lambda: True
            )
        )
        assert [m.client_id for m in made.assignments] == [f"c-{n}"]
        reads.append(sum(1 for q in found if q.startswith("SELECT tasks.id, tasks.type")))
    assert reads == [1, 1, 0]  # pending (started by the pass), running (remembered), from memory
    assert task_id in info.known
    with own_db.session() as s:
        assert s.get(Task, task_id).status == "running"  # type: ignore[union-attr]


def test_a_pass_looks_for_skipped_rows_only_when_no_other_pass_is_owed(own_db: Database) -> None:
    """A waiting client whose row another transaction holds is skipped (SKIP LOCKED). The pass
    says so (``skipped``: look again soon) unless a ring came meanwhile (``owed``): then the
    next pass, owed anyway, sees it, and this one spares the look."""
    from workers.scheduling import serve_batch

    add_task(own_db, shards=2)
    add_client(own_db, "c-free", ram_gb=8, waiting=1)
    add_client(own_db, "c-locked", ram_gb=8, waiting=1)
    found: list[str] = []
    statements_on(own_db, found)
    with own_db.engine.connect() as other:
        other.execute(text("SELECT id FROM clients WHERE id = 'c-locked' FOR UPDATE"))  # held meanwhile
        for owed, looked in ((True, False), (False, True)):
            found.clear()
            done = own_db.run(
                lambda s, owed=owed: serve_batch(
                    s, utcnow(), batch=50, max_tasks=3, skip_locked=True, owed=lambda: owed
                )
            )
            assert done.skipped is looked
            assert any(q.startswith("SELECT clients.id FROM clients") for q in found) is looked
        other.rollback()
    done = own_db.run(
        lambda s: serve_batch(s, utcnow(), batch=50, max_tasks=3, skip_locked=True, owed=lambda: True)
    )
    assert [m.client_id for m in done.assignments] == ["c-locked"]  # free now: served


def test_a_pass_that_skipped_a_locked_request_looks_again_once_the_ring_comes(
    own_redis: str, own_db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The usual holder of a waiting client's row is that request's own intake, whose commit
    rings. The scheduler that skipped the row looks again once that ring comes, not after
    SKIPPED_RETRY_S (a minute here: a scheduler that slept through the ring would not have
    served the request when the join below gives up)."""
    import workers.tasks
    from workers.tasks import run_scheduler

    monkeypatch.setattr(workers.tasks, "SKIPPED_RETRY_S", 60.0)
    add_task(own_db, shards=1)
    add_client(own_db, "c-held", ram_gb=8, waiting=1)
    found: list[str] = []
    statements_on(own_db, found)
    bus = RedisBus(own_redis)
    use(monkeypatch, own_db, bus)
    served: list[int] = []
    with own_db.engine.connect() as intake:  # the request's own transaction, not yet committed
        intake.execute(text("SELECT id FROM clients WHERE id = 'c-held' FOR UPDATE"))
        scheduler = threading.Thread(target=lambda: served.append(run_scheduler(listen=0.5)))
        scheduler.start()
        # the pass skipped the row and looked: it is there, locked (``skipped``)
        wait_for(lambda: any(q.startswith("SELECT clients.id FROM clients") for q in found), 10,
                 what="a pass that skipped the locked client")  # fmt: skip
        intake.commit()
    assert bus.ring_scheduler() is True  # what the intake does after its commit (nobody listens)
    scheduler.join(30)
    assert not scheduler.is_alive(), "the scheduler slept through the ring"
    assert served == [1]
    with own_db.session() as s:
        assert s.get(Client, "c-held").pending_requests == 0  # type: ignore[union-attr]
