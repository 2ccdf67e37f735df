"""Eager mode: the same dispatch path, inline, no process started."""

from __future__ import annotations

import threading

import pytest
from flask import Flask
from flask import g

from flask_execute import Celery
from flask_execute import current_task
from flask_execute import SerializationError
from tests.apps import tasks
from tests.conftest import descendants


@pytest.fixture
def eager():
    app = Flask("eager_app")
    app.config.update(CELERY_ALWAYS_EAGER=True, MARKER="eager")
    celery = Celery(app)
    before = descendants()
    yield app, celery
    assert descendants() == before, "eager mode started a process"


def test_eager_submit_and_map(eager):
    app, celery = eager
    future = celery.submit(tasks.add, 1, 2)
    assert future.done() and future.result() == 3 and future.state == "SUCCESS"
    assert celery.map(tasks.add, [1, 2], [3, 4], chunksize=2).result() == [3, 7]
    assert celery.submit(lambda: 5).result() == 5
    assert celery.submit(tasks.config_value, "MARKER").result() == "eager"


def test_eager_same_serialization_checks(eager):
    app, celery = eager
    with pytest.raises(SerializationError, match="Argument 'y' \\(position 1\\)"):
        celery.submit(tasks.add, 1, threading.Lock())
    with pytest.raises(SerializationError, match="return value"):
        celery.submit(tasks.unpicklable_result).result()


def test_eager_exceptions_and_callbacks(eager):
    app, celery = eager
    future = celery.submit(tasks.fail, "eager boom")
    assert isinstance(future.exception(), ValueError)
    calls = []
    future.add_done_callback(calls.append)
    assert calls == [future]
    assert not future.cancel()


def test_eager_progress_and_current_task(eager):
    app, celery = eager
    states = []

    def progress():
        assert current_task
        current_task.update_state(state="PROGRESS", meta={"step": 1})
        return current_task.request.id

    future = celery.submit(progress)
    future.add_done_callback(lambda f: states.append(f.state))
    assert future.result() == future.id
    assert states == ["SUCCESS"]
    assert not current_task


def test_eager_runs_a_copy_like_a_worker(eager):
    """Arguments travel through pickle even inline: no shared mutable state."""
    app, celery = eager
    seen = []
    celery.submit(seen.append, 1).result()
    assert seen == []


def test_eager_fresh_app_context_per_task(eager):
    app, celery = eager
    with app.app_context():
        g.outer = "kept"
        facts = celery.submit(tasks.task_facts).result()
        assert facts["g_before"] is None
        assert g.outer == "kept"  # the caller's context is untouched


def test_eager_get_finds_live_futures(eager):
    app, celery = eager
    future = celery.submit(tasks.add, 2, 2)
    assert celery.get(future.id) is future
    with pytest.raises(LookupError, match="eager mode"):
        celery.get("unknown-id")
