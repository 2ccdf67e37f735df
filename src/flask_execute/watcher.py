"""One result watcher per process and result backend drives every pending future.

With the Redis result backend, Celery publishes every state change of a task on the
channel named like its result key. The watcher holds ONE pub/sub connection with ONE
pattern subscription (``<prefix>celery-task-meta-*``), made before the first task is
published, so no state change can be missed and no per-future command is sent; a
message for a task nobody here waits on costs a dictionary lookup. A sweep (one
``MGET`` for everything pending) catches up after reconnects and every few seconds as a
safety net. Other backends get a polling loop with the same interface.

The watcher forgets what nobody holds: futures are referenced weakly, except those
with done-callbacks (which must fire even if the caller dropped the future).
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
import typing as t
import weakref

from celery.backends.redis import RedisBackend
from celery.exceptions import SecurityError
from kombu.exceptions import ContentDisallowed
from kombu.exceptions import SerializationError

from .outcomes import read_state
from .outcomes import UNREADABLE
from .outcomes import unreadable

__all__ = ["Deliver", "Watcher", "make_watcher"]

log = logging.getLogger(__name__)

_SWEEP_EVERY = 5.0
# what a Celery backend raises for a stored state it cannot decode (as opposed to
# not reaching its store): that task's failure alone
_UNDECODABLE = (
    SerializationError,
    ContentDisallowed,
    SecurityError,
    ValueError,
    TypeError,
    LookupError,
    AttributeError,
    ArithmeticError,
    RecursionError,
)


_watchers: weakref.WeakSet[Watcher] = weakref.WeakSet()


@atexit.register
def stop_all() -> None:
    """Stop every result watcher of this process (at exit, and in test harnesses)."""
    # Services (maybe the broker itself) stop at exit; a watcher must not complain.
    for watcher in list(_watchers):
        watcher.stop()


#: What receives a state for a task someone here waits on: ``deliver(task id, meta,
#: handler)``, the handler being whatever was given to :meth:`Watcher.watch` (a future,
#: a map chunk). It must not raise; if it does, the error is logged.
Deliver = t.Callable[[str, dict[str, t.Any], t.Any], None]
Handler = t.Any


class Watcher:
    """Tracks pending task ids and feeds their state changes to their handlers."""

    def __init__(self, deliver: Deliver) -> None:
        self._apply = deliver
        self._lock = threading.Lock()
        self._weak: weakref.WeakValueDictionary[str, Handler] = weakref.WeakValueDictionary()
        self._held: dict[str, Handler] = {}
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        _watchers.add(self)

    def __len__(self) -> int:
        with self._lock:
            return len(self._weak) + len(self._held)

    def watch(self, task_id: str, handler: Handler, *, catch_up: bool = False) -> None:
        """Start delivering ``task_id``'s state changes to ``handler``.

        Call before publishing the task. ``catch_up=True`` also fetches the current
        state at once (for a task that may have finished before we started watching).
        """
        with self._lock:
            self._weak[task_id] = handler
        self.ensure_running()
        if catch_up:
            self._fetch([task_id])

    def hold(self, task_id: str, handler: Handler) -> None:
        """Keep ``handler`` alive until its task is final (it has callbacks)."""
        with self._lock:
            self._held[task_id] = handler

    def forget(self, task_id: str) -> None:
        with self._lock:
            self._weak.pop(task_id, None)
            self._held.pop(task_id, None)

    def _waits_on(self, task_id: str) -> bool:
        with self._lock:
            return task_id in self._held or task_id in self._weak

    def _pending_ids(self) -> list[str]:
        with self._lock:
            return list({*self._weak.keys(), *self._held.keys()})

    def _deliver(self, task_id: str, meta: dict[str, t.Any]) -> None:
        with self._lock:
            handler = self._held.get(task_id) or self._weak.get(task_id)
            if handler is not None and meta.get("status") in ("SUCCESS", "FAILURE", "REVOKED"):
                self._weak.pop(task_id, None)
                self._held.pop(task_id, None)
        if handler is None:
            return
        try:
            self._apply(task_id, meta, handler)
        except Exception:  # a bad meta must not kill the watcher
            log.exception("flask-execute: could not apply the state of task %s", task_id)

    def ensure_running(self) -> None:
        raise NotImplementedError  # pragma: no cover

    def _fetch(self, task_ids: list[str]) -> None:
        raise NotImplementedError  # pragma: no cover

    def stop(self) -> None:
        self._stopping.set()


class RedisWatcher(Watcher):
    """The Redis implementation: one pattern subscription, one thread."""

    def __init__(self, backend: t.Any, deliver: Deliver, connect_timeout: float = 10.0) -> None:
        super().__init__(deliver)
        self._backend = backend
        self._connect_timeout = connect_timeout
        prefix = backend.task_keyprefix
        self._prefix: bytes = prefix if isinstance(prefix, bytes) else prefix.encode()
        self._subscribed = threading.Event()
        self._error: BaseException | None = None

    def ensure_running(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            with self._lock:
                if self._thread is None or not self._thread.is_alive():
                    self._subscribed.clear()
                    self._thread = threading.Thread(
                        target=self._run, name="flask-execute-watcher", daemon=True
                    )
                    self._thread.start()
        # Tasks published before the subscription exists could finish unseen.
        if not self._subscribed.wait(self._connect_timeout):
            raise ConnectionError(
                "flask-execute could not subscribe to result notifications on the"
                f" result backend: {self._error!r}"
            )

    def _fetch(self, task_ids: list[str]) -> None:
        client = self._backend.client
        for start in range(0, len(task_ids), 500):
            batch = task_ids[start : start + 500]
            values = client.mget([self._prefix + tid.encode() for tid in batch])
            for tid, value in zip(batch, values, strict=True):
                if value is not None:
                    self._deliver(tid, _read(tid, value))

    def _on_message(self, channel: bytes, data: bytes) -> None:
        """One published state: decoded only if someone here waits on its task."""
        try:
            task_id = channel[len(self._prefix) :].decode()
        except UnicodeDecodeError:
            return  # no task id of ours: ours are text
        if self._waits_on(task_id):
            self._deliver(task_id, _read(task_id, data))

    def _run(self) -> None:
        backoff = 0.1
        while not self._stopping.is_set():
            pubsub = None
            try:
                pubsub = self._backend.client.pubsub()
                pubsub.psubscribe(self._prefix + b"*")
                # wait for the subscription to be acknowledged before going live
                deadline = time.monotonic() + 10
                while True:
                    ack = pubsub.get_message(timeout=0.5)
                    if ack is not None and ack.get("type") == "psubscribe":
                        break
                    if time.monotonic() > deadline:
                        raise TimeoutError("no acknowledgement of the result subscription")
                self._subscribed.set()
                if backoff > 0.1:  # reconnected: catch up on what we missed
                    self._fetch(self._pending_ids())
                backoff = 0.1
                last_sweep = time.monotonic()
                while not self._stopping.is_set():
                    message = pubsub.get_message(timeout=1.0)
                    if message is not None and message.get("type") == "pmessage":
                        self._on_message(message["channel"], message["data"])
                    now = time.monotonic()
                    if now - last_sweep > _SWEEP_EVERY:
                        last_sweep = now
                        pending = self._pending_ids()
                        if pending:
                            self._fetch(pending)
            except Exception as exc:
                self._error = exc
                if self._stopping.is_set():
                    break
                if not self._pending_ids():
                    # nobody waits: stop quietly; the next watch() starts a new thread
                    self._subscribed.clear()
                    return
                (log.warning if backoff >= 1.0 else log.debug)(
                    "flask-execute: result watcher lost the result backend (%r);"
                    " reconnecting in %.1f s",
                    exc,
                    backoff,
                )
                time.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
            finally:
                if pubsub is not None:
                    try:
                        pubsub.close()
                    except Exception:  # pragma: no cover
                        pass


class PollingWatcher(Watcher):
    """Any other result backend: one thread polls every pending task's state."""

    def __init__(self, backend: t.Any, deliver: Deliver) -> None:
        super().__init__(deliver)
        self._backend = backend
        self._wake = threading.Event()

    def ensure_running(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="flask-execute-watcher", daemon=True
                )
                self._thread.start()
        self._wake.set()

    def _fetch(self, task_ids: list[str]) -> None:
        for tid in task_ids:
            try:
                meta = self._backend.get_task_meta(tid)
            except _UNDECODABLE as exc:  # forged; other errors: the backend is away
                log.warning("flask-execute: unreadable state stored for task %s", tid)
                meta = unreadable(f"{type(exc).__name__} in the result backend")
            if meta.get("status") not in (None, "PENDING") or "result" in meta:
                self._deliver(tid, dict(meta))

    def _run(self) -> None:
        delay = 0.01
        while not self._stopping.is_set():
            pending = self._pending_ids()
            if not pending:
                self._wake.wait(1.0)
                self._wake.clear()
                delay = 0.01
                continue
            try:
                self._fetch(pending)
                delay = min(delay * 1.5, 0.25)
            except Exception as exc:
                log.warning("flask-execute: polling the result backend failed: %r", exc)
                delay = 1.0
            self._wake.wait(delay)
            if self._wake.is_set():
                self._wake.clear()
                delay = 0.01


def _read(task_id: str, data: bytes) -> dict[str, t.Any]:
    meta = read_state(data)
    if UNREADABLE in meta:  # forged: fails that future alone
        log.warning("flask-execute: unreadable state stored for task %s", task_id)
    return meta


def make_watcher(backend: t.Any, deliver: Deliver, connect_timeout: float = 10.0) -> Watcher:
    """The watcher suited to ``backend`` (a Celery result backend instance), handing
    every state it sees for a task someone here waits on to ``deliver``."""
    if isinstance(backend, RedisBackend):
        return RedisWatcher(backend, deliver, connect_timeout)
    return PollingWatcher(backend, deliver)
