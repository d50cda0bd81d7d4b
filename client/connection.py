"""The WebSocket transport: connect, register, move JSON between the socket and the :class:`ClientSession`.

One thread owns the socket. It reads with a short timeout and, between reads, lets the
session's timers run and sends what the session queued (task progress and results come from
the training thread through the session's outbox). When the socket drops, or the server is not
up yet, it reconnects with exponential backoff and full jitter, keeping the identity.
"""

from __future__ import annotations

import json
import logging
import struct
import time
import urllib.parse
from collections.abc import Callable
from typing import Any

import websocket

from client.backoff import Backoff
from client.outbox import to_wire
from client.session import ClientSession, Fatal, Reconnect

log = logging.getLogger("aifarm.client")

RECV_TIMEOUT = 0.2  # seconds between checks of the outbox
CONNECT_TIMEOUT = 10.0
PING_INTERVAL = 20.0
SILENCE_LIMIT = 3 * PING_INTERVAL  # no frame at all (not even a pong) for this long: reconnect
LINGER = 1.0  # after the last result: time for an error answer to arrive before exiting


class GaveUp(Exception):
    """No registration within ``give_up_after`` seconds."""


def ws_url(server: str) -> str:
    """``http://host:port[/prefix]`` -> ``ws://host:port[/prefix]/ws`` (https -> wss)."""
    parts = urllib.parse.urlsplit(server)
    scheme = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}.get(parts.scheme.lower())
    if scheme is None or not parts.netloc:
        raise ValueError(f"--server must be an http(s):// URL, got {server!r}")
    path = parts.path.rstrip("/")
    if not path.endswith("/ws"):
        path += "/ws"
    return urllib.parse.urlunsplit((scheme, parts.netloc, path, "", ""))


def http_base(server: str) -> str:
    """The base URL for HTTP requests (``ws`` schemes turned back into ``http``)."""
    parts = urllib.parse.urlsplit(server)
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme.lower(), parts.scheme.lower())
    path = parts.path.rstrip("/")
    if path.endswith("/ws"):
        path = path[: -len("/ws")]
    return urllib.parse.urlunsplit((scheme, parts.netloc, path, "", ""))


def _close_code(data: bytes) -> int | None:
    return struct.unpack("!H", data[:2])[0] if len(data) >= 2 else None


class Connection:
    def __init__(
        self,
        server: str,
        session: ClientSession,
        *,
        backoff: Backoff | None = None,
        give_up_after: float | None = None,
        connect: Callable[..., Any] = websocket.create_connection,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = ws_url(server)
        self.session = session
        self.backoff = backoff or Backoff()
        self.give_up_after = give_up_after
        self._connect = connect
        self._sleep = sleep
        self._clock = clock
        self._last_registered = clock()

    def run(self) -> None:
        """Serve until the session is done. Raises :class:`Fatal` or :class:`GaveUp`."""
        while not self.session.done:
            immediately = False
            try:
                ws = self._connect(self.url, timeout=CONNECT_TIMEOUT, enable_multithread=True)
            except (OSError, websocket.WebSocketException) as error:
                log.warning("cannot connect to %s: %s", self.url, error)
            else:
                try:
                    self._serve(ws)
                except Reconnect as why:
                    log.info("reconnecting: %s", why)
                    immediately = why.immediately
                except (OSError, websocket.WebSocketException) as error:
                    log.warning("connection lost: %s", error)
                finally:
                    self.session.on_disconnected()
                    try:
                        ws.close()
                    except Exception as error:  # already broken; nothing left to do with it
                        log.debug("close: %s", error)
            if self.session.done:
                break
            if self.session.registered is False and self.give_up_after:
                waited = self._clock() - self._last_registered
                if waited > self.give_up_after:
                    raise GaveUp(f"no successful registration with {self.url} for {waited:.0f}s; giving up")
            if not immediately:
                delay = self.backoff.next_delay()
                log.info("reconnecting in %.1fs", delay)
                self._sleep(delay)

    def _send(self, ws: Any, message: dict[str, Any]) -> None:
        ws.send(json.dumps(to_wire(message), separators=(",", ":")))

    def _serve(self, ws: Any) -> None:
        session = self.session
        ws.settimeout(RECV_TIMEOUT)
        self._send(ws, session.register_message())
        log.info("connected to %s; registering", self.url)
        last_heard = last_ping = self._clock()
        done_since: float | None = None
        while True:
            session.tick()
            while (message := session.pop_outgoing()) is not None:
                try:
                    self._send(ws, message)
                except Exception:
                    session.push_back(message)
                    raise
                session.mark_sent(message)
            now = self._clock()
            if session.registered:
                self._last_registered = now
            if session.done:
                done_since = now if done_since is None else done_since
                if now - done_since >= LINGER:
                    log.info("finished the requested number of tasks")
                    return
            else:
                done_since = None
            if now - last_ping >= PING_INTERVAL:
                ws.ping()
                last_ping = now
            if now - last_heard >= SILENCE_LIMIT:
                raise Reconnect(f"nothing heard from the server for {now - last_heard:.0f}s")
            try:
                opcode, data = ws.recv_data(control_frame=True)
            except websocket.WebSocketTimeoutException:
                continue
            last_heard = self._clock()
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                code = _close_code(data)
                raise Reconnect(f"the server closed the connection (code {code})")
            if opcode != websocket.ABNF.OPCODE_TEXT:
                continue
            self._dispatch(data)
            if session.registered:
                self.backoff.reset()

    def _dispatch(self, data: bytes | str) -> None:
        text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
        try:
            message = json.loads(text)
        except ValueError:
            log.warning("ignoring a frame that is not JSON: %.200s", text)
            return
        if not isinstance(message, dict):
            log.warning("ignoring a frame that is not a JSON object: %.200s", text)
            return
        log.debug("received %s", message.get("type"))
        self.session.handle(message)


__all__ = ["Connection", "Fatal", "GaveUp", "http_base", "ws_url"]
