"""server.log, error.log and access.log rotate by size, safely with several processes writing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

WRITER = """
import logging, sys
import server_settings
settings = server_settings.load(LOG_DIR=sys.argv[1], LOG_MAX_BYTES=4096, LOG_BACKUP_COUNT=50)
server_settings.setup_logging(settings)
log = logging.getLogger("aifarm.test")
for i in range(int(sys.argv[3])):
    log.info("event=line writer=%s n=%d pad=%s", sys.argv[2], i, "x" * 60)
logging.getLogger("aifarm.access").info("GET /healthz 200 writer=%s", sys.argv[2])
"""


def test_three_processes_rotate_one_log_and_lose_no_line(tmp_path: Path) -> None:
    lines = 300
    writers = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), name, str(lines)], cwd=ROOT)
        for name in ("a", "b", "c")
    ]
    assert [w.wait(timeout=120) for w in writers] == [0, 0, 0]
    server = sorted(tmp_path.glob("server.log*"))
    assert len(server) > 3, server  # ~90 KB written in 4 KB files: it rotated
    assert all(path.stat().st_size <= 4096 + 200 for path in server)  # one line over at most
    written = [line for path in server for line in path.read_text().splitlines()]
    for name in ("a", "b", "c"):
        numbers = sorted(
            int(line.split(" n=")[1].split()[0]) for line in written if f"writer={name} " in line
        )
        assert numbers == list(range(lines)), name  # every line once, none torn
    access = (tmp_path / "access.log").read_text()
    assert all(f"writer={name}" in access for name in ("a", "b", "c"))


def test_rotation_off_keeps_one_file_for_logrotate(tmp_path: Path) -> None:
    code = WRITER.replace("LOG_MAX_BYTES=4096", "LOG_MAX_BYTES=0")
    subprocess.run([sys.executable, "-c", code, str(tmp_path), "a", "200"], cwd=ROOT, check=True, timeout=120)
    assert [p.name for p in tmp_path.glob("server.log*")] == ["server.log"]
    assert len((tmp_path / "server.log").read_text().splitlines()) == 200
