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
import datetime
import time
import typing as t
from collections.abc import Callable
from collections.abc import Generator

from .context import eager_run_active
from .context import task_running
from .errors import TaskTimeoutError

__all__ = ["READY", "Chunk", "Future", "FutureLink", "remaining", "seconds"]

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

    def callback_context(self) -> t.ContextManager[object]:
        """The context done-callbacks run in (an app context of the submitting app)."""


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
        self._facts: dict[str, object] | None = None  # made on the first fact: memory
        #: the ``map`` chunk (one message, several calls) this future is a member of
        self.chunk = chunk

    def __repr__(self) -> str:
        # the stdlib's shape (``<Future at 0x... state=finished returned int>``), then
        # Celery's facts
        base = super().__repr__()
        facts = f" task={self._task_id}"
        if self._name:
            facts += f" name={self._name}"
        return f"{base[:-1]}{facts} celery={self._celery_state}>"

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
        """The queue the call was sent to (None for a future of ``celery.get()``)."""
        return self._queue

    def _fact(self, key: str) -> object:
        return None if self._facts is None else self._facts.get(key)

    @property
    def traceback(self) -> str | None:
        """The worker-side traceback of a failed task (text), else None."""
        value = self._fact("traceback")
        return value if isinstance(value, str) and value else None

    @property
    def date_done(self) -> datetime.datetime | None:
        """When the task finished (UTC), as the worker stored it; None until then."""
        value = self._fact("date_done")
        if isinstance(value, str):
            try:
                return datetime.datetime.fromisoformat(value)
            except ValueError:
                return None
        return value if isinstance(value, datetime.datetime) else None

    @property
    def retries(self) -> int:
        """How many times the task was retried (``current_task.retry()``) so far."""
        value = self._fact("retries")
        return value if isinstance(value, int) and not isinstance(value, bool) else 0

    @property
    def worker(self) -> str | None:
        """The node (``name@host``) that ran or runs the task, once it started."""
        value = self._fact("worker")
        return value if isinstance(value, str) else None

    @property
    def args(self) -> str:
        """The call's positional arguments as a label (``<module:qualname>``), never
        their values: what logs, ``inspect`` and Flower show."""
        return f"<{self._name or '?'}>"

    @property
    def kwargs(self) -> str:
        """The call's keyword arguments as a label, never their values."""
        return "{}"

    @property
    def link(self) -> FutureLink | None:
        """The runtime that made this future (None: made by hand)."""
        return self._link

    @property
    def async_result(self) -> t.Any:
        """Celery's ``AsyncResult`` for this task (``None`` without a Celery app)."""
        if self._link is None:
            return None
        return self._link.async_result(self._task_id)

    # --- transitions, driven from outside (the result watcher, eager runs) ---------
    def record(self, meta: t.Mapping[str, object]) -> None:
        """Note Celery's facts in a stored state (when it finished, the traceback,
        which worker started it and at which retry). Never changes the outcome."""
        facts = self._facts if self._facts is not None else {}
        if meta.get("status") == "STARTED":
            info = meta.get("result")
            if isinstance(info, t.Mapping):
                facts["worker"] = info.get("hostname")
                facts["retries"] = info.get("retries", facts.get("retries"))
        for key in ("date_done", "traceback"):
            if meta.get(key) is not None:
                facts[key] = meta[key]
        if facts:
            self._facts = facts

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
    def cancel(
        self, terminate: bool = False, *, wait: bool = False, timeout: float | None = None
    ) -> bool:
        """Cancel the task if it has not started; return True when it will never run.

        With ``terminate=True`` a running task is also stopped (its worker process
        gets SIGTERM). Returns False when the task already finished (or started,
        without ``terminate``). ``wait=True`` (as in Flask-Execute 0.1.6) also waits up
        to ``timeout`` seconds for the task to be final (a terminated task's
        ``REVOKED``).

        A cancelled future counts as done at once for ``concurrent.futures.wait()`` and
        ``as_completed()``: there is no executor thread here to notify them later.
        """
        if not self._cancel(terminate):
            return False
        if wait:
            concurrent.futures.wait([self], timeout)
        return True

    def refuse(self, error: BaseException) -> None:
        """A worker says it refused this call (an unsigned notice, which anyone able to
        publish to the result backend could send): fail with ``error`` if, and only if,
        the call can still be withdrawn, that is it had not started and now never runs.
        Otherwise the notice is ignored. Never gives a value."""
        with self._condition:
            if self._state != _base.PENDING:
                return
        if self._link is None or not self._link.cancel(self, False):
            return
        self.settle("FAILURE", exc=error)

    def _cancel(self, terminate: bool) -> bool:
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
            self._state = _base.CANCELLED_AND_NOTIFIED
            self._celery_state = "REVOKED"
            for waiter in self._waiters:
                waiter.add_cancelled(self)
            self._condition.notify_all()
        self._invoke_callbacks()  # type: ignore[attr-defined]
        return True

    def add_done_callback(self, fn: Callable[[concurrent.futures.Future[T]], object]) -> None:
        """Call ``fn(future)`` once, when the future is done or cancelled (at once if it
        already is), inside an application context of the submitting app (a callback
        may query Flask-SQLAlchemy). Callbacks run in the result watcher's thread; an
        exception in one is logged with the future (and so its task id), as
        ``concurrent.futures`` does."""
        link = self._link
        if link is None:
            super().add_done_callback(fn)
            return

        def in_context(future: concurrent.futures.Future[T]) -> None:
            with link.callback_context():
                fn(future)

        if not self.done():
            link.hold(self)
        super().add_done_callback(in_context)

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
        return self.result_within(timeout, timeout)

    def result_within(self, wait: float | None, timeout: float | None) -> T:
        """``result(wait)``, where ``wait`` is what is left of a longer wait of
        ``timeout`` seconds (``executor.map``'s): a timeout error names ``timeout``,
        the time the caller gave, not what was left of it."""
        self._guard()
        try:
            return super().result(wait)
        except concurrent.futures.TimeoutError:
            if self.done():  # the task's own TimeoutError, not our wait running out
                raise
            raise self.timeout_error(timeout) from None

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """Return the task's exception (None if it succeeded), waiting like ``result``."""
        self._guard()
        try:
            return super().exception(timeout)
        except concurrent.futures.TimeoutError:
            raise self.timeout_error(timeout) from None

    def timeout_error(self, timeout: float | None) -> TaskTimeoutError:
        """The error of a wait of ``timeout`` seconds that ran out: what was seen (state,
        queue) and, when known, why (which workers consume the queue)."""
        where = f" on queue {self._queue!r}" if self._queue else ""
        detail = self._link.describe_wait(self) if self._link is not None else ""
        return TaskTimeoutError(
            f"Task {self._name or ''}[{self._task_id}] not done after {seconds(timeout)}"
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


def seconds(timeout: float | None) -> str:
    """A timeout as the caller gave it: ``0.5 s``, ``10 s``, ``no limit``."""
    return "no limit" if timeout is None else f"{timeout:g} s"


def remaining(deadline: float | None) -> float | None:
    if deadline is None:
        return None
    return max(0.0, deadline - time.monotonic())
