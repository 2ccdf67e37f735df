"""map and FuturePool against real workers."""

from __future__ import annotations

import gc
import os
import threading
import time

import pytest
import redis

from flask_execute import FuturePool
from flask_execute.capacity import auto_chunksize
from flask_execute.chunks import MAX_RUN
from flask_execute.chunks import RUN_BUDGET
from flask_execute.chunks import run_size
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
    # no chunksize: the rule, for the 2 processes of the test workers (250 // 8 = 31)
    size = auto_chunksize(250, 2) if chunksize is None else chunksize
    assert len(messages) == (250 if size == 1 else -(-250 // size))


@pytest.mark.parametrize(
    ("calls", "concurrency", "size"),
    [
        (0, 2, 1), (1, 2, 1), (15, 2, 1), (16, 2, 2), (100, 2, 12), (250, 2, 31),
        (800, 2, 100), (10_000, 2, 100), (10_000, 64, 39), (100, 1, 25), (3, 0, 1),
    ],
)  # fmt: skip
def test_automatic_chunk_size_rule(calls, concurrency, size):
    """At least 4 chunks per worker process, at most 100 calls per chunk; a map of
    fewer than 8 calls per process sends one message per call."""
    assert auto_chunksize(calls, concurrency) == size


@pytest.mark.parametrize(
    ("seconds_per_call", "left", "size"),
    [
        (None, 100, 1), (RUN_BUDGET, 100, 1), (1.0, 100, 1), (RUN_BUDGET / 2, 100, 2),
        (RUN_BUDGET / 10, 100, 10), (RUN_BUDGET / 10, 3, 3), (1e-9, 1000, MAX_RUN),
        (0.0, 1000, MAX_RUN), (RUN_BUDGET / 10, 0, 0),
    ],
)  # fmt: skip
def test_run_size_rule(seconds_per_call, left, size):
    """A chunk's first member runs alone, and so does every member of calls that take
    the budget or longer; shorter calls are claimed as many as fill the budget."""
    assert run_size(seconds_per_call, left) == size


def _evalsha_calls(client) -> int:
    return int(client.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0))


def test_short_calls_of_a_chunk_share_round_trips(setup):
    """A chunk of trivial calls is claimed and stored in runs, not one Redis round
    trip per call (which made a large map 3x slower than Celery's chunks); every call
    still has its own outcome."""
    app, celery = setup
    client = redis.Redis.from_url(app.config["CELERY_BROKER_URL"])
    before = _evalsha_calls(client)
    pool = celery.map(tasks.add, *[(i, i) for i in range(400)], chunksize=200)
    assert pool.result(timeout=30) == [2 * i for i in range(400)]
    assert len({f.chunk.task_id for f in pool}) == 2
    # one round trip per member was 400 and more; runs of calls of ~0.1 ms take ~20
    assert _evalsha_calls(client) - before < 100


def test_a_map_creates_its_futures_without_collections(setup):
    """The cyclic collector ran every few hundred new futures, each time over every
    object the process holds (a third to a half of a large map's time); it is paused
    while a map creates them, and on again after."""
    app, celery = setup
    collections = []

    def record(phase, info):
        if phase == "start":
            collections.append(info["generation"])

    calls = [(i, i) for i in range(3000)]
    gc.callbacks.append(record)
    try:
        pool = celery.map(tasks.add, *calls)
    finally:
        gc.callbacks.remove(record)
    # the first allocation after the pause sets one off (of any generation: the
    # counters are full by then), and the result watcher, delivering meanwhile, may
    # set off another; without the pause, dozens
    assert len(collections) <= 3, collections
    assert gc.isenabled()
    assert pool.result(timeout=30) == [2 * i for i in range(3000)]


def test_workers_advertise_their_concurrency(setup):
    """The test workers (one worker, 2 processes, queues celery and high-priority)
    say so in the result backend; a queue nobody consumes falls back to this host's
    CPU count; a small map asks nobody."""
    app, celery = setup
    capacity = app.extensions["celery"].runtime(app).client.capacity
    assert capacity.concurrency("celery") == 2
    assert capacity.concurrency("high-priority") == 2
    assert capacity.concurrency("nobody-consumes-this") == (os.cpu_count() or 1)
    assert capacity.chunksize(7, "celery") == 1
    assert capacity.chunksize(10_000, "celery") == 100


def test_small_map_without_chunksize_sends_one_message_per_call(setup):
    app, celery = setup
    pool = celery.map(tasks.add, *[(i, 1) for i in range(10)])
    assert pool.result(timeout=10) == [i + 1 for i in range(10)]
    assert all(f.chunk is None for f in pool)


def _wait_until(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_chunk_members_resolve_one_by_one(setup, tmp_path):
    """One message, three calls: each member runs, and resolves, on its own; only the
    member that runs is running()."""
    app, celery = setup
    marks = [tmp_path / f"m{i}" for i in range(3)]
    releases = [tmp_path / f"r{i}" for i in range(3)]
    pool = celery.map(
        tasks.mark_and_wait,
        *[(str(m), str(r)) for m, r in zip(marks, releases, strict=True)],
        chunksize=3,
    )
    assert len({f.chunk.task_id for f in pool}) == 1
    for i in range(3):
        # running() as soon as the worker claimed it, a moment before its body runs
        _wait_until(lambda: pool[i].running() and marks[i].exists())  # noqa: B023
        assert not any(f.running() for j, f in enumerate(pool) if j != i)
        assert not any(f.done() for f in pool[i:])
        assert all(f.result(timeout=0) == "released" for f in pool[:i])
        releases[i].touch()
        assert pool[i].result(timeout=10) == "released"
    assert pool.done()


def test_chunk_members_arrive_in_the_order_they_finish(setup, tmp_path):
    """Two chunks run side by side (2 worker processes); as_completed yields the
    members as they finish, across chunks, not chunk by chunk nor in call order."""
    app, celery = setup
    release = [tmp_path / f"r{i}" for i in range(4)]
    calls = [(str(tmp_path / f"m{i}"), str(release[i])) for i in range(4)]
    pool = celery.map(tasks.mark_and_wait, *calls, chunksize=2)  # chunks [0, 1], [2, 3]
    assert len({f.chunk.task_id for f in pool}) == 2
    _wait_until(lambda: pool[0].running() and pool[2].running())
    order = []
    finished = threading.Event()
    futures = list(pool)

    def collect():
        for f in pool.as_completed(timeout=20):
            order.append(futures.index(f))
        finished.set()

    threading.Thread(target=collect, daemon=True).start()
    for i in (2, 3, 0, 1):
        release[i].touch()
        _wait_until(lambda: len(order) == [2, 3, 0, 1].index(i) + 1)  # noqa: B023
    assert finished.wait(10)
    assert order == [2, 3, 0, 1]


def test_cancelling_a_chunk_member_skips_exactly_that_call(setup, tmp_path):
    app, celery = setup
    release = tmp_path / "release"
    marks = [tmp_path / f"m{i}" for i in range(4)]
    pool = celery.map(tasks.mark_and_wait, *[(str(m), str(release)) for m in marks], chunksize=4)
    _wait_until(lambda: pool[0].running())
    assert pool[0].cancel() is False  # it runs
    assert pool[2].cancel() is True  # it has not started: the worker will skip it
    assert pool[2].cancelled() and pool[2].done()
    release.touch()
    assert [pool[i].result(timeout=10) for i in (0, 1, 3)] == ["released"] * 3
    assert [m.exists() for m in marks] == [True, True, False, True]
    assert pool[2].cancelled()
    # the worker recorded the skip: another handle on that call sees it cancelled
    other = celery.get(pool[2].id)
    _wait_until(other.done)
    assert other.cancelled()


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


@pytest.mark.parametrize(
    ("pending", "interval"), [(0, 5.0), (1, 5.0), (5_000, 5.0), (10_000, 10.0), (100_000, 100.0)]
)
def test_a_large_map_is_swept_less_often(pending, interval):
    """The watcher's safety-net sweep fetches every pending state; with a large map
    pending it runs less often, so that its cost per call stays flat (at most
    SWEEP_RATE fetches per second on average)."""
    from flask_execute.watcher import sweep_interval

    assert sweep_interval(pending) == interval
