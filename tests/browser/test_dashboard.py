"""The dashboard in a real browser: Debian's Chromium driven by Playwright (from PyPI, with
``executable_path=/usr/bin/chromium``: Playwright's own browser download cannot work here).

One stack for the module: gunicorn (gevent workers) + a Celery worker + MariaDB + Redis from
tests/conftest.py, and two real reference clients. The browser signs in, opens a running
federated task, sees the chart gain a point when a round completes (pushed, no reload), pauses
the task and the clients receive ``pause``, resumes it, sees it finish (``4 / 4 rounds done``,
no buttons), and a refused form field shows the server's message with nothing created. The
screenshots of the overview and the task page go to docs/img/ (README shows them).
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from store.db import Database
from tests.conftest import ADMIN_PASSWORD, rows
from tests.helpers import ADMIN, ROOT, Proc, request, wait_for
from tests.services.test_federated import start_clients

pytestmark = pytest.mark.usefixtures("clean")

CHROMIUM = Path("/usr/bin/chromium")
IMG = ROOT / "docs" / "img"
ROUNDS = 4
# Long enough local training (digits, 2 shards) that a round's shards are still held when the
# pause arrives: the holders are the clients the server tells.
TASK = {
    "type": "federated_training",
    "config": {"model": "mlp", "dataset": "digits", "rounds": ROUNDS, "num_shards": 2,
               "local_epochs": 150, "batch_size": 32, "lr": 0.05},
}  # fmt: skip


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium (.ci/run does it)", pytrace=False)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is not installed: make venv (requirements-dev.txt)", pytrace=False)
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Any, server: int) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    tab = context.new_page()
    tab.on("dialog", lambda dialog: dialog.accept())
    errors: list[str] = []
    tab.on("pageerror", lambda error: errors.append(str(error)))
    tab.goto(f"http://127.0.0.1:{server}/admin")
    tab.fill("#password", ADMIN_PASSWORD)
    tab.click("#signin button")
    tab.wait_for_selector("#view-overview:not([hidden])")
    yield tab
    context.close()
    assert errors == [], f"JavaScript errors on the page: {errors}"


@pytest.fixture
def clients(server: int, run_dir: Path, prod_env: dict[str, str]) -> Iterator[list[Proc]]:
    procs = start_clients(server, run_dir, 2, prod_env)
    yield procs
    for proc in procs:
        proc.stop()


def points(page: Any) -> int:
    return int(page.get_attribute("#chart", "data-points") or 0)


def test_a_running_task_is_followed_live_paused_and_finished(
    page: Any, server: int, clients: list[Proc], db: Database
) -> None:
    status, task = request(server, "POST", "/api/tasks", TASK)
    assert status == 201, task
    task_id = task["id"]

    page.click("nav >> text=Tasks")
    page.click(f"#task-rows a[href='#/task/{task_id}']")
    page.wait_for_selector("#view-task:not([hidden])")
    page.evaluate("window.stillTheSamePage = true")  # gone if the page reloaded
    page.wait_for_function("Number(document.querySelector('#chart').dataset.points) >= 1", timeout=120_000)
    before = points(page)
    assert before < ROUNDS, "the task finished before the test could watch a round complete"
    page.wait_for_function(
        f"Number(document.querySelector('#chart').dataset.points) > {before}", timeout=120_000
    )
    assert page.evaluate("window.stillTheSamePage") is True
    assert page.locator("#chart canvas").count() == 1
    assert "running" in page.inner_text("#t-status")

    # Pause while the round's shards are held and being trained: the holders are told.
    page.wait_for_function(
        "[...document.querySelectorAll('#t-shards tr')].some((tr) => /training|assigned/.test(tr.innerText))",
        timeout=60_000,
    )
    page.click("#t-actions >> text=pause")
    page.wait_for_selector("#t-status:text('paused')")
    assert page.inner_text("#t-reason") == "paused by an admin"
    assert rows(db, "SELECT status FROM tasks WHERE id = :t", t=task_id) == [("paused",)]
    wait_for(
        lambda: any(f"task {task_id}: paused by the server" in c.output() for c in clients),
        30,
        what="a client logging the server's pause",
    )
    assert page.locator("#t-actions button").all_inner_texts() == ["resume", "stop"]

    page.click("#t-actions >> text=resume")
    page.wait_for_selector("#t-status:text('completed')", timeout=180_000)
    page.wait_for_function(f"Number(document.querySelector('#chart').dataset.points) === {ROUNDS}")
    assert page.inner_text("#t-progress") == f"{ROUNDS} / {ROUNDS} rounds done"
    assert page.locator("#t-actions button").count() == 0  # nothing to pause or stop any more
    assert page.evaluate("window.stillTheSamePage") is True
    IMG.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(IMG / "dashboard-task.png"), full_page=True)

    page.click("nav >> text=Tasks")  # the list's filters
    page.select_option("#f-status", "running")
    page.wait_for_selector("#task-rows td:text('no tasks match')")
    page.select_option("#f-status", "completed")
    page.wait_for_selector(f"#task-rows a[href='#/task/{task_id}']")
    assert f"{ROUNDS} / {ROUNDS} rounds done" in page.inner_text("#task-rows")

    page.click("nav >> text=Overview")
    page.wait_for_function("Number(document.querySelector('#ov-connected').textContent) >= 2")
    page.wait_for_function("Number(document.querySelector('#ov-workers').textContent) >= 1", timeout=30_000)
    assert page.locator("#ov-queues tr").count() >= 1
    page.screenshot(path=str(IMG / "dashboard-overview.png"), full_page=True)

    page.click("#ov-client-list a >> nth=0")  # a client's page: hardware, utilization, history
    page.wait_for_selector("#view-client:not([hidden])")
    page.wait_for_function("document.querySelectorAll('#c-history a').length >= 1")
    assert f"#/task/{task_id}" in page.get_attribute("#c-history a >> nth=0", "href")
    assert "CPU cores" in page.inner_text("#c-hardware")
    assert "valid results" in page.inner_text("#c-rel")


def test_a_refused_field_shows_the_servers_message_and_nothing_is_created(
    page: Any, server: int, db: Database
) -> None:
    page.click("nav >> text=Submit a task")
    page.fill("#s-rounds", "0")
    page.click("#s-go")
    beside = page.locator('#submit .ferr[data-for="config.rounds"]')
    beside.wait_for(state="visible")
    page.wait_for_function(
        "document.querySelector('#submit .ferr[data-for=\"config.rounds\"]').textContent !== ''"
    )
    # The reply has come back, so the server is done with the request: nothing was created.
    assert beside.inner_text() == "400 config.rounds must be in 1..10000, got 0"
    assert rows(db, "SELECT COUNT(*) FROM tasks") == [(0,)]
    assert page.inner_text("#s-form-error") == ""

    page.fill("#s-rounds", "1")  # corrected, the same form submits and opens the new task
    page.fill("#s-priority", "high")
    page.click("#s-go")
    page.wait_for_function(
        "document.querySelector('#submit .ferr[data-for=\"priority\"]').textContent !== ''"
    )
    assert page.inner_text('#submit .ferr[data-for="config.rounds"]') == ""
    assert rows(db, "SELECT COUNT(*) FROM tasks") == [(0,)]


# --- the push channel itself ---


def events(payload: bytes) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for block in payload.decode().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines() if not line.startswith(":"))
        if "event" in lines:
            out.append((lines["event"], json.loads(lines["data"])))
    return out


def get(port: int, path: str) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {ADMIN}"})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def test_the_event_stream_needs_an_admin_token_and_spends_none_of_the_rest_budget(server: int) -> None:
    status, body = request(server, "GET", "/admin/events?view=overview", token=None)
    assert status == 401 and body["error"] == "unauthorized"
    assert request(server, "GET", "/admin/events", token="not-a-token")[0] == 401

    before = int(get(server, "/api/tasks")[1]["x-ratelimit-remaining"])
    for _ in range(3):
        status, headers, payload = get(server, "/admin/events?view=overview")
        assert status == 200 and headers["content-type"].startswith("text/event-stream")
    after = int(get(server, "/api/tasks")[1]["x-ratelimit-remaining"])
    assert after >= before - 1  # only the second /api/tasks counted (old ones may have left the window)
    [(name, overview)] = events(payload)
    assert name == "overview"
    assert {
        "connected_clients",
        "active_tasks",
        "rounds_per_minute",
        "queues",
        "workers",
        "recent_errors",
    } <= set(overview)
    assert set(overview["queues"]) == {"celery", "aggregation"}


def test_the_event_stream_refuses_what_names_nothing(server: int) -> None:
    cases = {
        "/admin/events?view=nope": (400, "view must be one of overview, tasks, task, client"),
        "/admin/events?view=task": (400, "view=task needs id="),
        "/admin/events?view=task&id=x1": (400, "id must be a task id (a positive integer)"),
        "/admin/events?view=task&id=99999": (404, "no task 99999"),
        "/admin/events?view=client&id=c-nobody": (404, "no client c-nobody"),
        "/admin/events?view=tasks&status=sleeping": (400, None),
        "/admin/events?follow=2": (400, "follow must be 0 or 1"),
    }
    for path, (status, message) in cases.items():
        got, body = request(server, "GET", path)
        assert got == status, (path, got, body)
        assert message is None or body["message"] == message, (path, body)
