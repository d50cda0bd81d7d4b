"""Model bytes over HTTP (urllib): download a round's global model, upload a trained update.

Every request carries ``Authorization: Bearer <token>`` and ``X-Client-Id``. Connection errors,
timeouts, 429 and 5xx answers are retried a few times with backoff; other answers are final.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from client.backoff import Backoff
from client.state import Identity

log = logging.getLogger("aifarm.client.transfer")

TIMEOUT = 120.0
ATTEMPTS = 5
GONE_STATUSES = (404, 409)  # the task, round or shard is not ours any more


class TransferError(Exception):
    """An HTTP exchange failed for good. ``status`` is None for network errors."""

    def __init__(self, message: str, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code

    @property
    def task_gone(self) -> bool:
        """The server says the task, round or shard is no longer this client's (404 or 409)."""
        return self.status in GONE_STATUSES


class Cancelled(Exception):
    """``should_stop`` turned true while waiting to retry."""


@dataclass(frozen=True)
class Response:
    status: int
    headers: dict[str, str]
    body: bytes


def resolve(base_url: str, url: str) -> str:
    """``url`` from a task message (usually an absolute path) against the server's base URL."""
    return urllib.parse.urljoin(base_url.rstrip("/") + "/", url)


def _describe(status: int, body: bytes) -> tuple[str | None, str]:
    try:
        parsed = json.loads(body)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict):
        code = parsed.get("code") or parsed.get("error")
        message = parsed.get("message") or parsed.get("error") or ""
        return (str(code) if code else None), str(message)
    return None, body[:200].decode("utf-8", "replace")


def request(
    method: str,
    url: str,
    identity: Identity,
    *,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = TIMEOUT,
    attempts: int = ATTEMPTS,
    should_stop: Callable[[], bool] | None = None,
    sleep: Callable[[float], None] = time.sleep,
    opener: Callable[..., Any] = urllib.request.urlopen,
) -> Response:
    """One HTTP exchange with retries; returns a 2xx response or raises :class:`TransferError`."""
    all_headers = {
        "Authorization": f"Bearer {identity.token}",
        "X-Client-Id": identity.client_id,
        "User-Agent": "aifarm-client/0.1",
        **(headers or {}),
    }
    backoff = Backoff(base=0.5, cap=8.0)
    last: TransferError | None = None
    for attempt in range(1, attempts + 1):
        if should_stop is not None and should_stop():
            raise Cancelled()
        req = urllib.request.Request(url, data=body, method=method, headers=all_headers)
        try:
            with opener(req, timeout=timeout) as answer:
                return Response(
                    answer.status, {k.lower(): v for k, v in answer.headers.items()}, answer.read()
                )
        except urllib.error.HTTPError as error:
            payload = error.read() or b""
            code, message = _describe(error.code, payload)
            last = TransferError(
                f"{method} {url}: HTTP {error.code} {code or ''} {message}".strip(), error.code, code
            )
            if error.code != 429 and error.code < 500:
                raise last from None
        except (urllib.error.URLError, OSError, TimeoutError) as error:
            reason = getattr(error, "reason", error)
            last = TransferError(f"{method} {url}: {reason}")
        if attempt < attempts:
            delay = backoff.next_delay()
            log.warning("%s; retrying in %.1fs (attempt %d of %d)", last, delay, attempt, attempts)
            sleep(delay)
    assert last is not None
    raise last


def download_model(
    base_url: str, model_url: str, identity: Identity, *, should_stop: Callable[[], bool] | None = None
) -> bytes:
    """GET the round's global model and check it against ``X-Checksum-Sha256``."""
    url = resolve(base_url, model_url)
    answer = request("GET", url, identity, should_stop=should_stop)
    expected = answer.headers.get("x-checksum-sha256")
    actual = hashlib.sha256(answer.body).hexdigest()
    if expected is None:
        log.warning("GET %s: no X-Checksum-Sha256 header; cannot verify the model", url)
    elif expected.strip().lower() != actual:
        raise TransferError(f"GET {url}: checksum mismatch (header {expected}, body {actual})")
    return answer.body


def upload_update(
    base_url: str,
    update_url: str,
    identity: Identity,
    data: bytes,
    num_examples: int,
    *,
    should_stop: Callable[[], bool] | None = None,
) -> dict[str, Any]:
    """PUT the trained state dict (safetensors) with ``X-Num-Examples``; returns the JSON answer."""
    url = resolve(base_url, update_url)
    answer = request(
        "PUT",
        url,
        identity,
        body=data,
        headers={"Content-Type": "application/octet-stream", "X-Num-Examples": str(int(num_examples))},
        should_stop=should_stop,
    )
    try:
        parsed = json.loads(answer.body or b"{}")
    except ValueError:
        parsed = {}
    return parsed if isinstance(parsed, dict) else {}
