"""The client's identity on disk: ``{"client_id", "token", "server"}`` as JSON, mode 0600.

Written atomically (a temporary file in the same folder, fsync, rename), so a crash never
leaves half a file. A file that is not valid JSON or lacks the fields is treated as absent
(and replaced at the next registration); a file that cannot be read or written is an error.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("aifarm.client.state")

DEFAULT_PATH = Path("~/.aifarm/client.json")


class StateError(Exception):
    """The state file cannot be read or written (permissions, a directory in the way, ...)."""


@dataclass(frozen=True)
class Identity:
    client_id: str
    token: str


def load(path: Path) -> Identity | None:
    """The saved identity, or None if there is none (or it is unusable)."""
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as error:
        raise StateError(f"cannot read the state file {path}: {error}") from error
    try:
        body = json.loads(raw)
    except ValueError:
        log.warning("state file %s is not valid JSON; registering as a new client", path)
        return None
    client_id = body.get("client_id") if isinstance(body, dict) else None
    token = body.get("token") if isinstance(body, dict) else None
    if not (isinstance(client_id, str) and client_id and isinstance(token, str) and token):
        log.warning("state file %s has no client_id and token; registering as a new client", path)
        return None
    return Identity(client_id, token)


def save(path: Path, identity: Identity, *, server: str | None = None) -> None:
    """Write the identity atomically with mode 0600 (the folder is created 0700 if missing)."""
    body: dict[str, str] = {"client_id": identity.client_id, "token": identity.token}
    if server:
        body["server"] = server
    data = (json.dumps(body, indent=2) + "\n").encode("utf-8")
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)  # mode 0600
    except OSError as error:
        raise StateError(f"cannot write the state file {path}: {error}") from error
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except OSError as error:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise StateError(f"cannot write the state file {path}: {error}") from error
    _fsync_dir(path.parent)


def clear(path: Path) -> None:
    """Forget the saved identity (the server no longer knows it)."""
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as error:
        raise StateError(f"cannot remove the state file {path}: {error}") from error


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
