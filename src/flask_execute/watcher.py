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
import uuid
import weakref

from celery.backends.redis import RedisBackend
from celery.exceptions import SecurityError
from kombu.exceptions import ContentDisallowed
from kombu.exceptions import SerializationError

from .claims import claim_key
from .envelopes import REPLY_PREFIX
from .outcomes import EXPIRED
from .outcomes import read_state
from .outcomes import UNREADABLE
from .outcomes import unreadable

__all__ = ["Deliver", "Watcher", "make_watcher", "stop_all"]

log = logging.getLogger(__name__)

_WAKE = b"flask-execute:wake"
_SWEEP_EVERY = 5.0
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
    """Who waits on one task id here."""

    __slots__ = ("foreign", "handlers", "held")

    def __init__(self, foreign: bool) -> None:
        self.foreign = foreign
        self.handlers: list[weakref.ref[t.Any]] = []
        self.held: list[t.Any] = []

    def add(self, handler: t.Any) -> None:
        if not any(ref() is handler for ref in self.handlers):
            self.handlers.append(weakref.ref(handler))

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
        self._apply = deliver
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        _watchers.add(self)

    def __len__(self) -> int:
        """How many task ids someone here still waits on."""
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

    def hold(self, task_id: str, handler: t.Any) -> None:
        """Keep ``handler`` alive until its task is final (it has callbacks)."""
        with self._lock:
            entry = self._entries.get(task_id)
            if entry is not None and not any(h is handler for h in entry.held):
                entry.held.append(handler)

    def release(self, task_id: str, handler: t.Any) -> None:
        """``handler`` no longer waits (it was cancelled here)."""
        with self._lock:
            entry = self._entries.get(task_id)
            if entry is None:
                return
            entry.held = [h for h in entry.held if h is not handler]
            entry.handlers = [r for r in entry.handlers if r() not in (None, handler)]
            if not entry.held and not entry.handlers:
                self._drop(task_id)

    def forget(self, task_id: str) -> None:
        """Nobody waits on ``task_id`` any more (its publication failed)."""
        with self._lock:
            self._drop(task_id)

    def pending_ids(self) -> list[str]:
        with self._lock:
            self._prune()
            return list(self._entries)

    def _waits_on(self, task_id: str) -> bool:
        with self._lock:
            return task_id in self._entries

    def _drop(self, task_id: str) -> None:
        """Remove an entry (lock held)."""
        self._entries.pop(task_id, None)

    def _prune(self) -> None:
        """Forget the entries whose handlers are all gone (lock held)."""
        for task_id in [tid for tid, e in self._entries.items() if not e.live()]:
            self._drop(task_id)

    def _deliver(self, task_id: str, meta: dict[str, t.Any]) -> None:
        with self._lock:
            entry = self._entries.get(task_id)
            if entry is None:
                return
            handlers = entry.live()
            if meta.get("status") in _FINAL or not handlers:
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


class RedisWatcher(Watcher):
    """The Redis implementation: one pub/sub connection, one thread."""

    def __init__(self, backend: t.Any, deliver: Deliver, connect_timeout: float = 10.0) -> None:
        super().__init__(deliver)
        self._backend = backend
        self._connect_timeout = connect_timeout
        prefix = backend.task_keyprefix
        self._prefix: bytes = prefix if isinstance(prefix, bytes) else prefix.encode()
        self.reply_channel = f"{REPLY_PREFIX}{uuid.uuid4().hex}"
        self._reply = self.reply_channel.encode()
        self._subscribed = threading.Event()
        self._error: BaseException | None = None
        # foreign result channels: wanted, subscribed (acknowledged), and waited for
        self._channels: set[bytes] = set()
        self._ready: set[bytes] = set()
        self._acked: dict[bytes, threading.Event] = {}

    def _drop(self, task_id: str) -> None:
        entry = self._entries.pop(task_id, None)
        if entry is not None and entry.foreign:
            self._channels.discard(self._prefix + task_id.encode())

    def ensure_running(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            with self._lock:
                if self._thread is None or not self._thread.is_alive():
                    self._subscribed.clear()
                    self._thread = threading.Thread(
                        target=self._run, name="flask-execute-watcher", daemon=True
                    )
                    self._thread.start()
        # Calls published before the subscription exists could finish unseen.
        if not self._subscribed.wait(self._connect_timeout):
            raise ConnectionError(
                "flask-execute could not subscribe to result notifications on the"
                f" result backend: {self._error!r}"
            )

    def _follow(self, task_id: str) -> None:
        channel = self._prefix + task_id.encode()
        with self._lock:
            if task_id not in self._entries:
                return  # final already (fetched): nothing to follow
            self._channels.add(channel)
            if channel in self._ready:
                return
            acked = self._acked.setdefault(channel, threading.Event())
        # wake the thread (blocked reading its connection) with a message of its own
        self._backend.client.publish(self._reply, _WAKE)
        if acked.wait(self._connect_timeout):
            self._fetch([task_id])  # what was stored before the subscription took hold

    def _fetch(self, task_ids: list[str]) -> None:
        """Deliver the stored state of each task id; a task whose claim says it finished
        but whose result is gone gets :data:`EXPIRED`."""
        client = self._backend.client
        for start in range(0, len(task_ids), 250):
            batch = task_ids[start : start + 250]
            keys = [self._prefix + tid.encode() for tid in batch]
            keys += [claim_key(tid).encode() for tid in batch]
            values = client.mget(keys)
            for i, tid in enumerate(batch):
                value, claim = values[i], values[len(batch) + i]
                if value is not None:
                    self._deliver(tid, _read(tid, value))
                elif claim == b"done":
                    self._deliver(tid, EXPIRED)

    def _on_message(self, channel: bytes, data: bytes) -> None:
        """One published state: decoded only if someone here waits on its task."""
        if channel == self._reply:
            if data == _WAKE:
                return
            meta = _read("?", data)
            task_id = meta.get("task_id")
            if isinstance(task_id, str) and self._waits_on(task_id):
                self._deliver(task_id, meta)
            return
        try:
            task_id = channel[len(self._prefix) :].decode()
        except UnicodeDecodeError:
            return  # no task id of ours: ours are text
        if self._waits_on(task_id):
            self._deliver(task_id, _read(task_id, data))

    def _sync_channels(self, pubsub: t.Any, current: set[bytes]) -> None:
        """Subscribe to the foreign channels wanted, unsubscribe from the others."""
        with self._lock:
            wanted = set(self._channels)
        add, remove = wanted - current, current - wanted
        if add:
            pubsub.subscribe(*add)
            current |= add
        if remove:
            pubsub.unsubscribe(*remove)
            current -= remove
            with self._lock:
                self._ready -= remove

    def _run(self) -> None:
        backoff = 0.1
        while not self._stopping.is_set():
            pubsub = None
            current: set[bytes] = set()
            with self._lock:
                self._ready.clear()  # a new connection has no subscription yet
            try:
                pubsub = self._backend.client.pubsub()
                pubsub.subscribe(self._reply)
                # wait for the subscription to be acknowledged before going live
                deadline = time.monotonic() + 10
                while True:
                    ack = pubsub.get_message(timeout=0.5)
                    if ack is not None and ack.get("type") == "subscribe":
                        break
                    if time.monotonic() > deadline:
                        raise TimeoutError("no acknowledgement of the result subscription")
                self._subscribed.set()
                self._sync_channels(pubsub, current)
                if backoff > 0.1:  # reconnected: catch up on what we missed
                    self._fetch(self.pending_ids())
                backoff = 0.1
                last_sweep = time.monotonic()
                while not self._stopping.is_set():
                    message = pubsub.get_message(timeout=1.0)
                    if message is not None:
                        kind = message.get("type")
                        if kind == "message":
                            self._on_message(message["channel"], message["data"])
                        elif kind == "subscribe":
                            with self._lock:
                                self._ready.add(message["channel"])
                                acked = self._acked.pop(message["channel"], None)
                            if acked is not None:
                                acked.set()
                    self._sync_channels(pubsub, current)
                    now = time.monotonic()
                    if now - last_sweep > _SWEEP_EVERY:
                        last_sweep = now
                        pending = self.pending_ids()
                        if pending:
                            self._fetch(pending)
            except Exception as exc:
                self._error = exc
                if self._stopping.is_set():
                    break
                if not self.pending_ids():
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
