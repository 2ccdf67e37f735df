"""Fixtures of the CPython ``test_concurrent_futures`` port.

CPython's ``ExecutorMixin`` gives every test a fresh executor with few workers; here
``executor`` is ``celery.executor()`` of the shared direct app (one worker node,
concurrency 2: "few workers"), ``parked`` an executor whose queue no worker consumes
(its futures stay PENDING for as long as a test needs), and ``states`` builds real
futures in each of CPython's six canned states (``util.py``'s ``PENDING_FUTURE`` ...).
"""

from __future__ import annotations

import concurrent.futures
import typing as t
import uuid
from collections.abc import Iterator

import pytest

from tests.stdlib_futures import support
from tests.stdlib_futures.support import RemoteEvent
from tests.stdlib_futures.support import RemoteList

SHORT = 10.0  # seconds: the bound of any wait that normally takes well under one
HANG = 5.0  # seconds: the bound of a shutdown() that returns at once when correct


class Remote:
    """Makes the Redis-backed events and lists of one test; sets every event it
    made at teardown, so no task is left holding a worker slot."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.events: list[RemoteEvent] = []

    def event(self) -> RemoteEvent:
        event = RemoteEvent(self.url)
        self.events.append(event)
        return event

    def list(self) -> RemoteList:
        return RemoteList(self.url)

    def release_all(self) -> None:
        for event in self.events:
            event.set()


@pytest.fixture
def remote(redis_url: str) -> Iterator[Remote]:
    made = Remote(f"{redis_url}/0")  # db 0: used by no app of the harness
    yield made
    made.release_all()


@pytest.fixture
def celery(direct_app: t.Any) -> Iterator[t.Any]:
    """The direct app's extension, inside an app context."""
    from tests.apps import direct

    with direct_app.app_context():
        yield direct.celery


def _close(executor: concurrent.futures.Executor, remote: Remote) -> None:
    # CPython's tearDown: shutdown(wait=True) (cancelling what is still queued)
    remote.release_all()
    executor.shutdown(wait=True, cancel_futures=True)


@pytest.fixture
def executor(celery: t.Any, remote: Remote) -> Iterator[t.Any]:
    made = celery.executor()
    yield made
    _close(made, remote)


@pytest.fixture
def parked(celery: t.Any, remote: Remote) -> Iterator[t.Any]:
    """An executor on a queue no worker consumes: its calls stay queued (PENDING)."""
    made = celery.executor(queue=f"stdlib-parked-{uuid.uuid4().hex[:8]}")
    yield made
    _close(made, remote)


class States:
    """Real futures in CPython's canned states (``util.py``: ``PENDING_FUTURE``,
    ``RUNNING_FUTURE``, ``CANCELLED_FUTURE``, ``CANCELLED_AND_NOTIFIED_FUTURE``,
    ``EXCEPTION_FUTURE``, ``SUCCESSFUL_FUTURE``)."""

    def __init__(self, celery: t.Any, executor: t.Any, parked: t.Any, remote: Remote) -> None:
        self.celery = celery
        self.executor = executor
        self.parked = parked
        self.remote = remote

    def pending(self) -> t.Any:
        return self.parked.submit(support.mul, 1, 2)

    def running(self) -> t.Any:
        started, release = self.remote.event(), self.remote.event()
        future = self.executor.submit(support.hold, started, release, "held")
        assert started.wait(SHORT), "the blocking task did not start"
        support.wait_until(future.running, SHORT, "future.running() of a started task")
        return future

    def cancelled(self) -> t.Any:
        future = self.pending()
        assert future.cancel()
        return future

    def cancelled_and_notified(self) -> t.Any:
        # the stdlib's executors notify a cancelled future when they drop its work
        # item; the nearest public path here is shutdown(cancel_futures=True)
        executor = self.celery.executor(queue=f"stdlib-parked-{uuid.uuid4().hex[:8]}")
        future = executor.submit(support.mul, 1, 2)
        executor.shutdown(wait=False, cancel_futures=True)
        assert future.cancelled()
        return future

    def exception(self) -> t.Any:
        future = self.executor.submit(support.raise_, OSError())
        concurrent.futures.wait([future], timeout=SHORT)
        assert future.done()
        return future

    def successful(self) -> t.Any:
        future = self.executor.submit(support.mul, 6, 7)
        concurrent.futures.wait([future], timeout=SHORT)
        assert future.done()
        return future


@pytest.fixture
def states(celery: t.Any, executor: t.Any, parked: t.Any, remote: Remote) -> States:
    return States(celery, executor, parked, remote)
