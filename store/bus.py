"""The doorbell: "look at these clients again". Redis pub/sub in production, in-process when embedded.

A ring carries no data, only client ids (or "everyone"). The web process that holds a
client's socket answers by re-reading that client's open assignments from the database, so
a lost ring only delays delivery until the web tier's periodic reconcile
(``RECONCILE_INTERVAL``) reads them anyway.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable

import server_settings

log = logging.getLogger(__name__)

CHANNEL = "aifarm:doorbell"
SCHEDULE_PENDING = "aifarm:schedule:pending"  # set while a scheduling run is queued or owed
Listener = Callable[[list[str] | None], None]  # None: every local client


class Bus:
    def publish(self, client_ids: Iterable[str] | None) -> None:
        raise NotImplementedError

    def set_flag(self, name: str, ttl: float) -> bool:
        """Set ``name`` for ``ttl`` seconds unless it is set; True when this call set it."""
        raise NotImplementedError

    def clear_flag(self, name: str) -> None:
        raise NotImplementedError

    def is_set(self, name: str) -> bool:
        """Whether flag ``name`` is set (False when it cannot be told)."""
        raise NotImplementedError

    def listen(self, listener: Listener) -> None:
        raise NotImplementedError

    def ping(self) -> bool:
        return True


class LocalBus(Bus):
    """Embedded mode: the worker runs in the web process, so a ring is a function call."""

    def __init__(self) -> None:
        self._listeners: list[Listener] = []
        self._flags: dict[str, float] = {}
        self._flag_lock = threading.Lock()

    def set_flag(self, name: str, ttl: float) -> bool:
        now = time.monotonic()
        with self._flag_lock:
            if self._flags.get(name, 0.0) > now:
                return False
            self._flags[name] = now + ttl
            return True

    def clear_flag(self, name: str) -> None:
        with self._flag_lock:
            self._flags.pop(name, None)

    def is_set(self, name: str) -> bool:
        with self._flag_lock:
            return self._flags.get(name, 0.0) > time.monotonic()

    def publish(self, client_ids: Iterable[str] | None) -> None:
        ids = None if client_ids is None else list(client_ids)
        if ids == []:
            return
        for listener in list(self._listeners):
            listener(ids)

    def listen(self, listener: Listener) -> None:
        self._listeners.append(listener)


class RedisBus(Bus):
    def __init__(self, url: str) -> None:
        import redis

        self._url = url
        # Bounded and blocking: thousands of greenlets share a few connections instead of each
        # opening its own (a new redis-py connection costs more CPU than the command).
        pool = redis.BlockingConnectionPool.from_url(
            url, max_connections=32, timeout=5, socket_connect_timeout=2, socket_timeout=5
        )
        self._redis = redis.Redis(connection_pool=pool)

    def publish(self, client_ids: Iterable[str] | None) -> None:
        ids = None if client_ids is None else list(client_ids)
        if ids == []:
            return
        try:
            self._redis.publish(CHANNEL, json.dumps({"clients": ids}))
        except Exception as error:  # a lost ring is recovered by the periodic reconcile
            log.warning("event=doorbell_publish state=failed error=%s", type(error).__name__)

    def ping(self) -> bool:
        try:
            return bool(self._redis.ping())
        except Exception:
            return False

    def set_flag(self, name: str, ttl: float) -> bool:
        try:
            return bool(self._redis.set(name, b"1", nx=True, px=int(ttl * 1000)))
        except Exception:  # no flag, no debounce: enqueue anyway
            return True

    def clear_flag(self, name: str) -> None:
        try:
            self._redis.delete(name)
        except Exception as error:  # the flag expires on its own
            log.warning("event=flag_clear state=failed error=%s", type(error).__name__)

    def is_set(self, name: str) -> bool:
        try:
            return bool(self._redis.exists(name))
        except Exception:  # beat's scheduling pass looks again anyway
            return False

    def listen(self, listener: Listener) -> None:
        thread = threading.Thread(target=self._listen_forever, args=(listener,), daemon=True, name="doorbell")
        thread.start()

    def _listen_forever(self, listener: Listener) -> None:
        import redis

        delay = 0.5
        while True:
            try:
                # No read timeout: an idle channel is normal. Liveness is checked by the health ping.
                conn = redis.Redis.from_url(self._url, socket_connect_timeout=2, socket_timeout=None)
                pubsub = conn.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(CHANNEL)
                log.info("event=doorbell_subscribe state=ok")
                delay = 0.5
                listener(None)  # rings may have been missed while we were away
                for message in pubsub.listen():
                    if message.get("type") != "message":
                        continue
                    try:
                        body = json.loads(message["data"])
                        ids = body.get("clients")
                        listener(None if ids is None else [str(i) for i in ids])
                    except (ValueError, TypeError, AttributeError):
                        log.warning("event=doorbell_message state=malformed")
            except Exception as error:
                log.warning(
                    "event=doorbell_subscribe state=failed error=%s retry_in=%.1f",
                    type(error).__name__,
                    delay,
                )
                time.sleep(delay)
                delay = min(delay * 2, 10.0)


_bus: Bus | None = None
_lock = threading.Lock()


def get_bus() -> Bus:
    global _bus
    if _bus is None:
        with _lock:
            if _bus is None:
                settings = server_settings.load()
                _bus = RedisBus(settings.REDIS_URL) if settings.REDIS_URL else LocalBus()
    return _bus


def set_bus(bus: Bus | None) -> None:
    global _bus
    _bus = bus
