"""Port of CPython 3.13.0 ``Lib/test/test_concurrent_futures/test_as_completed.py``
(``AsCompletedTests``) to ``celery.executor()`` and ``flask_execute.Future`` on real
workers.

The canned futures stay plain stdlib futures, as in CPython; every future the tests
submit, wait on or drop is ours. ``as_completed`` carries a timeout wherever CPython
has none, so a hang fails fast.

All of CPython's as_completed tests apply.
"""

from __future__ import annotations

import gc
import itertools
import weakref
from concurrent import futures
from concurrent.futures._base import CANCELLED_AND_NOTIFIED
from concurrent.futures._base import FINISHED

import pytest

from tests.stdlib_futures import support
from tests.stdlib_futures.conftest import SHORT
from tests.stdlib_futures.test_wait import CANCELLED_AND_NOTIFIED_FUTURE
from tests.stdlib_futures.test_wait import create_future
from tests.stdlib_futures.test_wait import EXCEPTION_FUTURE
from tests.stdlib_futures.test_wait import SUCCESSFUL_FUTURE


# CPython test_as_completed.py: AsCompletedTests.test_no_timeout
def test_no_timeout(executor):
    future1 = executor.submit(support.mul, 2, 21)
    future2 = executor.submit(support.mul, 7, 6)

    completed = set(
        futures.as_completed(
            [CANCELLED_AND_NOTIFIED_FUTURE, EXCEPTION_FUTURE, SUCCESSFUL_FUTURE, future1, future2],
            timeout=SHORT,
        )
    )
    assert completed == {
        CANCELLED_AND_NOTIFIED_FUTURE,
        EXCEPTION_FUTURE,
        SUCCESSFUL_FUTURE,
        future1,
        future2,
    }


# CPython test_as_completed.py: AsCompletedTests.test_future_times_out
@pytest.mark.parametrize("timeout", [0, 0.100])
def test_future_times_out(executor, remote, timeout):
    already_completed = {CANCELLED_AND_NOTIFIED_FUTURE, EXCEPTION_FUTURE, SUCCESSFUL_FUTURE}
    completed_futures = set()
    future = executor.submit(support.wait_for, remote.event())  # CPython: sleep(1.0)

    try:
        for f in futures.as_completed(already_completed | {future}, timeout):
            completed_futures.add(f)
    except futures.TimeoutError:
        pass

    # Check that ``future`` wasn't completed.
    assert completed_futures == already_completed


# CPython test_as_completed.py: AsCompletedTests.test_duplicate_futures
def test_duplicate_futures(executor):
    # Duplicate futures should not raise exceptions or give duplicate responses.
    future1 = executor.submit(support.pause, None)  # CPython: time.sleep(2)
    completed = list(futures.as_completed(itertools.repeat(future1, 3), timeout=SHORT))
    assert len(completed) == 1


# CPython test_as_completed.py: AsCompletedTests.test_free_reference_yielded_future.
# CPython's eight never-finished ``Future()``s are our tasks held on one event each,
# and its ``futures_list[0].set_result("test")`` releases the first one still held
# (calls start in submission order, so it is running or next to run): a yielded
# future must not be kept alive by as_completed, the executor or the result watcher.
def test_free_reference_yielded_future(executor, remote):
    releases = [remote.event() for _ in range(8)]
    held = {}
    for release in releases:
        held[executor.submit(support.wait_and_return, release, "test")] = release
    futures_list = list(held)
    futures_list.append(create_future(state=CANCELLED_AND_NOTIFIED))
    futures_list.append(create_future(state=FINISHED, result=42))

    with pytest.raises(futures.TimeoutError):
        for future in futures.as_completed(futures_list, timeout=0):
            futures_list.remove(future)
            wr = weakref.ref(future)
            del future
            gc.collect()
            assert wr() is None

    def release_first():
        held.pop(futures_list[0]).set()

    release_first()
    for future in futures.as_completed(futures_list, timeout=30):
        futures_list.remove(future)
        wr = weakref.ref(future)
        del future
        gc.collect()
        assert wr() is None
        if futures_list:
            release_first()


# CPython test_as_completed.py: AsCompletedTests.test_correct_timeout_exception_msg
def test_correct_timeout_exception_msg(states):
    futures_list = [
        CANCELLED_AND_NOTIFIED_FUTURE,
        states.pending(),
        states.running(),
        SUCCESSFUL_FUTURE,
    ]

    with pytest.raises(futures.TimeoutError) as cm:
        list(futures.as_completed(futures_list, timeout=0))

    assert str(cm.value) == "2 (of 4) futures unfinished"
