"""``celery.executor()``: a :class:`concurrent.futures.Executor` running on Celery.

Code written for ``ProcessPoolExecutor`` runs on Celery workers by changing the line
that creates the executor. The semantics are the stdlib's exactly: ``submit(fn, *args,
**kwargs)`` passes every keyword to ``fn`` (Celery options are given once, to
``celery.executor(queue=...)``); ``map(fn, *iterables, timeout=None, chunksize=None)``
zips its iterables, submits everything at once and yields results lazily, in order,
under one overall ``timeout``; ``shutdown(wait=True, cancel_futures=False)``; a
``with`` block shuts down on exit.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
import typing as t
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Iterator

from .client import Client
from .futures import Future

__all__ = ["CeleryExecutor"]

P = t.ParamSpec("P")
R = t.TypeVar("R")


class CeleryExecutor(concurrent.futures.Executor):
    """An executor whose workers are Celery workers of one Flask app."""

    def __init__(self, client: Client, **options: t.Any) -> None:
        """``client``: the caller side of the app whose workers run the calls;
        ``options``: Celery options for every call (``queue=``, ...)."""
        self._client = client
        self._options = options
        self._lock = threading.Lock()
        self._shutdown = False
        self._pending: set[Future[t.Any]] = set()

    def _track(self, future: Future[t.Any]) -> None:
        with self._lock:
            self._pending.add(future)
        future.add_done_callback(self._untrack)

    def _untrack(self, future: concurrent.futures.Future[t.Any]) -> None:
        with self._lock:
            self._pending.discard(t.cast(Future[t.Any], future))

    def _check_open(self) -> None:
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")

    def submit(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> Future[R]:
        """Schedule ``fn(*args, **kwargs)``; every keyword goes to ``fn``.

        :raises RuntimeError: after :meth:`shutdown`.
        """
        with self._lock:
            self._check_open()
        future = self._client.apply(fn, args, kwargs, dict(self._options))
        self._track(future)
        return future

    def map(
        self,
        fn: Callable[..., R],
        *iterables: Iterable[t.Any],
        timeout: float | None = None,
        chunksize: int | None = None,
    ) -> Iterator[R]:
        """``map(fn, *iterables)`` like the stdlib's: ``fn(a[0], b[0])``,
        ``fn(a[1], b[1])``, ... (stops at the shortest iterable). Everything is submitted
        now; the returned iterator yields results in order and raises
        ``TimeoutError`` if a result is not ready ``timeout`` seconds after this call.
        ``chunksize`` sends that many calls per message (each still resolves on its
        own); ``None`` lets :meth:`flask_execute.Celery.map`'s rule choose, and ``1``
        sends one message per call.
        """
        if chunksize is not None and (not isinstance(chunksize, int) or chunksize < 1):
            raise ValueError(f"chunksize must be a positive integer; got {chunksize!r}.")
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            self._check_open()
        calls = list(zip(*iterables, strict=False))
        pool = self._client.map_apply(fn, calls, None, chunksize, dict(self._options))
        for future in pool:
            self._track(future)
        futures = list(pool)

        def results() -> Iterator[R]:
            # as the stdlib's: pop each future before waiting on it, hold no
            # reference across a yield, and cancel what is left (the one timed out
            # on included) when the caller stops iterating or the time runs out
            try:
                futures.reverse()
                while futures:
                    if deadline is None:
                        yield _result_or_cancel(futures.pop())
                    else:
                        left = deadline - time.monotonic()
                        yield _result_or_cancel(futures.pop(), left, timeout)
            finally:
                for future in futures:
                    future.cancel()

        return results()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Refuse new work; with ``cancel_futures`` cancel what has not started; with
        ``wait`` block until every submitted future is done."""
        with self._lock:
            self._shutdown = True
            pending = list(self._pending)
        if cancel_futures:
            for future in pending:
                future.cancel()
        if wait:
            concurrent.futures.wait(pending)


def _result_or_cancel(
    future: Future[R], left: float | None = None, timeout: float | None = None
) -> R:
    """``future.result(left)``, cancelling the call if it did not finish in time
    (CPython's ``concurrent.futures._base._result_or_cancel``); a timeout error names
    ``timeout``, the whole wait the caller gave ``map``."""
    try:
        try:
            return future.result_within(None if left is None else max(0.0, left), timeout)
        finally:
            future.cancel()
    finally:
        del future  # no reference cycle through a stored exception
