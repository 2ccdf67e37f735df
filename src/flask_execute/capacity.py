"""How many calls the workers of a queue run at once, and the chunk size ``map`` picks
from it when it is given none.

Every worker advertises, in the result backend's Redis, how many processes it has and
which queues it consumes: one hash per queue (``flask-execute:capacity:<queue>``), one
field per worker, ``"<concurrency> <expiry>"``, renewed every :data:`ADVERTISE_EVERY`
seconds by a worker bootstep (:class:`Advertise`) and removed when the worker stops. A
caller reads the hash of its queue (one round trip, remembered for
:data:`REMEMBER_FOR` seconds) and adds up the entries that have not expired.

What a worker advertises is not signed: someone with write access to Redis can make
``map`` choose other chunk sizes (always between 1 and :data:`MAX_CHUNKSIZE`), which
changes how fast a map runs, never what runs or what it returns.
"""

from __future__ import annotations

import os
import threading
import time
import typing as t

from celery import bootsteps

__all__ = [
    "ADVERTISE_EVERY",
    "CHUNKS_PER_PROCESS",
    "MAX_CHUNKSIZE",
    "Advertise",
    "Capacity",
    "auto_chunksize",
    "capacity_key",
]

#: a worker renews its record this often (seconds) ...
ADVERTISE_EVERY = 15.0
#: ... and a record not renewed for this long is ignored
RECORD_TTL = 60.0
#: a caller asks again after this many seconds
REMEMBER_FOR = 10.0
#: the largest chunk ``map`` makes by itself
MAX_CHUNKSIZE = 100
#: ``map`` aims for at least this many chunks per worker process
CHUNKS_PER_PROCESS = 4


def capacity_key(queue: str) -> str:
    """The Redis hash of the workers consuming ``queue``."""
    return f"flask-execute:capacity:{queue}"


def auto_chunksize(calls: int, concurrency: int) -> int:
    """The chunk size of a ``map`` of ``calls`` calls on workers that run
    ``concurrency`` calls at once, when the caller gave none.

    Enough chunks that every worker process gets :data:`CHUNKS_PER_PROCESS` of them
    (the load stays balanced, and the last chunk to finish is short), at most
    :data:`MAX_CHUNKSIZE` calls each (beyond that, a message saves nothing more):
    ``max(1, min(100, calls // (4 * concurrency)))``. A map of fewer than
    ``8 * concurrency`` calls sends one message per call, as ``submit`` does.
    """
    return max(1, min(MAX_CHUNKSIZE, calls // (CHUNKS_PER_PROCESS * max(1, concurrency))))


class Capacity:
    """The caller's view of the workers' advertised concurrency, per queue.

    ``backend`` gives the Celery app's result backend. When it is not Redis, and when
    no worker advertised yet, the concurrency is this host's CPU count (what
    ``celery worker`` starts by default).
    """

    def __init__(self, backend: t.Callable[[], t.Any]) -> None:
        self._backend = backend
        self._lock = threading.Lock()
        self._known: dict[str, tuple[float, int]] = {}  # queue: (asked at, concurrency)

    def concurrency(self, queue: str) -> int:
        """How many calls the live workers of ``queue`` run at once (at least 1)."""
        now = time.monotonic()
        with self._lock:
            known = self._known.get(queue)
            if known is not None and now - known[0] < REMEMBER_FOR:
                return known[1]
        found = self._read(queue) or os.cpu_count() or 1
        with self._lock:
            self._known[queue] = (now, found)
        return found

    def chunksize(self, calls: int, queue: str) -> int:
        """:func:`auto_chunksize` for ``calls`` calls on ``queue``'s workers."""
        if calls < 2 * CHUNKS_PER_PROCESS:
            return 1  # no concurrency makes a chunk of these: do not ask
        return auto_chunksize(calls, self.concurrency(queue))

    def _read(self, queue: str) -> int:
        client = redis_of(self._backend())
        if client is None:
            return 0
        try:
            records = client.hgetall(capacity_key(queue))
        except Exception:  # a guess is fine: publishing reports an outage
            return 0
        return total(records, time.time())


def total(records: t.Mapping[t.Any, t.Any], now: float) -> int:
    """The sum of the unexpired ``"<concurrency> <expiry>"`` records; malformed ones
    count for nothing."""
    found = 0
    for value in records.values():
        try:
            text = value.decode() if isinstance(value, bytes) else str(value)
            concurrency, expiry = text.split()
            if float(expiry) > now:
                found += max(0, min(int(concurrency), 10_000))
        except (ValueError, UnicodeDecodeError):
            continue
    return found


class Advertise(bootsteps.StartStopStep):  # type: ignore[misc]
    """Worker bootstep: keep this worker's record in the hash of every queue it
    consumes (needs a Redis result backend; does nothing otherwise)."""

    requires = ("celery.worker.components:Timer", "celery.worker.components:Pool")

    def __init__(self, worker: t.Any, **kwargs: t.Any) -> None:
        super().__init__(worker, **kwargs)
        self._timer: t.Any = None
        self._queues: list[str] = []

    def start(self, worker: t.Any) -> None:
        self._advertise(worker)
        self._timer = worker.timer.call_repeatedly(ADVERTISE_EVERY, self._advertise, (worker,))

    def stop(self, worker: t.Any) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        client = redis_of(worker.app.backend)
        if client is None or not self._queues:
            return
        try:
            with client.pipeline() as pipe:
                for queue in self._queues:
                    pipe.hdel(capacity_key(queue), worker.hostname)
                pipe.execute()
        except Exception:  # stopping anyway; the record expires by itself
            pass

    def _advertise(self, worker: t.Any) -> None:
        client = redis_of(worker.app.backend)
        if client is None:
            return
        queues = sorted(worker.app.amqp.queues.consume_from or worker.app.amqp.queues)
        record = f"{int(worker.concurrency or 1)} {time.time() + RECORD_TTL:.0f}"
        try:
            with client.pipeline() as pipe:
                for queue in set(self._queues) - set(queues):  # no longer consumed
                    pipe.hdel(capacity_key(queue), worker.hostname)
                for queue in queues:
                    pipe.hset(capacity_key(queue), worker.hostname, record)
                    pipe.expire(capacity_key(queue), int(2 * RECORD_TTL))
                pipe.execute()
            self._queues = queues
        except Exception:  # the backend is down: the next beat tries again
            pass


def redis_of(backend: t.Any) -> t.Any:
    """The Redis client of a Celery result backend, or ``None`` if it has none."""
    client = getattr(backend, "client", None)
    return client if hasattr(client, "hgetall") else None
