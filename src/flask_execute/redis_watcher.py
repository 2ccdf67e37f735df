"""The result watcher for the Redis result backend: one pub/sub connection, one
thread, the process's reply channel, and the result channels of foreign calls while
someone here waits on them (see :mod:`flask_execute.watcher`)."""

from __future__ import annotations

import logging
import threading
import time
import typing as t
import uuid

from .claims import claim_key
from .envelopes import REPLY_PREFIX
from .outcomes import EXPIRED
from .outcomes import read_replies
from .outcomes import read_state
from .outcomes import UNREADABLE
from .watcher import Deliver
from .watcher import sweep_interval
from .watcher import Watcher

__all__ = ["RedisWatcher"]

log = logging.getLogger(__name__)

_WAKE = b"flask-execute:wake"


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
        self._entries.pop(task_id, None)
        self._channels.discard(self._prefix + task_id.encode())

    def ensure_running(self) -> None:
        """Return once the thread is subscribed; start it if it is not running (or
        has decided to stop: :meth:`_stop_if_idle`).

        :raises ConnectionError: not subscribed within the connect timeout.
        """
        deadline = time.monotonic() + self._connect_timeout
        while True:
            with self._lock:
                if self._thread is None or not self._thread.is_alive():
                    self._subscribed.clear()
                    self._thread = threading.Thread(
                        target=self._run, name="flask-execute-watcher", daemon=True
                    )
                    self._thread.start()
            # Calls published before the subscription exists could finish unseen.
            left = deadline - time.monotonic()
            if self._subscribed.wait(max(0.0, min(left, 0.2))):
                return
            if left <= 0:
                raise ConnectionError(
                    "flask-execute could not subscribe to result notifications on the"
                    f" result backend: {self._error!r}"
                ) from self._error

    def _stop_if_idle(self) -> bool:
        """After losing the connection: stop, when no future waits. Decided under the
        lock with which :meth:`watch` adds a waiter (and :meth:`ensure_running` looks
        at the thread), so that a waiter added meanwhile is either seen here or starts
        a new thread."""
        with self._lock:
            if self._waiting():
                return False
            self._thread = None
            return True

    def _follow(self, task_id: str) -> None:
        channel = self._prefix + task_id.encode()
        with self._lock:
            entry = self._entries.get(task_id)
            if entry is None:
                return  # final already (fetched): nothing to follow
            if not entry.foreign:
                return  # a call of this process: its states come on the reply channel
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
            for meta in read_replies(data):
                if self._waits_on(meta["task_id"]):
                    self._deliver(meta["task_id"], meta)
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
                wait = self.sweep_every
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
                    if now - last_sweep > wait:
                        last_sweep = now
                        pending = self.pending_ids()
                        if pending:
                            self._fetch(pending)
                        wait = sweep_interval(len(pending), self.sweep_every)
            except Exception as exc:
                self._error = exc
                self._subscribed.clear()  # until subscribed again
                if self._stopping.is_set():
                    break
                if self._stop_if_idle():
                    return  # nobody waits: the next watch() starts a new thread
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


def _read(task_id: str, data: bytes) -> dict[str, t.Any]:
    meta = read_state(data)
    if UNREADABLE in meta:  # forged: fails that future alone
        log.warning("flask-execute: unreadable state stored for task %s", task_id)
    return meta
