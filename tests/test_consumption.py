"""A worker run without -Q consumes the queues the app routes to (issue 12, item 7):
the README's production command, `celery -A flask_execute.celery worker`, consumed
only `celery`, and calls routed to a queue of CELERY_WORKERS stayed PENDING forever.
A timeout names the queue the call waits on."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from flask_execute import TaskTimeoutError
from tests.apps.tasks import add
from tests.conftest import read_until
from tests.conftest import stop_sessions
from tests.conftest import wait_gone

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SRC = os.path.join(ROOT, "src")
WORKERS = {"hi": {"queues": ["high"]}, "lo": {"queues": ["low", "bulk"]}, "plain": {}}


def _stock_worker(tmp_path, *args):
    """`celery -A flask_execute.celery worker`, as the README runs it in production."""
    return subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "flask_execute.celery", "worker",
         "--loglevel=info", "-c", "1", "--without-mingle", "--without-gossip", *args],
        cwd=tmp_path,
        env={**os.environ, "FLASK_APP": "qapp:create_app",
             "PYTHONPATH": os.pathsep.join([str(tmp_path), SRC, ROOT])},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip


@pytest.fixture
def qapp(tmp_modules, broker_url):
    tmp_modules.write_factory_app(
        "qapp",
        dict(SECRET_KEY="queues-secret-for-tests", CELERY_BROKER_URL=broker_url,
             CELERY_WORKERS=WORKERS, CELERY_START_LOCAL_WORKERS=False),
    )  # fmt: skip
    module = tmp_modules.load("qapp")
    return module, module.create_app()


def test_a_stock_worker_consumes_the_queues_the_app_routes_to(tmp_path, qapp):
    module, app = qapp
    anonymous = _stock_worker(tmp_path, "-n", "any@%h")
    named = _stock_worker(tmp_path, "-n", "lo@%h")
    told = _stock_worker(tmp_path, "-n", "told@%h", "-Q", "bulk")
    procs = [anonymous, named, told]
    try:
        banner = "".join(read_until(anonymous, "ready."))
        assert "flask-execute: worker any@" in banner
        assert "consumes celery, high, low, bulk (every queue this app routes to" in banner
        assert "flask-execute: worker lo@" in "".join(read_until(named, "ready."))
        assert "flask-execute:" not in "".join(read_until(told, "ready."))
        host = os.uname().nodename
        with app.app_context():
            consumed: dict[str, list[str]] = {}
            deadline = time.monotonic() + 30
            while len(consumed) < 3 and time.monotonic() < deadline:
                # a worker busy starting on a loaded machine may miss one broadcast
                replies = module.celery.inspect.active_queues(timeout=2) or {}
                consumed |= {node: sorted(q["name"] for q in qs) for node, qs in replies.items()}
            assert consumed == {
                f"any@{host}": ["bulk", "celery", "high", "low"],  # was ["celery"]
                f"lo@{host}": ["bulk", "low"],  # was ["celery"]
                f"told@{host}": ["bulk"],  # -Q: as told
            }
            assert module.celery.submit(add, 1, 2, queue="high").result(timeout=20) == 3
    finally:
        group = {p for proc in procs for p in _group(proc)}
        stop_sessions(procs)
        assert not wait_gone(group, 10)


def _group(proc):
    from tests.conftest import descendants

    return {p for p in descendants() if os.getpgid(p) == proc.pid}


def test_a_timeout_names_the_queue_the_call_waits_on(qapp):
    module, app = qapp
    with app.app_context():
        future = module.celery.submit(add, 1, 2)  # no queue given: the default queue
        with pytest.raises(TaskTimeoutError) as info:
            future.result(timeout=0.1)
    assert str(info.value).startswith(
        f"Task tests.apps.tasks:add[{future.id}] not done after 0.1 s"
        " (state PENDING on queue 'celery'). No worker consumes queue 'celery'"
    )
