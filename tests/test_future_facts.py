"""Issue 11.6-7: done-callbacks run in the submitting app's context, and ``Future`` shows
Celery's read-only ``AsyncResult`` facts; ``FuturePool`` summarises its members' states.
None of it changes the ``concurrent.futures`` semantics (tests/stdlib_futures)."""

from __future__ import annotations

import datetime
import logging
import threading
import time

import pytest
from flask import current_app

from flask_execute import Future
from flask_execute import FuturePool
from flask_execute import TaskTimeoutError
from tests.apps import tasks


def wait_until(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def test_a_done_callback_runs_inside_the_submitting_apps_context(setup):
    app, celery = setup
    seen: list[object] = []
    done = threading.Event()

    def callback(future):
        seen.append((current_app.name, current_app.config.get("MARKER"), future.result(0)))
        done.set()

    future = celery.submit(tasks.sleep, 0.2)
    future.add_done_callback(callback)  # pending now: runs in the watcher's thread
    assert done.wait(10)
    assert seen == [(app.name, app.config.get("MARKER"), 0.2)]


def test_a_failing_callback_is_logged_with_the_task_id(setup, caplog):
    app, celery = setup
    future = celery.submit(tasks.sleep, 0.1)

    def boom(future):
        raise RuntimeError("callback failed")

    with caplog.at_level(logging.ERROR, logger="concurrent.futures"):
        future.add_done_callback(boom)
        assert future.result(timeout=10) == 0.1
        wait_until(lambda: "callback failed" in caplog.text)
    (record,) = [r for r in caplog.records if "exception calling callback" in r.getMessage()]
    assert f"task={future.id}" in record.getMessage()


def test_a_future_shows_celerys_facts(setup):
    app, celery = setup
    future = celery.submit(tasks.worker_name, queue="celery")
    node = future.result(timeout=10)
    assert future.state == future.status == "SUCCESS"
    assert future.worker == node
    assert future.queue == "celery"
    assert future.retries == 0
    assert isinstance(future.date_done, datetime.datetime)
    assert future.traceback is None
    assert future.args == "<tests.apps.tasks:worker_name>" and future.kwargs == "{}"
    assert future.name == "tests.apps.tasks:worker_name"


def test_a_failed_future_carries_the_worker_traceback_and_the_retries(setup, tmp_path):
    app, celery = setup
    failed = celery.submit(tasks.fail, "boom")
    assert isinstance(failed.exception(timeout=10), ValueError)
    assert "ValueError: boom" in failed.traceback
    retried = celery.submit(tasks.retry_until, str(tmp_path / "runs"), 3)
    assert retried.result(timeout=15) == 3
    assert retried.retries == 2


def test_a_pending_future_has_no_facts_yet(setup):
    app, celery = setup
    future = celery.submit(tasks.add, 1, 2, queue="nobody-consumes-this")
    try:
        assert (future.worker, future.date_done, future.traceback) == (None, None, None)
        assert repr(future).startswith("<Future at 0x")
        assert "state=pending" in repr(future) and f"task={future.id}" in repr(future)
    finally:
        assert future.cancel()


def test_cancel_can_wait_for_the_cancellation_like_flask_execute_0_1_6(setup):
    app, celery = setup
    future = celery.submit(tasks.sleep, 5)
    wait_until(future.running)
    assert future.cancel(terminate=True, wait=True, timeout=10)
    assert future.done() and future.cancelled()


@pytest.mark.parametrize(
    ("states", "summary"),
    [
        (["PENDING", "STARTED", "SUCCESS"], "PENDING"),
        (["PROGRESS", "SUCCESS"], "STARTED"),
        (["RETRY", "FAILURE"], "RETRY"),
        (["REVOKED", "FAILURE", "SUCCESS"], "REVOKED"),
        (["FAILURE", "SUCCESS"], "FAILURE"),
        (["SUCCESS", "SUCCESS"], "SUCCESS"),
    ],
)
def test_a_pool_summarises_its_members_states_as_0_1_6_did(states, summary):
    members = []
    for state in states:
        future = Future(f"id-{len(members)}")
        if state in ("SUCCESS", "FAILURE", "REVOKED"):
            future.settle(state, 1, exc=ValueError() if state == "FAILURE" else None)
        elif state != "PENDING":
            future.set_progress(state)
        members.append(future)
    pool = FuturePool(members)
    assert pool.state == pool.status == summary


def test_a_pool_of_real_calls_and_add(setup):
    app, celery = setup
    failing = celery.map(tasks.fail, "a", "b")
    failing.add(celery.submit(tasks.add, 1, 1))
    assert len(failing) == 3
    wait_until(failing.done)
    assert failing.state == "FAILURE"
    assert failing[2].result(0) == 2
    with pytest.raises(TypeError, match="holds flask-execute Futures"):
        failing.add("not a future")  # type: ignore[arg-type]


def test_a_pool_timeout_names_the_timeout_given(setup):
    app, celery = setup
    pool = celery.map(tasks.add, (1, 2), (3, 4), queue="nobody-consumes-this")
    try:
        with pytest.raises(TaskTimeoutError) as info:
            pool.result(timeout=0.5)
        assert str(info.value).startswith("2 of 2 calls not done after 0.5 s. The first: Task ")
    finally:
        pool.cancel()
