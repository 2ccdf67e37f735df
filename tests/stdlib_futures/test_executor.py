"""Port of CPython 3.13.0 ``Lib/test/test_concurrent_futures/executor.py``
(``ExecutorTest``, run there for every executor class) and of the applicable tests of
``test_thread_pool.py``, ``test_process_pool.py`` and ``test_deadlock.py``, to
``celery.executor()`` on real workers; plus issue 11's map and traceback cases.

Waits CPython leaves unbounded carry a timeout here; tasks that only had to take long
(``time.sleep(6)``) are held on a Redis event instead, released at teardown.

Not applicable (each needs a specific executor class's internals):
- executor.py ``test_max_workers_negative``: no ``max_workers``; the pool is the
  app's Celery workers (``CELERY_WORKERS``), shared by every executor.
- test_thread_pool.py ``test_default_workers``, ``test_saturation``,
  ``test_idle_thread_reuse``: inspect ``_max_workers``/``_threads`` of a thread pool.
- test_thread_pool.py ``test_hang_global_shutdown_lock``: fork() of a process pool
  from inside a thread pool (``_global_shutdown_lock`` after fork).
- test_process_pool.py ``test_max_workers_too_large``: a Windows process limit.
- test_process_pool.py ``test_killed_child``: ``BrokenProcessPool`` after a child is
  killed; a killed Celery worker process is replaced and its call redelivered
  (tests/test_reliability.py).
- test_process_pool.py ``test_saturation``, ``test_idle_process_reuse_one``,
  ``test_idle_process_reuse_multiple``: count ``_processes`` of the pool.
- test_process_pool.py ``test_max_tasks_per_child``,
  ``test_max_tasks_per_child_defaults_to_spawn_context``,
  ``test_max_tasks_early_shutdown``: the ``max_tasks_per_child`` constructor option
  and mp start methods (Celery's counterpart is the worker's own
  ``--max-tasks-per-child``, not a per-executor option).
- test_process_pool.py ``test_python_finalization_error``: mocks thread creation of
  the pool's manager thread.
- test_deadlock.py, every test but ``test_error_during_func_exec_on_worker``:
  recovery of a process pool's queues from crashes/exits/pickling errors in its own
  feeder and result threads (``BrokenProcessPool``). Here arguments that cannot be
  pickled fail at submit and results that cannot be pickled fail with
  ``SerializationError`` by contract (SPEC §2), and a dying worker process is
  Celery's to replace (tests/test_reliability.py).
- test_init.py (all): ``initializer=``/``initargs=`` run once per pool worker; Celery
  workers are long-lived and shared by every executor of the app (their app-wide
  counterpart is ``worker_process_init``), so a per-executor initializer has none.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import sys
import threading
import time
import traceback
import weakref
from concurrent import futures

import pytest

from flask_execute import RemoteTraceback
from tests.stdlib_futures import support
from tests.stdlib_futures.conftest import HANG
from tests.stdlib_futures.conftest import SHORT

WORKER_COUNT = 2  # the direct app's worker: concurrency 2


# CPython executor.py: ExecutorTest.test_submit
def test_submit(executor):
    future = executor.submit(pow, 2, 8)
    assert future.result(timeout=SHORT) == 256


# CPython executor.py: ExecutorTest.test_submit_keyword
def test_submit_keyword(executor):
    future = executor.submit(support.mul, 2, y=8)
    assert future.result(timeout=SHORT) == 16
    future = executor.submit(support.capture, 1, self=2, fn=3)
    assert future.result(timeout=SHORT) == ((1,), {"self": 2, "fn": 3})
    with pytest.raises(TypeError):
        executor.submit(fn=support.capture, arg=1)
    with pytest.raises(TypeError):
        executor.submit(arg=1)


# CPython executor.py: ExecutorTest.test_map
def test_map(executor):
    assert list(executor.map(pow, range(10), range(10), timeout=SHORT)) == list(
        map(pow, range(10), range(10))
    )

    assert list(executor.map(pow, range(10), range(10), chunksize=3, timeout=SHORT)) == list(
        map(pow, range(10), range(10))
    )


# CPython executor.py: ExecutorTest.test_map_exception
def test_map_exception(executor):
    i = executor.map(divmod, [1, 1, 1, 1], [2, 3, 0, 5], timeout=SHORT)
    assert i.__next__() == (0, 1)
    assert i.__next__() == (0, 1)
    with pytest.raises(ZeroDivisionError):
        i.__next__()


# CPython executor.py: ExecutorTest.test_map_timeout (CPython: time.sleep over
# [0, 0, 6] with timeout=5; here the third call is held until teardown)
def test_map_timeout(executor, remote):
    results = []
    with pytest.raises(futures.TimeoutError):
        for i in executor.map(support.pause, [None, None, remote.event()], timeout=1):
            results.append(i)

    assert results == [None, None]


# CPython executor.py: ExecutorTest.test_shutdown_race_issue12456
def test_shutdown_race_issue12456(executor):
    executor.map(str, [2] * (WORKER_COUNT + 1))
    assert support.finishes(executor.shutdown, SHORT), "shutdown() hung"


# CPython executor.py: ExecutorTest.test_no_stale_references
def test_no_stale_references(executor):
    my_object = support.MyObject()
    my_object_collected = threading.Event()
    my_object_callback = weakref.ref(my_object, lambda obj: my_object_collected.set())
    # Deliberately discarding the future.
    executor.submit(my_object.my_method)
    del my_object

    gc.collect()
    collected = my_object_collected.wait(timeout=SHORT)
    assert collected, "Stale reference not collected within timeout."
    assert my_object_callback() is None


# CPython executor.py: ExecutorTest.test_free_reference (issue #14406: the result
# iterator must not keep an internal reference to result objects). As in CPython's
# later version of this test, the reference may take a moment to go (here: done
# callbacks run in the result watcher's thread), never until the next next().
def _collected(wr: weakref.ref, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        gc.collect()
        if wr() is None:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)


def test_free_reference(executor):
    for obj in executor.map(support.make_dummy_object, range(10), timeout=SHORT):
        wr = weakref.ref(obj)
        del obj
        assert _collected(wr, 2), "the iterator keeps the last result alive"


# CPython test_thread_pool.py: ThreadPoolExecutorTest.test_map_submits_without_iteration
# (issue 11777)
def test_map_submits_without_iteration(executor, remote):
    finished = remote.list()

    executor.map(support.record, itertools.repeat(finished), range(10))
    assert support.finishes(lambda: executor.shutdown(wait=True), SHORT), "shutdown() hung"
    assert sorted(finished.items(), key=int) == [str(n) for n in range(10)]


# CPython test_thread_pool.py: ThreadPoolExecutorTest.test_executor_map_current_future_cancel.
# CPython saturates a one-thread pool with one call; our pool is two worker slots,
# so two calls ("first-a", "first-b") saturate it. The map's calls are queued behind
# them; the iterator times out at once: the call it timed out on ("second") and the
# one left ("third") are cancelled and never run.
def test_executor_map_current_future_cancel(celery, remote):
    stop_event = remote.event()
    log = remote.list()

    pool = celery.executor()
    try:
        # submit work to saturate the pool
        first = [
            pool.submit(support.log_n_wait, log, stop_event, i) for i in ("first-a", "first-b")
        ]
        support.wait_until(lambda: all(f.running() for f in first), SHORT, "both slots busy")
        try:
            with (
                contextlib.closing(
                    pool.map(
                        support.log_n_wait,
                        itertools.repeat(log),
                        itertools.repeat(stop_event),
                        ["second", "third"],
                        timeout=0,
                    )
                ) as gen,
                pytest.raises(TimeoutError),
            ):
                next(gen)
        finally:
            stop_event.set()
        for fut in first:
            fut.result(timeout=SHORT)
        shut_down = support.finishes(pool.shutdown, HANG)  # CPython: leaving `with pool`
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    # ident='second' is cancelled as a result of raising a TimeoutError
    # ident='third' is cancelled because it remained in the collection of futures
    assert sorted(log.items()) == sorted(
        f"ident={i!r} {what}" for i in ("first-a", "first-b") for what in ("started", "stopped")
    )
    assert shut_down, "shutdown() hung"


# CPython test_process_pool.py: ProcessPoolExecutorTest.test_map_chunksize
def test_map_chunksize(executor):
    def bad_map():
        list(executor.map(pow, range(40), range(40), chunksize=-1))

    ref = list(map(pow, range(40), range(40)))
    assert list(executor.map(pow, range(40), range(40), chunksize=6, timeout=SHORT)) == ref
    assert list(executor.map(pow, range(40), range(40), chunksize=50, timeout=SHORT)) == ref
    assert list(executor.map(pow, range(40), range(40), chunksize=40, timeout=SHORT)) == ref
    with pytest.raises(ValueError):
        bad_map()


class Raiser:
    @classmethod
    def _test_traceback(cls):
        raise RuntimeError(123)  # some comment


# CPython test_process_pool.py: ProcessPoolExecutorTest.test_traceback (the worker's
# traceback is contained in the one raised here; our counterpart of
# futures.process._RemoteTraceback is flask_execute.RemoteTraceback). Raiser is
# importable, yet its classmethod travels by value (cloudpickle cannot find a bound
# method by its qualified name), which is issue 11's case.
def test_traceback(executor, capsys):
    future = executor.submit(Raiser._test_traceback)
    with pytest.raises(Exception) as cm:
        future.result(timeout=SHORT)

    exc = cm.value
    assert type(exc) is RuntimeError
    assert exc.args == (123,)
    cause = exc.__cause__
    assert type(cause) is RemoteTraceback
    assert "raise RuntimeError(123)  # some comment" in cause.tb

    try:
        raise exc
    except RuntimeError:
        sys.excepthook(*sys.exc_info())
    assert "raise RuntimeError(123)  # some comment" in capsys.readouterr().err


# CPython test_process_pool.py: ProcessPoolExecutorTest.test_ressources_gced_in_workers
# (the arguments of a call are collected in the worker once it finished)
def test_ressources_gced_in_workers(executor, remote):
    event = remote.event()
    obj = support.EventfulGCObj(event)
    future = executor.submit(id, obj)
    future.result(timeout=SHORT)

    assert event.wait(timeout=5)


# CPython test_deadlock.py: ExecutorDeadlockTest.test_error_during_func_exec_on_worker
def test_error_during_func_exec_on_worker(executor):
    res = executor.submit(support.raise_, RuntimeError())
    with pytest.raises(RuntimeError):
        res.result(timeout=SHORT)


# --- issue 11 ----------------------------------------------------------------------
# issue 11: "a task that raises TimeoutError reaches the caller as
# TaskTimeoutError('not done after None s (state FAILURE)') through result()". The
# task's own exception, with its own type; a timeout error only when we timed out.
# (CPython's main branch has the map side as ExecutorTest.test_map_timeout_from_callable.)
def test_task_timeout_error_is_the_tasks_own(executor):
    future = executor.submit(support.timeout_on_one, 1)
    assert type(future.exception(timeout=SHORT)) is TimeoutError
    with pytest.raises(TimeoutError) as cm:
        future.result(timeout=SHORT)
    assert type(cm.value) is TimeoutError
    assert cm.value.args == ("from the task",)

    i = executor.map(support.timeout_on_one, [0, 1, 2, 3], timeout=SHORT)
    assert next(i) == 0
    with pytest.raises(TimeoutError) as cm:
        next(i)
    assert type(cm.value) is TimeoutError
    assert cm.value.args == ("from the task",)


def _lambda():
    return lambda: 1 / 0  # the failing line of a lambda


def _closure():
    divisor = 0

    def divide():
        return 1 / divisor  # the failing line of a closure

    return divide


def _local_classmethod():
    class Local:
        @classmethod
        def divide(cls):
            return 1 / 0  # the failing line of a classmethod

    return Local.divide


# issue 11: "tracebacks of functions sent by value (closures, lambdas, __main__,
# classmethods) show File "<dynamic-code>" without source lines". The by-value
# counterpart of test_traceback above (__main__ is in test_shutdown.py's scripts).
@pytest.mark.parametrize(
    ("make", "line"),
    [
        (_lambda, "return lambda: 1 / 0  # the failing line of a lambda"),
        (_closure, "return 1 / divisor  # the failing line of a closure"),
        (_local_classmethod, "return 1 / 0  # the failing line of a classmethod"),
    ],
    ids=["lambda", "closure", "classmethod"],
)
def test_by_value_traceback_shows_source_line(executor, make, line):
    exc = executor.submit(make()).exception(timeout=SHORT)
    assert type(exc) is ZeroDivisionError
    assert type(exc.__cause__) is RemoteTraceback
    assert line in exc.__cause__.tb
    assert line in "".join(traceback.format_exception(exc))
