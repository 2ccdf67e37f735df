"""What a task raised reaches the caller as itself, or wrapped (issue 10, item 7).

A ``BaseException`` that is not an ``Exception`` never unwinds the caller: it arrives as
a ``RemoteError``. The failures Celery stores itself for a call (a lost pool process, a
time limit) are sealed by the worker and keep their type; the ``SystemExit`` with which
Celery's pool stops a task is not the task's own failure.
"""

from __future__ import annotations

import asyncio
import json
import os

import pytest
from billiard.exceptions import TimeLimitExceeded
from billiard.exceptions import WorkerLostError
from flask import Flask

from flask_execute import Celery
from flask_execute import RemoteError
from tests import conftest
from tests import test_security
from tests.apps import tasks
from tests.apps.tasks import Halt
from tests.test_security import serves
from tests.test_security import Target
from tests.test_security import wait_for

direct = test_security.direct  # the fixture: the shared direct app, under attack


def pool_of(target: Target) -> set[int]:
    """The target worker's pool processes."""
    (worker,) = target.state.services.children
    return conftest.descendants(worker.pid)


def stored(target: Target, task_id: str) -> dict:
    return json.loads(target.client.get(f"celery-task-meta-{task_id}"))


def sealed(target: Target, task_id: str) -> bool:
    """The failure stored for ``task_id`` carries an error envelope the app's key opens."""
    meta = stored(target, task_id)
    (envelope,) = [
        arg["flask_execute"] for arg in meta["result"]["exc_message"] if isinstance(arg, dict)
    ]
    target.state.codec.open(envelope, "error", task_id)
    return True


# --- the worker reports what a task raises, and seals Celery's own failures -----------
RAISED = [GeneratorExit("stop"), asyncio.CancelledError(), Halt("mine")]


def _wrapped(exc: BaseException) -> str:
    name = f"{type(exc).__module__}.{type(exc).__qualname__}"
    return f"{name}: the task raised {exc!r}; the worker was kept running"


@pytest.mark.parametrize("raised", RAISED, ids=lambda exc: type(exc).__name__)
def test_a_base_exception_in_task_code_is_reported_wrapped(direct, raised):
    pool = pool_of(direct)
    single = direct.celery.submit(tasks.raise_it, raised)
    chunk = direct.celery.map(tasks.raise_it, [raised], [ValueError("x")], chunksize=2)
    for future in (single, chunk[0]):
        exc = future.exception(timeout=10)
        assert type(exc) is RemoteError
        assert str(exc) == _wrapped(raised)
        assert ", in raise_it\n" in exc.remote_traceback
    assert type(chunk[1].exception(timeout=10)) is ValueError  # its neighbour: its own
    assert serves(direct.celery)
    assert pool_of(direct) == pool  # not even the pool process was replaced


@pytest.mark.parametrize("raised", RAISED, ids=lambda exc: type(exc).__name__)
def test_a_base_exception_in_eager_task_code_is_reported_wrapped(raised):
    app = Flask("outcomes_eager")
    app.config.update(SECRET_KEY="outcomes-eager", CELERY_ALWAYS_EAGER=True)
    celery = Celery(app)
    with app.app_context():
        single = celery.submit(tasks.raise_it, raised)
        chunk = celery.map(tasks.raise_it, [raised], [1], chunksize=2)
    for future in (single, chunk[0]):
        exc = future.exception(0)
        assert type(exc) is RemoteError
        assert str(exc) == _wrapped(raised)


def test_a_lost_pool_process_arrives_sealed_with_its_type(direct, tmp_path):
    runs = str(tmp_path / "runs")
    single = direct.celery.submit(tasks.die_always, runs)
    chunk = direct.celery.map(tasks.die_always, [runs], [runs], chunksize=2)
    for future in (single, *chunk):
        exc = future.exception(timeout=20)
        assert type(exc) is WorkerLostError
        assert str(exc).startswith("Worker exited prematurely: signal 9 (SIGKILL)")
    assert sealed(direct, single.id) and sealed(direct, chunk[0].id)
    assert serves(direct.celery)


def test_a_time_limit_arrives_sealed_with_its_type(direct):
    future = direct.celery.submit(tasks.sleep, 10, time_limit=1)
    exc = future.exception(timeout=20)
    assert type(exc) is TimeLimitExceeded
    assert str(exc) == "TimeLimitExceeded(1,)"
    assert sealed(direct, future.id)
    assert serves(direct.celery)


def test_terminate_is_a_cancellation_not_the_task_exiting(direct, tmp_path):
    """``cancel(terminate=True)`` stops the pool process with SIGTERM, whose handler
    raises SystemExit inside the task: that is the process leaving, not the task's own
    failure; the task stays cancelled (REVOKED) for every reader, and the process goes."""
    mark = tmp_path / "mark"
    future = direct.celery.submit(tasks.mark_and_wait, str(mark), str(tmp_path / "never"), 30)
    assert wait_for(future.running)
    pid = stored(direct, future.id)["result"]["pid"]
    assert future.cancel(terminate=True) is True
    assert wait_for(lambda: not os.path.exists(f"/proc/{pid}") or _zombie(pid))
    assert stored(direct, future.id)["status"] == "REVOKED"
    assert direct.celery.get(future.id).cancelled()
    assert serves(direct.celery)


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1].startswith("Z")
    except OSError:
        return True


def test_a_cold_shutdown_stops_an_at_least_once_call_without_failing_it(
    broker_url, log_dir, tmp_path
):
    """A cold shutdown stops the pool process running a call with SIGTERM: that is no
    failure of the call, which is delivered again to the next worker."""
    app = Flask("outcomes_cold")
    app.config.update(
        SECRET_KEY="outcomes-cold",
        CELERY_BROKER_URL=broker_url,
        CELERY_WORKERS=["outcomes-cold"],
        CELERY_LOG_DIR=log_dir,
        CELERY_FLOWER=False,
    )
    celery = Celery(app)
    runs = tmp_path / "runs"
    try:
        with app.app_context():
            future = celery.submit(tasks.count_and_sleep, str(runs), 2, acks_late=True)
            assert wait_for(future.running, timeout=20)
            celery.stop(timeout=0)  # SIGTERM, then at once SIGQUIT: a cold shutdown
            assert not future.done()
            celery.start()
            assert future.result(timeout=30) == 2
    finally:
        with app.app_context():
            celery.stop()
    assert len(runs.read_text().splitlines()) == 2
