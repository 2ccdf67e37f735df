"""One outage, one message (issue 12, item 6): every broker or backend error that
reaches a caller is a BrokerUnavailable naming what is down; a connection left stale
by a broker restart is retried once; a call whose worker died names the worker."""

from __future__ import annotations

import os
import signal
import time

import pytest
from flask import Flask

from flask_execute import BrokerUnavailable
from flask_execute import Celery
from flask_execute import supervisor
from flask_execute import TaskTimeoutError
from flask_execute.local import EmbeddedRedis
from tests.apps import tasks
from tests.conftest import free_port


@pytest.fixture
def private_redis(tmp_path):
    server = EmbeddedRedis(str(tmp_path / "redis"), port=free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()


def make_app(broker_url, name, **config):
    app = Flask(f"outage_{name}")
    app.config.update(
        SECRET_KEY="outage-secret-for-tests", CELERY_BROKER_URL=broker_url,
        CELERY_START_LOCAL_WORKERS=False, CELERY_BROKER_TIMEOUT=1,
    )  # fmt: skip
    app.config.update(config)
    return app, Celery(app)


def test_status_after_a_broker_restart_retries_the_stale_connection(private_redis):
    app, celery = make_app(private_redis.url + "/0", "stale")
    with app.app_context():
        assert celery.status(timeout=0.2) == {}  # a pooled connection now exists
        private_redis.stop()
        private_redis.start()
        # the pooled connection is stale: redis-py's ConnectionError leaked
        assert celery.status(timeout=0.2) == {}
        assert celery.inspect.ping(timeout=0.2) == {}


def test_one_outage_gives_one_message_naming_the_broker(private_redis):
    url = private_redis.url + "/0"
    app, celery = make_app(url, "down")
    private_redis.stop()
    expected = (
        f"Cannot reach the Celery broker at {url} (CELERY_BROKER_URL):"
        " [Errno 111] Connection refused. Is it running?"
    )
    calls = {
        "submit": lambda: celery.submit(tasks.add, 1, 2),
        "map": lambda: celery.map(tasks.add, (1, 2)),
        "get": lambda: celery.get("a-task-id"),
        "status": lambda: celery.status(timeout=0.2),
        "inspect": lambda: celery.inspect.ping(timeout=0.2),
        "control": lambda: celery.control.pool_grow(1, timeout=0.2),
    }
    with app.app_context():
        for what, call in calls.items():
            with pytest.raises(BrokerUnavailable) as info:
                call()
            assert str(info.value) == expected, what


def test_a_backend_of_its_own_is_named_with_its_key(private_redis):
    broker = private_redis.url + "/0"
    backend = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    app, celery = make_app(broker, "backend", CELERY_RESULT_BACKEND=backend)
    with app.app_context(), pytest.raises(BrokerUnavailable) as info:
        celery.submit(tasks.add, 1, 2)
    assert str(info.value) == (
        f"Cannot reach the result backend at {backend} (CELERY_RESULT_BACKEND):"
        " [Errno 111] Connection refused. Is it running?"
    )


def test_a_call_whose_worker_died_names_the_worker(broker_url, log_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(supervisor, "MAX_RESTARTS", 0)  # a dead worker stays dead
    app, celery = make_app(broker_url, "died", CELERY_START_LOCAL_WORKERS=True,
                           CELERY_LOG_DIR=log_dir, CELERY_FLOWER=False,
                           CELERY_WORKERS={"mortal": {"concurrency": 1}})  # fmt: skip
    services = celery.runtime(app).services
    node = f"mortal@{os.uname().nodename}"
    try:
        mark, release = tmp_path / "mark", tmp_path / "release"
        future = celery.submit(tasks.mark_and_wait, str(mark), str(release), 30)
        deadline = time.monotonic() + 20
        while not (mark.exists() and future.worker):
            assert time.monotonic() < deadline, "the call did not start"
            time.sleep(0.05)
        with pytest.raises(TaskTimeoutError) as running:
            future.result(timeout=0.1)
        assert str(running.value).endswith(
            f"(state STARTED on queue 'celery'). It runs on worker {node}."
        )
        (child,) = services.children
        os.kill(child.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while not services.given_up:
            assert time.monotonic() < deadline, "the supervisor did not see the worker die"
            time.sleep(0.05)
        with pytest.raises(TaskTimeoutError) as dead:
            future.result(timeout=0.1)
        assert str(dead.value) == (
            f"Task tests.apps.tasks:mark_and_wait[{future.id}] not done after 0.1 s"
            f" (state STARTED on queue 'celery'). Worker {node}, which started it,"
            " stopped answering (killed, stopped or cut off from the broker): a call with"
            " acks_late=True"
            " runs again when redelivered, any other is not run again."
        )
    finally:
        release.touch()
        celery.stop()


def test_a_wrong_broker_url_in_development_fails_at_once(log_dir):
    # issue 13, item 5: local workers were started anyway and retried the URL until
    # the start timeout: ServiceStartError after 8 s, kombu's retries in its text
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    app, celery = make_app(url, "wrongurl", CELERY_START_LOCAL_WORKERS=True,
                           CELERY_LOG_DIR=log_dir, CELERY_FLOWER=False)  # fmt: skip
    started = time.monotonic()
    try:
        with pytest.raises(BrokerUnavailable) as info:
            celery.submit(tasks.add, 1, 2)
        assert time.monotonic() - started < 3
        assert not celery.runtime(app).services.children  # no worker was started
    finally:
        celery.stop()
    assert str(info.value) == (
        f"Cannot reach the Celery broker at {url} (CELERY_BROKER_URL):"
        " [Errno 111] Connection refused. Is it running?"
    )
