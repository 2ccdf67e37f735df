"""A call a worker refuses for a reason the caller can fix (the workers do not know the
key it was signed with, its envelope expired) fails the caller's future at once, saying
what to check, instead of running out the caller's timeout. The worker's notice is
unsigned (it does not hold the caller's key): it only ever fails a call that has not
started, which then never runs, and never gives a value (refusals.py)."""

from __future__ import annotations

import json
import time

import pytest
from flask import Flask

from flask_execute import Celery
from flask_execute import SignatureError
from flask_execute.envelopes import derive_key
from flask_execute.envelopes import key_id
from flask_execute.refusals import NOTICE
from tests import conftest
from tests.apps import tasks

WEB_KEY, WORKER_KEY = "the-web-process-secret-key", "the-workers-secret-key"


def _app(name: str, key: str, broker: str, log_dir: str, local: bool) -> tuple[Flask, Celery]:
    app = Flask(name)
    app.config.update(
        SECRET_KEY=key, CELERY_BROKER_URL=broker, CELERY_LOG_DIR=log_dir,
        CELERY_WORKERS=[name], CELERY_FLOWER=False, CELERY_START_LOCAL_WORKERS=local,
    )  # fmt: skip
    return app, Celery(app)


@pytest.fixture(scope="module")
def workers(redis_url, log_dir):
    """An app with its worker running, signing with the key ``the-workers-secret-key``."""
    app, celery = _app(
        "refusals", "the-workers-secret-key", conftest.fresh_db_url(redis_url), log_dir, True
    )
    with app.app_context():
        celery.start()
        conftest.keep_alive(app)
        try:
            yield app, celery
        finally:
            celery.stop()


@pytest.fixture
def web(workers, log_dir):
    """A web process on the same broker whose SECRET_KEY differs from the workers'."""
    broker = workers[0].config["CELERY_BROKER_URL"]
    app, celery = _app("refusals_web", WEB_KEY, broker, log_dir, False)
    with app.app_context():
        yield app, celery


def kid(secret: str) -> str:
    return key_id(derive_key(secret.encode()))


def test_a_key_the_workers_do_not_know_fails_the_call_at_once(web):
    app, celery = web
    future = celery.submit(tasks.add, 1, 2)
    start = time.monotonic()
    with pytest.raises(SignatureError) as info:
        future.result(timeout=30)
    assert time.monotonic() - start < 10
    assert info.value.reason == "unknown_key"
    assert str(info.value) == (
        f"A worker refused tests.apps.tasks:add[{future.id}] (unknown_key): it does not"
        f" know the key this call was signed with (key id {kid(WEB_KEY)}; the worker"
        f" signs with key id {kid(WORKER_KEY)}). Give the web processes and the workers"
        " the same SECRET_KEY or CELERY_SIGNING_KEY (while rotating keys, keep the old one"
        " in SECRET_KEY_FALLBACKS or CELERY_SIGNING_KEY_FALLBACKS on both sides). The call"
        " did not run and will not."
    )
    assert future.exception(0) is info.value and future.state == "FAILURE"


def test_every_call_of_a_refused_map_fails_at_once(web):
    app, celery = web
    for chunksize in (None, 2):
        pool = celery.map(tasks.add, (1, 2), (3, 4), (5, 6), chunksize=chunksize)
        start = time.monotonic()
        errors = [pool[i].exception(timeout=30) for i in range(3)]
        assert time.monotonic() - start < 10
        assert [type(e) for e in errors] == [SignatureError] * 3
        assert all("(unknown_key): it does not know the key" in str(e) for e in errors)


# --- what a forged notice can do -------------------------------------------------------------
def forge(workers, task_id: str, **fields: object) -> None:
    """Publish a notice on the reply channel of this process, as anyone able to write
    to the result backend could."""
    app, celery = workers
    runtime = celery.runtime(app)
    notice = {"task_id": task_id, "status": "REFUSED", NOTICE: "unknown_key", **fields}
    runtime.controller.backend.client.publish(runtime.watcher.reply_channel, json.dumps(notice))


def test_a_notice_for_a_call_that_started_is_ignored(workers, tmp_path):
    app, celery = workers
    mark, release = tmp_path / "mark", tmp_path / "release"
    future = celery.submit(tasks.mark_and_wait, str(mark), str(release), 30)
    conftest_wait(mark.exists)
    forge(workers, future.id)
    time.sleep(0.5)
    assert not future.done()
    release.touch()
    assert future.result(timeout=30) == "released"


def test_a_notice_fails_a_queued_call_that_then_never_runs(workers, tmp_path):
    """Forged or not, a believed notice withdraws the call: as if its message had been
    deleted. A notice never gives a value, whatever status it claims."""
    app, celery = workers
    path = tmp_path / "ran"
    future = celery.submit(tasks.touch, str(path), countdown=2)
    forge(workers, future.id, status="SUCCESS", result=42)
    with pytest.raises(SignatureError, match=r"\(unknown_key\): it does not know the key"):
        future.result(timeout=5)
    time.sleep(4)  # past the countdown: the worker got the call and dropped it
    assert not path.exists()
    assert celery.submit(tasks.add, 1, 1).result(timeout=30) == 2


def test_a_notice_with_a_reason_not_told_is_ignored(workers):
    app, celery = workers
    future = celery.submit(tasks.add, 2, 2, countdown=1)
    forge(workers, future.id, **{NOTICE: "bad_mac"})
    forge(workers, future.id, **{NOTICE: ["unknown_key"]})
    assert future.result(timeout=30) == 4


def conftest_wait(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)
