"""The WebSocket protocol parser, on literal frames."""

from __future__ import annotations

import json

import pytest

from app.protocol import ProtocolError, Register, TaskProgress, TaskRequest, TaskResult, parse

HW = {
    "cpu_info": {"cores": 8},
    "ram_info": {"total_gb": 31.5},
    "gpu_info": [{"name": "A", "memory_gb": 24}, {"name": "B", "memory_gb": 80}],
}


def frame(**body: object) -> str:
    return json.dumps(body)


def test_register_derives_the_matching_fields() -> None:
    msg = parse(frame(type="register", **HW, task_types=["federated_training"]))
    assert isinstance(msg, Register)
    hw = msg.hardware
    assert (hw.cores, hw.ram_gb, hw.gpu_count, hw.gpu_memory_gb) == (8, 31.5, 2, 80.0)
    assert hw.task_types == ["federated_training"]
    assert msg.client_id is None and msg.token is None


def test_register_for_a_reconnect_needs_id_and_token_together() -> None:
    assert parse(frame(type="register", **HW, client_id="c-1", token="t")).client_id == "c-1"  # type: ignore[union-attr]
    with pytest.raises(ProtocolError, match="together"):
        parse(frame(type="register", **HW, client_id="c-1"))
    with pytest.raises(ProtocolError, match="characters"):
        parse(frame(type="register", **HW, client_id="c 1; drop", token="t"))


def test_progress_and_result_accept_numeric_string_ids() -> None:
    progress = parse(frame(type="task_progress", task_id="7", progress=12.5, metrics={"loss": 0.3}))
    assert progress == TaskProgress(task_id=7, round=None, progress=12.5, metrics={"loss": 0.3})
    result = parse(frame(type="task_result", task_id=7, round=2, status="failed", error="oom"))
    assert result == TaskResult(task_id=7, round=2, status="failed", metrics={}, error="oom")
    assert parse(frame(type="task_request")) == TaskRequest(client_id=None)


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b'{"type": "task_request"}', "invalid_json"),
        ("", "invalid_json"),
        ('"register"', "invalid_json"),
        ('{"type": "task_progress", "task_id": 1, "progress": Infinity}', "invalid_json"),
        ('{"type": "task_progress", "task_id": 1, "progress": 1e999}', "invalid_json"),  # inf
        ("[" * 100_000 + "]" * 100_000, "invalid_json"),  # deeper than Python's recursion limit
        ('{"type": 5}', "unknown_type"),
        ('{"type": "task_progress", "task_id": 1, "progress": true}', "invalid_message"),
        ('{"type": "task_progress", "task_id": 1.5, "progress": 1}', "invalid_message"),
        (
            '{"type": "task_progress", "task_id": 1, "progress": 1, "metrics": {"k": "' + "v" * 300 + '"}}',
            "invalid_message",
        ),
        ('{"type": "task_progress", "task_id": 1, "progress": 1, "round": -1}', "invalid_message"),
        ('{"type": "task_result", "task_id": 1}', "invalid_message"),
    ],
)
def test_refusals(raw: str | bytes, code: str) -> None:
    with pytest.raises(ProtocolError) as caught:
        parse(raw)
    assert caught.value.code == code
    assert caught.value.message


def test_too_many_metrics_or_gpus_are_refused() -> None:
    with pytest.raises(ProtocolError, match="at most 64 entries"):
        parse(frame(type="task_progress", task_id=1, progress=1, metrics={f"m{i}": i for i in range(65)}))
    with pytest.raises(ProtocolError, match="gpu_info"):
        parse(frame(type="register", cpu_info={"cores": 1}, ram_info={"total_gb": 1}, gpu_info=[{}] * 65))
