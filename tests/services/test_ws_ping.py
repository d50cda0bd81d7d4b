"""The web process pings every open socket every ``WS_PING_INTERVAL`` and drops one whose ping
went unanswered (a laptop that slept, a network that vanished without a FIN): the socket is
closed with 1008 and its client's row released, registered or not, while a client that
answers stays connected and served.

The pings come from the hub (one loop for all sockets, app/hub.py), not from simple-websocket
per socket: its per-socket selector cost half of the web process's CPU at 10,000 clients."""

from __future__ import annotations

import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import websocket

from store.db import Database
from tests.conftest import rows
from tests.helpers import Proc, WsClient, free_port, start_gunicorn, wait_for

pytestmark = pytest.mark.usefixtures("clean")


@pytest.fixture(scope="module")
def server(prod_env: dict[str, str], worker: Proc, run_dir: Path) -> Iterator[int]:
    port = free_port()
    proc = start_gunicorn({**prod_env, "WS_PING_INTERVAL": "1"}, port, run_dir / "procs-ping", workers=1)
    yield port
    proc.stop()


def answer_pings(client: WsClient, count: int, timeout: float) -> int:
    """Read frames (websocket-client answers each ping with a pong as it reads it) until
    ``count`` pings came or ``timeout`` passed; returns how many pings came."""
    pings = 0
    deadline = time.monotonic() + timeout
    while pings < count and (left := deadline - time.monotonic()) > 0:
        client.ws.settimeout(left)
        try:
            opcode, _ = client.ws.recv_data(control_frame=True)
        except websocket.WebSocketTimeoutException:
            break
        pings += opcode == websocket.ABNF.OPCODE_PING
    return pings


def close_frame(client: WsClient, timeout: float = 10.0) -> tuple[int, str]:
    """The close frame the server sent (code, reason), reading past what came before it
    (frame by frame, answering nothing: the server has shut the socket down)."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        client.ws.settimeout(left)
        frame = client.ws.recv_frame()
        if frame.opcode == websocket.ABNF.OPCODE_CLOSE:
            return struct.unpack("!H", frame.data[:2])[0], frame.data[2:].decode()
    raise AssertionError(f"no close frame within {timeout}s")


def connection_of(db: Database, client: WsClient) -> str | None:
    return rows(db, "SELECT conn_id FROM clients WHERE id = :c", c=client.client_id)[0][0]


def test_a_socket_that_stops_answering_pings_is_dropped_and_one_that_answers_is_kept(
    server: int, db: Database
) -> None:
    answering = WsClient(server).register()
    silent = WsClient(server).register()  # reads nothing from now on: its pings go unanswered
    unregistered = WsClient(server)  # opened /ws, never registers, never reads
    try:
        assert connection_of(db, silent) is not None
        # three intervals: the silent socket's first ping went unanswered by the second
        assert answer_pings(answering, 3, timeout=20) == 3
        wait_for(lambda: connection_of(db, silent) is None, what="the silent client's row released")
        assert close_frame(silent) == (1008, "Ping/Pong timeout")
        assert close_frame(unregistered) == (1008, "Ping/Pong timeout")
        # the client that answered is still connected, and still served
        assert connection_of(db, answering) is not None
        answering.send({"type": "no_such_message"})
        assert answering.expect_error("unknown_type")["code"] == "unknown_type"
    finally:
        for client in (answering, silent, unregistered):
            client.close()
