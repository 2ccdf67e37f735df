"""The fault suite: under load, the broker restarts (30 s down), workers are killed
with SIGKILL at random instants, the web process is killed; on Redis and on
RabbitMQ, for both delivery modes. Every accepted call is counted by its side effect
and the documented guarantee is asserted exactly (docs/reliability.md):

* at most once (default): none runs twice; none is lost except calls that were
  running in a killed worker;
* at least once (``acks_late=True``): none is lost.

``make soak`` runs the same at a larger scale (tests/soak.py).
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import time
import uuid

import pytest
import redis

from tests import faults
from tests.conftest import fresh_db_url

pytestmark = pytest.mark.slow

OUTAGE = float(os.environ.get("FLASK_EXECUTE_FAULT_OUTAGE", "30"))
MODES = [pytest.param(False, id="at-most-once"), pytest.param(True, id="at-least-once")]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rabbit_or_skip() -> None:
    reason = faults.rabbit_missing()
    if reason:
        pytest.skip(reason)


@pytest.fixture
def counter_url(redis_url):
    return fresh_db_url(redis_url)


def _amqp_setup(tmp_name: str) -> tuple[str, dict[str, object]]:
    queue = f"fe-fault-{tmp_name}-{uuid.uuid4().hex[:8]}"
    return queue, {"CELERY_TASK_DEFAULT_QUEUE": queue}


def _amqp_queued(app, queue: str) -> int:
    with app.extensions["celery"].runtime(app).controller.connection_for_write() as conn:
        try:
            return int(conn.default_channel.queue_declare(queue, passive=True).message_count)
        except Exception:
            return 0


def _amqp_cleanup(app, queue: str) -> None:
    with app.extensions["celery"].runtime(app).controller.connection_for_write() as conn:
        conn.default_channel.queue_delete(queue)


def _check(counts: faults.Counts, late: bool, running_bound: int) -> None:
    print(faults.HEADER + "\n" + counts.row("at-least-once" if late else "at-most-once"))
    assert counts.accepted > 0
    assert counts.queued == 0, counts
    if late:
        assert counts.lost == 0, counts
    else:
        assert counts.twice == 0, counts
        assert counts.lost <= running_bound, counts


def _loads(celery, app, counter_url) -> list[faults.Load]:
    """Both delivery modes at once, each counted on its own: one worker start and one
    fault serve both (the suite's slowest part is waiting out the fault)."""
    return [faults.Load(celery, app, counter_url, late) for late in (False, True)]


def _settle(loads, queued) -> list[faults.Counts]:
    return [load.settle(60, queued) for load in loads]


def _check_both(loads, counts, running_bound: int) -> None:
    for load, count in zip(loads, counts, strict=True):
        _check(count, load.late, running_bound)


def _outage_under_load(app, celery, loads, cut, restore, queued):
    """Start the workers and the loads, cut the broker for OUTAGE seconds, restore it,
    stop the loads and count; every worker still serves, and it is the same process."""
    with app.app_context():
        celery.start()
        pids = [c.pid for c in app.extensions["celery"].runtime(app).services.children]
        for load in loads:
            load.start(rate=12)
        time.sleep(2)
        cut()
        time.sleep(OUTAGE)
        restore()
        time.sleep(3)
        for load in loads:
            load.stop()
        counts = _settle(loads, queued)
        assert [c.pid for c in app.extensions["celery"].runtime(app).services.children] == pids
        assert len(celery.status(timeout=5)) == 1
    return counts


# --- broker restart under load -----------------------------------------------------
def test_redis_restart_under_load(private_redis, counter_url, log_dir):
    url = private_redis.url + "/0"
    app, celery = faults.make_app(url, url, log_dir, "rrestart")
    loads = _loads(celery, app, counter_url)
    try:
        queued = functools.partial(faults.redis_queued, url)
        counts = _outage_under_load(
            app, celery, loads, private_redis.stop, private_redis.start, queued
        )
    finally:
        for load in loads:
            load.stop()
        celery.stop()
    _check_both(loads, counts, running_bound=0)


def test_rabbitmq_outage_under_load(redis_url, counter_url, log_dir):
    _rabbit_or_skip()
    from urllib.parse import urlsplit

    target = urlsplit(faults.AMQP_URL)
    proxy = faults.Outage(target.hostname or "127.0.0.1", target.port or 5672)
    url = faults.AMQP_URL.replace(f":{target.port or 5672}", f":{proxy.port}")
    queue, extra = _amqp_setup("outage")
    app, celery = faults.make_app(url, fresh_db_url(redis_url), log_dir, "aoutage", **extra)
    loads = _loads(celery, app, counter_url)
    try:
        counts = _outage_under_load(
            app, celery, loads, proxy.cut, proxy.restore, lambda: _amqp_queued(app, queue)
        )
    finally:
        for load in loads:
            load.stop()
        celery.stop()
        _amqp_cleanup(app, queue)
        proxy.close()
    _check_both(loads, counts, running_bound=0)


# --- worker SIGKILL at random instants under load ----------------------------------
@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_worker_kill_under_load(broker, private_redis, counter_url, redis_url, log_dir):
    extra: dict[str, object] = {}
    queue = None
    if broker == "rabbitmq":
        _rabbit_or_skip()
        url, backend = faults.AMQP_URL, fresh_db_url(redis_url)
        queue, extra = _amqp_setup("kill")
    else:
        url = backend = private_redis.url + "/0"
    app, celery = faults.make_app(url, backend, log_dir, f"kill{broker}", **extra)
    loads = _loads(celery, app, counter_url)
    kills = 3
    try:
        with app.app_context():
            celery.start()
            for load in loads:
                load.start(rate=15, seconds=8)
            faults.kill_workers_at_random(app, kills, 7.0, seed=int(time.time()))
            time.sleep(1.5)
            for load in loads:
                load.stop()
            queued = (lambda: faults.redis_queued(url)) if queue is None else (
                lambda: _amqp_queued(app, queue))  # fmt: skip
            counts = _settle(loads, queued)
    finally:
        for load in loads:
            load.stop()
        celery.stop()
        if queue is not None:
            _amqp_cleanup(app, queue)
    _check_both(loads, counts, running_bound=kills * 2)  # 2 pool processes per worker


# --- web process SIGKILL under load ---------------------------------------------------
@pytest.mark.parametrize("late", MODES)
def test_web_process_kill_under_load(private_redis, counter_url, log_dir, late):
    url = private_redis.url + "/0"
    app, celery = faults.make_app(url, url, log_dir, "webkill")
    prefix = f"webkill:{uuid.uuid4().hex[:8]}:"
    spec = {
        "config": {"SECRET_KEY": "faults-secret-for-tests", "CELERY_BROKER_URL": url,
                   "CELERY_START_LOCAL_WORKERS": False},
        "prefix": prefix, "counter": counter_url, "late": late, "rate": 50,
    }  # fmt: skip
    env = {**os.environ, "LOADPROC": json.dumps(spec),
           "PYTHONPATH": os.pathsep.join([os.path.join(ROOT, "src"), ROOT])}  # fmt: skip
    try:
        with app.app_context():
            celery.start()
            proc = subprocess.Popen([sys.executable, "-m", "tests.scripts.loadproc"], cwd=ROOT,
                                    env=env, stdout=subprocess.PIPE, text=True)  # fmt: skip
            accepted = []
            try:
                deadline = time.monotonic() + 30
                while len(accepted) < 100 and time.monotonic() < deadline:
                    line = proc.stdout.readline()
                    if line.startswith("ACCEPTED "):
                        accepted.append(line.split()[1])
            finally:
                proc.kill()
                proc.wait(10)
                proc.stdout.close()
            client = redis.Redis.from_url(counter_url)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                runs = [int(v or 0) for v in client.mget(accepted)]
                if all(runs):
                    break
                time.sleep(0.5)
            time.sleep(1.0)
            runs = [int(v or 0) for v in client.mget(accepted)]
    finally:
        celery.stop()
    counts = faults.Counts(accepted=len(accepted), once=runs.count(1),
                           twice=sum(r > 1 for r in runs), lost=runs.count(0))  # fmt: skip
    print(faults.HEADER + "\n" + counts.row("web kill"))
    assert counts.accepted >= 100
    assert counts.once == counts.accepted, counts  # the web process's death loses nothing
