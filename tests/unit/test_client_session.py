"""The protocol logic of the client, driven message by message without a server."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from client.outbox import to_wire
from client.runner import FEDERATED, Assignment, TaskControl, TaskDropped, spawn_thread
from client.session import ClientSession, Fatal, Reconnect
from client.state import Identity
from training.version import PROTOCOL_VERSION, VERSION

HARDWARE = {"cpu_info": {"cores": 2, "model": "test"}, "ram_info": {"total_gb": 4.0}, "gpu_info": []}
WAIT = 60.0  # generous upper bound for a worker thread to get somewhere; never a timing assertion


def task(task_id: int = 7, round_no: int = 3, rank: int = 1, kind: str = FEDERATED) -> dict[str, Any]:
    return {
        "type": "task",
        "data": {
            "id": task_id,
            "type": kind,
            "round": round_no,
            "rank": rank,
            "num_shards": 4,
            "config": {"model": "mlp"},
            "requirements": {},
            "model_url": f"/api/tasks/{task_id}/rounds/{round_no}/model",
            "update_url": f"/api/tasks/{task_id}/rounds/{round_no}/updates/{rank}",
        },
    }


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.005)


class Harness:
    """A session plus fakes for its callbacks; ``sent`` is what the transport would have sent."""

    def __init__(
        self,
        runner: Callable[[Assignment, TaskControl], dict[str, Any]] | None = None,
        *,
        identity: Identity | None = None,
        max_tasks: int | None = None,
        threads: bool = False,
        rotate_token: bool = False,
    ) -> None:
        self.saved: list[Identity] = []
        self.forgotten = 0
        self.now = 1000.0
        self.calls: list[Assignment] = []

        def default_runner(assignment: Assignment, control: TaskControl) -> dict[str, Any]:
            control.report(100.0, {"loss": 0.5, "accuracy": 0.75, "epoch": 1})
            return {"train_loss": 0.5, "num_examples": 10}

        self.runner = runner or default_runner

        def counted(assignment: Assignment, control: TaskControl) -> dict[str, Any]:
            self.calls.append(assignment)
            return self.runner(assignment, control)

        def inline(target: Callable[[], None], name: str) -> None:
            target()

        def forget() -> None:
            self.forgotten += 1

        self.session = ClientSession(
            hardware=HARDWARE,
            identity=identity,
            runners={FEDERATED: counted},
            save_identity=self.saved.append,
            forget_identity=forget,
            max_tasks=max_tasks,
            rotate_token=rotate_token,
            clock=lambda: self.now,
            spawn=spawn_thread if threads else inline,
        )
        self.sent: list[dict[str, Any]] = []

    def connect(self, token: str | None = "tok") -> dict[str, Any]:
        register = self.session.register_message()
        reply = {"type": "registered", "client_id": "c-1"}
        if token is not None:
            reply["token"] = token
        self.session.handle(reply)
        return register

    def flush(self) -> list[dict[str, Any]]:
        """Send everything queued (as the transport would); returns the wire messages."""
        out = []
        while (message := self.session.pop_outgoing()) is not None:
            self.session.mark_sent(message)
            out.append(to_wire(message))
        self.sent.extend(out)
        return out

    def types(self) -> list[str]:
        return [m["type"] for m in self.flush()]


def test_register_message_carries_hardware_task_types_and_saved_credentials() -> None:
    fresh = Harness().session.register_message()
    assert fresh == {
        "type": "register",
        **HARDWARE,
        "task_types": ["federated_training"],
        "protocol_version": PROTOCOL_VERSION,
        "client_version": VERSION,
    }
    again = Harness(identity=Identity("c-9", "s3cret")).session.register_message()
    assert again["client_id"] == "c-9" and again["token"] == "s3cret"


def test_nothing_is_sent_before_registered_then_one_request() -> None:
    h = Harness()
    h.session.register_message()
    assert h.session.pop_outgoing() is None
    h.session.handle({"type": "registered", "client_id": "c-1", "token": "tok"})
    assert h.saved == [Identity("c-1", "tok")]
    assert h.session.identity == Identity("c-1", "tok")
    assert h.flush() == [{"type": "task_request", "client_id": "c-1"}]
    # no second request while the first is outstanding
    h.session.handle({"type": "resume", "task_id": 1})
    h.session.tick()
    assert h.flush() == []


def test_registered_without_token_keeps_the_saved_identity() -> None:
    h = Harness(identity=Identity("c-1", "old"))
    h.connect(token=None)
    assert h.saved == []
    assert h.session.identity == Identity("c-1", "old")


def test_registered_without_token_and_without_identity_is_fatal() -> None:
    h = Harness()
    h.session.register_message()
    with pytest.raises(Fatal, match="token"):
        h.session.handle({"type": "registered", "client_id": "c-1"})


def test_task_runs_reports_progress_then_result_then_asks_again() -> None:
    h = Harness()
    h.connect()
    h.flush()
    h.session.handle(task())
    out = h.flush()
    assert [m["type"] for m in out] == ["task_progress", "task_result", "task_request"]
    progress, result = out[0], out[1]
    assert progress == {
        "type": "task_progress",
        "task_id": 7,
        "round": 3,
        "progress": 100.0,
        "metrics": {"loss": 0.5, "accuracy": 0.75, "epoch": 1},
    }
    assert result == {
        "type": "task_result",
        "task_id": 7,
        "round": 3,
        "status": "completed",
        "metrics": {"train_loss": 0.5, "num_examples": 10},
    }
    assert len(h.calls) == 1 and h.calls[0].key == (7, 3, 1)


def test_unknown_task_type_fails_with_a_reason() -> None:
    h = Harness()
    h.connect()
    h.flush()
    h.session.handle(task(kind="render_video"))
    out = h.flush()
    assert [m["type"] for m in out] == ["task_result", "task_request"]
    assert out[0]["status"] == "failed"
    assert "render_video" in out[0]["error"] and out[0]["task_id"] == 7 and out[0]["round"] == 3
    assert h.calls == []


def test_invalid_task_message_with_an_id_fails() -> None:
    h = Harness()
    h.connect()
    h.flush()
    h.session.handle({"type": "task", "data": {"id": 5, "round": 2}})
    out = h.flush()
    assert [m["type"] for m in out] == ["task_result", "task_request"]
    assert out[0]["status"] == "failed" and "data.type" in out[0]["error"]
    assert out[0]["task_id"] == 5 and out[0]["round"] == 2
    h.session.handle({"type": "task", "data": "nonsense"})  # no id: only logged
    assert h.flush() == []


def test_training_failure_reports_the_error_text() -> None:
    def broken(assignment: Assignment, control: TaskControl) -> dict[str, Any]:
        raise RuntimeError("CUDA out of memory")

    h = Harness(broken)
    h.connect()
    h.flush()
    h.session.handle(task())
    out = h.flush()
    assert out[0]["type"] == "task_result" and out[0]["status"] == "failed"
    assert out[0]["error"] == "RuntimeError: CUDA out of memory"
    assert out[1]["type"] == "task_request"


def test_dropped_task_reports_nothing_and_asks_again() -> None:
    def gone(assignment: Assignment, control: TaskControl) -> dict[str, Any]:
        raise TaskDropped("no longer assigned")

    h = Harness(gone)
    h.connect()
    h.flush()
    h.session.handle(task())
    assert h.types() == ["task_request"]


def test_duplicate_task_while_running_is_ignored() -> None:
    release = threading.Event()
    started = threading.Event()

    def slow(assignment: Assignment, control: TaskControl) -> dict[str, Any]:
        started.set()
        assert release.wait(WAIT)
        return {"train_loss": 1.0, "num_examples": 3}

    h = Harness(slow, threads=True)
    h.connect()
    h.flush()
    h.session.handle(task())
    assert started.wait(WAIT)
    h.session.handle(task())  # the server resends after a reconnect
    h.session.handle(task())
    assert h.flush() == []
    release.set()
    wait_until(lambda: not h.session.busy(), "the task to finish")
    assert [m["type"] for m in h.flush()] == ["task_result", "task_request"]
    assert len(h.calls) == 1


def accepted(
    task_id: int = 7, round_no: int = 3, rank: int = 1, *, duplicate: bool = False
) -> dict[str, Any]:
    """The server's acknowledgement of a result (docs/protocol.md)."""
    return {
        "type": "result_accepted",
        "task_id": task_id,
        "round": round_no,
        "rank": rank,
        "assignment_id": 42,
        "status": "completed",
        "duplicate": duplicate,
    }


def test_an_unacknowledged_result_goes_out_again_on_the_next_connection_once() -> None:
    h = Harness()
    h.connect()
    h.flush()
    h.session.handle(task())
    first = [m for m in h.flush() if m["type"] == "task_result"]
    h.session.handle(task())  # the offer crossed the result on the same socket
    assert h.flush() == []
    h.session.on_disconnected()  # before the acknowledgement came
    h.connect()
    assert [m for m in h.flush() if m["type"] == "task_result"] == first
    h.session.handle(task())  # the server offers its open assignment again: already sent
    assert [m for m in h.flush() if m["type"] == "task_result"] == []
    assert len(h.calls) == 1


def test_an_acknowledged_result_is_not_sent_again() -> None:
    h = Harness()
    h.connect()
    h.flush()
    h.session.handle(task())
    assert [m["type"] for m in h.flush()] == ["task_progress", "task_result", "task_request"]
    h.session.handle(accepted())
    h.session.on_disconnected()
    h.connect()
    assert h.types() == ["task_request"]
    h.session.handle(accepted(duplicate=True))  # a late repeat changes nothing
    assert h.flush() == []


@pytest.mark.parametrize("code", ["not_assigned", "superseded", "timed_out", "unknown_task"])
def test_a_result_refused_for_good_is_forgotten_and_more_work_is_asked_for(code: str) -> None:
    h = Harness(max_tasks=1)
    h.connect()
    h.flush()
    h.session.handle(task())
    assert h.types() == ["task_progress", "task_result"]  # max_tasks made: no request

    refusal = {"type": "error", "code": code, "message": "no", "in_reply_to": "task_result"}
    h.session.handle({**refusal, "task_id": 7, "round": 3})

    assert h.types() == ["task_request"]  # it does not count: room for another task
    assert not h.session.done
    h.session.on_disconnected()
    h.connect()
    assert "task_result" not in h.types()


def test_a_result_refused_for_now_is_sent_again_after_the_pause() -> None:
    h = Harness()
    h.connect()
    h.flush()
    h.session.handle(task())
    first = [m for m in h.flush() if m["type"] == "task_result"]
    busy = {"type": "error", "code": "unavailable", "message": "busy", "in_reply_to": "task_result"}
    h.session.handle({**busy, "task_id": 7, "round": 3})
    h.session.tick()
    assert h.flush() == []  # not before the pause is over
    h.now += 10.0
    h.session.tick()
    assert [m for m in h.flush() if m["type"] == "task_result"] == first
    h.session.handle(accepted())
    h.now += 10.0
    h.session.tick()
    assert [m for m in h.flush() if m["type"] == "task_result"] == []


def test_a_task_offered_again_after_a_failed_try_runs_again() -> None:
    tries: list[int] = []

    def flaky(assignment: Assignment, control: TaskControl) -> dict[str, Any]:
        tries.append(1)
        if len(tries) == 1:
            raise RuntimeError("GET /api/tasks/7/rounds/3/model: [Errno 111] Connection refused")
        return {"train_loss": 0.25, "num_examples": 10}

    h = Harness(flaky)
    h.connect()
    h.flush()
    h.session.handle(task())
    first = [m for m in h.flush() if m["type"] == "task_result"]
    assert first[0]["status"] == "failed"
    h.session.handle(task())  # the server offers the same shard again
    again = [m for m in h.flush() if m["type"] == "task_result"]
    assert [m["status"] for m in again] == ["completed"] and len(h.calls) == 2
    h.session.handle(task())  # a completed one is not run again (nor resent on this socket)
    assert h.flush() == []
    assert len(h.calls) == 2


def test_a_failure_not_sent_yet_is_replaced_by_the_retry() -> None:
    outcomes = [RuntimeError("connection refused"), {"train_loss": 0.25, "num_examples": 10}]

    def flaky(assignment: Assignment, control: TaskControl) -> dict[str, Any]:
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    h = Harness(flaky)
    h.connect()
    h.flush()
    h.session.handle(task())  # fails while the connection is down: nothing is sent yet
    h.session.handle(task())  # the server offers it again after the reconnect
    results = [m for m in h.flush() if m["type"] == "task_result"]
    assert [m["status"] for m in results] == ["completed"] and len(h.calls) == 2


def test_another_round_of_the_same_task_runs() -> None:
    h = Harness()
    h.connect()
    h.flush()
    h.session.handle(task(round_no=3))
    h.session.handle(task(round_no=4))
    assert [a.key for a in h.calls] == [(7, 3, 1), (7, 4, 1)]


def test_pause_holds_and_resume_releases() -> None:
    seen_pause = threading.Event()
    go = threading.Event()
    log: list[str] = []

    def pausable(assignment: Assignment, control: TaskControl) -> dict[str, Any]:
        assert go.wait(WAIT)
        while control.should_pause():
            if not seen_pause.is_set():
                log.append("paused")
                seen_pause.set()
            time.sleep(0.001)
        log.append("resumed")
        return {"train_loss": 0.1, "num_examples": 1}

    h = Harness(pausable, threads=True)
    h.connect()
    h.flush()
    h.session.handle(task())
    h.session.handle({"type": "pause", "task_id": 7})
    assert h.session.is_paused(7)
    go.set()
    assert seen_pause.wait(WAIT)
    assert h.session.busy()
    assert log == ["paused"]
    h.session.handle({"type": "resume", "task_id": 7})
    wait_until(lambda: not h.session.busy(), "the task to finish after resume")
    assert log == ["paused", "resumed"]
    assert [m["type"] for m in h.flush()] == ["task_result", "task_request"]


def test_pause_of_another_task_does_not_hold_this_one() -> None:
    h = Harness()
    h.connect()
    h.session.handle({"type": "pause", "task_id": 99})
    assert not h.session.is_paused(7)
    assert h.session.is_paused(99)


def test_stop_abandons_the_task_without_a_result() -> None:
    started = threading.Event()

    def until_stopped(assignment: Assignment, control: TaskControl) -> dict[str, Any]:
        started.set()
        while not control.should_stop():
            time.sleep(0.001)
        raise TaskDropped("stopped")

    h = Harness(until_stopped, threads=True)
    h.connect()
    h.flush()
    h.session.handle(task())
    assert started.wait(WAIT)
    h.session.handle({"type": "stop", "task_id": 7})
    wait_until(lambda: not h.session.busy(), "the stopped task to end")
    assert h.types() == ["task_request"]


def test_stop_ignores_whatever_the_runner_returns_or_raises_afterwards() -> None:
    started = threading.Event()
    finish = threading.Event()

    def returns_anyway(assignment: Assignment, control: TaskControl) -> dict[str, Any]:
        started.set()
        assert finish.wait(WAIT)
        if assignment.round == 3:
            return {"train_loss": 1.0, "num_examples": 1}
        raise RuntimeError("interrupted upload")

    h = Harness(returns_anyway, threads=True)
    h.connect()
    h.flush()
    for round_no in (3, 4):
        started.clear()
        finish.clear()
        h.session.handle(task(round_no=round_no))
        assert started.wait(WAIT)
        h.session.handle({"type": "stop", "task_id": 7})
        finish.set()
        wait_until(lambda: not h.session.busy(), "the stopped task to end")
        assert h.types() == ["task_request"]


def test_stop_drops_queued_and_unreported_work() -> None:
    h = Harness()
    h.connect()
    h.flush()
    h.session.handle(task())  # finished inline; result waiting in the outbox
    h.session.handle({"type": "stop", "task_id": 7})
    assert [m["type"] for m in h.flush()] == ["task_request"]


def test_disconnect_keeps_results_and_drops_the_rest() -> None:
    h = Harness()
    h.connect()
    h.session.handle(task())  # request, progress, result, request queued, none sent
    h.session.on_disconnected()
    assert h.session.pop_outgoing() is None  # not registered any more
    register = h.session.register_message()
    assert register["client_id"] == "c-1" and register["token"] == "tok"
    h.session.handle({"type": "registered", "client_id": "c-1"})
    assert h.types() == ["task_result", "task_request"]


def test_pause_state_is_relearned_after_a_reconnect() -> None:
    h = Harness()
    h.connect()
    h.session.handle({"type": "pause", "task_id": 7})
    h.session.on_disconnected()
    h.session.register_message()
    h.session.handle({"type": "registered", "client_id": "c-1"})
    assert not h.session.is_paused(7)  # the server says "pause" again if it still is


def test_auth_failed_with_saved_identity_registers_fresh() -> None:
    h = Harness(identity=Identity("c-old", "stale"))
    register = h.session.register_message()
    assert register["client_id"] == "c-old"
    with pytest.raises(Reconnect) as caught:
        h.session.handle(
            {"type": "error", "code": "auth_failed", "message": "unknown client_id or wrong token"}
        )
    assert caught.value.immediately
    assert h.forgotten == 1
    assert h.session.identity is None
    fresh = h.session.register_message()
    assert "client_id" not in fresh and "token" not in fresh
    h.session.handle({"type": "registered", "client_id": "c-new", "token": "t-new"})
    assert h.saved == [Identity("c-new", "t-new")]


def test_auth_failed_without_saved_identity_is_fatal() -> None:
    h = Harness()
    h.session.register_message()
    with pytest.raises(Fatal, match="refused"):
        h.session.handle({"type": "error", "code": "auth_failed", "message": "no"})


def test_upgrade_required_is_fatal_and_says_what_to_upgrade() -> None:
    h = Harness()
    h.session.register_message()
    with pytest.raises(Fatal, match=r"another version of this client: client 0\.1\.0 is older"):
        h.session.handle({"type": "error", "code": "upgrade_required", "message": "client 0.1.0 is older"})


def test_server_full_backs_off() -> None:
    h = Harness()
    h.session.register_message()
    with pytest.raises(Reconnect) as caught:
        h.session.handle({"type": "error", "code": "server_full", "message": "full"})
    assert not caught.value.immediately


def test_invalid_register_is_fatal() -> None:
    h = Harness()
    h.session.register_message()
    with pytest.raises(Fatal):
        h.session.handle({"type": "error", "code": "invalid_message", "message": "cores"})


def test_superseded_reconnects() -> None:
    h = Harness()
    h.connect()
    with pytest.raises(Reconnect):
        h.session.handle({"type": "error", "code": "superseded", "message": "elsewhere"})


def test_errors_after_registration_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    h = Harness()
    h.connect()
    h.flush()
    h.session.handle({"type": "error", "code": "not_assigned", "message": "you do not hold task 3"})
    assert "not_assigned" in caplog.text
    assert h.flush() == []


def test_unavailable_resends_recent_results_and_the_request_later() -> None:
    h = Harness()
    h.connect()
    h.flush()
    h.session.handle(task())
    first = h.flush()
    assert [m["type"] for m in first] == ["task_progress", "task_result", "task_request"]
    h.session.handle({"type": "error", "code": "unavailable", "message": "database down"})
    h.session.tick()
    assert h.flush() == []  # not yet
    h.now += 10
    h.session.tick()
    again = h.flush()
    assert [m["type"] for m in again] == ["task_result", "task_request"]
    assert again[0] == first[1]


def test_max_tasks_stops_asking_and_reports_done_once_the_results_are_acknowledged() -> None:
    h = Harness(max_tasks=2)
    h.connect()
    assert h.types() == ["task_request"]
    h.session.handle(task(round_no=0))
    assert not h.session.done
    assert h.types() == ["task_progress", "task_result", "task_request"]
    h.session.handle(task(round_no=1))
    assert not h.session.done  # the result is not sent yet
    assert h.types() == ["task_progress", "task_result"]
    assert not h.session.done  # sent, not acknowledged
    h.session.handle(accepted(round_no=0))
    assert not h.session.done
    h.session.handle(accepted(round_no=1))
    assert h.session.done


def test_failed_results_count_towards_max_tasks() -> None:
    h = Harness(max_tasks=1)
    h.connect()
    h.flush()
    h.session.handle(task(kind="unknown"))
    assert h.types() == ["task_result"]
    h.session.handle({**accepted(), "status": "failed"})
    assert h.session.done


def test_progress_is_coalesced_while_waiting() -> None:
    def chatty(assignment: Assignment, control: TaskControl) -> dict[str, Any]:
        for step in range(1, 11):
            control.report(step * 10.0, {"loss": 1.0 / step, "epoch": step})
        return {"train_loss": 0.1, "num_examples": 1}

    h = Harness(chatty)
    h.connect()
    h.flush()
    h.session.handle(task())  # ten reports before the transport sends anything
    progress = [m for m in h.flush() if m["type"] == "task_progress"]
    assert len(progress) == 1
    assert progress[0]["progress"] == 100.0
    assert progress[0]["metrics"] == {"loss": 0.1, "epoch": 10}


def test_progress_is_throttled_but_the_end_always_goes_out() -> None:
    h = Harness()
    h.connect()
    h.flush()
    assignment = Assignment.parse(task()["data"])

    def report(progress: float) -> list[float]:
        h.session.report_progress(assignment, progress, {"loss": 1.0, "epoch": 1, "note": "x", "flag": True})
        return [m["progress"] for m in h.flush()]

    assert report(10.0) == [10.0]
    assert report(20.0) == []  # same instant: throttled
    h.now += 1.0
    assert report(30.0) == [30.0]
    assert report(100.0) == [100.0]  # the last report is never held back
    h.session.report_progress(assignment, 150.0, {"loss": 2.0})
    assert h.flush()[0]["progress"] == 100.0  # clamped to 0..100
    h.session.report_progress(assignment, 100.0, {"loss": 2.0, "note": "text"})
    assert h.flush()[0]["metrics"] == {"loss": 2.0}  # numbers only


def test_to_wire_hides_bookkeeping() -> None:
    h = Harness()
    h.connect()
    h.flush()
    h.session.handle(task())
    result = next(m for m in h.session.pending_outgoing() if m["type"] == "task_result")
    assert "_key" in result
    assert "_key" not in to_wire(result)


def test_shutdown_stops_the_running_task() -> None:
    started = threading.Event()

    def until_stopped(assignment: Assignment, control: TaskControl) -> dict[str, Any]:
        started.set()
        while not control.should_stop():
            time.sleep(0.001)
        raise TaskDropped()

    h = Harness(until_stopped, threads=True)
    h.connect()
    h.session.handle(task())
    assert started.wait(WAIT)
    h.session.shutdown(timeout=WAIT)
    assert not h.session.busy()


def test_control_identity_follows_the_session() -> None:
    h = Harness(identity=Identity("c-1", "t"))
    seen: list[Identity] = []

    def grab(assignment: Assignment, control: TaskControl) -> dict[str, Any]:
        seen.append(control.identity())
        return {"num_examples": 1}

    h.runner = grab
    h.connect(token=None)
    h.session.handle(task())
    assert seen == [Identity("c-1", "t")]


def test_no_new_task_is_taken_after_max_tasks_results() -> None:
    h = Harness(max_tasks=1)
    h.connect()
    h.flush()
    h.session.handle(task(round_no=0))
    h.session.handle(task(round_no=1))  # unsolicited: the limit is reached
    assert [a.key for a in h.calls] == [(7, 0, 1)]
    assert h.types() == ["task_progress", "task_result"]


def test_rotate_token_asks_once_registered_and_saves_the_new_token() -> None:
    h = Harness(identity=Identity("c-1", "old"), rotate_token=True)
    h.connect(token=None)  # registered again with the saved identity
    assert "rotate_token" in h.types()
    h.session.handle({"type": "token_rotated", "client_id": "c-1", "token": "new"})
    assert h.saved == [Identity("c-1", "new")]
    assert h.session.identity == Identity("c-1", "new")
    h.connect(token=None)  # a later connection does not ask again
    assert "rotate_token" not in h.types()


def test_a_token_rotated_without_a_token_is_fatal() -> None:
    h = Harness(identity=Identity("c-1", "old"))
    h.connect(token=None)
    with pytest.raises(Fatal, match="token_rotated"):
        h.session.handle({"type": "token_rotated", "client_id": "c-1"})
    assert h.saved == []
