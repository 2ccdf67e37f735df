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
from tests.conftest import fresh_db_url

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


# a user project with a factory app, tests that use the fixtures without pushing an app
# context themselves (as docs/testing.md's eager example), in both orders
MANY_APP = """
from flask import Flask

from flask_execute import Celery

celery = Celery()


def create_app(config=None):
    app = Flask(__name__)
    app.config.update(SECRET_KEY="many-tests", CELERY_FLOWER=False)
    app.config.update(config or {})
    celery.init_app(app)
    return app


def add(x, y):
    return x + y
"""
MANY_CONFTEST = """
import pytest
from many import create_app


@pytest.fixture
def app(flask_execute_broker, tmp_path):
    return create_app({"CELERY_BROKER_URL": flask_execute_broker,
                       "CELERY_LOG_DIR": str(tmp_path), "CELERY_WORKERS": ["many"]})
"""
MANY_WORKERS = """
from many import add, celery


def test_worker_first(app, flask_execute_worker):
    assert celery.submit(add, 1, 2).result(timeout=30) == 3


def test_worker_second(app, flask_execute_worker):
    assert celery.submit(add, 2, 3).result(timeout=30) == 5
    with app.app_context():
        assert celery.map(add, (1, 1), (2, 2)).result(timeout=30) == [2, 4]
"""
MANY_EAGER = """
from many import add, celery


def test_eager_first(app, flask_execute_eager):
    future = celery.submit(add, 1, 2)
    assert future.done() and future.result(timeout=0) == 3


def test_eager_second(app, flask_execute_eager):
    assert celery.submit(add, 2, 2).result(timeout=0) == 4


def test_eager_third(app, flask_execute_eager):
    assert celery.map(add, (1, 2), (3, 4)).result(timeout=0) == [3, 7]
"""


@pytest.mark.parametrize(
    "order", [["test_eager.py", "test_workers.py"], ["test_workers.py", "test_eager.py"]]
)
def test_the_fixtures_serve_any_number_of_tests_in_any_order(tmp_path, redis_url, order):
    """Each test's app stays alive after it (until the collector runs, or for good while
    its result watcher runs): the fixtures still pick the test's own app."""
    for name, source in {
        "many.py": MANY_APP,
        "conftest.py": MANY_CONFTEST,
        "test_workers.py": MANY_WORKERS,
        "test_eager.py": MANY_EAGER,
    }.items():
        (tmp_path / name).write_text(source)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLASK_EXECUTE_TEST")}
    env["FLASK_EXECUTE_TEST_BROKER"] = fresh_db_url(redis_url)
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *order],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert "5 passed" in out.stdout
