"""The load benchmark's smoke run (bench/load.py, 100 clients): correctness only, never speed.

100 asyncio WebSocket clients in two processes register, ask for work at once, send progress,
send their results and wait for ``result_accepted``, against gunicorn (one gevent process) and
the Celery worker on MariaDB and Redis: no shard is given twice, every result is acknowledged
and recorded once, and nothing is answered ``unavailable``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from websockets.sync.client import connect

from tests.helpers import ADMIN, ROOT, Proc, free_port, start_gunicorn

pytestmark = pytest.mark.usefixtures("clean")

CLIENTS = 100


def bench_load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_load", ROOT / "bench" / "load.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def one_web_process(prod_env: dict[str, str], worker: Proc, run_dir: Path) -> Iterator[tuple[int, Proc]]:
    port = free_port()
    env = {**prod_env, "MAX_CLIENTS": "1000", "WS_MESSAGES_PER_MINUTE": "1000000", "RECONCILE_INTERVAL": "1"}
    proc = start_gunicorn(env, port, run_dir / "procs-load", workers=1)
    yield port, proc
    proc.stop()


def test_a_hundred_clients_get_distinct_shards_and_every_result_is_recorded_once(
    one_web_process: tuple[int, Proc], mysql_url: str
) -> None:
    port, web = one_web_process
    load = bench_load()

    r = load.run_load(
        port, web, mysql_url, clients=CLIENTS, drivers=2, progress_seconds=2, progress_rate=500, token=ADMIN
    )

    assert (r["registered"], r["register_errors"]) == (CLIENTS, [])
    assert (r["assigned"], r["burst_errors"]) == (CLIENTS, [])
    assert r["shards_given_twice"] == 0 and r["shards_held_twice"] == 0
    assert r["progress_ingested"] == r["progress_sent"] > 0
    assert (r["results_acknowledged"], r["result_errors"]) == (CLIENTS, [])
    assert r["results_recorded"] == CLIENTS
    assert r["unavailable_errors"] == 0


def test_the_server_declines_permessage_deflate(one_web_process: tuple[int, Proc]) -> None:
    """Accepted, each socket would keep a 256 KB zlib compressor for messages of a few hundred
    bytes: the web process's memory per client tripled (docs/operations.md, "Scale")."""
    port, _ = one_web_process
    with connect(f"ws://127.0.0.1:{port}/ws", compression="deflate") as ws:  # offers permessage-deflate
        assert (
            ws.request is not None and "permessage-deflate" in ws.request.headers["Sec-WebSocket-Extensions"]
        )
        assert ws.response is not None and "Sec-WebSocket-Extensions" not in ws.response.headers
