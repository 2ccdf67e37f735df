"""One result watcher per process and app delivers state changes to the futures of
THIS process, and only to them.

With the Redis result backend, a flask-execute worker publishes every state change of
a call twice: on the channel named like its result key (as Celery does), and on the
*reply channel* of the process that submitted it, named inside the signed envelope. The
watcher subscribes to its own reply channel once, before the first call is published,
so nothing of its own calls can be missed and no per-call command is sent; an idle web
process receives nothing of other processes' calls. A call submitted elsewhere
(``celery.get(id)`` of another process's call, or of a call from before a restart) is
followed through its own result channel, subscribed while someone here waits on it.

A sweep (one ``MGET`` of every pending state and claim) catches up after a reconnect and
every few seconds as a safety net; it is also how a call whose result is gone is told
apart from one still queued: its claim says it finished (:data:`EXPIRED`). Other
backends get a polling loop with the same interface.

Any number of handlers (futures, map chunks) may wait on one task id; each gets every
state. Handlers are referenced weakly, except those held because they have
done-callbacks (which must fire even if the caller dropped the future).
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
import typing as t
import weakref

from celery.exceptions import SecurityError
from kombu.exceptions import ContentDisallowed
from kombu.exceptions import SerializationError

from .outcomes import unreadable

__all__ = [
    "SWEEP_EVERY",
    "SWEEP_RATE",
    "Deliver",
    "PollingWatcher",
    "Watcher",
    "stop_all",
    "sweep_interval",
]

log = logging.getLogger(__name__)

#: Seconds between two sweeps (one fetch of every pending state) of a watcher.
SWEEP_EVERY = 5.0
#: At most this many pending states fetched per second by the sweeps, on average: a
#: large ``map`` is swept less often instead of costing more per call.
SWEEP_RATE = 1000.0


def sweep_interval(pending: int, every: float = SWEEP_EVERY) -> float:
    """Seconds until the next sweep, after one that fetched ``pending`` states:
    ``every``, or longer when sweeping that many states that often would fetch more
    than :data:`SWEEP_RATE` per second."""
    return max(every, pending / SWEEP_RATE)


_ORPHAN_TTL = 3600.0
_FINAL = frozenset({"SUCCESS", "FAILURE", "REVOKED"})
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

#: What receives a state for a task someone here waits on: ``deliver(task id, meta,
#: handler)``, the handler being whatever was given to :meth:`Watcher.watch` (a future,
#: a map chunk). It must not raise; if it does, the error is logged.
Deliver = t.Callable[[str, dict[str, t.Any], t.Any], None]

_watchers: weakref.WeakSet[Watcher] = weakref.WeakSet()


@atexit.register
def stop_all() -> None:
    """Stop every result watcher of this process (at exit, and in test harnesses)."""
    # Services (maybe the broker itself) stop at exit; a watcher must not complain.
    for watcher in list(_watchers):
        watcher.stop()


class _Entry:
    """Who waits on one task id here. A call of this process stays tracked until it is
    final even when its futures are gone (the exit wait needs to know it is in
    flight), for at most :data:`_ORPHAN_TTL` seconds."""

    __slots__ = ("created", "foreign", "handlers", "held")

    def __init__(self, foreign: bool) -> None:
        self.foreign = foreign
        self.created = time.monotonic()
        # tuples, not lists: most entries have one handler and nothing held, and a
        # large map keeps one entry per pending call (memory per pending future)
        self.handlers: tuple[weakref.ref[t.Any], ...] = ()
        self.held: tuple[t.Any, ...] = ()

    def orphaned(self, now: float) -> bool:
        """Nobody waits any more, and nothing needs the entry."""
        if self.live():
            return False
        return self.foreign or now - self.created > _ORPHAN_TTL

    def add(self, handler: t.Any) -> None:
        if not any(ref() is handler for ref in self.handlers):
            self.handlers = (*self.handlers, weakref.ref(handler))

    def live(self) -> list[t.Any]:
        """Every handler still alive, held ones included, each once."""
        out = list(self.held)
        for ref in self.handlers:
            handler = ref()
            if handler is not None and not any(h is handler for h in out):
                out.append(handler)
        return out


class Watcher:
    """Tracks the task ids this process waits on and delivers their states."""

    #: the channel the workers publish this process's states on (None: not Redis)
    reply_channel: str | None = None

    def __init__(self, deliver: Deliver) -> None:
        #: seconds between two sweeps
        self.sweep_every = SWEEP_EVERY
        self._apply = deliver
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        _watchers.add(self)

    def __len__(self) -> int:
        """How many task ids are still followed here."""
        with self._lock:
            self._prune()
            return len(self._entries)

    def watch(self, task_id: str, handler: t.Any, *, foreign: bool = False) -> None:
        """Deliver ``task_id``'s states to ``handler`` (with any others already
        waiting on it).

        For a call of this process, call before publishing it. ``foreign=True`` is for a
        task submitted elsewhere (or before a restart): its current state is fetched at
        once, and while it is not final its result channel is followed.
        """
        with self._lock:
            entry = self._entries.get(task_id)
            if entry is None:
                entry = self._entries[task_id] = _Entry(foreign)
            entry.add(handler)
        self.ensure_running()
        if foreign:
            self._fetch([task_id])
            self._follow(task_id)

    def watch_many(self, items: t.Iterable[tuple[str, t.Any]]) -> None:
        """:meth:`watch` of many calls of this process (``(task_id, handler)`` pairs),
        with one lock and one check that the watcher runs: a large ``map``."""
        with self._lock:
            for task_id, handler in items:
                entry = self._entries.get(task_id)
                if entry is None:
                    entry = self._entries[task_id] = _Entry(False)
                entry.add(handler)
        self.ensure_running()

    def hold(self, task_id: str, handler: t.Any) -> None:
        """Keep ``handler`` alive until its task is final (it has callbacks)."""
        with self._lock:
            entry = self._entries.get(task_id)
            if entry is not None and not any(h is handler for h in entry.held):
                entry.held = (*entry.held, handler)

    def release(self, task_id: str, handler: t.Any) -> None:
        """``handler`` no longer waits (it was cancelled here)."""
        with self._lock:
            entry = self._entries.get(task_id)
            if entry is None:
                return
            entry.held = tuple(h for h in entry.held if h is not handler)
            entry.handlers = tuple(r for r in entry.handlers if r() not in (None, handler))
            if not entry.held and not entry.handlers:
                self._drop(task_id)

    def unwatch(self, task_id: str, handler: t.Any) -> None:
        """``handler`` no longer waits (a stream ended). A call of this process stays
        tracked until it is final (the exit wait needs it); a foreign task is forgotten
        once nobody else here waits on it."""
        with self._lock:
            entry = self._entries.get(task_id)
            if entry is None:
                return
            entry.held = tuple(h for h in entry.held if h is not handler)
            entry.handlers = tuple(r for r in entry.handlers if r() not in (None, handler))
            if entry.foreign and not entry.live():
                self._drop(task_id)

    def forget(self, task_id: str) -> None:
        """Nobody waits on ``task_id`` any more (its publication failed)."""
        with self._lock:
            self._drop(task_id)

    def pending_ids(self) -> list[str]:
        """Every task id still followed here."""
        with self._lock:
            self._prune()
            return list(self._entries)

    def has_waiters(self) -> bool:
        """Does any future here still wait (as opposed to calls followed only for the
        exit wait)?"""
        with self._lock:
            return self._waiting()

    def _waiting(self) -> bool:
        """:meth:`has_waiters`, with the lock held."""
        return any(entry.live() for entry in self._entries.values())

    def in_flight(self) -> list[str]:
        """The calls this process submitted that are not final yet (whether or not
        anyone still holds their futures)."""
        with self._lock:
            self._prune()
            return [tid for tid, entry in self._entries.items() if not entry.foreign]

    def _waits_on(self, task_id: str) -> bool:
        with self._lock:
            return task_id in self._entries

    def _drop(self, task_id: str) -> None:
        """Remove an entry (lock held)."""
        self._entries.pop(task_id, None)

    def _prune(self) -> None:
        """Forget the entries nobody needs any more (lock held)."""
        now = time.monotonic()
        for task_id in [tid for tid, e in self._entries.items() if e.orphaned(now)]:
            self._drop(task_id)

    def _deliver(self, task_id: str, meta: dict[str, t.Any]) -> None:
        with self._lock:
            entry = self._entries.get(task_id)
            if entry is None:
                return
            handlers = entry.live()
            if meta.get("status") in _FINAL:
                self._drop(task_id)
        for handler in handlers:
            try:
                self._apply(task_id, meta, handler)
            except Exception:  # a bad meta must not kill the watcher
                log.exception("flask-execute: could not apply the state of task %s", task_id)

    def _follow(self, task_id: str) -> None:
        """Follow a foreign task's result channel while it is pending (backends that
        push states)."""

    def ensure_running(self) -> None:
        raise NotImplementedError  # pragma: no cover

    def _fetch(self, task_ids: list[str]) -> None:
        raise NotImplementedError  # pragma: no cover

    def stop(self) -> None:
        self._stopping.set()


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
            pending = self.pending_ids()
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
