"""Every bad WebSocket input gets a precise error, writes nothing, and leaves the socket usable."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import websocket

from store.db import Database
from tests.conftest import rows
from tests.helpers import WsClient, request

pytestmark = pytest.mark.usefixtures("clean")


@pytest.fixture
def client(server: int) -> Iterator[WsClient]:
    c = WsClient(server).register()
    yield c
    c.close()


def still_usable(c: WsClient) -> None:
    c.send({"type": "task_progress", "task_id": 999999, "progress": 1})
    c.expect_error("unknown_task")


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ("not json", "invalid_json"),
        ("[1, 2]", "invalid_json"),
        ('{"type": "task_progress", "task_id": 1, "progress": NaN}', "invalid_json"),
        ('{"no_type": 1}', "unknown_type"),
        ('{"type": "launch_missiles"}', "unknown_type"),
        ('{"type": "task_progress", "task_id": 1}', "invalid_message"),
        ('{"type": "task_progress", "task_id": 1, "progress": 150}', "invalid_message"),
        ('{"type": "task_progress", "task_id": 1, "progress": -1}', "invalid_message"),
        ('{"type": "task_progress", "task_id": "seven", "progress": 5}', "invalid_message"),
        ('{"type": "task_progress", "task_id": -3, "progress": 5}', "invalid_message"),
        ('{"type": "task_progress", "task_id": 1, "progress": 5, "metrics": [1]}', "invalid_message"),
        (
            '{"type": "task_progress", "task_id": 1, "progress": 5, "metrics": {"a": {"b": 1}}}',
            "invalid_message",
        ),
        ('{"type": "task_result", "task_id": 1, "status": "great"}', "invalid_message"),
        ('{"type": "task_result", "task_id": 1, "status": "failed", "error": 42}', "invalid_message"),
        ('{"type": "task_request", "client_id": 17}', "invalid_message"),
        ('{"type": "task_progress", "task_id": 424242, "progress": 5}', "unknown_task"),
        ('{"type": "task_result", "task_id": 424242, "status": "completed"}', "unknown_task"),
    ],
)
def test_malformed_messages_get_a_precise_error(client: WsClient, frame: str, code: str) -> None:
    client.send(frame)
    error = client.expect("error")
    assert error["code"] == code, error
    assert error["message"]
    still_usable(client)


@pytest.mark.parametrize(
    ("hardware", "field"),
    [
        ({"cpu_info": {"cores": 0}}, "cores"),
        ({"cpu_info": {"cores": 10**9}}, "cores"),
        ({"cpu_info": {"cores": "many"}}, "cores"),
        ({"cpu_info": "fast"}, "cpu_info"),
        ({"ram_info": {"total_gb": -4}}, "total_gb"),
        ({"ram_info": {}}, "total_gb"),
        ({"gpu_info": [{"name": "x", "memory_gb": -1}]}, "memory_gb"),
        ({"gpu_info": "A100"}, "gpu_info"),
        ({"task_types": "all"}, "task_types"),
    ],
)
def test_bad_registrations_are_refused_and_nothing_is_written(
    server: int, db: Database, hardware: dict, field: str
) -> None:
    c = WsClient(server)
    try:
        c.send({"type": "register", **WsClient.HARDWARE, **hardware})
        error = c.expect_error("invalid_message")
        assert field in error["message"]
        assert rows(db, "SELECT COUNT(*) FROM clients") == [(0,)]
        c.register()  # the same socket can still register properly
        assert c.client_id
    finally:
        c.close()


def test_messages_before_register_are_refused(server: int) -> None:
    c = WsClient(server)
    try:
        for message in ({"type": "task_request"}, {"type": "task_progress", "task_id": 1, "progress": 1}):
            c.send(message)
            c.expect_error("not_registered")
        c.register()
    finally:
        c.close()


def test_a_second_register_on_one_connection_is_refused(client: WsClient) -> None:
    client.send({"type": "register", **WsClient.HARDWARE})
    client.expect_error("already_registered")
    still_usable(client)


def test_someone_elses_id_or_a_wrong_token_is_refused(server: int, client: WsClient, db: Database) -> None:
    thief = WsClient(server)
    try:
        thief.send({"type": "register", **WsClient.HARDWARE, "client_id": client.client_id, "token": "guess"})
        thief.expect_error("auth_failed")
        thief.send({"type": "register", **WsClient.HARDWARE, "client_id": "c-nobody", "token": "guess"})
        thief.expect_error("auth_failed")
        thief.send({"type": "register", **WsClient.HARDWARE, "client_id": client.client_id})
        thief.expect_error("invalid_message")  # id without token
        (conn,) = rows(db, "SELECT conn_id FROM clients WHERE id = :id", id=client.client_id)[0]
        assert conn is not None  # the real client's connection is untouched
        thief.register()
        thief.send({"type": "task_request", "client_id": client.client_id})
        thief.expect_error("auth_failed")  # asking for work as someone else
    finally:
        thief.close()
    still_usable(client)


def test_progress_and_results_for_tasks_not_held_are_refused(
    server: int, client: WsClient, db: Database
) -> None:
    status, task = request(server, "POST", "/api/tasks", {"type": "echo"})
    assert status == 201
    client.send({"type": "task_progress", "task_id": task["id"], "progress": 10})
    client.expect_error("not_assigned")
    client.send({"type": "task_result", "task_id": task["id"], "status": "completed"})
    client.expect_error("not_assigned")
    assert rows(db, "SELECT COUNT(*) FROM task_assignments") == [(0,)]


def test_an_oversized_frame_closes_with_1009_and_others_carry_on(server: int, client: WsClient) -> None:
    big = WsClient(server).register()
    try:
        big.ws.send(
            json.dumps({"type": "task_progress", "task_id": 1, "progress": 1, "metrics": {"x": "y" * 200}})
        )
        big.expect_error("unknown_task")  # a large but legal frame is processed
        big.ws.send("x" * ((64 << 10) + 1))  # WS_MAX_MESSAGE_SIZE + 1
        opcode, data = big.ws.recv_data(control_frame=True)
        assert opcode == websocket.ABNF.OPCODE_CLOSE
        assert int.from_bytes(data[:2], "big") == 1009
    finally:
        big.close()
    still_usable(client)


def test_a_huge_frame_drops_only_that_socket(server: int, client: WsClient) -> None:
    """Far over the limit, the server stops reading: the peer sees 1009 or, with its unsent bytes
    refused, a reset. Either way that socket is gone and everyone else is served."""
    huge = WsClient(server).register()
    try:
        try:
            huge.ws.send("x" * (4 << 20))
            opcode, data = huge.ws.recv_data(control_frame=True)
            assert opcode == websocket.ABNF.OPCODE_CLOSE
            assert int.from_bytes(data[:2], "big") == 1009
        except (ConnectionResetError, BrokenPipeError, websocket.WebSocketConnectionClosedException):
            pass
    finally:
        huge.close()
    still_usable(client)


def test_a_flood_is_rate_limited_per_connection(server: int, client: WsClient) -> None:
    other = WsClient(server).register()
    try:
        for _ in range(700):  # WS_MESSAGES_PER_MINUTE defaults to 600
            other.send({"type": "task_progress", "task_id": 999999, "progress": 1})
        other.expect_error("rate_limited")
    finally:
        other.close()
    still_usable(client)


@pytest.mark.parametrize(
    ("versions", "words"),
    [
        ({}, "federated_training needs a client that states protocol_version and client_version"),
        ({"protocol_version": 2, "client_version": "0.1.0"}, "client 0.1.0 is older than this server"),
        ({"protocol_version": 99, "client_version": "9.0.0"}, "upgrade the server"),
    ],
)
def test_an_incompatible_client_is_told_what_to_upgrade_and_closed(
    server: int, client: WsClient, db: Database, versions: dict[str, object], words: str
) -> None:
    before = rows(db, "SELECT COUNT(*) FROM clients")[0][0]
    old = WsClient(server)
    try:
        old.send({"type": "register", **WsClient.HARDWARE, "task_types": ["federated_training"], **versions})
        refused = old.expect_error("upgrade_required")
        assert words in refused["message"]
        with pytest.raises(websocket.WebSocketConnectionClosedException, match="upgrade required"):
            old.recv()
    finally:
        old.close()
    assert rows(db, "SELECT COUNT(*) FROM clients")[0][0] == before  # nothing registered
    still_usable(client)


def test_an_invalid_message_names_its_field(client: WsClient) -> None:
    busy = {"cpu_utilization": 101}
    client.send({"type": "task_progress", "task_id": 1, "progress": 5, "utilization": busy})
    error = client.expect_error("invalid_message")
    assert error["field"] == "task_progress.utilization.cpu_utilization", error
    assert error["message"] == "task_progress.utilization.cpu_utilization must be a number in 0..100"
    still_usable(client)
