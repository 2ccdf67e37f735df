"""The pytest plugin's fixtures, used as a user's test suite would use them."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from flask import Flask

from flask_execute import Celery
from tests.apps import tasks
from tests.conftest import descendants

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def app(flask_execute_broker, log_dir):
    app = Flask("plugin_user_app")
    app.config.update(
        SECRET_KEY="user-secret-for-tests", CELERY_BROKER_URL=flask_execute_broker,
        CELERY_LOG_DIR=log_dir,
        CELERY_WORKERS=["plugin"], CELERY_FLOWER=False, CELERY_START_LOCAL_WORKERS=False,
    )  # fmt: skip
    Celery(app)
    return app


def test_worker_fixture_runs_real_workers(app, flask_execute_worker):
    celery = app.extensions["celery"]
    assert flask_execute_worker.services.running
    with app.app_context():
        assert celery.submit(tasks.add, 1, 2).result(timeout=10) == 3
        assert list(celery.status().values()) == ["OK"]


def test_eager_fixture(app, flask_execute_eager):
    before = descendants()
    celery = app.extensions["celery"]
    with app.app_context():
        future = celery.submit(tasks.add, 2, 2)
        assert future.done() and future.result() == 4
    assert descendants() == before


def test_sample_user_project_suite_passes():
    """examples/userproject has its own tests written against the plugin."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLASK_EXECUTE_TEST")}
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"],
        cwd=os.path.join(ROOT, "examples", "userproject"),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert " passed" in out.stdout
