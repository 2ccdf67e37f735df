"""Local workers come back: a dead worker is restarted (and given up when it keeps
dying), its messages are given back at once, and a worker reconnects to a broker
that went away (issue 12, items 1, 3, 4)."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time

import pytest
import redis
from flask import Flask
from kombu import Exchange
from kombu import Queue

from flask_execute import Celery
from flask_execute import supervisor
from flask_execute.transports import Connection
from tests.apps import tasks
from tests.conftest import read_until
from tests.conftest import stop_sessions

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SRC = os.path.join(ROOT, "src")


def make_app(broker_url, log_dir, name, **config):
    app = Flask(f"survival_{name}")
    app.config.update(
        SECRET_KEY="survival-secret-for-tests", CELERY_BROKER_URL=broker_url,
        CELERY_LOG_DIR=log_dir, CELERY_WORKERS={name: {"concurrency": 1}}, CELERY_FLOWER=False,
    )  # fmt: skip
    app.config.update(config)
    return app, Celery(app)


def wait_until(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_a_killed_worker_comes_back_with_its_prefetched_calls(
    broker_url, log_dir, tmp_path, caplog
):
    caplog.set_level(logging.WARNING, "flask_execute")
    app, celery = make_app(broker_url, log_dir, "phoenix")
    client = redis.Redis.from_url(broker_url)
    services = app.extensions["celery"].runtime(app).services
    try:
        mark, release = tmp_path / "mark", tmp_path / "release"
        running = celery.submit(tasks.mark_and_wait, str(mark), str(release), 30)
        wait_until(mark.exists, 20, "the first call to start")
        queued = [celery.submit(tasks.add, i, i) for i in range(4)]  # prefetched: unacked
        wait_until(lambda: client.hlen("unacked") == 4, 10, "4 prefetched calls")
        (dead,) = services.children
        os.kill(dead.pid, signal.SIGKILL)
        started = time.monotonic()
        # given back at once, not after the visibility timeout: the new worker runs them
        assert [f.result(timeout=20) for f in queued] == [0, 2, 4, 6]
        assert time.monotonic() - started < 15
        (fresh,) = services.children
        assert fresh.pid != dead.pid and fresh.alive()
        assert celery.status(timeout=5) == {f"phoenix@{os.uname().nodename}": "OK"}
        assert not running.done()  # at most once: the running call is not run again
    finally:
        release.touch()
        celery.stop()
    messages = [r.getMessage() for r in caplog.records]
    assert any("local worker phoenix" in m and "died (signal SIGKILL)" in m for m in messages)
    assert any("gave 4 message(s) held by the dead worker phoenix back" in m for m in messages)
    assert any("local worker phoenix is back" in m for m in messages)


def test_a_worker_that_keeps_dying_is_given_up_with_its_log(
    broker_url, log_dir, monkeypatch, caplog
):
    monkeypatch.setattr(supervisor, "BACKOFF", 0.05)
    monkeypatch.setattr(supervisor, "MAX_RESTARTS", 2)
    caplog.set_level(logging.WARNING, "flask_execute")
    app, celery = make_app(broker_url, log_dir, "doomed")
    services = app.extensions["celery"].runtime(app).services
    try:
        celery.start()
        for _ in range(3):
            (child,) = services.children
            os.kill(child.pid, signal.SIGKILL)
            wait_until(
                lambda pid=child.pid: services.given_up or services.children[0].pid != pid,
                20,
                "a restart",
            )
            if not services.given_up:  # wait for the restarted one to be ready
                wait_until(lambda: celery.status(timeout=0.3), 20, "the restarted worker")
        wait_until(lambda: services.given_up, 10, "giving up")
        assert services.given_up == ["doomed"]
    finally:
        celery.stop()
    (error,) = [
        r
        for r in caplog.records
        if r.levelno == logging.ERROR
        and r.name.startswith("flask_execute.")
        and "doomed" in r.getMessage()
    ]
    text = error.getMessage()
    assert "local worker doomed" in text and "after 2 restarts in a row; not restarting it" in text
    assert "Last lines of" in text and "doomed@" in text  # the tail of its log


def test_a_channel_closed_after_its_connection_still_gives_messages_back(broker_url):
    # kombu's Connection.close() detaches the transport (transport.client = None); a
    # channel closed after that (Celery's consumer closes some while reconnecting)
    # raised AttributeError ('NoneType' object has no attribute 'hostname'): the
    # worker stopped
    queue = Queue("survival-detached", Exchange("survival-detached"), "survival-detached")
    connection = Connection(broker_url)
    try:
        producer = connection.Producer(connection.channel())
        producer.publish({"n": 1}, exchange=queue.exchange, routing_key=queue.routing_key,
                         declare=[queue])  # fmt: skip
        channel = connection.channel()
        received = []
        consumer = channel.Consumer(queue, callbacks=[lambda body, m: received.append(body)])
        consumer.consume()
        connection.drain_events(timeout=5)
        assert received == [{"n": 1}]
        connection.transport.client = None  # what kombu's Connection.close() does first
        channel.close()  # gives the unacknowledged message back
        with Connection(broker_url) as again:
            message = again.SimpleQueue(queue).get(timeout=5)
            assert message.payload == {"n": 1} and message.delivery_info["redelivered"]
            message.ack()
    finally:
        connection.release()


def test_a_worker_restarted_while_the_broker_is_down_is_not_given_up(
    tmp_path, log_dir, monkeypatch, caplog
):
    # found by `make soak`: a worker killed during a Redis outage was restarted, did
    # not become ready (no broker) within the start timeout, was killed for it and
    # restarted again, until the supervisor gave it up during a 30 s outage
    from flask_execute.local import EmbeddedRedis
    from tests.conftest import free_port

    monkeypatch.setattr(supervisor, "BACKOFF", 0.05)
    monkeypatch.setattr(supervisor, "MAX_RESTARTS", 2)
    caplog.set_level(logging.WARNING, "flask_execute")
    server = EmbeddedRedis(str(tmp_path / "redis"), port=free_port())
    server.start()
    app, celery = make_app(server.url + "/0", log_dir, "patient", CELERY_START_TIMEOUT=2)
    services = celery.runtime(app).services
    try:
        celery.start()
        server.stop()
        (child,) = services.children
        os.kill(child.pid, signal.SIGKILL)
        time.sleep(8)  # longer than the restarts allowed: 2 x (start timeout + backoff)
        assert services.given_up == []
        (fresh,) = services.children
        assert fresh.pid != child.pid and fresh.alive()
        server.start()
        assert celery.submit(tasks.add, 1, 2).result(timeout=30) == 3
    finally:
        celery.stop()
        server.stop()
    assert any("restarted worker patient is not ready after 2 s" in r.getMessage()
               for r in caplog.records)  # fmt: skip


@pytest.mark.parametrize("prefix", ["", "app1:"], ids=["plain", "global_keyprefix"])
def test_an_unacknowledged_message_nobody_holds_is_put_back_soon(
    broker_url, log_dir, tmp_path, prefix
):
    """A worker took a message, then lost its connection while giving it back (what a
    broker restart does to the messages a worker had prefetched): the message waits in
    kombu's unacknowledged hash, held by no worker. It is put back on the next scan,
    not after the visibility timeout (300 s). With a ``global_keyprefix`` too: the scan
    read the unprefixed index, found nothing, and left it for the visibility timeout."""
    options = {"global_keyprefix": prefix} if prefix else {}
    web, web_celery = make_app(broker_url, log_dir, "orphans", CELERY_START_LOCAL_WORKERS=False,
                               CELERY_BROKER_TRANSPORT_OPTIONS=options)  # fmt: skip
    client = redis.Redis.from_url(broker_url)
    with web.app_context():
        future = web_celery.submit(tasks.touch, str(tmp_path / "ran"))
    # take it off the queue as a worker would, and leave it unacknowledged, stamped 60 s
    # ago, in nobody's set of held messages
    raw = json.loads(client.rpop(f"{prefix}celery"))
    tag = raw["properties"]["delivery_tag"]
    client.hset(f"{prefix}unacked", tag, json.dumps([raw, "celery", "celery"]))
    client.zadd(f"{prefix}unacked_index", {tag: time.time() - 60})
    app, celery = make_app(broker_url, log_dir, "orphans", CELERY_BROKER_TRANSPORT_OPTIONS=options)
    try:
        with app.app_context():
            celery.start()
        assert future.result(timeout=25) == str(tmp_path / "ran")
        assert client.hlen(f"{prefix}unacked") == 0
    finally:
        celery.stop()


def test_a_forged_unacknowledged_entry_does_not_stop_the_orphan_scan(broker_url, log_dir, tmp_path):
    """An entry of kombu's unacknowledged hash that is not what kombu records (anyone
    with access to the broker can write one) made the scan raise at it, every time:
    the orphans after it were never put back."""
    web, web_celery = make_app(broker_url, log_dir, "forged", CELERY_START_LOCAL_WORKERS=False)
    client = redis.Redis.from_url(broker_url)
    with web.app_context():
        future = web_celery.submit(tasks.touch, str(tmp_path / "ran"))
    raw = json.loads(client.rpop("celery"))
    tag = raw["properties"]["delivery_tag"]
    client.hset("unacked", tag, json.dumps([raw, "celery", "celery"]))
    client.hset("unacked", "forged", "[not json")
    client.zadd("unacked_index", {"forged": time.time() - 61, tag: time.time() - 60})
    app, celery = make_app(broker_url, log_dir, "forged")
    try:
        with app.app_context():
            celery.start()
        assert future.result(timeout=25) == str(tmp_path / "ran")
        assert client.hlen("unacked") == 0
    finally:
        celery.stop()


def test_a_call_stopped_by_a_cold_shutdown_fails_saying_so(broker_url, log_dir, tmp_path):
    """A cold stop while an at-most-once call runs: Celery stores RETRY ('cancelled by
    Celery') although the message was acknowledged and never comes back, so the future
    waited until its timeout. It fails at once, naming the stopped worker."""
    app, celery = make_app(broker_url, log_dir, "coldstop")
    mark, release = tmp_path / "mark", tmp_path / "release"
    try:
        with app.app_context():
            future = celery.submit(tasks.mark_and_wait, str(mark), str(release), 30)
            wait_until(mark.exists, 20, "the call to start")
            celery.stop(timeout=0)
            exc = future.exception(timeout=15)
    finally:
        release.touch()
        celery.stop()
    assert type(exc).__name__ == "WorkerLostError", repr(exc)
    assert f"The worker coldstop@{os.uname().nodename} was stopped (cold shutdown)" in str(exc)
    assert future.state == "FAILURE"


def test_calls_prefetched_before_a_broker_restart_come_back_soon(private_redis, log_dir, tmp_path):
    # found by `make soak`: a worker that reconnects after a Redis restart keeps its
    # process id, so its old channel's prefetched messages (which it dropped and could
    # not give back while the broker was down) stayed "held" by its live process and
    # waited for the visibility timeout (300 s). Each channel now holds its own
    # lease, which stops being renewed when the channel goes.
    app, celery = make_app(private_redis.url + "/0", log_dir, "reconnect")
    client = redis.Redis.from_url(private_redis.url + "/0")
    mark, release = tmp_path / "mark", tmp_path / "release"
    try:
        with app.app_context():
            celery.start()
            (worker,) = celery.runtime(app).services.children
            running = celery.submit(tasks.mark_and_wait, str(mark), str(release), 60)
            wait_until(mark.exists, 20, "the first call to start")
            queued = [celery.submit(tasks.add, i, i) for i in range(4)]
            wait_until(lambda: client.hlen("unacked") == 4, 10, "4 prefetched calls")
            private_redis.stop()
            time.sleep(3)
            private_redis.start()
            release.touch()
            started = time.monotonic()
            assert running.result(timeout=30) == "released"
            assert [f.result(timeout=70) for f in queued] == [0, 2, 4, 6]
            assert time.monotonic() - started < 60  # the lease book, not the 300 s timeout
            assert client.hlen("unacked") == 0
            (same,) = celery.runtime(app).services.children
            assert same.pid == worker.pid  # it reconnected; it was not restarted
    finally:
        release.touch()
        celery.stop()


def _stock_worker(tmp_path, name, *extra):
    """`celery -A flask_execute.celery worker` of the app module ``lapp``, as a process
    manager runs it (no supervisor of ours), consuming the queue ``q<name>``."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "flask_execute.celery", "worker",
         "-n", f"{name}@%h", "-Q", f"q{name}", "-c", "1", "--without-mingle",
         "--without-gossip", "--loglevel=info", *extra],
        cwd=tmp_path, env={**os.environ, "FLASK_APP": "lapp:create_app",
                           "PYTHONPATH": os.pathsep.join([str(tmp_path), SRC, ROOT])},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        read_until(proc, "ready.")
    except BaseException:
        stop_sessions([proc])
        raise
    return proc


@pytest.fixture
def lapp(private_redis, tmp_modules):
    """An app run by separate workers ``a`` (queue ``qa``) and ``b`` (``qb``), on a
    Redis of the test's own; and that Redis's client."""
    url = private_redis.url + "/0"
    config = dict(
        SECRET_KEY="survival-secret-for-tests", CELERY_BROKER_URL=url,
        CELERY_START_LOCAL_WORKERS=False,
        CELERY_WORKERS={"a": {"queues": ["qa"]}, "b": {"queues": ["qb"]}},
    )  # fmt: skip
    tmp_modules.write_factory_app("lapp", config)
    app = tmp_modules.load("lapp").create_app()
    return app, app.extensions["celery"], redis.Redis.from_url(url)


def _lease_terms(client):
    """Seconds each holder in the lease book stays live without renewing."""
    now = time.time()
    return [until - now for _, until in client.zrange("unacked:leases", 0, -1, withscores=True)]


def test_a_separate_worker_killed_unseen_has_its_calls_put_back_by_another(lapp, tmp_path):
    """A worker that no supervisor of ours watches (run by systemd, say) is killed
    holding prefetched calls: a live worker's scan puts them back on their queue once
    the dead worker's lease lapses (30-40 s), not after the 300 s visibility timeout,
    and the next worker of that queue runs them."""
    app, celery, client = lapp
    procs: list[subprocess.Popen] = []
    mark, release = tmp_path / "mark", tmp_path / "release"
    try:
        procs += [_stock_worker(tmp_path, "a"), _stock_worker(tmp_path, "b")]
        with app.app_context():
            celery.submit(tasks.mark_and_wait, str(mark), str(release), 60, queue="qa")
            wait_until(mark.exists, 20, "the first call to start")
            queued = [celery.submit(tasks.add, i, i, queue="qa") for i in range(3)]
            wait_until(lambda: client.hlen("unacked") == 3, 10, "3 prefetched calls")
            assert all(0 < term <= 30 for term in _lease_terms(client))
            os.killpg(procs[0].pid, signal.SIGKILL)
            procs[0].wait()
            started = time.monotonic()
            wait_until(lambda: client.llen("qa") == 3, 60, "the calls back on their queue")
            assert time.monotonic() - started < 55  # the lease, not the 300 s timeout
            procs.append(_stock_worker(tmp_path, "a"))
            assert [f.result(timeout=20) for f in queued] == [0, 2, 4]
    finally:
        release.touch()
        stop_sessions(procs)


def test_a_solo_worker_holds_its_lease_for_the_visibility_timeout(lapp, tmp_path):
    """A solo worker runs the task in its main process and cannot renew its leases
    meanwhile: its holder stays live for the visibility timeout (300 s), so a long
    at-least-once call is not put back, and run again, after 30 s."""
    app, celery, client = lapp
    procs: list[subprocess.Popen] = []
    mark, release = tmp_path / "mark", tmp_path / "release"
    try:
        procs.append(_stock_worker(tmp_path, "a", "--pool=solo"))
        with app.app_context():
            future = celery.submit(
                tasks.mark_and_wait, str(mark), str(release), 60, queue="qa", acks_late=True
            )
            wait_until(mark.exists, 20, "the call to start")
            terms = _lease_terms(client)
            assert terms and all(250 < term <= 300 for term in terms), terms
            release.touch()
            assert future.result(timeout=20) == "released"
    finally:
        release.touch()
        stop_sessions(procs)
