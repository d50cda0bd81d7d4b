"""Workers log to LOG_DIR without losing the console output their command line asks for."""

from __future__ import annotations

from pathlib import Path

from tests.helpers import start_worker


def test_a_worker_says_ready_at_info_when_log_level_is_warning(
    prod_env: dict[str, str], tmp_path: Path
) -> None:
    env = {**prod_env, "LOG_LEVEL": "WARNING", "LOG_DIR": str(tmp_path / "logs")}
    proc = start_worker(env, tmp_path, name="quiet-worker", concurrency=1)  # waits for "ready."
    try:
        assert "ready." in proc.output()
        assert (tmp_path / "logs" / "server.log").exists()
    finally:
        proc.stop()
