"""The client's pure parts: hardware detection, the state file, backoff, URLs, progress display."""

from __future__ import annotations

import json
import logging
import os
import random
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from client import hardware, state
from client.backoff import Backoff
from client.connection import http_base, ws_url
from client.progress import LogDisplay, TqdmDisplay, make_display
from client.transfer import resolve

ROOT = Path(__file__).resolve().parents[2]

# --- hardware ---


def test_detect_has_the_register_shape() -> None:
    found = hardware.detect()
    assert set(found) == {"cpu_info", "ram_info", "gpu_info"}
    cores = found["cpu_info"]["cores"]
    assert isinstance(cores, int) and 1 <= cores <= (os.cpu_count() or 1)
    assert isinstance(found["cpu_info"]["model"], str) and found["cpu_info"]["model"]
    assert isinstance(found["ram_info"]["total_gb"], float) and found["ram_info"]["total_gb"] > 0
    assert isinstance(found["gpu_info"], list)
    for gpu in found["gpu_info"]:
        assert isinstance(gpu["name"], str) and gpu["memory_gb"] >= 0
    json.dumps(found)  # it goes into a JSON frame


def test_detect_without_gpus_reports_none() -> None:
    assert hardware.detect(include_gpus=False)["gpu_info"] == []


def test_gpu_list_matches_what_torch_sees() -> None:
    import torch

    gpus = hardware.cuda_gpus()
    assert len(gpus) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)


def test_cores_follow_the_affinity_mask() -> None:
    if hasattr(os, "sched_getaffinity"):
        assert hardware.cpu_cores() == len(os.sched_getaffinity(0))


def test_parse_meminfo() -> None:
    text = "MemFree:         1000 kB\nMemTotal:       16384000 kB\nSwapTotal: 0 kB\n"
    assert hardware.parse_meminfo_total_gb(text) == pytest.approx(16384000 * 1024 / 1024**3)
    assert hardware.parse_meminfo_total_gb("nothing here\n") is None


def test_parse_cpu_model() -> None:
    x86 = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13\n"
    assert hardware.parse_cpu_model(x86) == "AMD EPYC 7B13"
    arm = "processor : 0\nBogoMIPS : 48.00\nModel : Raspberry Pi 4 Model B Rev 1.4\n"
    assert hardware.parse_cpu_model(arm) == "Raspberry Pi 4 Model B Rev 1.4"
    assert hardware.parse_cpu_model("") is None


def test_ram_reading_matches_proc_meminfo() -> None:
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        expected = hardware.parse_meminfo_total_gb(meminfo.read_text())
        assert hardware.ram_total_gb() == pytest.approx(expected)
    assert hardware.ram_total_gb() > 0


# --- state file ---


def test_state_round_trip_with_private_permissions(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "client.json"
    assert state.load(path) is None
    state.save(path, state.Identity("c-1", "secret"), server="http://x:1")
    assert state.load(path) == state.Identity("c-1", "secret")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert json.loads(path.read_text()) == {"client_id": "c-1", "token": "secret", "server": "http://x:1"}
    state.save(path, state.Identity("c-2", "other"))
    assert state.load(path) == state.Identity("c-2", "other")
    assert [p.name for p in path.parent.iterdir()] == ["client.json"]  # no temporary file left behind
    state.clear(path)
    assert state.load(path) is None
    state.clear(path)  # clearing twice is fine


def test_state_save_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "client.json"
    state.save(path, state.Identity("c-old", "t-old"))

    def broken_replace(src: Any, dst: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(state.StateError, match="disk full"):
        state.save(path, state.Identity("c-new", "t-new"))
    monkeypatch.undo()
    assert state.load(path) == state.Identity("c-old", "t-old")  # the old file is intact
    assert [p.name for p in tmp_path.iterdir()] == ["client.json"]


def test_state_corrupt_file_counts_as_none(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "client.json"
    for content in ("{not json", "[]", '{"client_id": "c-1"}', '{"client_id": "", "token": "x"}'):
        path.write_text(content)
        with caplog.at_level(logging.WARNING):
            assert state.load(path) is None
    assert "registering as a new client" in caplog.text


def test_state_unreadable_is_an_error(tmp_path: Path) -> None:
    folder = tmp_path / "client.json"
    folder.mkdir()  # a directory where the file should be
    with pytest.raises(state.StateError):
        state.load(folder)
    with pytest.raises(state.StateError):
        state.save(folder, state.Identity("a", "b"))


# --- backoff ---


def test_backoff_bounds_double_up_to_the_cap() -> None:
    backoff = Backoff(base=0.5, cap=30.0, rng=random.Random(1))
    ceilings = []
    for _ in range(12):
        ceiling = backoff.ceiling()
        delay = backoff.next_delay()
        assert 0.0 <= delay <= ceiling
        ceilings.append(ceiling)
    assert ceilings[:7] == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0]
    assert set(ceilings[6:]) == {30.0}
    backoff.reset()
    assert backoff.ceiling() == 0.5


def test_backoff_has_full_jitter() -> None:
    backoff = Backoff(base=0.5, cap=30.0, rng=random.Random(7))
    for _ in range(10):
        backoff.next_delay()
    delays = [backoff.next_delay() for _ in range(400)]
    assert all(0.0 <= d <= 30.0 for d in delays)
    assert min(delays) < 3.0 and max(delays) > 27.0  # spread over the whole range
    assert len({round(d, 6) for d in delays}) > 390  # not a constant


def test_backoff_refuses_nonsense() -> None:
    with pytest.raises(ValueError):
        Backoff(base=0.0)
    with pytest.raises(ValueError):
        Backoff(base=2.0, cap=1.0)


# --- URLs ---


@pytest.mark.parametrize(
    ("server", "expected"),
    [
        ("http://127.0.0.1:5000", "ws://127.0.0.1:5000/ws"),
        ("http://127.0.0.1:5000/", "ws://127.0.0.1:5000/ws"),
        ("https://farm.example.org", "wss://farm.example.org/ws"),
        ("https://farm.example.org/prefix/", "wss://farm.example.org/prefix/ws"),
        ("ws://h:1/ws", "ws://h:1/ws"),
    ],
)
def test_ws_url(server: str, expected: str) -> None:
    assert ws_url(server) == expected


@pytest.mark.parametrize("server", ["127.0.0.1:5000", "ftp://h", "http://", ""])
def test_ws_url_refuses_non_http(server: str) -> None:
    with pytest.raises(ValueError):
        ws_url(server)


def test_http_base_and_resolve() -> None:
    assert http_base("http://h:1/") == "http://h:1"
    assert http_base("wss://h/ws") == "https://h"
    assert resolve("http://h:1", "/api/tasks/7/rounds/3/model") == "http://h:1/api/tasks/7/rounds/3/model"
    assert resolve("http://h:1", "http://other:2/x") == "http://other:2/x"


# --- display ---


def test_display_choice_follows_the_terminal() -> None:
    class Stream:
        def __init__(self, tty: bool) -> None:
            self.tty = tty

        def isatty(self) -> bool:
            return self.tty

    assert isinstance(make_display(Stream(True)), TqdmDisplay)
    assert isinstance(make_display(Stream(False)), LogDisplay)


def test_log_display_throttles_but_logs_the_end(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    display = LogDisplay(interval=2.0, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="aifarm.client"):
        display.start("task 1 round 0")
        for step in range(10):
            now[0] = step * 0.5
            display.update(step * 10.0, {"loss": 0.5, "accuracy": 0.8, "epoch": 1})
        display.update(100.0, {"loss": 0.1, "accuracy": 0.9, "epoch": 1})
        display.finish("completed")
    lines = [r.getMessage() for r in caplog.records]
    progress_lines = [line for line in lines if "%" in line]
    assert 2 <= len(progress_lines) <= 4
    assert "100.0%" in progress_lines[-1] and "loss=0.1000" in progress_lines[-1]
    assert lines[-1] == "task 1 round 0: completed"


# --- the entry point ---


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("AIFARM_")}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "client", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=full_env,
    )


def test_cli_needs_a_server() -> None:
    out = run_cli()
    assert out.returncode == 2
    assert "--server" in out.stderr


def test_cli_refuses_a_bad_url() -> None:
    out = run_cli("--server", "localhost:5000")
    assert out.returncode == 2
    assert "http(s)://" in out.stderr


def test_cli_refuses_bad_flags() -> None:
    assert run_cli("--server", "http://h:1", "--max-tasks", "0").returncode == 2
    assert run_cli("--server", "http://h:1", "--device", "tpu").returncode == 2
    bad_env = run_cli("--server", "http://h:1", env={"AIFARM_DEVICE": "tpu"})
    assert bad_env.returncode == 2 and "AIFARM_DEVICE" in bad_env.stderr
    assert run_cli("--server", "http://h:1", env={"AIFARM_THREADS": "many"}).returncode == 2


def test_cli_help_lists_the_flags() -> None:
    out = run_cli("--help")
    assert out.returncode == 0
    for flag in (
        "--server",
        "--state",
        "--device",
        "--max-tasks",
        "--log-level",
        "--threads",
        "--give-up-after",
    ):
        assert flag in out.stdout


def test_cli_gives_up_when_nothing_listens(tmp_path: Path) -> None:
    import socket

    with socket.socket() as sock:  # a port that nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = run_cli(
        "--server",
        f"http://127.0.0.1:{port}",
        "--state",
        str(tmp_path / "s.json"),
        "--give-up-after",
        "0.5",
        "--device",
        "cpu",
    )
    assert out.returncode == 1, out.stderr
    assert "giving up" in out.stderr
    assert not (tmp_path / "s.json").exists()


def test_device_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from client.cli import _select_device
    from client.session import Fatal

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _select_device("auto") == "cpu"
    assert _select_device("cpu") == "cpu"
    with pytest.raises(Fatal, match="no CUDA GPU"):
        _select_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert _select_device("auto") == "cuda"
    assert _select_device("cuda") == "cuda"
    assert _select_device("cpu") == "cpu"
