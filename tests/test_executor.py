"""celery.executor(): the stdlib Executor contract, ported from CPython's own
test_concurrent_futures expectations, against real workers."""

from __future__ import annotations

import concurrent.futures
import io
import time

import pytest

from flask_execute import CeleryExecutor
from flask_execute import progress
from flask_execute import TaskTimeoutError
from tests.apps import tasks


def mul(x, y):
    return x * y


def test_submit_and_keywords_go_to_fn(setup):
    app, celery = setup
    with celery.executor() as executor:
        assert isinstance(executor, concurrent.futures.Executor)
        assert isinstance(executor, CeleryExecutor)
        assert executor.submit(pow, 2, 8).result(10) == 256
        assert executor.submit(mul, 2, y=5).result(10) == 10
        # stdlib semantics: `queue` is the function's own argument here
        assert executor.submit(tasks.echo_options, queue="q").result(10) == ("q", None)


def test_map_zips_and_stops_at_shortest(setup):
    app, celery = setup
    with celery.executor() as executor:
        assert list(executor.map(pow, range(10), range(10))) == [pow(i, i) for i in range(10)]
        assert list(executor.map(mul, [1, 2, 3], [4, 5])) == [4, 10]
        assert list(executor.map(abs, range(-50, 50), chunksize=7)) == [
            abs(i) for i in range(-50, 50)
        ]


def test_map_exception_raised_on_iteration(setup):
    app, celery = setup
    with celery.executor() as executor:
        results = executor.map(divmod, [1, 1, 1, 1], [2, 3, 0, 5])
        assert next(results) == (0, 1)
        assert next(results) == (0, 1)
        with pytest.raises(ZeroDivisionError):
            next(results)


def test_map_timeout(setup):
    app, celery = setup
    with celery.executor() as executor:
        results = []
        with pytest.raises(concurrent.futures.TimeoutError):
            for value in executor.map(time.sleep, [0, 0, 6], timeout=1):
                results.append(value)
        assert results == [None, None]


def test_map_timeout_names_the_timeout_given(setup):
    """The wait on each result is what is left of map's timeout; the error says the
    timeout the caller gave (not 0.08091930000000502 s, not 0.0 s)."""
    app, celery = setup
    with celery.executor(queue="nobody-consumes-this") as executor:
        results = executor.map(tasks.add, [1, 2], [3, 4], timeout=0.5)
        with pytest.raises(TaskTimeoutError) as info:
            next(results)
        assert " not done after 0.5 s (state PENDING on queue 'nobody-consumes-this')." in str(
            info.value
        )
        executor.shutdown(wait=False, cancel_futures=True)


def test_shutdown(setup):
    app, celery = setup
    executor = celery.executor()
    future = executor.submit(tasks.sleep, 0.2)
    executor.shutdown(wait=True)
    assert future.done()
    with pytest.raises(RuntimeError, match="cannot schedule new futures after shutdown"):
        executor.submit(pow, 2, 5)
    with pytest.raises(RuntimeError):
        executor.map(abs, [1])


def test_shutdown_cancel_futures(setup, tmp_path):
    app, celery = setup
    release = tmp_path / "release"
    executor = celery.executor()
    blockers = [
        executor.submit(tasks.mark_and_wait, str(tmp_path / f"m{i}"), str(release))
        for i in range(2)
    ]
    deadline = time.monotonic() + 10
    while not all(b.running() for b in blockers):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    queued = [executor.submit(tasks.touch, str(tmp_path / f"r{i}")) for i in range(3)]
    executor.shutdown(wait=False, cancel_futures=True)
    assert all(f.cancelled() for f in queued)
    release.touch()
    assert [b.result(10) for b in blockers] == ["released"] * 2


def test_executor_options_route(direct_app):
    from tests.apps import direct

    with direct_app.app_context(), direct.celery.executor(queue="high-priority") as executor:
        assert executor.submit(tasks.add, 2, 3).result(10) == 5


def test_progress_bar(setup):
    app, celery = setup
    pool = celery.map(tasks.add, *[(i, i) for i in range(20)])
    out = io.StringIO()
    progress(pool, timeout=20, file=out, description="adding")
    assert pool.done()
    assert "20/20" in out.getvalue() or "20/20" in out.getvalue().replace(" ", "")
    assert celery.map(tasks.add, [1, 1]).result(timeout=10, progress=True) == [2]


def test_the_text_progress_bar_ends_its_line_on_timeout():
    """Without tqdm: the bar is drawn at once, and its line ends however the wait
    ends, so that the traceback of a timeout starts on a line of its own."""
    done, pending = concurrent.futures.Future(), concurrent.futures.Future()
    done.set_result(1)
    out = io.StringIO()
    with pytest.raises(concurrent.futures.TimeoutError):
        progress([done, pending], timeout=0.3, file=out, description="adding")
    drawn = out.getvalue().split("\r")
    assert drawn[1:] == [f"adding: [{'.' * 30}] 0/2", f"adding: [{'#' * 15}{'.' * 15}] 1/2\n"]
