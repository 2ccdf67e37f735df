"""``FuturePool``: the futures of one ``map`` call, with pool-wide verbs."""

from __future__ import annotations

import concurrent.futures
import threading
import time
import typing as t
from collections.abc import Callable
from collections.abc import Iterator

from .errors import TaskTimeoutError
from .futures import Future
from .futures import remaining
from .futures import seconds
from .progress import progress as show_progress

__all__ = ["FuturePool"]

T = t.TypeVar("T")


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
        return f"<FuturePool {done}/{len(self.futures)} done state={self.state}>"

    @property
    def state(self) -> str:
        """One Celery state for the pool, as Flask-Execute 0.1.6 summarised it: the
        first of PENDING, STARTED (any running member, custom states included), RETRY,
        REVOKED, FAILURE that a member is in, else SUCCESS."""
        states = {f.state for f in self.futures}
        if "PENDING" in states:
            return "PENDING"
        if any(f.running() for f in self.futures):
            return "STARTED"
        for name in ("RETRY", "REVOKED", "FAILURE"):
            if name in states:
                return name
        return "SUCCESS"

    status = state

    def add(self, future: Future[T]) -> None:
        """Add ``future`` to the pool (as Flask-Execute 0.1.6 allowed)."""
        if not isinstance(future, Future):
            raise TypeError(f"A FuturePool holds flask-execute Futures; got {future!r}.")
        self.futures.append(future)

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
            try:
                show_progress(self.futures, timeout)
            except concurrent.futures.TimeoutError:
                pass  # the loop below raises the precise error
        results = []
        for future in self.futures:
            try:
                results.append(future.result(remaining(deadline)))
            except TaskTimeoutError:
                raise self.timeout_error(timeout) from None
        return results

    def timeout_error(self, timeout: float | None) -> TaskTimeoutError:
        """What did not finish within the pool's whole ``timeout``."""
        pending = [f for f in self.futures if not f.done()]
        first = pending[0].timeout_error(timeout) if pending else None
        detail = f" The first: {first}" if first is not None else ""
        return TaskTimeoutError(
            f"{len(pending)} of {len(self.futures)} calls not done after"
            f" {seconds(timeout)}.{detail}"
        )

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """The first member exception in submission order, or None."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for f in self.futures:
            if f.cancelled():
                continue
            try:
                exc = f.exception(remaining(deadline))
            except TaskTimeoutError:
                raise self.timeout_error(timeout) from None
            if exc is not None:
                return exc
        return None

    def cancel(
        self, terminate: bool = False, *, wait: bool = False, timeout: float | None = None
    ) -> bool:
        """Cancel every member that can be; True if at least one was cancelled.

        ``terminate=True`` also stops the running ones. ``wait=True`` (as in
        Flask-Execute 0.1.6) then waits up to ``timeout`` seconds in all for every
        member to be final."""
        cancelled = any([f.cancel(terminate) for f in self.futures])
        if wait:
            concurrent.futures.wait(self.futures, timeout)
        return cancelled

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
