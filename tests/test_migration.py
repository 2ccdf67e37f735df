"""Code written for Flask-Execute 0.1.6 (the examples of its docs/usage.rst and its
test suite), run through the rows of docs/migrating.md, against a real worker: each
row that is not "removed" is exercised by a test below (its docstring names it)."""

from __future__ import annotations

import os
import pathlib
import re
import socket
import threading

import pytest
from celery.schedules import crontab
from flask import Flask

from flask_execute import Celery
from flask_execute import ConfigurationError
from tests import conftest
from tests.apps import oldstyle

ROOT = pathlib.Path(__file__).resolve().parent.parent
MIGRATING = (ROOT / "docs" / "migrating.md").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def old(redis_url, log_dir):
    """The 0.1.6-style app with its worker ``quorra`` running."""
    app = oldstyle.create_app(
        CELERY_BROKER_URL=conftest.fresh_db_url(redis_url), CELERY_LOG_DIR=log_dir
    )
    with app.app_context():
        oldstyle.celery.start()
        conftest.keep_alive(app)
        try:
            yield app, oldstyle.celery
        finally:
            oldstyle.celery.stop()


# --- the table covers 0.1.6 --------------------------------------------------------------
# Every public name and key of 0.1.6 (its __init__, plugin, futures and managers modules,
# its init_app defaults and its CLI), as it appears in the first column of a table row.
OLD_API = [
    "pip install Flask-Execute", "from flask_execute import Celery, current_task",
    "flask_execute.__version__", "flask_execute.plugin.dispatch", "flask_execute.ext.celery",
    "flask_execute.managers.TaskManager", "flask_execute.plugin.PROCESSES",
    "Celery(app, MyTask)", "celery.app", 'app.extensions["celery"]', "celery.controller",
    "celery.submit(func, *args, **kwargs)", "celery.apply(func, args=, kwargs=, **options)",
    "celery.map(func, *args, **kwargs)", "celery.get(task_id)", "celery.status(timeout=5)",
    "celery.start(timeout=...)", "celery.stop(timeout=...)", "celery.processes",
    "celery.logs", "celery.wrapper", "future.result(timeout=)", "future.exception(timeout=)",
    "future.running()", "future.cancel()", "future.cancel(wait=True, timeout=1)",
    "future.add_done_callback(fn)", "future.id", "Future(async_result)",
    "pool.result(timeout=0)", "pool.cancel()", "pool.cancel(wait=True, timeout=1)",
    "pool.exception()",
    "pool.add_done_callback(fn)", "pool.status", "pool.add(future)", "FuturePool(futures)",
    "@celery.task", "celery.task.<name>", "celery.schedule.<name>", "current_task.id",
    "current_task.update_state(...)", "celery.inspect.<command>(timeout=, destination=)",
    "celery.control.<command>(...)", "celery.inspect.help()", "CELERY_BROKER_URL",
    "CELERY_RESULT_BACKEND", "CELERY_WORKERS", "CELERY_START_LOCAL_WORKERS",
    "CELERY_START_TIMEOUT", "CELERY_TASK_SERIALIZER", "CELERY_RESULT_SERIALIZER",
    "CELERY_ACCEPT_CONTENT", "CELERY_SANITIZE_ARGUMENTS", "CELERY_ALWAYS_EAGER",
    "CELERY_LOG_LEVEL", "CELERY_LOG_DIR", "CELERY_FLOWER", "CELERY_FLOWER_PORT",
    "CELERY_FLOWER_ADDRESS", "CELERY_SCHEDULER", "CELERYBEAT_SCHEDULE", "C_FORCE_ROOT=1",
    "flask celery cluster", "celery -A flask_execute.ext.celery worker",
]  # fmt: skip


def rows() -> dict[str, str]:
    """``{first cell: status cell}`` of every table row of docs/migrating.md."""
    found = {}
    for line in MIGRATING.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 4 and cells[0] not in ("0.1.6", "---"):
            found[cells[0]] = cells[1]
    return found


@pytest.mark.parametrize("name", OLD_API)
def test_every_0_1_6_api_has_a_row(name):
    assert any(name in first for first in rows()), f"docs/migrating.md has no row for {name}"


def test_every_row_says_what_it_is_now():
    statuses = ("same", "changed", "restored", "removed")
    for first, status in rows().items():
        assert status.startswith(statuses), f"{first}: status {status!r}"


# --- the rows that work today, with 0.1.6's own examples -----------------------------------
def test_configuration_with_0_1_6_defaults_says_delete_them(redis_url):
    """Row: CELERY_TASK_SERIALIZER, CELERY_RESULT_SERIALIZER, CELERY_ACCEPT_CONTENT."""
    app = Flask(__name__)
    app.config.update(
        SECRET_KEY="s", CELERY_BROKER_URL=redis_url, CELERY_ACCEPT_CONTENT=["json", "pickle"],
        CELERY_TASK_SERIALIZER="pickle", CELERY_RESULT_SERIALIZER="pickle",
    )  # fmt: skip
    with pytest.raises(ConfigurationError) as info:
        Celery(app)
    assert str(info.value).startswith(
        "CELERY_TASK_SERIALIZER = 'pickle', CELERY_RESULT_SERIALIZER = 'pickle' and"
        " CELERY_ACCEPT_CONTENT = ['json', 'pickle']: no longer needed, delete them."
    )


def test_setup_submit_and_future(old):
    """Rows: Celery() + init_app, submit, future.result/state/status/id/name, get,
    plugin.Future; usage.rst "Submitting Task to Workers" and "Working with Futures"."""
    from flask_execute.plugin import Future

    app, celery = old
    add = oldstyle.add
    assert [celery.submit(add, 1, 2).result(timeout=10),
            celery.submit(add, 1, y=2).result(timeout=10),
            celery.submit(add, x=1, y=2).result(timeout=10)] == [3, 3, 3]  # fmt: skip
    future = celery.submit(add, 1, 2)
    assert isinstance(future, Future)
    assert future.result(timeout=10) == 3
    assert future.done() and not future.running() and not future.cancelled()
    assert future.state == future.status == "SUCCESS"
    assert future.name == "tests.apps.oldstyle:add"
    task_id = future.id
    assert celery.get(task_id).result(timeout=10) == 3
    assert celery.get(task_id).done()
    assert future.async_result.status == "SUCCESS"  # Row: future.<AsyncResult attribute>


def test_exception_cancel_and_callback(old):
    """Rows: future.exception, future.cancel, future.add_done_callback."""
    app, celery = old
    failing = celery.submit(oldstyle.fail)
    with pytest.raises(AssertionError, match="fail"):
        failing.result(timeout=10)
    error = failing.exception()
    assert isinstance(error, AssertionError) and str(error) == "fail"
    assert failing.state == "FAILURE" and not failing.running()

    queued = celery.submit(oldstyle.sleep, countdown=30)
    assert queued.cancel() is True
    assert queued.cancelled() and queued.done() and not queued.running()

    seen: list[object] = []
    called = threading.Event()

    def callback(task):  # 0.1.6's tests: the callback takes the task (now: the future)
        seen.append(task.result())
        called.set()

    future = celery.submit(oldstyle.add, 1, 2)
    future.add_done_callback(callback)
    assert future.result(timeout=10) == 3
    assert called.wait(10)
    assert seen == [3]


def test_map_and_pool(old):
    """Rows: celery.map, FuturePool iteration/len/result/done/running/cancelled,
    pool.exception (first), FuturePool(futures); usage.rst's map examples."""
    from flask_execute.plugin import FuturePool

    app, celery = old
    future_pool = celery.map(oldstyle.add, [1, 2], [3, 4], [5, 6])
    assert [future.result(timeout=10) for future in future_pool] == [3, 7, 11]
    future_pool = celery.map(oldstyle.add, [1], [3], [5], y=2)
    assert [future.result(timeout=10) for future in future_pool] == [3, 5, 7]
    pool = celery.map(oldstyle.add_all, [1, 2], [1, 2], [1, 2])
    assert isinstance(pool, FuturePool) and len(pool) == 3
    assert pool.result(timeout=10) == [3, 3, 3]
    assert pool.done() and not pool.running() and not pool.cancelled()
    failed = celery.map(oldstyle.fail, [], [])
    with pytest.raises(AssertionError):
        failed.result(timeout=10)
    assert isinstance(failed.exception(), AssertionError)
    assert [type(f.exception()) for f in failed] == [AssertionError] * 2  # the new spelling
    assert FuturePool(list(pool)).result(timeout=10) == [3, 3, 3]


def test_registered_and_scheduled_tasks(old):
    """Rows: @celery.task, celery.task.<name>, @celery.schedule, celery.schedule.<name>
    (restored), CELERYBEAT_SCHEDULE; 0.1.6's test_managers."""
    app, celery = old
    data = celery.inspect.registered()
    (worker,) = data
    assert "tests.apps.oldstyle.registered" in data[worker]
    assert celery.task.registered()
    assert celery.task.registered.delay().get(timeout=10) is True

    schedule = celery.controller.conf["CELERYBEAT_SCHEDULE"]
    entry = schedule["scheduled-task-to-run-at-midnight"]
    assert entry["task"] == "tests.apps.oldstyle.scheduled_task"
    assert isinstance(entry["schedule"], crontab)
    assert schedule["solar-task"]["task"] == "tests.apps.oldstyle.task_to_run_every_sunset"
    every_30 = schedule["tests.apps.oldstyle.task_to_run_every_30_seconds"]
    assert (every_30["schedule"], every_30["args"], every_30["kwargs"]) == (
        30.0, (1, 2), {"arg3": "foo"}
    )  # fmt: skip
    assert celery.schedule.scheduled_task()
    assert celery.schedule.scheduled_task.delay().get(timeout=10) is True
    assert celery.schedule["scheduled-task-to-run-at-midnight"].name == entry["task"]
    assert celery.schedule["tests.apps.oldstyle.scheduled_task"] is celery.schedule.scheduled_task
    assert "solar-task" in celery.schedule and "nightly" not in celery.schedule
    with pytest.raises(AttributeError, match="No schedule or scheduled task is named 'nightly'"):
        celery.schedule.nightly  # noqa: B018


def test_current_task(old):
    """Rows: current_task.id (restored), current_task.update_state, `if current_task:`."""
    app, celery = old
    future = celery.submit(oldstyle.task_id)
    assert future.result(timeout=10) == future.id
    assert celery.submit(oldstyle.add_with_progress, 1, 2).result(timeout=10) == 3
    assert oldstyle.add_with_progress(1, 2) == 3  # outside a task: current_task is falsy


def test_inspect_control_and_status(old):
    """Rows: celery.inspect.<command>, celery.control.<command>, inspect/control help()
    (restored), celery.status(); usage.rst "Inspection" and "Control", 0.1.6's
    test_managers."""
    app, celery = old
    host = socket.gethostname()
    assert celery.status() == {f"quorra@{host}": "OK"}
    assert celery.inspect.ping() == {f"quorra@{host}": {"ok": "pong"}}
    for command in ("active", "scheduled", "reserved", "revoked", "registered", "stats"):
        assert f"quorra@{host}" in getattr(celery.inspect, command)(), command
    assert "broker" in celery.inspect.stats()[f"quorra@{host}"]
    assert celery.control.heartbeat() == {f"quorra@{host}": None}
    assert celery.control.pool_grow(1) == {f"quorra@{host}": {"ok": "pool will grow"}}
    assert celery.control.pool_shrink(1) == {f"quorra@{host}": {"ok": "pool will shrink"}}
    inspect_help = celery.inspect.help()
    assert re.search(r"^  ping\(\): Ping worker\(s\)\.$", inspect_help, re.MULTILINE)
    assert re.search(r"^  stats\(\): ", inspect_help, re.MULTILINE)
    control_help = celery.control.help()
    assert re.search(r"^  pool_grow\(n=1\): Grow pool", control_help, re.MULTILINE)
    assert re.search(r"^  rate_limit\(task_name, rate_limit\): ", control_help, re.MULTILINE)
    assert "shutdown" not in inspect_help and "  ping(" not in control_help


def test_restored_by_the_futures_redesign(old):
    """Rows: app.extensions["celery"], future.cancel(wait=, timeout=), pool.status/state,
    pool.add; 0.1.6's test_futures and its /submit view."""
    from flask import current_app

    app, celery = old
    assert app.extensions["celery"] is celery
    assert current_app.extensions["celery"].submit(oldstyle.add, 1, 2).result(timeout=10) == 3

    queued = celery.submit(oldstyle.sleep, 10, countdown=30)
    assert queued.cancel(wait=True, timeout=1) is True
    assert queued.cancelled() and queued.done() and not queued.running()

    pool = celery.map(oldstyle.add_all, [1, 2], [1, 2], [1, 2])
    assert pool.result(timeout=10) == [3, 3, 3]
    assert pool.status == pool.state == "SUCCESS"
    pool.add(celery.submit(oldstyle.fail))
    assert isinstance(pool.exception(timeout=10), AssertionError)
    assert pool.state == "FAILURE" and len(pool) == 4


def test_restored_logs_and_pool_cancel_wait(old):
    """Rows: celery.logs, pool.cancel(wait=, timeout=) (restored)."""
    app, celery = old
    (log,) = celery.logs
    assert os.path.basename(log) == "quorra.log" and os.path.isfile(log)

    pool = celery.map(oldstyle.sleep, [10], [10], countdown=30)
    assert pool.cancel(wait=True, timeout=1) is True
    assert pool.cancelled() and pool.done() and all(f.cancelled() for f in pool)
