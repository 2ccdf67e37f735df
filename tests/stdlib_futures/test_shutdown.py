"""Port of CPython 3.13.0 ``Lib/test/test_concurrent_futures/test_shutdown.py``
(``ExecutorShutdownTest`` and the applicable ``ThreadPoolShutdownTest`` /
``ProcessPoolShutdownTest`` tests) to ``celery.executor()`` on real workers; plus issue
11's shutdown-after-map and ``__main__`` traceback cases.

CPython's interpreter-exit tests run ``python -c`` with a fresh executor; here each is
a small script run as ``python script.py`` that starts its own local worker (on a
Redis db of its own) the way a developer's script does, since what they check is
what happens to that process's calls when it exits. ``sleep_and_print`` prints from a
pool worker into the script's stdout; a Celery worker's stdout is its log file, so
the port records the message in Redis and reads it once the script has exited.

Not applicable (thread/process pool internals):
- ``ThreadPoolShutdownTest.test_threads_terminate`` and
  ``ProcessPoolShutdownTest.test_processes_terminate``: count and join the pool's
  ``_threads``/``_processes``.
- ``ThreadPoolShutdownTest.test_thread_names_assigned`` and
  ``test_thread_names_default``: ``thread_name_prefix``.
- ``ProcessPoolShutdownTest.test_context_manager_shutdown``, ``test_del_shutdown``,
  ``test_shutdown_no_wait``: the thread-pool tests of the same names, plus joins of
  ``_executor_manager_thread``/``_call_queue``; ported once, below.
"""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid

import pytest

from tests.conftest import wait_gone
from tests.stdlib_futures import support
from tests.stdlib_futures.conftest import HANG
from tests.stdlib_futures.conftest import SHORT
from tests.stdlib_futures.support import RemoteList


# CPython test_shutdown.py: ExecutorShutdownTest.test_run_after_shutdown
def test_run_after_shutdown(executor):
    assert support.finishes(executor.shutdown, SHORT)
    with pytest.raises(RuntimeError):
        executor.submit(pow, 2, 5)


# CPython test_shutdown.py: ExecutorShutdownTest.test_hang_issue12364
def test_hang_issue12364(executor):
    fs = [executor.submit(time.sleep, 0.05) for _ in range(50)]
    assert support.finishes(executor.shutdown, 30), "shutdown() hung"
    for f in fs:
        f.result(timeout=SHORT)


# CPython test_shutdown.py: ExecutorShutdownTest.test_cancel_futures (two worker
# slots: "few workers")
def test_cancel_futures(executor):
    fs = [executor.submit(time.sleep, 0.1) for _ in range(50)]
    assert support.finishes(lambda: executor.shutdown(cancel_futures=True), HANG), (
        "shutdown(cancel_futures=True) hung"
    )
    # We can't guarantee the exact number of cancellations, but we can
    # guarantee that *some* were cancelled. With few workers, many of
    # the submitted futures should have been cancelled.
    cancelled = [fut for fut in fs if fut.cancelled()]
    assert len(cancelled) > 20

    # Ensure the other futures were able to finish.
    # Use "not fut.cancelled()" instead of "fut.done()" to include futures
    # that may have been left in a pending state.
    others = [fut for fut in fs if not fut.cancelled()]
    for fut in others:
        assert fut.done(), f"{fut!r}"
        assert fut.exception(timeout=0) is None

    # Similar to the number of cancelled futures, we can't guarantee the
    # exact number that completed. But, we can guarantee that at least
    # one finished.
    assert len(others) > 0


# CPython test_shutdown.py: ExecutorShutdownTest.test_hang_gh94440 (shutdown(wait=True)
# does not hang when a future was submitted and cancelled right before it). CPython's
# idle one-worker pool may or may not start the call before cancel(); here both
# slots are held first, so the cancel always wins and the case is always tested.
def test_hang_gh94440(executor, remote):
    assert executor.submit(int).result(timeout=SHORT) == 0
    release = remote.event()
    blockers = [executor.submit(support.wait_for, release) for _ in range(2)]
    support.wait_until(lambda: all(b.running() for b in blockers), SHORT, "both slots busy")
    assert executor.submit(int).cancel()
    release.set()
    assert support.finishes(lambda: executor.shutdown(wait=True), HANG), (
        "timed out waiting for shutdown"
    )


# CPython test_shutdown.py: ThreadPoolShutdownTest.test_context_manager_shutdown
def test_context_manager_shutdown(celery):
    def use():
        with celery.executor() as e:
            assert list(e.map(abs, range(-5, 5), timeout=SHORT)) == [5, 4, 3, 2, 1, 0, 1, 2, 3, 4]

    assert support.finishes(use, SHORT), "leaving the with block hung"


# CPython test_shutdown.py: ThreadPoolShutdownTest.test_del_shutdown
def test_del_shutdown(celery):
    executor = celery.executor()
    res = executor.map(abs, range(-5, 5), timeout=SHORT)
    del executor
    gc.collect()

    # Make sure the results were all computed before the
    # executor got shutdown.
    assert all([r == abs(v) for r, v in zip(res, range(-5, 5), strict=True)])


# CPython test_shutdown.py: ThreadPoolShutdownTest.test_shutdown_no_wait
def test_shutdown_no_wait(celery):
    executor = celery.executor()
    res = executor.map(abs, range(-5, 5), timeout=SHORT)
    executor.shutdown(wait=False)

    # Make sure the results were all computed before the
    # executor got shutdown.
    assert all([r == abs(v) for r, v in zip(res, range(-5, 5), strict=True)])


# issue 11: "executor.shutdown(wait=True) after an executor.map of 10 calls hung for
# 13 minutes although all 10 calls had finished on the workers: shutdown must return
# once its futures are final, whatever order their notifications arrive in". Ten
# rounds, one call per message and three, to give the orders a chance to differ.
@pytest.mark.parametrize("chunksize", [1, 3])
def test_shutdown_after_map_returns(celery, chunksize):
    for _ in range(10):
        executor = celery.executor()
        executor.map(support.mul, range(10), range(10), chunksize=chunksize)
        assert support.finishes(executor.shutdown, SHORT), "shutdown() after map() hung"


# --- interpreter exit: scripts -------------------------------------------------------
SCRIPT = textwrap.dedent(
    """
    {prelude}
    import os
    import time

    from flask import Flask
    from flask_execute import Celery

    MARKS_URL, MARKS_KEY = {marks_url!r}, {marks_key!r}


    def sleep_and_print(t, msg):
        # CPython's sleep_and_print; "printed" to Redis (a worker's stdout is its log)
        import redis

        time.sleep(t)
        redis.Redis.from_url(MARKS_URL).rpush(MARKS_KEY, msg)


    app = Flask(__name__)
    app.config.update({config!r})
    celery = Celery(app)
    """
)

MARKER_ENV = "FLASK_EXECUTE_STDLIB_SCRIPT"


def _marked(marker: str) -> set[int]:
    """The live processes started for one script (they inherit its environment)."""
    found = set()
    needle = f"{MARKER_ENV}={marker}".encode()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if needle in f.read().split(b"\0"):
                        found.add(int(entry))
            except OSError:
                continue
    return found


class Script:
    """Runs a script that starts its own local worker, and reads what it recorded."""

    def __init__(self, tmp_path, broker_url, redis_url, log_dir):
        self.tmp_path = tmp_path
        self.broker_url = broker_url
        self.log_dir = log_dir
        self.marks = RemoteList(f"{redis_url}/0")

    def run(
        self, body: str, prelude: str = "", shared: bool = False, timeout: float = 60
    ) -> subprocess.CompletedProcess:
        """Run ``body`` after the script's app is set up. The app starts a local
        worker of its own (concurrency 1); ``shared=True`` uses the shared direct
        app's workers instead (its broker and key, no local worker)."""
        marker = uuid.uuid4().hex
        if shared:
            from tests.apps import direct

            config = {key: direct.app.config[key] for key in ("SECRET_KEY", "CELERY_BROKER_URL")}
            config.update(CELERY_START_LOCAL_WORKERS=False, TESTING=True)
        else:
            config = {
                "SECRET_KEY": "stdlib-exit-secret",
                "CELERY_BROKER_URL": self.broker_url,
                "CELERY_WORKERS": {f"stdlib-{marker[:8]}": {"concurrency": 1}},
                "CELERY_FLOWER": False,
                "CELERY_LOG_DIR": self.log_dir,
            }
        source = SCRIPT.format(
            prelude=textwrap.dedent(prelude),
            marks_url=self.marks.url,
            marks_key=self.marks.key,
            config=config,
        ) + textwrap.dedent(body)
        path = self.tmp_path / "script.py"
        path.write_text(source)
        proc = subprocess.Popen(
            [sys.executable, str(path)],
            cwd=self.tmp_path,
            env={**os.environ, MARKER_ENV: marker},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            err += f"\n[the script did not exit within {timeout} s]"
        # its local worker must not outlive it (nor this test)
        left = wait_gone(_marked(marker), 15)
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        assert not left, f"the script's processes outlived it: {sorted(left)}"
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.fixture
def script(tmp_path, broker_url, redis_url, log_dir):
    return Script(tmp_path, broker_url, redis_url, log_dir)


# CPython test_shutdown.py: ExecutorShutdownTest.test_interpreter_shutdown (the
# program does not exit until its pending futures are done). CPython submits one
# call to an idle pool; whether a just-started worker has begun it when the script
# exits is a race, so a second call is queued behind it on the one worker slot: at
# exit it has certainly not started. CPython asserts an empty stderr; a bounded wait
# at exit may be logged, so here: no traceback.
def test_interpreter_shutdown(script):
    done = script.run(
        """
        if __name__ == "__main__":
            with app.app_context():
                t = celery.executor()
            t.submit(sleep_and_print, 1.0, "apple")
            t.submit(sleep_and_print, 0.0, "banana")
        """
    )
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 0
    assert sorted(script.marks.items()) == ["apple", "banana"]


# CPython test_shutdown.py: ExecutorShutdownTest.test_submit_after_interpreter_shutdown
# (the exit hook is registered before flask_execute is imported, so it runs after
# flask_execute's own exit hooks, as CPython's runs after concurrent.futures')
def test_submit_after_interpreter_shutdown(script):
    done = script.run(
        """
        if __name__ == "__main__":
            with app.app_context():
                t = celery.executor()
            t.submit(id, 42).result(timeout=30)
        """,
        prelude="""
            import atexit
            @atexit.register
            def run_last():
                try:
                    t.submit(id, None)
                except RuntimeError:
                    print("runtime-error")
                    raise
            """,
    )
    # Errors in atexit hooks don't change the process exit code, check
    # stderr manually.
    assert "RuntimeError: cannot schedule new futures" in done.stderr, done.stderr
    assert done.stdout.strip() == "runtime-error"


# CPython test_shutdown.py: ExecutorShutdownTest.test_hang_gh83386 (shutdown(wait=False)
# does not hang at exit with running futures, and they still complete); a second
# call queued behind the first, as in test_interpreter_shutdown
def test_hang_gh83386(script):
    done = script.run(
        """
        if __name__ == "__main__":
            with app.app_context():
                t = celery.executor()
            t.submit(sleep_and_print, 1.0, "apple")
            t.submit(sleep_and_print, 0.0, "banana")
            t.shutdown(wait=False)
        """
    )
    assert "Traceback" not in done.stderr, done.stderr
    assert sorted(script.marks.items()) == ["apple", "banana"]


# CPython test_shutdown.py: ThreadPoolShutdownTest.test_cancel_futures_wait_false
def test_cancel_futures_wait_false(script):
    done = script.run(
        """
        if __name__ == "__main__":
            with app.app_context():
                t = celery.executor()
            t.submit(sleep_and_print, 0.1, "apple")
            t.shutdown(wait=False, cancel_futures=True)
        """
    )
    # Errors in atexit hooks don't change the process exit code, check
    # stderr manually.
    assert "Traceback" not in done.stderr, done.stderr
    # stdout may be empty if shutdown happens before task starts executing.
    assert script.marks.items() in (["apple"], [])


# issue 11: "tracebacks of functions sent by value (closures, lambdas, __main__,
# classmethods) show File "<dynamic-code>" without source lines" -- the __main__ case
def test_main_function_traceback_shows_source_line(script, direct_app):
    done = script.run(
        """
        import traceback


        def fails():
            raise ValueError("from main")  # the failing line in __main__


        if __name__ == "__main__":
            with app.app_context():
                exc = celery.executor().submit(fails).exception(timeout=30)
            print("".join(traceback.format_exception(exc)))
        """,
        shared=True,
    )
    assert done.returncode == 0, done.stderr
    assert "ValueError: from main" in done.stdout
    assert 'raise ValueError("from main")  # the failing line in __main__' in done.stdout
