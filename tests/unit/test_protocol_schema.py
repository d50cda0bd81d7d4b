"""The published description of the WebSocket messages (GET /api/protocol.json) and the parser
are one declaration: whatever the description allows, the parser accepts, and each refusal
names its field in the description's words."""

from __future__ import annotations

import json
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from app.protocol import MAX_DEPTH, MODELS, ProtocolError, describe, parse

SCHEMA = describe()


def generated_messages(kind: str) -> st.SearchStrategy[Any]:
    """Messages of ``kind`` drawn from the published schema (schemathesis's generator, fed a
    document with one operation per message)."""
    paths = {
        f"/{name}": {
            "post": {
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": {"$ref": f"#/$defs/{model.__name__}"}}},
                },
                "responses": {"200": {"description": "accepted"}},
            }
        }
        for name, model in MODELS.items()
    }
    document = {"openapi": "3.1.0", "info": {"title": "ws", "version": "1"}, "paths": paths}
    document["components"] = {"schemas": SCHEMA["$defs"]}
    text = json.dumps(document).replace("#/$defs/", "#/components/schemas/")
    operation = schemathesis.openapi.from_dict(json.loads(text))[f"/{kind}"]["POST"]
    return operation.as_strategy().map(lambda case: case.body)


def depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max((depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((depth(v) for v in value), default=0)
    return 0


def test_every_client_message_is_described_with_what_each_field_must_be() -> None:
    kinds = {branch["$ref"].rsplit("/", 1)[-1] for branch in SCHEMA["oneOf"]}
    assert kinds == {"Register", "TaskRequest", "TaskProgress", "TaskResult", "Heartbeat", "RotateToken"}
    assert set(SCHEMA["discriminator"]["mapping"]) == set(MODELS)
    progress = SCHEMA["$defs"]["TaskProgress"]["properties"]
    assert progress["progress"] == {
        "description": "a number in 0..100",
        "maximum": 100,
        "minimum": 0,
        "title": "Progress",
        "type": "number",
    }
    assert SCHEMA["$defs"]["Utilization"]["additionalProperties"] is False
    assert json.loads(json.dumps(SCHEMA)) == SCHEMA  # plain JSON


def unique_gpu_ids(message: dict[str, Any]) -> bool:
    gpus = (message.get("utilization") or {}).get("gpu_utilization") or []
    return len({gpu["id"] for gpu in gpus}) == len(gpus)


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_whatever_the_description_allows_the_parser_accepts(kind: str) -> None:
    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(generated_messages(kind))
    def accepted(message: dict[str, Any]) -> None:
        # The two rules JSON Schema cannot say: each GPU id at most once, and MAX_DEPTH.
        assume(unique_gpu_ids(message) and depth(message) <= MAX_DEPTH)
        parsed = parse(json.dumps(message))
        assert kind == parsed.TYPE

    accepted()


@pytest.mark.parametrize(
    ("message", "words"),
    [
        (
            {"type": "task_progress", "task_id": 1, "progress": 101},
            "task_progress.progress must be a number in 0..100",
        ),
        (
            {"type": "task_result", "task_id": 0, "status": "failed"},
            "task_result.task_id must be an integer in 1..",
        ),
        ({"type": "heartbeat", "utilization": {"cpu_utilization": None}}, "cpu_utilization must not be null"),
        ({"type": "register", "ram_info": {"total_gb": 1}}, "register.cpu_info is required"),
    ],
)
def test_a_refusal_names_the_field_in_the_descriptions_words(message: dict[str, Any], words: str) -> None:
    with pytest.raises(ProtocolError) as refused:
        parse(json.dumps(message))
    assert refused.value.code == "invalid_message"
    assert words in refused.value.message


@given(st.recursive(st.integers(), lambda inner: st.lists(inner, max_size=2), max_leaves=40))
@settings(max_examples=30, deadline=None, database=None)
def test_any_nesting_is_answered_never_raised(nested: Any) -> None:
    try:
        parse(
            json.dumps(
                {"type": "register", "cpu_info": {"cores": 1, "x": nested}, "ram_info": {"total_gb": 1}}
            )
        )
    except ProtocolError as refused:
        assert refused.code == "invalid_json"
