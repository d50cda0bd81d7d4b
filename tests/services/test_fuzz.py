"""A schema fuzzer against the project's own /api/openapi.json: no 5xx from any input, and every
answer matches the document (status code, content type, headers, body schema).

schemathesis runs as its own process, as an operator would run it, once on the embedded default
(SQLite) and once on gunicorn with MariaDB, each a fresh server with the rate limit raised. It
sends schema-valid and schema-violating requests to every operation, then chains them (a task it
created is read, paused and deleted). The seed is fixed so that a failure here reproduces; run it
with another ``--seed`` (or none) to explore further.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from launch import ADMIN
from tests.conftest import service_env
from tests.helpers import Proc, free_port, start_embedded, start_gunicorn

pytestmark = pytest.mark.usefixtures("clean")

SEED = 20261130
MAX_EXAMPLES = 6  # per operation and phase: about 600 requests a run
#: Checks left out, and why:
#: - ensure_resource_availability: a task just created has no model, so its /model, /export and
#:   /model-card are a 404 with that reason (docs/operations.md); the check expects them at once.
#: And one path: /admin/events streams for minutes (the dashboard's push channel, with its own
#: tests in tests/browser/).
EXCLUDED = "ensure_resource_availability"
RAISED = {"RATE_LIMIT": "1000000/minute", "CLIENT_RATE_LIMIT": "1000000/minute"}


def fuzz(port: int, report: Path) -> None:
    schemathesis = Path(sys.executable).with_name("schemathesis")
    if not schemathesis.exists():
        pytest.fail(f"schemathesis is not installed in {schemathesis.parent} (make venv installs it)")
    args = [
        str(schemathesis),
        "run",
        f"http://127.0.0.1:{port}/api/openapi.json",
        "--header",
        f"Authorization: Bearer {ADMIN}",
        "--checks",
        "all",
        "--exclude-checks",
        EXCLUDED,
        "--exclude-path",
        "/admin/events",
        "--max-examples",
        str(MAX_EXAMPLES),
        "--seed",
        str(SEED),
        "--request-timeout",
        "30",
        "--no-color",
        "--warnings",
        "off",
        "--report",
        "junit",
        "--report-dir",
        str(report),
    ]
    done = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=report)
    assert done.returncode == 0, (
        f"schemathesis found failures:\n{done.stdout[-12000:]}\n{done.stderr[-2000:]}"
    )
    assert "24 skipped" not in done.stdout or "Tested: 0" not in done.stdout
    assert " passed" in done.stdout, done.stdout[-3000:]  # it ran test cases, not nothing


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    run_dir = tmp_path_factory.mktemp("fuzz-embedded")
    port = free_port()
    proc: Proc = start_embedded(service_env(run_dir, **RAISED), port, run_dir / "procs")
    yield port
    proc.stop()


@pytest.fixture(scope="module")
def gunicorn(
    prod_env: dict[str, str], worker: Proc, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[int]:
    run_dir = tmp_path_factory.mktemp("fuzz-gunicorn")
    port = free_port()
    proc = start_gunicorn({**prod_env, **RAISED}, port, run_dir / "procs")
    yield port
    proc.stop()


def test_the_embedded_default_answers_every_fuzzed_request_as_documented(
    embedded: int, tmp_path: Path
) -> None:
    fuzz(embedded, tmp_path)


def test_gunicorn_with_mariadb_answers_every_fuzzed_request_as_documented(
    gunicorn: int, tmp_path: Path
) -> None:
    fuzz(gunicorn, tmp_path)
