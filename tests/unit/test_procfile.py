"""`make up` (the Procfile under honcho) and docker-compose.yml run the same processes with the
same commands, so the stack run locally is the one that ships; and the Dockerfile and compose
file keep their promises (two images, no default secret, health checks, shared volumes). This
compares the files (tests/services/test_make_up.py runs `make up`, tests/docker/stack_e2e.py
the compose stack: `make test-docker`).

What may differ between the two spellings of a command, and nothing else:
- A Procfile line is a /bin/sh command line; compose's `command` is an exec list, or
  ["sh", "-c", LINE] where the line needs a shell (Flower's ${FLOWER_BASIC_AUTH:?...}). Compose
  reads `$$` as a literal `$` for the container's sh to expand, so `$$` is `$` before comparing.
- `NAME=value` in front of a Procfile command is an `environment` entry of that compose service
  (REMAP_SIGTERM=SIGQUIT).
"""

from __future__ import annotations

import json
import re
import shlex
from typing import Any

import honcho.manager
import pytest
import yaml
from honcho.environ import parse_procfile

import celeryconfig
from launch import ROOT

ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


def procfile() -> dict[str, str]:
    return dict(parse_procfile((ROOT / "Procfile").read_text()).processes)  # as honcho reads it


def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]


def our_services() -> dict[str, Any]:
    """The services that run this project's image (not mysql, not redis)."""
    return {name: s for name, s in compose().items() if s.get("image", "").startswith("aifarm-server:")}


def split_line(line: str) -> tuple[dict[str, str], list[str]]:
    """A Procfile command: its leading NAME=value assignments, and the argv of the rest."""
    words = shlex.split(line)
    env = {}
    while words and ASSIGNMENT.match(words[0]):
        name, _, value = words.pop(0).partition("=")
        env[name] = value
    return env, words


def compose_argv(service: dict[str, Any]) -> list[str]:
    command = service["command"]
    if command[:2] == ["sh", "-c"]:
        assert len(command) == 3, command
        return shlex.split(command[2].replace("$$", "$"))
    return list(command)


def makefile_recipe(target: str) -> str:
    lines = (ROOT / "Makefile").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"{target}:"))
    recipe = []
    for line in lines[start + 1 :]:
        if not line.startswith("\t"):
            break
        recipe.append(line)
    return "\n".join(recipe)


def test_the_procfile_and_compose_run_the_same_processes() -> None:
    assert set(procfile()) == set(our_services()) - {"init-db"}


@pytest.mark.parametrize("name", sorted(procfile()))
def test_each_compose_service_runs_its_procfile_line(name: str) -> None:
    env, argv = split_line(procfile()[name])
    service = our_services()[name]
    assert compose_argv(service) == argv
    assert env.items() <= (service.get("environment") or {}).items()


def test_the_workers_consume_every_queue_of_celeryconfig() -> None:
    consumed = set()
    for line in procfile().values():
        _, argv = split_line(line)
        if argv[:4] == ["celery", "-A", "workers", "worker"]:
            consumed.update(argv[argv.index("--queues") + 1].split(","))
    assert consumed == {queue.name for queue in celeryconfig.task_queues}


def test_exactly_one_beat() -> None:
    beats = [name for name, line in procfile().items() if split_line(line)[1][3:4] == ["beat"]]
    assert beats == ["beat"]
    assert our_services()["beat"]["deploy"] == {"replicas": 1}


def test_init_db_runs_once_before_everything_else() -> None:
    services = our_services()
    assert services["init-db"]["command"] == ["python", "-m", "app", "init-db"]
    assert services["init-db"]["restart"] == "no"
    assert 'honcho --env "$(UP_ENV)" run python -m app init-db && ' in makefile_recipe("up")
    for name, service in services.items():
        if name != "init-db":
            assert service["depends_on"]["init-db"] == {"condition": "service_completed_successfully"}


def dockerfile_stages() -> dict[str, list[str]]:
    """The Dockerfile's lines by stage name (``FROM ... AS name``), in the file's order."""
    stages: dict[str, list[str]] = {}
    current: list[str] = []
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.startswith("FROM "):
            current = stages.setdefault(line.split()[-1], [])
        current.append(line)
    return stages


def stage_cmd(lines: list[str]) -> list[str]:
    return json.loads(next(line for line in lines if line.startswith("CMD ")).removeprefix("CMD "))


def test_each_image_runs_its_command_by_default_and_web_is_the_default_image() -> None:
    stages = dockerfile_stages()
    assert list(stages)[-1] == "web"  # `docker build .` builds the web image
    assert stage_cmd(stages["web"]) == compose()["web"]["command"]
    assert stage_cmd(stages["worker"]) == compose()["worker"]["command"]


def test_the_web_image_has_no_torch_and_the_worker_image_installs_the_cpu_build() -> None:
    """The web tier never imports torch; the workers get it from PyTorch's CPU index by default,
    from elsewhere only through build arguments (make test-docker: a local wheel)."""
    stages = dockerfile_stages()
    assert stages["web"][0] == "FROM base AS web" and stages["worker"][0] == "FROM base AS worker"
    assert not any("torch" in line and "pip install" in line for line in stages["base"])
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in stages["worker"]
    assert "ARG BASE_IMAGE=python:3.11-slim" in (ROOT / "Dockerfile").read_text().splitlines()
    services = our_services()
    for name, service in services.items():
        target = "web" if name in ("web", "init-db") else "worker"
        assert service["image"] == f"aifarm-server:{target}", name
        assert service["build"] == {"context": ".", "target": target}, name


def test_no_default_secret() -> None:
    """Unset or empty, compose refuses to start with one line naming the variable."""
    text = (ROOT / "docker-compose.yml").read_text()
    for name in ("ADMIN_TOKEN", "FLOWER_BASIC_AUTH", "MYSQL_PASSWORD"):
        assert f"${{{name}:?set {name}" in text, name
        assert f"${{{name}:-" not in text and f"${{{name}}}" not in text, name
    assert "MYSQL_RANDOM_ROOT_PASSWORD" in compose()["mysql"]["environment"]


def test_every_long_running_service_has_a_health_check_and_runs_as_a_user() -> None:
    for name, service in compose().items():
        if name == "init-db":
            assert service["healthcheck"] == {"disable": True}
            continue
        assert service["healthcheck"]["test"][0] in ("CMD", "CMD-SHELL"), name
    for stage in ("web", "worker"):
        assert "USER aifarm" in dockerfile_stages()[stage], stage


def test_web_and_workers_share_uploads_and_checkpoints() -> None:
    services = our_services()
    for name in ("web", "worker", "aggregator"):
        mounts = services[name]["volumes"]
        assert "checkpoints:/srv/aifarm/checkpoints" in mounts and "data:/srv/aifarm/data" in mounts, name
        assert services[name]["environment"]["CHECKPOINT_DIR"] == "/srv/aifarm/checkpoints", name


def test_flower_is_published_on_this_host_only_by_default() -> None:
    published = "${AIFARM_FLOWER_ADDRESS:-127.0.0.1}:${AIFARM_FLOWER_PORT:-5555}:5555"
    assert compose()["flower"]["ports"] == [published]


def test_flower_always_asks_for_a_password() -> None:
    # sh refuses to start it when FLOWER_BASIC_AUTH is unset or empty
    assert " --basic-auth=${FLOWER_BASIC_AUTH:?" in procfile()["flower"]


def test_make_up_gives_the_processes_docker_s_grace() -> None:
    """The Makefile raises honcho's KILL_WAIT (5 s) to 10 s: a pinned honcho must still have it."""
    assert isinstance(honcho.manager.KILL_WAIT, int)
    assert "m.KILL_WAIT = max(m.KILL_WAIT, 10)" in (ROOT / "Makefile").read_text()


def test_the_build_context_leaves_local_state_out() -> None:
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".git", ".venv", "data", "logs", "checkpoints", "bench/out", ".env"} <= ignored


def test_the_web_service_may_open_a_file_for_every_socket_gunicorn_allows() -> None:
    """docs/operations.md, "Scale": a WebSocket is a file descriptor."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gunicorn_conf", ROOT / "gunicorn.conf.py")
    assert spec is not None and spec.loader is not None
    conf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conf)
    nofile = compose()["web"]["ulimits"]["nofile"]
    assert min(nofile["soft"], nofile["hard"]) >= conf.worker_connections + 200 >= 10_000


def test_gunicorn_raises_its_open_files_limit_as_far_as_the_hard_limit_allows() -> None:
    import resource
    import subprocess
    import sys

    script = (
        "import importlib.util, resource, sys\n"
        "hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))\n"
        "spec = importlib.util.spec_from_file_location('g', sys.argv[1])\n"
        "g = importlib.util.module_from_spec(spec); spec.loader.exec_module(g)\n"
        "print(g.raise_open_files(int(sys.argv[2]))[0])\n"
    )
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    low = subprocess.run([sys.executable, "-c", script, str(ROOT / "gunicorn.conf.py"), "1000"],
                         capture_output=True, text=True, check=True)  # fmt: skip
    assert (low.stdout.strip(), low.stderr) == ("1000", "")
    beyond = hard + 1 if hard != resource.RLIM_INFINITY else None
    if beyond is not None:  # more than the hard limit: raised to it, and one line says so
        high = subprocess.run([sys.executable, "-c", script, str(ROOT / "gunicorn.conf.py"), str(beyond)],
                              capture_output=True, text=True, check=True)  # fmt: skip
        assert high.stdout.strip() == str(hard)
        assert "open-files limit" in high.stderr and len(high.stderr.strip().splitlines()) == 1
