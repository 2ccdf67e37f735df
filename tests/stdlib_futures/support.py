"""Support for the port of CPython's ``test_concurrent_futures`` (tests/test_stdlib_*.py).

The functions here are submitted to real Celery workers by reference, so this module
stays importable and light in a worker (no pytest). :class:`RemoteEvent` and
:class:`RemoteList` play the part of the ``multiprocessing.Manager`` events and lists
CPython's tests share with a process pool: they live in the harness Redis, so a
worker can wait on an event the test sets, and the test can read what a worker logged.
"""

from __future__ import annotations

import dataclasses
import threading
import time
import typing as t
import uuid
from collections.abc import Callable

_clients: dict[str, t.Any] = {}
_clients_lock = threading.Lock()
TTL = 300  # seconds a key outlives its test: the harness Redis is shared by the session


def _client(url: str) -> t.Any:
    import redis

    with _clients_lock:
        client = _clients.get(url)
        if client is None:
            client = _clients[url] = redis.Redis.from_url(url)
        return client


@dataclasses.dataclass(frozen=True)
class RemoteEvent:
    """A ``threading.Event`` shared by the test process and the workers."""

    url: str
    key: str = dataclasses.field(default_factory=lambda: f"stdlib:event:{uuid.uuid4()}")

    def set(self) -> None:
        client = _client(self.url)
        with client.pipeline() as pipe:
            pipe.set(self.key, 1, ex=TTL)
            pipe.rpush(self.key + ":wake", 1)
            pipe.expire(self.key + ":wake", TTL)
            pipe.execute()

    def is_set(self) -> bool:
        return bool(_client(self.url).exists(self.key))

    def wait(self, timeout: float = 30.0) -> bool:
        """Block until set (True) or ``timeout`` seconds passed (False)."""
        if self.is_set():
            return True
        client = _client(self.url)
        if client.blpop([self.key + ":wake"], timeout=timeout) is not None:
            client.rpush(self.key + ":wake", 1)  # wake the next waiter too
            return True
        return self.is_set()


@dataclasses.dataclass(frozen=True)
class RemoteList:
    """A list the workers append to and the test reads (a Manager ``list()``)."""

    url: str
    key: str = dataclasses.field(default_factory=lambda: f"stdlib:list:{uuid.uuid4()}")

    def append(self, value: str) -> None:
        client = _client(self.url)
        with client.pipeline() as pipe:
            pipe.rpush(self.key, value)
            pipe.expire(self.key, TTL)
            pipe.execute()

    def items(self) -> list[str]:
        return [v.decode() for v in _client(self.url).lrange(self.key, 0, -1)]


# --- functions the workers run (CPython's module-level helpers, and their kin) ----------
def mul(x: int, y: int) -> int:
    return x * y


def capture(*args: t.Any, **kwargs: t.Any) -> tuple[tuple[t.Any, ...], dict[str, t.Any]]:
    return args, kwargs


class MyObject:
    def my_method(self) -> None:
        pass


def make_dummy_object(_: object) -> MyObject:
    return MyObject()


def wait_for(event: RemoteEvent, timeout: float = 30.0) -> bool:
    """``event.wait`` as a task: holds a worker slot until the test sets ``event``."""
    if not event.wait(timeout):
        raise TimeoutError(f"{event.key} was not set within {timeout} s")
    return True


def pause(event: RemoteEvent | None) -> None:
    """None at once, or once ``event`` is set (``time.sleep`` for a map of pauses)."""
    if event is not None:
        wait_for(event)


def hold(started: RemoteEvent, release: RemoteEvent, value: object = None) -> object:
    """Say it started, then wait for ``release``: keeps a future RUNNING on demand."""
    started.set()
    wait_for(release)
    return value


def wait_and_return(release: RemoteEvent, value: object) -> object:
    wait_for(release)
    return value


def wait_and_raise(release: RemoteEvent, exc: BaseException) -> t.NoReturn:
    wait_for(release)
    raise exc


def sleep_and_raise(seconds: float, exc: BaseException) -> t.NoReturn:
    time.sleep(seconds)
    raise exc


def raise_(exc: BaseException) -> t.NoReturn:
    raise exc


def timeout_on_one(x: int) -> int:
    """CPython main's ``timeout_on_one``: a call whose own exception is TimeoutError."""
    if x == 1:
        raise TimeoutError("from the task")
    return x


def record(log: RemoteList, value: object) -> None:
    log.append(str(value))


def log_n_wait(log: RemoteList, stop: RemoteEvent, ident: str) -> None:
    """CPython test_thread_pool's ``log_n_wait``, logging to Redis."""
    log.append(f"{ident=} started")
    try:
        wait_for(stop)
    finally:
        log.append(f"{ident=} stopped")


class EventfulGCObj:
    """Sets its event when collected (CPython test_process_pool's ``EventfulGCObj``)."""

    def __init__(self, event: RemoteEvent) -> None:
        self.event = event

    def __del__(self) -> None:
        self.event.set()


# --- test-side helpers ---------------------------------------------------------------
def finishes(fn: Callable[[], object], timeout: float) -> bool:
    """Run ``fn()`` in a daemon thread; True if it returned within ``timeout`` seconds
    (its exception, if any, is re-raised). A call that hangs is left behind in its
    thread: the test fails fast instead of hanging until pytest-timeout."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            fn()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True, name="stdlib-bounded")
    thread.start()
    thread.join(timeout)
    if errors:
        raise errors[0]
    return not thread.is_alive()


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    """Poll ``predicate`` (a public Future predicate such as ``running``) until true."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout} s: {what or predicate}")
        time.sleep(0.01)
