"""Numbers past 64 bits never reach SQL, and a 429 says when to come back (issue 11's 500s).

A schema fuzzer found three 500s on the embedded default: an id or round beyond 2**63 - 1 in a
path, and a page whose offset overflows. Each is checked on gunicorn with MariaDB (``server``)
and on the embedded default with SQLite (``embedded``), whose INTEGER has the same bound.
"""

from __future__ import annotations

import http.client
from collections.abc import Iterator

import pytest

from app.validation import INT64_MAX, PAGE_MAX
from tests.conftest import service_env
from tests.helpers import Proc, free_port, request, start_embedded

pytestmark = pytest.mark.usefixtures("clean")

HUGE = 104312524145940758528  # > 2**64: the values the fuzzer sent


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    run_dir = tmp_path_factory.mktemp("bounds")
    port = free_port()
    proc: Proc = start_embedded(service_env(run_dir, RATE_LIMIT="30/minute"), port, run_dir / "procs")
    yield port
    proc.stop()


@pytest.fixture(params=["mariadb", "sqlite"])
def port(request: pytest.FixtureRequest) -> int:
    return int(request.getfixturevalue("server" if request.param == "mariadb" else "embedded"))


def test_a_round_beyond_64_bits_is_a_404(port: int) -> None:
    status, reply = request(port, "GET", f"/api/tasks/1/rounds/{HUGE}/model", headers={"X-Client-Id": "c-1"})
    assert status == 404, reply
    assert reply["error"] and reply["message"]


def test_a_task_id_beyond_64_bits_is_a_404_for_every_route(port: int) -> None:
    for method, path, body in [
        ("PUT", f"/api/tasks/{HUGE}/status", {"status": "paused"}),
        ("PUT", "/api/tasks/18125699107020355584/status", {"status": "paused"}),
        ("GET", f"/api/tasks/{HUGE}", None),
        ("DELETE", f"/api/tasks/{HUGE}", None),
        ("GET", f"/api/tasks/{HUGE}/model", None),
    ]:
        status, reply = request(port, method, path, body)
        assert status == 404, (method, path, reply)


def test_the_largest_64_bit_id_is_looked_up_and_not_found(port: int) -> None:
    status, reply = request(port, "GET", f"/api/tasks/{INT64_MAX}")
    assert (status, reply["error"]) == (404, "not_found"), reply
    assert str(INT64_MAX) in reply["message"]


def test_a_page_whose_offset_overflows_is_a_400_and_the_last_page_is_empty(port: int) -> None:
    status, reply = request(port, "GET", "/api/tasks?page=5912867602081695744&per_page=12")
    assert status == 400, reply
    assert f"1..{PAGE_MAX}" in reply["message"]
    status, reply = request(port, "GET", f"/api/tasks?page={PAGE_MAX}&per_page=100")
    assert status == 200, reply
    assert reply["items"] == [] and reply["page"] == PAGE_MAX


def test_a_429_says_when_to_come_back(embedded: int) -> None:
    """RATE_LIMIT is 30/minute on this server: the 31st request in a minute is refused."""
    answers = []
    for _ in range(31):
        conn = http.client.HTTPConnection("127.0.0.1", embedded, timeout=30)
        try:
            conn.request("GET", "/api/tasks/1", headers={"Authorization": "Bearer nope"})
            response = conn.getresponse()
            response.read()
            answers.append((response.status, response.getheader("Retry-After")))
        finally:
            conn.close()
        if answers[-1][0] == 429:
            break
    status, retry_after = answers[-1]
    assert status == 429, answers
    assert retry_after is not None and 0 < int(retry_after) <= 60


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),  # a RecursionError, a 500, before
        ('{"type": "echo", "config": {"depth": ' + '{"a": ' * 20 + "1" + "}" * 20 + "}}", "nests deeper"),
        ('{"type": "echo", "config": {"x": 1e999}}', "1e999 is too large for a number"),  # inf, stored
        ('{"type": "echo", "config": {"x": NaN}}', "NaN is not valid JSON"),
    ],
)
def test_json_no_database_or_answer_can_hold_is_a_400(port: int, raw: str, why: str) -> None:
    before = request(port, "GET", "/api/tasks")[1]["total"]
    status, reply = request(
        port, "POST", "/api/tasks", raw=raw.encode(), headers={"Content-Type": "application/json"}
    )
    assert status == 400 and why in reply["message"], reply
    assert request(port, "GET", "/api/tasks")[1]["total"] == before  # nothing created
