"""A volunteer installs the client alone: requirements-client.txt (or the ``client`` extra of
pyproject.toml) is enough for ``python -m client`` and holds nothing of the server's.

- The client's pins are requirements.txt's pins, in both spellings, so the two installs run the
  same versions.
- A fresh interpreter that imports every client module and the training code the client runs
  loads nothing of the server side (Flask, Celery, SQL drivers, Redis, gevent, app/, store/, ...),
  and every third-party module it loads comes from requirements-client.txt or what those
  distributions require: the file is sufficient, not merely small.

docs/client.md, "Install", says how (and how to get torch's CPU build). A fresh venv with only
requirements-client.txt installed was checked by hand; pip cannot run here without the
package indexes, so this test reads what the dev venv has.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from importlib import metadata

from packaging.requirements import Requirement

from launch import ROOT

# Top-level modules of the server side: none may load in the client.
SERVER_SIDE = frozenset(
    {
        "flask",
        "flask_sock",
        "flask_limiter",
        "simple_websocket",
        "werkzeug",
        "celery",
        "kombu",
        "redis",
        "pymysql",
        "sqlalchemy",
        "gevent",
        "gunicorn",
        "flower",
        "prometheus_client",
        "concurrent_log_handler",
        "sklearn",  # the client reads scikit-learn's digits file, it never imports it
        "app",
        "workers",
        "store",
        "server_settings",
        "celeryconfig",
    }
)

# What `python -m client` imports, then what its federated runner loads on its first shard.
CLIENT_IMPORTS = """
import importlib, json, pkgutil, sys
import client, client.cli
for info in pkgutil.walk_packages(client.__path__, "client."):
    importlib.import_module(info.name)
import training
for name in ("build_model", "state_from_bytes", "state_to_bytes", "train_local", "TrainingStopped",
             "warm_up", "load_split", "shard_data", "evaluate"):
    getattr(training, name)
training.load_split("digits", 0)
print(json.dumps(sorted({name.split(".")[0] for name in sys.modules})))
"""


def pins(lines: list[str]) -> dict[str, str]:
    """{canonical name: specifier} of requirement lines (comments and options skipped)."""
    found = {}
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        req = Requirement(line)
        found[canonical(req.name)] = str(req.specifier)
    return found


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def client_pins() -> dict[str, str]:
    return pins((ROOT / "requirements-client.txt").read_text().splitlines())


def test_client_pins_are_the_servers_pins() -> None:
    server = pins((ROOT / "requirements.txt").read_text().splitlines())
    ours = client_pins()
    assert {"torch", "numpy", "safetensors", "websocket-client"} <= set(ours)
    assert {name: server.get(name) for name in ours} == ours


def test_the_client_extra_is_requirements_client() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert pins(project["optional-dependencies"]["client"]) == client_pins()


def test_the_client_extra_packages_hold_what_the_client_imports() -> None:
    found = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    assert sorted(found["include"]) == ["aggregation*", "client*", "training*"]


def requirement_closure(names: set[str]) -> set[str]:
    """The distributions ``names`` pull in, through the installed metadata (extras left out)."""
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for line in metadata.requires(name) or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(canonical(req.name))
    return seen


def test_the_client_loads_nothing_of_the_server_and_only_what_it_requires() -> None:
    done = subprocess.run(
        [sys.executable, "-c", CLIENT_IMPORTS], cwd=ROOT, capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = set(json.loads(done.stdout.strip().splitlines()[-1]))
    assert {"client", "training", "torch", "websocket"} <= loaded  # it did import the client
    assert sorted(loaded & SERVER_SIDE) == []

    ours = {"client", "training", "aggregation"}
    providers = metadata.packages_distributions()
    third_party = {name for name in loaded - ours if name in providers}
    allowed = requirement_closure(set(client_pins()))
    outside = {
        name: providers[name] for name in third_party if not {canonical(d) for d in providers[name]} & allowed
    }
    assert outside == {}, f"loaded by the client but not required by requirements-client.txt: {outside}"
