"""The model server: predictions from the exported model of a completed task, on MODEL_SERVER_PORT.

    python -m training.serve [--host HOST] [--port PORT]

``POST /predict/{task_id}`` with ``{"inputs": [row, ...]}`` (each row 64 numbers, 8x8 or
1x8x8, raw pixels in [0, 1]) answers ``{"task_id", "predictions": [class, ...],
"probabilities": [[p0..p9], ...]}``. 404: no such task, not completed, or no model; 400: not
JSON, wrong shape, non-numeric or non-finite values, no rows or more than ``MAX_ROWS``; 413: a
body over MAX_BODY_SIZE; 503: the database does not answer. ``GET /healthz`` says it runs.

A separate process (it loads torch; the web tier never does). It reads the same database
(DATABASE_URL, or the embedded SQLite under DATA_DIR) to see that a task completed and the
program from CHECKPOINT_DIR (``training.export.export_rel``); a completed task whose export is
missing (an older task, or a failed export) gets it built from its final checkpoint on first
use. Loaded programs are cached, at most ``CACHE_SIZE``, least recently used out.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sqlalchemy import exc, select

import server_settings
from store.blobs import BlobStore
from store.db import Database, Unavailable
from store.models import FEDERATED, Task
from store.states import TaskState
from training import export, program
from training.serialize import state_from_bytes

log = logging.getLogger("aifarm.model_server")

MAX_ROWS = 1000  # rows per request
CACHE_SIZE = 8  # programs kept loaded
MAX_TASK_ID = 2**63 - 1
ROUTE = re.compile(r"^/predict/(\d{1,19})/?$")


class Refused(Exception):
    """An answer other than 200: HTTP status and message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Loaded:
    module: torch.nn.Module
    input_shape: tuple[int, ...]
    stamp: tuple[str, int]  # the file's (path, mtime_ns): a rewritten export is loaded again


class Models:
    """Finds, builds when missing, loads and caches the programs of completed tasks."""

    def __init__(self, db: Database, blobs: BlobStore, cache_size: int = CACHE_SIZE) -> None:
        self.db = db
        self.blobs = blobs
        self.cache_size = cache_size
        self._cache: OrderedDict[int, Loaded] = OrderedDict()
        self._lock = threading.Lock()

    def _task(self, task_id: int) -> tuple[dict[str, Any], str | None]:
        """The completed task's (config, final checkpoint), or Refused 404."""

        def read(s: Any) -> tuple[str, str, dict[str, Any], str | None] | None:
            row = s.execute(
                select(Task.type, Task.status, Task.config, Task.checkpoint_path).where(Task.id == task_id)
            ).first()
            return None if row is None else tuple(row)

        try:
            found = self.db.run(read)
        except (Unavailable, exc.SQLAlchemyError) as error:
            raise Refused(503, f"the database does not answer: {type(error).__name__}") from None
        if found is None:
            raise Refused(404, f"no task {task_id}")
        kind, status, config, checkpoint = found
        if kind != FEDERATED or status != TaskState.COMPLETED:
            raise Refused(404, f"task {task_id} has no trained model: it is {status}, not a completed "
                               "federated task")  # fmt: skip
        return dict(config or {}), checkpoint

    def _ensure_export(self, task_id: int, config: dict[str, Any], checkpoint: str | None) -> Path:
        path = self.blobs.path(export.export_rel(task_id))
        if path.exists():
            return path
        source = self.blobs.path(checkpoint) if checkpoint else None
        if source is None or not source.exists():
            raise Refused(404, f"task {task_id} has no model file")
        log.info("event=export state=building task=%d from=%s", task_id, checkpoint)
        state = state_from_bytes(source.read_bytes())
        self.blobs.write(export.export_rel(task_id), program.program_bytes(task_id, config, state))
        return path

    def get(self, task_id: int) -> Loaded:
        config, checkpoint = self._task(task_id)  # every time: a deleted task stops answering
        with self._lock:  # one load at a time; loads are rare and short
            path = self._ensure_export(task_id, config, checkpoint)
            stamp = (str(path), path.stat().st_mtime_ns)
            cached = self._cache.get(task_id)
            if cached is not None and cached.stamp == stamp:
                self._cache.move_to_end(task_id)
                return cached
            module, meta = program.load(path)
            shape = tuple(int(d) for d in meta.get("input", {}).get("shape", ["batch", 1, 8, 8])[1:])
            loaded = Loaded(module, shape, stamp)
            self._cache[task_id] = loaded
            self._cache.move_to_end(task_id)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
            log.info("event=model_loaded task=%d cached=%d", task_id, len(self._cache))
            return loaded


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise Refused(400, f"inputs must hold numbers only, got {type(value).__name__}")
    try:
        number = float(value)
    except OverflowError:
        raise Refused(400, "inputs must be finite numbers") from None
    if not math.isfinite(number):
        raise Refused(400, "inputs must be finite numbers")
    return number


def _flatten(value: Any, depth: int, out: list[float]) -> tuple[int, ...]:
    """Append the numbers of a nested list to ``out``; returns its shape (regular, or Refused)."""
    if not isinstance(value, list):
        out.append(_number(value))
        return ()
    if depth > 3 or not value:
        raise Refused(400, "a row must be a list of numbers or a nested list (8x8, 1x8x8)")
    shapes = {_flatten(item, depth + 1, out) for item in value}
    if len(shapes) != 1:
        raise Refused(400, "a row's nested lists must all have the same shape")
    return (len(value), *shapes.pop())


def parse_inputs(body: bytes, input_shape: tuple[int, ...]) -> np.ndarray:
    """The request's rows as float32 ``(n, *input_shape)``, or Refused 400."""
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):
        raise Refused(400, 'the body must be JSON: {"inputs": [[...], ...]}') from None
    if not isinstance(payload, dict) or not isinstance(payload.get("inputs"), list):
        raise Refused(400, "the body must be a JSON object with a list 'inputs'")
    rows = payload["inputs"]
    if not 1 <= len(rows) <= MAX_ROWS:
        raise Refused(400, f"inputs must hold 1..{MAX_ROWS} rows, got {len(rows)}")
    size = math.prod(input_shape)
    # A row is the flat features, or the input shape with or without its leading 1s.
    allowed = {(size,), input_shape}
    trimmed = input_shape
    while len(trimmed) > 1 and trimmed[0] == 1:
        trimmed = trimmed[1:]
        allowed.add(trimmed)
    numbers: list[float] = []
    for i, row in enumerate(rows):
        if not isinstance(row, list):
            raise Refused(400, f"inputs[{i}] must be a list of {size} numbers")
        shape = _flatten(row, 1, numbers)
        if shape not in allowed:
            shapes = " or ".join("x".join(map(str, s)) for s in sorted(allowed, key=len))
            raise Refused(400, f"inputs[{i}] has shape {'x'.join(map(str, shape))}, expected {shapes}")
    x = np.asarray(numbers, dtype=np.float64).reshape(len(rows), *input_shape)
    if np.abs(x).max() > np.finfo(np.float32).max:
        raise Refused(400, "inputs must fit float32")
    return x.astype(np.float32)


def predict(loaded: Loaded, x: np.ndarray) -> dict[str, Any]:
    with torch.no_grad():
        logits = loaded.module(torch.from_numpy(x))
        probabilities = torch.softmax(logits.double(), dim=1)
    return {
        "predictions": [int(c) for c in probabilities.argmax(dim=1)],
        "probabilities": [[round(float(p), 6) for p in row] for row in probabilities],
    }


class Handler(BaseHTTPRequestHandler):
    server: ModelServer
    protocol_version = "HTTP/1.1"

    def _answer(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str) -> None:
        self._answer(
            status, {"error": HTTPStatus(status).phrase.lower().replace(" ", "_"), "message": message}
        )

    def do_GET(self) -> None:
        if self.path.split("?", 1)[0] == "/healthz":
            self._answer(200, {"status": "ok"})
        elif ROUTE.match(self.path.split("?", 1)[0]):
            self._error(405, "use POST")
        else:
            self._error(404, "POST /predict/{task_id}")

    def _not_allowed(self) -> None:
        self.close_connection = True  # the body, if any, is not read
        self._error(405, "POST /predict/{task_id}")

    do_PUT = do_DELETE = do_PATCH = _not_allowed

    def do_POST(self) -> None:
        match = ROUTE.match(self.path.split("?", 1)[0])
        try:
            body = self._body()
            if match is None or int(match.group(1)) > MAX_TASK_ID:
                raise Refused(404, "POST /predict/{task_id}")
            task_id = int(match.group(1))
            loaded = self.server.models.get(task_id)
            out = predict(loaded, parse_inputs(body, loaded.input_shape))
        except Refused as refused:
            self._error(refused.status, str(refused))
            return
        except Exception:  # a bug or a broken file: answered, logged, and the server keeps going
            log.exception("event=predict state=failed path=%s", self.path)
            self._error(500, "internal error")
            return
        self._answer(200, {"task_id": task_id, **out})

    def _body(self) -> bytes:
        raw = self.headers.get("Content-Length")
        if raw is None or not raw.isdigit():
            self.close_connection = True
            raise Refused(400, "send a JSON body with Content-Length")
        length = int(raw)
        if length > self.server.max_body:
            self.close_connection = True
            raise Refused(413, f"the body may be at most {self.server.max_body} bytes")
        return self.rfile.read(length)

    def log_message(self, format: str, *args: Any) -> None:
        log.info("event=http %s %s", self.address_string(), format % args)


class ModelServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], models: Models, max_body: int) -> None:
        super().__init__(address, Handler)
        self.models = models
        self.max_body = max_body


def make_server(settings: server_settings.Settings, host: str, port: int) -> ModelServer:
    db = Database(settings.database_url, pool_size=4, timeout=settings.DB_TIMEOUT)
    models = Models(db, BlobStore(settings.CHECKPOINT_DIR))
    return ModelServer((host, port), models, settings.MAX_BODY_SIZE)


def main(argv: list[str] | None = None) -> None:
    settings = server_settings.load()
    parser = argparse.ArgumentParser(prog="python -m training.serve", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default=settings.SERVER_HOST, help="default: SERVER_HOST")
    parser.add_argument(
        "--port", type=int, default=settings.MODEL_SERVER_PORT, help="default: MODEL_SERVER_PORT"
    )
    args = parser.parse_args(argv)
    server_settings.setup_logging(settings)
    torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
    server = make_server(settings, args.host, args.port)
    log.info("event=model_server state=listening host=%s port=%d", args.host, args.port)
    print(f"model server on http://{args.host}:{args.port} (POST /predict/{{task_id}})", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
