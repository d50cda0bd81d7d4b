"""A full server turns the next client away: ``error`` ``server_full``, then a close frame with
1013 (Try Again Later), which the reference client backs off on; a slot freed is taken again."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import service_env
from tests.faults.test_shutdown import close_frame
from tests.helpers import WsClient, free_port, start_embedded, wait_for

TRY_AGAIN_LATER = 1013


def test_a_full_server_says_server_full_and_closes_with_1013(tmp_path: Path) -> None:
    port = free_port()
    server = start_embedded(service_env(tmp_path, MAX_CLIENTS="2"), port, tmp_path / "procs")
    connected = [WsClient(port).register() for _ in range(2)]
    extra = WsClient(port)
    try:
        extra.send({"type": "register", **WsClient.HARDWARE})
        error = extra.expect_error("server_full")
        assert "2 clients are connected" in error["message"]
        assert close_frame(extra) == (TRY_AGAIN_LATER, "server full")

        connected.pop().close()  # a slot frees once the server has seen the socket go

        def registers() -> bool:
            c = WsClient(port)
            try:
                c.send({"type": "register", **WsClient.HARDWARE})
                return c.recv()["type"] == "registered"
            finally:
                c.close()

        wait_for(registers, 15, 0.2, "a free slot after a disconnect")
    finally:
        extra.close()
        for c in connected:
            c.close()
        server.stop()
