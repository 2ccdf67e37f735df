"""Port of CPython 3.13.0 ``Lib/test/test_concurrent_futures/test_future.py``
(``FutureTests``) to ``flask_execute.Future`` on real workers.

CPython builds its futures by hand (``Future()``, ``create_future(state=...)``) and
completes them with ``set_result``; here every future is a real task of
``celery.executor()`` brought into that state (``conftest.States``): PENDING is a call
queued where no worker consumes, RUNNING a task holding a worker slot until released,
CANCELLED/CANCELLED_AND_NOTIFIED a queued call cancelled by ``cancel()`` /
``shutdown(cancel_futures=True)``, FINISHED a task that returned 42 or raised OSError.
Assertions on the private ``_state`` become the public predicate of that state
(``cancelled()``, ``running()``, ``done()``), so the port does not pin our internals.

All of CPython 3.13.0's Future tests apply.
"""

from __future__ import annotations

import concurrent.futures
import logging
import re
import threading
from concurrent.futures import CancelledError
from concurrent.futures import InvalidStateError

import pytest

from tests.stdlib_futures import support
from tests.stdlib_futures.conftest import SHORT


def _repr(state: str) -> str:
    # the stdlib's shape, with room for fields after it (a task id, a name)
    return rf"<Future at 0x[0-9a-f]+ state={state}[ >]"


def _completed_with_callback(executor, remote, fn, value=None, exc=None):
    """Submit a task that finishes only once released, add ``fn`` while it is still
    pending, release it; return the future and an Event set after ``fn`` ran."""
    release = remote.event()
    if exc is None:
        future = executor.submit(support.wait_and_return, release, value)
    else:
        future = executor.submit(support.wait_and_raise, release, exc)
    called = threading.Event()

    def callback(f):
        try:
            fn(f)
        finally:
            called.set()

    future.add_done_callback(callback)
    assert not future.done()
    release.set()
    return future, called


# CPython test_future.py: FutureTests.test_done_callback_with_result
def test_done_callback_with_result(executor, remote):
    callback_result = None

    def fn(callback_future):
        nonlocal callback_result
        callback_result = callback_future.result()

    f, called = _completed_with_callback(executor, remote, fn, value=5)
    assert called.wait(SHORT)
    assert callback_result == 5


# CPython test_future.py: FutureTests.test_done_callback_with_exception
def test_done_callback_with_exception(executor, remote):
    callback_exception = None

    def fn(callback_future):
        nonlocal callback_exception
        callback_exception = callback_future.exception()

    f, called = _completed_with_callback(executor, remote, fn, exc=Exception("test"))
    assert called.wait(SHORT)
    assert callback_exception.args == ("test",)


# CPython test_future.py: FutureTests.test_done_callback_with_cancel
def test_done_callback_with_cancel(states):
    was_cancelled = None

    def fn(callback_future):
        nonlocal was_cancelled
        was_cancelled = callback_future.cancelled()

    f = states.pending()
    f.add_done_callback(fn)
    assert f.cancel()
    assert was_cancelled


# CPython test_future.py: FutureTests.test_done_callback_raises (the stdlib logs the
# callback's exception through the 'concurrent.futures' logger; captured_stderr saw
# it through logging's last-resort handler, caplog sees the record itself)
def test_done_callback_raises(executor, remote, caplog):
    caplog.set_level(logging.ERROR)
    raising_was_called = False
    fn_was_called = False

    def raising_fn(callback_future):
        nonlocal raising_was_called
        raising_was_called = True
        raise Exception("doh!")

    def fn(callback_future):
        nonlocal fn_was_called
        fn_was_called = True

    f, called = _completed_with_callback(executor, remote, raising_fn, value=5)
    f.add_done_callback(fn)
    assert called.wait(SHORT)
    support.wait_until(lambda: fn_was_called, SHORT, "the second callback")
    assert raising_was_called
    assert fn_was_called
    # the raising callback ran in the result watcher's thread, which logs its error
    # there; fn may have run at once in this thread (f was done by then)
    support.wait_until(lambda: "Exception: doh!" in caplog.text, SHORT, "the logged error")


# CPython test_future.py: FutureTests.test_done_callback_already_successful
def test_done_callback_already_successful(states):
    callback_result = None

    def fn(callback_future):
        nonlocal callback_result
        callback_result = callback_future.result()

    f = states.successful()
    f.add_done_callback(fn)
    assert callback_result == 42  # CPython's f.set_result(5): here the task returned 42


# CPython test_future.py: FutureTests.test_done_callback_already_failed
def test_done_callback_already_failed(executor):
    callback_exception = None

    def fn(callback_future):
        nonlocal callback_exception
        callback_exception = callback_future.exception()

    f = executor.submit(support.raise_, Exception("test"))
    concurrent.futures.wait([f], timeout=SHORT)
    f.add_done_callback(fn)
    assert callback_exception.args == ("test",)


# CPython test_future.py: FutureTests.test_done_callback_already_cancelled
def test_done_callback_already_cancelled(states):
    was_cancelled = None

    def fn(callback_future):
        nonlocal was_cancelled
        was_cancelled = callback_future.cancelled()

    f = states.pending()
    assert f.cancel()
    f.add_done_callback(fn)
    assert was_cancelled


# CPython test_future.py: FutureTests.test_done_callback_raises_already_succeeded
def test_done_callback_raises_already_succeeded(states, caplog):
    caplog.set_level(logging.ERROR)

    def raising_fn(callback_future):
        raise Exception("doh!")

    f = states.successful()
    f.add_done_callback(raising_fn)
    assert "exception calling callback for" in caplog.text
    assert "doh!" in caplog.text


# CPython test_future.py: FutureTests.test_repr
def test_repr(states):
    assert re.search(_repr("pending"), repr(states.pending()))
    assert re.search(_repr("running"), repr(states.running()))
    assert re.search(_repr("cancelled"), repr(states.cancelled()))
    assert re.search(_repr("cancelled"), repr(states.cancelled_and_notified()))
    assert re.search(_repr("finished raised OSError"), repr(states.exception()))
    assert re.search(_repr("finished returned int"), repr(states.successful()))


# CPython test_future.py: FutureTests.test_cancel
def test_cancel(states):
    f1 = states.pending()
    f2 = states.running()
    f3 = states.cancelled()
    f4 = states.cancelled_and_notified()
    f5 = states.exception()
    f6 = states.successful()

    assert f1.cancel()
    assert f1.cancelled()  # CPython: f1._state == CANCELLED

    assert not f2.cancel()
    assert f2.running()  # RUNNING

    assert f3.cancel()
    assert f3.cancelled()

    assert f4.cancel()
    assert f4.cancelled()  # CANCELLED_AND_NOTIFIED

    assert not f5.cancel()
    assert f5.done() and not f5.cancelled()  # FINISHED

    assert not f6.cancel()
    assert f6.done() and not f6.cancelled()


# CPython test_future.py: FutureTests.test_cancelled
def test_cancelled(states):
    assert not states.pending().cancelled()
    assert not states.running().cancelled()
    assert states.cancelled().cancelled()
    assert states.cancelled_and_notified().cancelled()
    assert not states.exception().cancelled()
    assert not states.successful().cancelled()


# CPython test_future.py: FutureTests.test_done
def test_done(states):
    assert not states.pending().done()
    assert not states.running().done()
    assert states.cancelled().done()
    assert states.cancelled_and_notified().done()
    assert states.exception().done()
    assert states.successful().done()


# CPython test_future.py: FutureTests.test_running
def test_running(states):
    assert not states.pending().running()
    assert states.running().running()
    assert not states.cancelled().running()
    assert not states.cancelled_and_notified().running()
    assert not states.exception().running()
    assert not states.successful().running()


# CPython test_future.py: FutureTests.test_result_with_timeout
def test_result_with_timeout(states):
    with pytest.raises(concurrent.futures.TimeoutError):
        states.pending().result(timeout=0)
    with pytest.raises(concurrent.futures.TimeoutError):
        states.running().result(timeout=0)
    with pytest.raises(CancelledError):
        states.cancelled().result(timeout=0)
    with pytest.raises(CancelledError):
        states.cancelled_and_notified().result(timeout=0)
    with pytest.raises(OSError):
        states.exception().result(timeout=0)
    assert states.successful().result(timeout=0) == 42


# CPython test_future.py: FutureTests.test_result_with_success (the "notification"
# thread that sets the result is the worker finishing the task)
def test_result_with_success(executor, remote):
    release = remote.event()
    f1 = executor.submit(support.wait_and_return, release, 42)
    t = threading.Timer(0.2, release.set)  # the main thread is waiting by then
    t.start()
    assert f1.result(timeout=SHORT) == 42
    t.join()


# CPython test_future.py: FutureTests.test_result_with_cancel
def test_result_with_cancel(states):
    f1 = states.pending()
    t = threading.Timer(0.2, f1.cancel)  # cancelled while result() waits
    t.start()
    with pytest.raises(CancelledError):
        f1.result(timeout=SHORT)
    t.join()


# CPython test_future.py: FutureTests.test_exception_with_timeout
def test_exception_with_timeout(states):
    with pytest.raises(concurrent.futures.TimeoutError):
        states.pending().exception(timeout=0)
    with pytest.raises(concurrent.futures.TimeoutError):
        states.running().exception(timeout=0)
    with pytest.raises(CancelledError):
        states.cancelled().exception(timeout=0)
    with pytest.raises(CancelledError):
        states.cancelled_and_notified().exception(timeout=0)
    assert isinstance(states.exception().exception(timeout=0), OSError)
    assert states.successful().exception(timeout=0) is None


# CPython test_future.py: FutureTests.test_exception_with_success
def test_exception_with_success(executor, remote):
    release = remote.event()
    f1 = executor.submit(support.wait_and_raise, release, OSError())
    t = threading.Timer(0.2, release.set)
    t.start()
    assert isinstance(f1.exception(timeout=SHORT), OSError)
    t.join()


# CPython test_future.py: FutureTests.test_multiple_set_result (set_result is the
# stdlib's interface for completing a future from outside: a queued call's future
# completed by hand must then refuse a second outcome, naming itself in the stdlib's
# repr shape)
def test_multiple_set_result(states):
    f = states.pending()
    f.set_result(1)

    with pytest.raises(InvalidStateError, match="FINISHED: " + _repr("finished returned int")):
        f.set_result(2)

    assert f.done()
    assert f.result(timeout=0) == 1


# CPython test_future.py: FutureTests.test_multiple_set_exception
def test_multiple_set_exception(states):
    f = states.pending()
    e = ValueError()
    f.set_exception(e)

    with pytest.raises(InvalidStateError, match="FINISHED: " + _repr("finished raised ValueError")):
        f.set_exception(Exception())

    assert f.exception(timeout=0) == e
