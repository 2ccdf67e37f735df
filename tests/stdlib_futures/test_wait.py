"""Port of CPython 3.13.0 ``Lib/test/test_concurrent_futures/test_wait.py``
(``WaitTests`` and ``ThreadPoolWaitTests``) to ``celery.executor()`` on real workers,
plus issue 11's cancelled-while-queued case.

The canned futures (``CANCELLED_FUTURE`` ...) stay plain stdlib futures, as in CPython:
``wait()`` mixes them with ours. CPython's ``time.sleep(1.5)``/``time.sleep(3)`` tasks,
there only to be still running, are tasks held on a Redis event here (as CPython's
main branch later did with ``create_event()``): they finish when the test releases
them, not seconds later. Every ``wait()`` carries a timeout so a hang fails fast.

All of CPython's wait tests apply (none is about one executor class's internals).
"""

from __future__ import annotations

import threading
from concurrent import futures
from concurrent.futures._base import CANCELLED
from concurrent.futures._base import CANCELLED_AND_NOTIFIED
from concurrent.futures._base import FINISHED
from concurrent.futures._base import PENDING

from tests.stdlib_futures import support
from tests.stdlib_futures.conftest import SHORT


def create_future(state=PENDING, exception=None, result=None):
    # CPython util.py: a stdlib Future put in a state by hand
    f = futures.Future()
    f._state = state
    f._exception = exception
    f._result = result
    return f


CANCELLED_FUTURE = create_future(state=CANCELLED)
CANCELLED_AND_NOTIFIED_FUTURE = create_future(state=CANCELLED_AND_NOTIFIED)
EXCEPTION_FUTURE = create_future(state=FINISHED, exception=OSError())
SUCCESSFUL_FUTURE = create_future(state=FINISHED, result=42)


# CPython test_wait.py: WaitTests.test_20369
def test_20369(executor):
    future = executor.submit(support.mul, 1, 2)
    done, not_done = futures.wait(
        [future, future], timeout=SHORT, return_when=futures.ALL_COMPLETED
    )
    assert done == {future}
    assert not_done == set()


# CPython test_wait.py: WaitTests.test_first_completed
def test_first_completed(executor, remote):
    event = remote.event()
    future1 = executor.submit(support.mul, 21, 2)
    future2 = executor.submit(support.wait_for, event)

    try:
        done, not_done = futures.wait(
            [CANCELLED_FUTURE, future1, future2],
            timeout=SHORT,
            return_when=futures.FIRST_COMPLETED,
        )

        assert done == {future1}
        assert not_done == {CANCELLED_FUTURE, future2}
    finally:
        event.set()
    future2.result(timeout=SHORT)  # wait for job to finish


# CPython test_wait.py: WaitTests.test_first_completed_some_already_completed
def test_first_completed_some_already_completed(executor, remote):
    event = remote.event()
    future1 = executor.submit(support.wait_for, event)

    try:
        finished, pending = futures.wait(
            [CANCELLED_AND_NOTIFIED_FUTURE, SUCCESSFUL_FUTURE, future1],
            timeout=SHORT,
            return_when=futures.FIRST_COMPLETED,
        )

        assert finished == {CANCELLED_AND_NOTIFIED_FUTURE, SUCCESSFUL_FUTURE}
        assert pending == {future1}
    finally:
        event.set()
    future1.result(timeout=SHORT)


# CPython test_wait.py: WaitTests.test_first_exception
def test_first_exception(executor, remote):
    event1, event2 = remote.event(), remote.event()
    try:
        future1 = executor.submit(support.mul, 2, 21)
        future2 = executor.submit(support.wait_and_raise, event1, Exception("this is an exception"))
        future3 = executor.submit(support.wait_for, event2)

        # Ensure that future1 is completed before future2 finishes
        def wait_for_future1():
            future1.result(timeout=SHORT)
            event1.set()

        t = threading.Thread(target=wait_for_future1)
        t.start()

        finished, pending = futures.wait(
            [future1, future2, future3], timeout=SHORT, return_when=futures.FIRST_EXCEPTION
        )

        assert finished == {future1, future2}
        assert pending == {future3}

        t.join(SHORT)
    finally:
        event1.set()
        event2.set()
    future3.result(timeout=SHORT)


# CPython test_wait.py: WaitTests.test_first_exception_some_already_complete
def test_first_exception_some_already_complete(executor, remote):
    event = remote.event()
    future1 = executor.submit(divmod, 21, 0)
    future2 = executor.submit(support.wait_for, event)

    try:
        finished, pending = futures.wait(
            [SUCCESSFUL_FUTURE, CANCELLED_FUTURE, CANCELLED_AND_NOTIFIED_FUTURE, future1, future2],
            timeout=SHORT,
            return_when=futures.FIRST_EXCEPTION,
        )

        assert finished == {SUCCESSFUL_FUTURE, CANCELLED_AND_NOTIFIED_FUTURE, future1}
        assert pending == {CANCELLED_FUTURE, future2}
    finally:
        event.set()
    future2.result(timeout=SHORT)


# CPython test_wait.py: WaitTests.test_first_exception_one_already_failed
def test_first_exception_one_already_failed(executor, remote):
    event = remote.event()
    future1 = executor.submit(support.wait_for, event)

    try:
        finished, pending = futures.wait(
            [EXCEPTION_FUTURE, future1], timeout=SHORT, return_when=futures.FIRST_EXCEPTION
        )

        assert finished == {EXCEPTION_FUTURE}
        assert pending == {future1}
    finally:
        event.set()
    future1.result(timeout=SHORT)


# CPython test_wait.py: WaitTests.test_all_completed
def test_all_completed(executor):
    future1 = executor.submit(divmod, 2, 0)
    future2 = executor.submit(support.mul, 2, 21)

    finished, pending = futures.wait(
        [SUCCESSFUL_FUTURE, CANCELLED_AND_NOTIFIED_FUTURE, EXCEPTION_FUTURE, future1, future2],
        timeout=SHORT,
        return_when=futures.ALL_COMPLETED,
    )

    assert finished == {
        SUCCESSFUL_FUTURE,
        CANCELLED_AND_NOTIFIED_FUTURE,
        EXCEPTION_FUTURE,
        future1,
        future2,
    }
    assert pending == set()


# CPython test_wait.py: WaitTests.test_timeout
def test_timeout(executor, remote):
    short_timeout = 0.050

    event = remote.event()
    future = executor.submit(support.wait_for, event)

    try:
        finished, pending = futures.wait(
            [CANCELLED_AND_NOTIFIED_FUTURE, EXCEPTION_FUTURE, SUCCESSFUL_FUTURE, future],
            timeout=short_timeout,
            return_when=futures.ALL_COMPLETED,
        )

        assert finished == {CANCELLED_AND_NOTIFIED_FUTURE, EXCEPTION_FUTURE, SUCCESSFUL_FUTURE}
        assert pending == {future}
    finally:
        event.set()
    future.result(timeout=SHORT)


# CPython test_wait.py: ThreadPoolWaitTests.test_pending_calls_race (many futures
# completing while wait() registers its waiter on them; the switch-interval tweak
# of the thread pool has no counterpart across processes)
def test_pending_calls_race(executor, remote):
    event = remote.event()
    fs = {executor.submit(support.wait_for, event) for i in range(100)}
    event.set()
    done, not_done = futures.wait(fs, timeout=30, return_when=futures.ALL_COMPLETED)
    assert not not_done


# issue 11: "a future cancelled while queued never counts as done for wait() /
# as_completed()" (10 cancelled futures: done() True, wait(timeout=5) -> 0 done).
# The stdlib's executors notify a cancelled future when they drop its work item, so
# wait() and as_completed() see it; the calls here are queued behind two busy workers.
def test_cancelled_while_queued_counts_as_done(executor, remote):
    release = remote.event()
    blockers = [executor.submit(support.wait_for, release) for _ in range(2)]
    support.wait_until(lambda: all(b.running() for b in blockers), SHORT, "both slots busy")
    fs = [executor.submit(support.mul, i, 2) for i in range(10)]
    assert all(f.cancel() for f in fs)
    assert all(f.done() for f in fs)
    try:
        done, not_done = futures.wait(fs, timeout=5)
        assert len(done) == 10
        assert len(list(futures.as_completed(fs, timeout=5))) == 10
    finally:
        release.set()
    assert [b.result(timeout=SHORT) for b in blockers] == [True, True]
