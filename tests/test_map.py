"""map and FuturePool against real workers."""

from __future__ import annotations

import threading
import time

import pytest

from flask_execute import FuturePool
from tests.apps import tasks


def test_map_each_argument_is_one_call(setup):
    app, celery = setup
    pool = celery.map(tasks.add, [1, 2], [3, 4], [5, 6])
    assert isinstance(pool, FuturePool)
    assert pool.result(timeout=10) == [3, 7, 11]
    assert len(pool) == 3
    assert [f.result() for f in pool] == [3, 7, 11]
    assert pool[1].result() == 7
    assert pool.done() and not pool.running() and not pool.cancelled()
    assert pool.exception() is None


def test_map_constant_keyword_arguments(setup):
    app, celery = setup
    assert celery.map(tasks.add, [1], [3], [5], y=2).result(timeout=10) == [3, 5, 7]
    # a non-sequence item is the single argument of its call
    assert celery.map(tasks.config_value, "MARKER").result(10) == [app.config["MARKER"]]


@pytest.mark.parametrize("chunksize", [None, 1, 7, 100])
def test_map_many_calls(setup, chunksize):
    app, celery = setup
    pool = celery.map(tasks.add, *[(i, i) for i in range(250)], chunksize=chunksize)
    assert pool.result(timeout=30) == [2 * i for i in range(250)]
    assert len({f.id for f in pool}) == 250  # every call has its own task id
    messages = {f.chunk.task_id if f.chunk else f.id for f in pool}
    if chunksize is not None:
        assert len(messages) == (250 if chunksize == 1 else -(-250 // chunksize))


def test_chunk_failures_stay_per_call(setup):
    app, celery = setup

    def maybe_fail(i):
        if i == 3:
            raise ValueError(f"item {i}")
        return i

    pool = celery.map(maybe_fail, *range(6), chunksize=4)
    assert [f.exception(10) is None for f in pool] == [True, True, True, False, True, True]
    assert str(pool.exception(10)) == "item 3"
    with pytest.raises(ValueError, match="item 3"):
        pool.result(timeout=10)


def test_pool_result_has_one_deadline(setup):
    app, celery = setup
    pool = celery.map(tasks.sleep, *[0.4] * 6)  # 2 worker processes: ~1.2 s in all
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        pool.result(timeout=0.5)
    assert time.monotonic() - start < 1.0
    assert pool.result(timeout=10) == [0.4] * 6


def test_pool_callback_once_when_all_done(setup):
    app, celery = setup
    calls = []
    done = threading.Event()
    pool = celery.map(tasks.add, [1, 1], [2, 2], [3, 3])
    pool.add_done_callback(lambda p: (calls.append(p), done.set()))
    assert done.wait(10)
    time.sleep(0.1)
    assert calls == [pool]
    assert pool.done()


def test_pool_cancel_and_as_completed(setup, tmp_path):
    app, celery = setup
    release = tmp_path / "release"
    blockers = celery.map(
        tasks.mark_and_wait, *[(str(tmp_path / f"m{i}"), str(release)) for i in range(2)]
    )
    deadline = time.monotonic() + 10
    while not all(f.running() for f in blockers):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert blockers.running()
    queued = celery.map(tasks.touch, *[str(tmp_path / f"ran{i}") for i in range(3)])
    assert queued.cancel() is True
    assert queued.cancelled() and queued.done()
    release.touch()
    finished = list(blockers.as_completed(timeout=10))
    assert sorted(f.result() for f in finished) == ["released", "released"]
    time.sleep(0.3)
    assert not any((tmp_path / f"ran{i}").exists() for i in range(3))


def test_empty_map(setup):
    app, celery = setup
    pool = celery.map(tasks.add)
    assert len(pool) == 0 and pool.result() == [] and pool.done()
