"""``Future`` and ``FuturePool``: Celery tasks behind the ``concurrent.futures`` API.

A :class:`Future` IS a :class:`concurrent.futures.Future`, with exactly its
semantics: ``running()`` is true only while a worker executes the task (Celery's
``STARTED`` or a custom state such as ``PROGRESS``), ``done()`` once it succeeded,
failed or was cancelled, ``cancel()`` succeeds only before the task started (and then
it never runs), callbacks run exactly once. One result watcher per process
(:mod:`flask_execute.watcher`) moves every pending future forward; no future polls.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import concurrent.futures._base as _base
import time
import typing as t
from collections.abc import Callable
from collections.abc import Generator
from collections.abc import Iterator

from .context import eager_run_active
from .context import task_running
from .errors import TaskTimeoutError

__all__ = ["READY", "Chunk", "Future", "FutureLink", "FuturePool"]

T = t.TypeVar("T")

# Celery states that mean "a worker is executing it" are STARTED and any custom state
# a task reports through update_state (PROGRESS, ...); these mean "not yet":
_NOT_STARTED = frozenset({"PENDING", "RECEIVED", "RETRY", "REJECTED"})
READY = frozenset({"SUCCESS", "FAILURE", "REVOKED"})


class FutureLink(t.Protocol):
    """What a :class:`Future` asks of the runtime that made it; nothing else of it."""

    def cancel(self, future: Future[t.Any], terminate: bool) -> bool:
        """Stop the task from running (or, with ``terminate``, stop it): True when it
        will never run."""

    def hold(self, future: Future[t.Any]) -> None:
        """Keep delivering the task's states to ``future`` even when nobody else
        references it (it has done-callbacks)."""

    def describe_wait(self, future: Future[t.Any]) -> str:
        """Why the task is not done yet, for a timeout error ('' when unknown)."""

    def async_result(self, task_id: str) -> t.Any:
        """Celery's ``AsyncResult`` for ``task_id``."""


class Future(concurrent.futures.Future[T]):
    """The outcome of one submitted call, as a :class:`concurrent.futures.Future`.

    ``id``, ``name``, ``state`` (= ``status``) and ``info`` are Celery's facts about
    the task; ``state`` follows the task live (``PENDING`` → ``STARTED`` →
    ``PROGRESS`` … → ``SUCCESS``/``FAILURE``/``REVOKED``).
    """

    def __init__(
        self,
        task_id: str,
        link: FutureLink | None = None,
        *,
        name: str | None = None,
        queue: str | None = None,
        chunk: Chunk | None = None,
    ) -> None:
        super().__init__()
        self._task_id = task_id
        self._link = link
        self._name = name
        self._queue = queue
        self._celery_state = "PENDING"
        self._info: object = None
        #: the ``map`` chunk (one message, several calls) this future is a member of
        self.chunk = chunk

    def __repr__(self) -> str:
        return f"<Future {self._name or ''}[{self._task_id}] {self._celery_state}>"

    # --- Celery facts -----------------------------------------------------------
    @property
    def id(self) -> str:
        """The Celery task id (``celery.get(future.id)`` finds it again)."""
        return self._task_id

    @property
    def name(self) -> str | None:
        """``module:qualname`` of the submitted function (None when unknown)."""
        return self._name

    @property
    def state(self) -> str:
        """Celery's state of the task, kept current by the result watcher."""
        return self._celery_state

    status = state

    @property
    def info(self) -> object:
        """The ``meta`` of the latest custom state (progress), or the result/exception."""
        if self.done() and not self.cancelled():
            exc = self.exception(0)
            return exc if exc is not None else self.result(0)
        return self._info

    @property
    def queue(self) -> str | None:
        """The queue the call was sent to, when given (None: the default queue)."""
        return self._queue

    @property
    def async_result(self) -> t.Any:
        """Celery's ``AsyncResult`` for this task (``None`` without a Celery app)."""
        if self._link is None:
            return None
        return self._link.async_result(self._task_id)

    # --- transitions, driven from outside (the result watcher, eager runs) ---------
    def set_progress(self, state: str, info: object = None) -> None:
        """A non-final Celery state arrived (STARTED, PROGRESS, RETRY, ...): follow it.
        Ignored once the future is done."""
        with self._condition:
            if self._state in (_base.FINISHED, _base.CANCELLED, _base.CANCELLED_AND_NOTIFIED):
                return
            self._celery_state = state
            if state != "STARTED":  # STARTED's meta is Celery's (pid, hostname)
                self._info = info
            if state not in _NOT_STARTED and self._state == _base.PENDING:
                self._state = _base.RUNNING
            # no notify: the stdlib's waiters wake only for a final state

    def settle(self, state: str, value: object = None, exc: BaseException | None = None) -> None:
        """A final Celery state arrived (``SUCCESS`` with ``value``, ``FAILURE`` with
        ``exc``, ``REVOKED``): resolve the future. Only the first call counts."""
        with self._condition:
            if self._state in (_base.FINISHED, _base.CANCELLED, _base.CANCELLED_AND_NOTIFIED):
                return
            self._celery_state = state
            if state == "REVOKED":
                self._state = _base.CANCELLED_AND_NOTIFIED
                for waiter in self._waiters:
                    waiter.add_cancelled(self)
                self._condition.notify_all()
            else:
                # let set_result/set_exception do the stdlib bookkeeping
                self._state = _base.RUNNING if self._state == _base.PENDING else self._state
        if state == "REVOKED":
            self._invoke_callbacks()  # type: ignore[attr-defined]
        elif exc is not None:
            self.set_exception(exc)
        else:
            self.set_result(t.cast(T, value))

    # --- the concurrent.futures API ----------------------------------------------
    def cancel(self, terminate: bool = False) -> bool:
        """Cancel the task if it has not started; return True when it will never run.

        With ``terminate=True`` a running task is also stopped (its worker process
        gets SIGTERM). Returns False when the task already finished (or started,
        without ``terminate``).
        """
        with self._condition:
            if self._state == _base.FINISHED:
                return False
            if self._state in (_base.CANCELLED, _base.CANCELLED_AND_NOTIFIED):
                return True
            if self._state == _base.RUNNING and not terminate:
                return False
        if self._link is not None and not self._link.cancel(self, terminate):
            return False
        with self._condition:
            if self._state == _base.FINISHED:
                return False
            if self._state in (_base.CANCELLED, _base.CANCELLED_AND_NOTIFIED):
                return True
            self._state = _base.CANCELLED
            self._celery_state = "REVOKED"
            self._condition.notify_all()
        self._invoke_callbacks()  # type: ignore[attr-defined]
        return True

    def add_done_callback(self, fn: Callable[[concurrent.futures.Future[T]], object]) -> None:
        """Call ``fn(future)`` once, when the future is done or cancelled (at once if it
        already is). Callbacks run in the result watcher's thread."""
        if self._link is not None and not self.done():
            self._link.hold(self)
        super().add_done_callback(fn)

    def _guard(self) -> None:
        if not self.done() and task_running() and not eager_run_active():
            raise RuntimeError(
                "Waiting for a Future inside a task would block a worker slot (and can"
                " deadlock the pool). Return the future's id, use a callback, or"
                " submit the follow-up work from the caller instead."
            )

    def result(self, timeout: float | None = None) -> T:
        """Return the task's return value, waiting up to ``timeout`` seconds.

        :raises: the task's own exception (its ``__cause__`` carries the worker
            traceback); :class:`concurrent.futures.CancelledError` when cancelled;
            :class:`~flask_execute.TaskTimeoutError` (a ``TimeoutError``) on timeout.
        """
        self._guard()
        try:
            return super().result(timeout)
        except concurrent.futures.TimeoutError as exc:
            if isinstance(exc, TaskTimeoutError):
                raise
            raise self._timeout_error(timeout) from None

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """Return the task's exception (None if it succeeded), waiting like ``result``."""
        self._guard()
        try:
            return super().exception(timeout)
        except concurrent.futures.TimeoutError as exc:
            if isinstance(exc, TaskTimeoutError):
                raise
            raise self._timeout_error(timeout) from None

    def _timeout_error(self, timeout: float | None) -> TaskTimeoutError:
        where = f" on queue {self._queue!r}" if self._queue else ""
        detail = self._link.describe_wait(self) if self._link is not None else ""
        return TaskTimeoutError(
            f"Task {self._name or ''}[{self._task_id}] not done after {timeout} s"
            f" (state {self._celery_state}{where}).{detail}"
        )

    def __await__(self) -> Generator[t.Any, None, T]:
        return asyncio.wrap_future(self).__await__()


class Chunk:
    """One Celery task carrying several calls of a ``map`` (``chunksize=``): its task
    id and the futures of its calls, in order."""

    def __init__(self, task_id: str) -> None:
        self.task_id = task_id
        self.members: list[Future[t.Any]] = []


class FuturePool(t.Generic[T]):
    """The futures of one ``map`` call, in submission order, with pool-wide verbs.

    ``len(pool)``, ``pool[i]`` and iteration give the member futures.
    ``result(timeout)`` waits for all of them under ONE deadline and returns their
    results in order.
    """

    def __init__(self, futures: list[Future[T]]) -> None:
        self.futures = futures

    def __repr__(self) -> str:
        done = sum(f.done() for f in self.futures)
        return f"<FuturePool {done}/{len(self.futures)} done>"

    def __len__(self) -> int:
        return len(self.futures)

    def __iter__(self) -> Iterator[Future[T]]:
        return iter(self.futures)

    @t.overload
    def __getitem__(self, index: int) -> Future[T]: ...
    @t.overload
    def __getitem__(self, index: slice) -> list[Future[T]]: ...
    def __getitem__(self, index: int | slice) -> Future[T] | list[Future[T]]:
        return self.futures[index]

    def result(self, timeout: float | None = None, *, progress: bool = False) -> list[T]:
        """All results in submission order; raises the first failure met (in order).

        ``progress=True`` shows a progress bar (tqdm when installed) while waiting.

        :raises TaskTimeoutError: when not everything finished within ``timeout``
            seconds in total.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        if progress:
            from .progress import progress as show

            try:
                show(self.futures, timeout)
            except concurrent.futures.TimeoutError:
                pass  # the loop below raises the precise error
        return [f.result(_remaining(deadline)) for f in self.futures]

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """The first member exception in submission order, or None."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for f in self.futures:
            if f.cancelled():
                continue
            exc = f.exception(_remaining(deadline))
            if exc is not None:
                return exc
        return None

    def cancel(self, terminate: bool = False) -> bool:
        """Cancel every member that can be; True if at least one was cancelled."""
        return any([f.cancel(terminate) for f in self.futures])

    def cancelled(self) -> bool:
        """True if any member was cancelled."""
        return any(f.cancelled() for f in self.futures)

    def running(self) -> bool:
        """True if any member is executing right now."""
        return any(f.running() for f in self.futures)

    def done(self) -> bool:
        """True once every member is done."""
        return all(f.done() for f in self.futures)

    def as_completed(self, timeout: float | None = None) -> Iterator[Future[T]]:
        """Yield members as they finish (``concurrent.futures.as_completed``)."""
        return t.cast(Iterator[Future[T]], concurrent.futures.as_completed(self.futures, timeout))

    def add_done_callback(self, fn: Callable[[FuturePool[T]], object]) -> None:
        """Call ``fn(pool)`` once, when every member is done (at once if they are)."""
        import threading

        lock = threading.Lock()
        remaining = [len(self.futures)]

        def member_done(_: object) -> None:
            with lock:
                remaining[0] -= 1
                last = remaining[0] == 0
            if last:
                fn(self)

        if not self.futures:
            fn(self)
            return
        for f in self.futures:
            f.add_done_callback(member_done)


def _remaining(deadline: float | None) -> float | None:
    if deadline is None:
        return None
    return max(0.0, deadline - time.monotonic())
