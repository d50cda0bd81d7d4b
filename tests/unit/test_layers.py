"""The import direction holds: the web tier never loads torch; workers never load Flask."""

from __future__ import annotations

import subprocess
import sys

from tests.helpers import ROOT


def modules_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport sys\nprint(' '.join(sorted(sys.modules)))"],
        cwd=ROOT, capture_output=True, text=True, check=True,
        env={"PATH": "/usr/bin:/bin", "DATA_DIR": "/tmp/aifarm-layers", "LOG_DIR": "/tmp/aifarm-layers/logs"},
    )  # fmt: skip
    return set(out.stdout.split())


def test_the_web_tier_never_imports_torch() -> None:
    loaded = modules_after(
        "from app import create_app\ncreate_app()\nimport app.ws, app.models_api, workers.tasks"
    )
    assert "flask" in loaded
    assert "torch" not in loaded


def test_workers_never_import_flask() -> None:
    loaded = modules_after(
        "import workers, workers.tasks, workers.scheduling, workers.lifecycle, workers.federated"
    )
    assert "celery" in loaded
    assert "flask" not in loaded and "flask_sock" not in loaded


def test_aggregation_imports_nothing_of_the_server() -> None:
    loaded = modules_after("import aggregation, aggregation.spec")
    assert not {"flask", "celery", "sqlalchemy", "torch"} & loaded
