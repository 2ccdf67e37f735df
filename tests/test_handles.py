"""Issue 11: every handle on a task is exact, "expired" is a fact, and results go to
the process that waits.

Three defects seen on main, each with a test here that failed there:

* ``celery.get(f.id)`` in the process that holds ``f`` detached ``f`` (the watcher kept
  one handler per task id): ``f.result()`` timed out although SUCCESS was stored;
* ``celery.get(id)`` reported ``ResultExpired`` for a task that had just started (it
  read the state, then the claim, and a worker claimed the task in between);
* every web process received every task's result (one pattern subscription per
  process): an idle web process paid for the calls of the others.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import sys
import threading
import time

import redis as redis_client
from flask import Flask

from flask_execute import Celery
from flask_execute import ResultExpired
from tests.apps import tasks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- several handles, one outcome ----------------------------------------------------------
def test_get_in_the_same_process_does_not_detach_the_submitted_future(setup):
    app, celery = setup
    future = celery.submit(tasks.sleep, 0.3)
    celery.get(future.id)  # dropped at once, as the reproduction did
    other = celery.get(future.id)
    assert future.result(timeout=10) == 0.3
    assert other.result(timeout=10) == 0.3


def test_every_handle_completes_with_the_same_outcome_and_its_callbacks_once(setup):
    app, celery = setup
    future = celery.submit(tasks.fail, "boom")
    handles = [future, *(celery.get(future.id) for _ in range(3))]
    calls: list[object] = []
    lock = threading.Lock()

    def callback(f: object) -> None:
        with lock:
            calls.append(f)

    for handle in handles:
        handle.add_done_callback(callback)
    done, not_done = concurrent.futures.wait(handles, timeout=10)
    assert not not_done
    errors = [h.exception(0) for h in handles]
    assert all(type(e) is ValueError and str(e) == "boom" for e in errors)
    deadline = time.monotonic() + 5
    while len(calls) < len(handles) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sorted(map(id, calls)) == sorted(map(id, handles))  # each once


def test_handles_in_a_pool_and_an_executor_agree(setup):
    app, celery = setup
    pool = celery.map(tasks.add, (1, 2), (3, 4))
    with celery.executor() as executor:
        third = executor.submit(tasks.add, 5, 6)
        again = [celery.get(f.id) for f in [*pool, third]]
        assert [f.result(timeout=10) for f in again] == [3, 7, 11]
        assert pool.result(timeout=10) == [3, 7] and third.result(timeout=10) == 11


# --- expired only when it is a fact -------------------------------------------------------
def test_get_in_a_tight_loop_across_the_claim_window_never_says_expired(direct_app):
    from tests.apps import direct

    with direct_app.app_context():
        for _ in range(150):
            future = direct.celery.submit(tasks.sleep, 0.01)
            while True:
                handle = direct.celery.get(future.id)
                if handle.done():
                    assert not isinstance(handle.exception(0), ResultExpired), future.id
                    break
                time.sleep(0.001)
            assert future.result(timeout=10) == 0.01


def test_a_running_call_whose_state_is_gone_is_not_expired(direct_app, redis_url):
    # claimed and started, but (say, after a flushed cache) no state stored: not a fact
    from tests.apps import direct

    client = redis_client.Redis.from_url(redis_url + "/1")
    with direct_app.app_context():
        future = direct.celery.submit(tasks.sleep, 1.0)
        deadline = time.monotonic() + 10
        while not future.running():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        client.delete(f"celery-task-meta-{future.id}")
        handle = direct.celery.get(future.id)
        assert not handle.done()
        assert handle.result(timeout=10) == 1.0


def test_queued_calls_read_after_a_broker_restart_are_never_expired(tmp_path, log_dir):
    """The independent probe: 200 calls queued, the broker restarted (its AOF keeps
    them), then ``celery.get()`` of each while a worker works through them."""
    from flask_execute.embedded import EmbeddedRedis
    from flask_execute.processes import free_port

    server = EmbeddedRedis(str(tmp_path / "redis"), port=free_port(), appendonly=True)
    server.start()
    config = dict(
        SECRET_KEY="handles-secret-for-tests", CELERY_BROKER_URL=server.url + "/0",
        CELERY_LOG_DIR=log_dir, CELERY_WORKERS=["restarted"], CELERY_FLOWER=False,
    )  # fmt: skip
    web, worker_app = Flask("handles_web"), Flask("handles_worker")
    web.config.update(config, CELERY_START_LOCAL_WORKERS=False)
    worker_app.config.update(config)
    web_celery, worker_celery = Celery(web), Celery(worker_app)
    try:
        with web.app_context():
            ids = [web_celery.submit(tasks.add, i, i).id for i in range(200)]
        server.stop()
        server.start()
        with worker_app.app_context():
            worker_celery.start()
        with web.app_context():
            handles = [web_celery.get(task_id) for task_id in ids]
            results = [h.result(timeout=60) for h in handles]
        assert results == [2 * i for i in range(200)]
    finally:
        with worker_app.app_context():
            worker_celery.stop()
        server.stop()


# --- results go to the process that waits ----------------------------------------------------
def test_an_idle_web_process_receives_nothing_of_the_others_calls(direct_app, redis_url):
    from tests.apps import direct

    idle = Flask("handles_idle")
    idle.config.update(
        SECRET_KEY="direct-secret",
        CELERY_BROKER_URL=redis_url + "/1",  # the direct app's broker and backend
        CELERY_START_LOCAL_WORKERS=False,
        TESTING=True,  # the direct app's short test key is fine outside production
    )
    idle_celery = Celery(idle)
    watcher = idle_celery.runtime(idle).client.watcher()  # live, subscribed
    received: list[bytes] = []
    original = watcher._on_message  # type: ignore[attr-defined]

    def counting(channel: bytes, data: bytes) -> None:
        received.append(channel)
        original(channel, data)

    watcher._on_message = counting  # type: ignore[attr-defined]
    with direct_app.app_context():
        pool = direct.celery.map(tasks.add, *[(i, i) for i in range(50)])
        assert pool.result(timeout=30)[-1] == 98
    time.sleep(0.2)  # anything published is in flight by now
    assert received == []


def test_get_of_a_call_submitted_by_a_process_that_has_exited(direct_app, redis_url, tmp_path):
    script = tmp_path / "submitter.py"
    script.write_text(
        "import json, sys\n"
        "from tests.apps import direct, tasks\n"
        "with direct.app.app_context():\n"
        "    future = direct.celery.submit(tasks.sleep, 0.5)\n"
        "    print(json.dumps(future.id), flush=True)\n"
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "src")]),
        "FLASK_EXECUTE_CHILD": "1",  # publish only: the session's worker runs it
    }
    done = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    task_id = json.loads(done.stdout.strip().splitlines()[-1])
    from tests.apps import direct

    with direct_app.app_context():
        assert direct.celery.get(task_id).result(timeout=10) == 0.5


def test_a_submit_right_after_the_watcher_lost_its_connection_is_followed(direct_app):
    """The result watcher's connection drops while no future waits: its thread decides
    to stop. A submit at that moment once found the thread still alive, waited for a
    subscription nobody would make, and failed after 10 s with BrokerUnavailable (or
    its future was never followed). The decision and a new waiter are now ordered."""
    from tests.apps import direct

    backend = direct_app.extensions["celery"].runtime(direct_app).controller.backend
    with direct_app.app_context():
        for i in range(30):
            backend.client.connection_pool.disconnect()
            start = time.monotonic()
            assert direct.celery.submit(tasks.add, i, 1).result(timeout=10) == i + 1
            assert time.monotonic() - start < 5, f"submit {i} waited for the watcher"
