"""submit / apply / get against real workers, in the direct and the factory setup."""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime
import threading
import time

import pytest

from flask_execute import Future
from flask_execute import RemoteTraceback
from flask_execute import SerializationError
from tests.apps import tasks
from tests.conftest import progress_seen


def test_submit_forms(setup):
    app, celery = setup
    futures = [
        celery.submit(tasks.add, 1, 2),
        celery.submit(tasks.add, 1, y=2),
        celery.submit(tasks.add, x=1, y=2),
    ]
    assert [f.result(timeout=10) for f in futures] == [3, 3, 3]
    assert all(isinstance(f, concurrent.futures.Future) for f in futures)
    assert futures[0].name == "tests.apps.tasks:add"
    assert futures[0].state == futures[0].status == "SUCCESS"


def test_by_value_functions(setup):
    app, celery = setup
    offset = 40

    def closure(x):
        return x + offset

    assert celery.submit(lambda: 42).result(timeout=10) == 42
    assert celery.submit(closure, 2).result(timeout=10) == 42


def test_task_runs_in_app_context_of_its_app(setup):
    app, celery = setup
    assert celery.submit(tasks.config_value, "MARKER").result(10) == app.config["MARKER"]
    assert celery.submit(tasks.app_name).result(10) == app.import_name


def test_exception_type_and_worker_traceback(setup):
    app, celery = setup
    future = celery.submit(tasks.fail, "bad thing")
    with pytest.raises(ValueError, match="bad thing") as info:
        future.result(timeout=10)
    assert isinstance(info.value.__cause__, RemoteTraceback)
    assert "raise ValueError(message)" in str(info.value.__cause__)
    assert future.state == "FAILURE"
    assert isinstance(future.exception(1), ValueError)

    custom = celery.submit(tasks.fail_custom).exception(timeout=10)
    assert isinstance(custom, tasks.CustomError)
    assert (custom.code, custom.detail) == (42, "custom")


def test_unpicklable_argument_fails_at_submit(setup):
    app, celery = setup
    with pytest.raises(SerializationError) as info:
        celery.submit(tasks.add, 1, threading.Lock())
    assert str(info.value).startswith(
        "Argument 'y' (position 1) of tests.apps.tasks:add cannot be serialized (lock value)"
    )


def test_unpicklable_result_reported(setup):
    app, celery = setup
    with pytest.raises(SerializationError, match=r"return value of tests\.apps\.tasks:unpicklable"):
        celery.submit(tasks.unpicklable_result).result(timeout=10)


def test_reserved_options_and_apply(setup):
    app, celery = setup
    start = time.monotonic()
    assert celery.submit(tasks.add, 1, 2, countdown=1).result(timeout=10) == 3
    assert time.monotonic() - start >= 0.9
    eta = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=1)
    assert celery.submit(tasks.add, 2, 2, eta=eta).result(timeout=10) == 4
    # a function whose own parameters are reserved names goes through apply()
    future = celery.apply(tasks.echo_options, kwargs={"queue": "q", "countdown": 5})
    assert future.result(timeout=10) == ("q", 5)


def test_queue_routing(direct_app):
    from tests.apps import direct

    with direct_app.app_context():
        future = direct.celery.submit(tasks.add, 1, 2, queue="high-priority")
        assert future.result(timeout=10) == 3


def test_unconsumed_queue_times_out_saying_so(direct_app):
    from tests.apps import direct

    with direct_app.app_context():
        future = direct.celery.submit(tasks.add, 1, 2, queue="nobody-listens")
        start = time.monotonic()
        with pytest.raises(TimeoutError) as info:
            future.result(timeout=0.5)
        assert time.monotonic() - start < 2
        message = str(info.value)
        assert "No worker consumes queue 'nobody-listens' (workers seen: direct@" in message
        assert "[celery, high-priority]" in message
        assert future.cancel()


def test_running_and_progress(setup, tmp_path):
    app, celery = setup
    mark, release = tmp_path / "mark", tmp_path / "release"
    future = celery.submit(tasks.mark_and_wait, str(mark), str(release))
    _wait(lambda: mark.exists())
    _wait(future.running)
    assert not future.done()
    assert future.state == "STARTED"
    assert not future.cancel()  # started: too late without terminate
    release.touch()
    assert future.result(timeout=10) == "released"
    assert future.done() and not future.running()

    future = celery.submit(tasks.report_progress, 5, 0.1)
    seen = progress_seen(future)
    assert future.result(1) == 5
    assert len(seen) >= 2 and seen <= {1, 2, 3, 4, 5}


def test_cancel_before_start_never_runs(setup, tmp_path):
    app, celery = setup
    release = tmp_path / "release"
    blockers = [
        celery.submit(tasks.mark_and_wait, str(tmp_path / f"b{i}"), str(release)) for i in range(2)
    ]
    _wait(lambda: all(b.running() for b in blockers))
    ran = tmp_path / "ran"
    queued = celery.submit(tasks.touch, str(ran))
    assert not queued.running()
    assert queued.cancel() is True
    assert queued.cancelled() and queued.done()
    with pytest.raises(concurrent.futures.CancelledError):
        queued.result(1)
    release.touch()
    assert [b.result(10) for b in blockers] == ["released"] * 2
    after = celery.submit(tasks.add, 1, 1)  # the worker goes on serving
    assert after.result(10) == 2
    time.sleep(0.5)
    assert not ran.exists()


def test_cancel_terminate_stops_running_task(setup, tmp_path):
    app, celery = setup
    mark = tmp_path / "mark"
    future = celery.submit(tasks.mark_and_wait, str(mark), str(tmp_path / "never"), 30)
    _wait(future.running)
    assert future.cancel(terminate=True) is True
    assert future.cancelled()
    assert celery.submit(tasks.add, 2, 3).result(10) == 5


def test_done_callbacks_run_once(setup):
    app, celery = setup
    calls = []
    done = threading.Event()
    future = celery.submit(tasks.sleep, 0.2)

    def callback(f):
        calls.append(f)
        done.set()

    future.add_done_callback(callback)
    assert done.wait(10)
    time.sleep(0.2)
    assert calls == [future]
    late = []
    future.add_done_callback(late.append)  # already done: called at once
    assert late == [future]


def test_callback_fires_for_dropped_future(setup):
    app, celery = setup
    done = threading.Event()
    celery.submit(tasks.add, 1, 1).add_done_callback(lambda f: done.set())
    assert done.wait(10)


def test_stdlib_and_asyncio_interop(setup):
    app, celery = setup
    futures = [celery.submit(tasks.add, i, i) for i in range(5)]
    done, not_done = concurrent.futures.wait(futures, timeout=10)
    assert len(done) == 5 and not not_done
    results = sorted(f.result() for f in concurrent.futures.as_completed(futures, timeout=10))
    assert results == [0, 2, 4, 6, 8]

    async def main():
        one = await celery.submit(tasks.add, 20, 22)
        two = await asyncio.wrap_future(celery.submit(tasks.add, 1, 1))
        return one, two

    assert asyncio.run(main()) == (42, 2)


def test_get_by_id(setup):
    app, celery = setup
    future = celery.submit(tasks.add, 2, 3)
    future.result(10)
    again = celery.get(future.id)
    assert isinstance(again, Future)
    assert again.result(timeout=5) == 5
    assert again.id == future.id

    unknown = celery.get("no-such-task-id")
    assert unknown.state == "PENDING"
    assert not unknown.running() and not unknown.done()
    with pytest.raises(TimeoutError, match="knows nothing of this task id"):
        unknown.result(timeout=0.2)


def test_current_task_and_g(setup):
    app, celery = setup
    from flask_execute import current_task

    assert not current_task
    facts = [celery.submit(tasks.task_facts) for _ in range(4)]
    for future in facts:
        value = future.result(10)
        assert value["task_id"] == future.id
        assert value["bool"] is True
        assert value["g_before"] is None  # g is fresh for every task
        assert value["app"] == app.import_name


def test_factory_app_built_once_per_worker(factory_app):
    from tests.apps import factory

    with factory_app.app_context():
        counts = {factory.celery.submit(factory.created).result(10) for _ in range(10)}
    assert counts == {1}


def test_status_inspect_control(setup):
    app, celery = setup
    start = time.monotonic()
    status = celery.status()
    assert time.monotonic() - start < 0.9  # every expected worker answered: no waiting
    assert list(status.values()) == ["OK"]
    node = next(iter(status))
    assert node.split("@")[0] in {"direct", "factory"}
    assert celery.inspect.ping() == {node: {"ok": "pong"}}
    registered = celery.inspect.registered()
    assert "flask_execute.dispatch" in registered[node]
    assert node in celery.inspect.stats()
    assert isinstance(celery.inspect.active(), dict)
    assert celery.control.ping() == {node: {"ok": "pong"}}
    assert node in celery.control.pool_grow(1)
    assert node in celery.control.pool_shrink(1)
    assert celery.control.heartbeat(reply=False) == {}


def _wait(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def test_get_of_an_expired_result_says_so(direct_app, redis_url):
    import redis as redis_client

    from flask_execute import ResultExpired
    from tests.apps import direct

    with direct_app.app_context():
        future = direct.celery.submit(tasks.add, 1, 1)
        assert future.result(10) == 2
        redis_client.Redis.from_url(redis_url + "/1").delete(f"celery-task-meta-{future.id}")
        again = direct.celery.get(future.id)
        with pytest.raises(ResultExpired, match="its result has expired"):
            again.result(timeout=1)
        assert isinstance(again.exception(0), LookupError)
