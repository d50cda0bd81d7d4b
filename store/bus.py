"""The doorbell: "look at these clients again". Redis pub/sub in production, in-process when embedded.

A ring carries client ids (or "everyone"). The web process that holds a client's socket
answers by re-reading that client's open assignments from the database, so a lost ring only
delays delivery until the web tier's periodic reconcile (``RECONCILE_INTERVAL``) reads them
anyway. The scheduler's ring also carries the assignments it just committed
(:class:`store.assignments.Made`), so the web process pushes them without reading them back;
the database stays the source: what the ring said is checked by the next reconcile.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import server_settings
from store.assignments import Made

log = logging.getLogger(__name__)

CHANNEL = "aifarm:doorbell"  # and ":<db>": pub/sub ignores the db number (see RedisBus)
SCHEDULE_PENDING = "aifarm:schedule:pending"  # set while a scheduling run is queued or owed
SCHEDULE_LISTENING = "aifarm:schedule:listening"  # set while the scheduler waits for the next ring
SCHEDULE_BELL = "aifarm:schedule:bell"  # the ring it waits for (a list of at most one item)
PENDING_TTL = 5.0  # seconds: a flag nobody clears (a scheduler died) lets jobs be sent again
MAX_LISTEN_S = 4.0  # below the pool's socket timeout (5 s), which a longer BLPOP would hit
LISTEN_MARGIN_S = 1.0  # the listening mark outlives a wait by this much, so a ring in the gap finds it
Listener = Callable[[list[str] | None, list[Made]], None]  # None: every local client


class Bus:
    def publish(self, client_ids: Iterable[str] | None, made: Sequence[Made] = ()) -> None:
        """Ring for these clients (None: every client); ``made``: new assignments of theirs,
        committed, that their web process may push as they are."""
        raise NotImplementedError

    def set_flag(self, name: str, ttl: float) -> bool:
        """Set ``name`` for ``ttl`` seconds unless it is set; True when this call set it."""
        raise NotImplementedError

    def clear_flag(self, name: str) -> None:
        raise NotImplementedError

    def take_flag(self, name: str) -> bool:
        """Clear ``name``; whether it was set (False when it cannot be told), in one step."""
        raise NotImplementedError

    def ring_scheduler(self) -> bool:
        """A scheduling pass is owed. True when the caller must send a ``schedule`` job: none
        is queued, and no scheduler is waiting for this ring (:meth:`wait_for_ring`)."""
        return self.set_flag(SCHEDULE_PENDING, ttl=PENDING_TTL)

    def wait_for_ring(self, timeout: float) -> bool:
        """Called by the scheduler, with its lock held and nothing left to do: wait up to
        ``timeout`` seconds for the next :meth:`ring_scheduler`; True when it came. While it
        waits (and until :meth:`stop_listening`), rings go to it instead of to new jobs.
        Without a broker (embedded) there is nothing to wait on: False at once."""
        return False

    def stop_listening(self) -> None:
        """The scheduler stops waiting for rings: they send jobs again."""

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

    def take_flag(self, name: str) -> bool:
        with self._flag_lock:
            return self._flags.pop(name, 0.0) > time.monotonic()

    def is_set(self, name: str) -> bool:
        with self._flag_lock:
            return self._flags.get(name, 0.0) > time.monotonic()

    def publish(self, client_ids: Iterable[str] | None, made: Sequence[Made] = ()) -> None:
        ids = None if client_ids is None else list(client_ids)
        if ids == []:
            return
        for listener in list(self._listeners):
            listener(ids, list(made))

    def listen(self, listener: Listener) -> None:
        self._listeners.append(listener)


# ring_scheduler in one step: mark the pass owed; if the scheduler is listening, ring its bell
# (one item at most) and send no job; else a job is owed when the flag was not set before.
_RING = """
local fresh = redis.call('SET', KEYS[1], '1', 'NX', 'PX', ARGV[1])
if redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('LPUSH', KEYS[3], '1')
  redis.call('LTRIM', KEYS[3], 0, 0)
  redis.call('PEXPIRE', KEYS[3], ARGV[1])
  return 0
end
if fresh then return 1 end
return 0
"""


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
        self._ring = self._redis.register_script(_RING)
        # Redis pub/sub channels are the server's, not a db's: two deployments (or test runs)
        # on one Redis, each on its own db, would hear each other's rings on one channel name.
        self.channel = f"{CHANNEL}:{pool.connection_kwargs.get('db', 0)}"

    def publish(self, client_ids: Iterable[str] | None, made: Sequence[Made] = ()) -> None:
        ids = None if client_ids is None else list(client_ids)
        if ids == []:
            return
        try:
            self._redis.publish(self.channel, ring_body(ids, made))
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

    def ring_scheduler(self) -> bool:
        try:
            keys = [SCHEDULE_PENDING, SCHEDULE_LISTENING, SCHEDULE_BELL]
            return bool(self._ring(keys=keys, args=[int(PENDING_TTL * 1000)]))
        except Exception:  # no flag, no listener known: enqueue anyway
            return True

    def wait_for_ring(self, timeout: float) -> bool:
        try:
            # Listening is announced before the flag is read: a ring that comes in between
            # finds the announcement and rings the bell, which the BLPOP below takes.
            timeout = min(timeout, MAX_LISTEN_S)
            self._redis.set(SCHEDULE_LISTENING, b"1", px=int((timeout + LISTEN_MARGIN_S) * 1000))
            if self._redis.exists(SCHEDULE_PENDING):
                return True
            return self._redis.blpop([SCHEDULE_BELL], timeout=timeout) is not None
        except Exception as error:  # Redis is down: stop waiting; beat's pass finds the work
            log.warning("event=schedule_listen state=failed error=%s", type(error).__name__)
            return False

    def stop_listening(self) -> None:
        try:
            self._redis.delete(SCHEDULE_LISTENING)
        except Exception as error:  # it expires on its own (timeout + LISTEN_MARGIN_S)
            log.warning("event=schedule_listen_stop state=failed error=%s", type(error).__name__)

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

    def take_flag(self, name: str) -> bool:
        try:
            return self._redis.getdel(name) is not None
        except Exception:  # as is_set
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
                pubsub.subscribe(self.channel)
                log.info("event=doorbell_subscribe state=ok")
                delay = 0.5
                listener(None, [])  # rings may have been missed while we were away
                for message in pubsub.listen():
                    if message.get("type") != "message":
                        continue
                    try:
                        ids, made = parse_ring(message["data"])
                    except (ValueError, TypeError, AttributeError):
                        log.warning("event=doorbell_message state=malformed")
                        continue
                    listener(ids, made)
            except Exception as error:
                log.warning(
                    "event=doorbell_subscribe state=failed error=%s retry_in=%.1f",
                    type(error).__name__,
                    delay,
                )
                time.sleep(delay)
                delay = min(delay * 2, 10.0)


def ring_body(client_ids: list[str] | None, made: Sequence[Made] = ()) -> str:
    """A doorbell message (:func:`parse_ring` reads it)."""
    body: dict[str, Any] = {"clients": client_ids}
    if made:
        body["made"] = [dataclasses.astuple(m) for m in made]
    return json.dumps(body)


def parse_ring(data: str | bytes) -> tuple[list[str] | None, list[Made]]:
    """A doorbell message: (client ids or None for everyone, new assignments). Raises
    ValueError, TypeError or AttributeError when it is malformed."""
    body = json.loads(data)
    ids = body.get("clients")
    made = [
        Made(int(a), str(c), int(t), int(r), int(k), str(y), int(n))
        for a, c, t, r, k, y, n in body.get("made", [])
    ]
    return (None if ids is None else [str(i) for i in ids]), made


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
