"""The web process survives any stored state and raises only what was signed (issue 10,
items 6 and 7).

The attacker can write to the result backend: a state is ``SET`` and ``PUBLISH``-ed on
``celery-task-meta-<id>`` of the app's Redis db (``forge_result``). Whatever they write
fails that one future, with an error naming its task id; the result watcher keeps its
one subscription and every other future its latency. A failure raises its own type only
when a worker holding the app's key sealed it, Celery's own failures (a lost pool
process, a time limit) included; anything else is a ``RemoteError`` naming the type it
claims, and a ``BaseException`` that is not an ``Exception`` never unwinds the caller.
"""

from __future__ import annotations

import asyncio
import json
import os
import pickle
import threading
import time
import uuid

import pytest
import redis
from billiard.exceptions import TimeLimitExceeded
from billiard.exceptions import WorkerLostError
from flask import Flask

from flask_execute import Celery
from flask_execute import RemoteError
from flask_execute import SignatureError
from tests import conftest
from tests import test_security
from tests.apps import tasks
from tests.apps.tasks import Halt
from tests.test_security import DIRECT_DB
from tests.test_security import forge_result
from tests.test_security import NOBODY
from tests.test_security import serves
from tests.test_security import Target
from tests.test_security import wait_for

direct = test_security.direct  # the fixture: the shared direct app, under attack
DEEP = b"[" * 100_000 + b"]" * 100_000
UNREADABLE = (
    "The state stored for task {task_id} is unreadable ({why}): forged? Nothing in it"
    " was deserialized."
)
REFUSED = (
    "The {what} stored for task {task_id} was refused (malformed): {detail} Nothing in it"
    " was unpickled."
)
UNSIGNED = (
    "{claimed}: unsigned failure stored for task {task_id}; not raised as its claimed type"
    " (forged, or not stored by a flask-execute worker): {message}"
)


def subscriptions(target: Target) -> set[str]:
    """The Redis clients holding a pattern subscription on the target's db: its result
    watcher's one connection (a reconnect shows as a new client id)."""
    db = str(DIRECT_DB)
    return {c["id"] for c in target.client.client_list() if c["psub"] != "0" and c["db"] == db}


def pool_of(target: Target) -> set[int]:
    """The target worker's pool processes."""
    (worker,) = target.state.services.children
    return conftest.descendants(worker.pid)


def full_pool(target: Target) -> set[int]:
    """The target worker's pool processes, once it has all of them again (an earlier
    test may have ended one: its replacement is forked when the worker notices)."""
    concurrency = target.state.worker_options("direct")["concurrency"]
    assert wait_for(lambda: len(pool_of(target)) == concurrency)
    return pool_of(target)


def stored(target: Target, task_id: str) -> dict:
    return json.loads(target.client.get(f"celery-task-meta-{task_id}"))


def sealed(target: Target, task_id: str) -> bool:
    """The failure stored for ``task_id`` carries an error envelope the app's key opens."""
    meta = stored(target, task_id)
    (envelope,) = [
        arg["flask_execute"] for arg in meta["result"]["exc_message"] if isinstance(arg, dict)
    ]
    target.state.codec.open(envelope, "error", task_id)
    return True


# --- the worker reports what a task raises, and seals Celery's own failures -----------
RAISED = [GeneratorExit("stop"), asyncio.CancelledError(), Halt("mine")]


def _wrapped(exc: BaseException) -> str:
    name = f"{type(exc).__module__}.{type(exc).__qualname__}"
    return f"{name}: the task raised {exc!r}; the worker was kept running"


@pytest.mark.parametrize("raised", RAISED, ids=lambda exc: type(exc).__name__)
def test_a_base_exception_in_task_code_is_reported_wrapped(direct, raised):
    pool = full_pool(direct)
    single = direct.celery.submit(tasks.raise_it, raised)
    chunk = direct.celery.map(tasks.raise_it, [raised], [ValueError("x")], chunksize=2)
    for future in (single, chunk[0]):
        exc = future.exception(timeout=10)
        assert type(exc) is RemoteError
        assert str(exc) == _wrapped(raised)
        assert ", in raise_it\n" in exc.remote_traceback
    assert type(chunk[1].exception(timeout=10)) is ValueError  # its neighbour: its own
    assert serves(direct.celery)
    assert pool_of(direct) == pool  # not even the pool process was replaced


@pytest.mark.parametrize("raised", RAISED, ids=lambda exc: type(exc).__name__)
def test_a_base_exception_in_eager_task_code_is_reported_wrapped(raised):
    app = Flask("outcomes_eager")
    app.config.update(SECRET_KEY="outcomes-eager", CELERY_ALWAYS_EAGER=True)
    celery = Celery(app)
    with app.app_context():
        single = celery.submit(tasks.raise_it, raised)
        chunk = celery.map(tasks.raise_it, [raised], [1], chunksize=2)
    for future in (single, chunk[0]):
        exc = future.exception(0)
        assert type(exc) is RemoteError
        assert str(exc) == _wrapped(raised)


def test_a_lost_pool_process_arrives_sealed_with_its_type(direct, tmp_path):
    runs = str(tmp_path / "runs")
    single = direct.celery.submit(tasks.die_always, runs)
    chunk = direct.celery.map(tasks.die_always, [runs], [runs], chunksize=2)
    for future in (single, *chunk):
        exc = future.exception(timeout=20)
        assert type(exc) is WorkerLostError
        assert str(exc).startswith("Worker exited prematurely: signal 9 (SIGKILL)")
    # the chunk's message failed as a whole: its failure is stored under its own id
    assert sealed(direct, single.id) and sealed(direct, chunk[0].chunk.task_id)
    assert serves(direct.celery)


def test_a_time_limit_arrives_sealed_with_its_type(direct):
    future = direct.celery.submit(tasks.sleep, 10, time_limit=1)
    exc = future.exception(timeout=20)
    assert type(exc) is TimeLimitExceeded
    assert str(exc) == "TimeLimitExceeded(1,)"
    assert sealed(direct, future.id)
    assert serves(direct.celery)


def test_terminate_is_a_cancellation_not_the_task_exiting(direct, tmp_path):
    """``cancel(terminate=True)`` stops the pool process with SIGTERM, whose handler
    raises SystemExit inside the task: that is the process leaving, not the task's own
    failure; the task stays cancelled (REVOKED) for every reader, and the process goes."""
    mark = tmp_path / "mark"
    future = direct.celery.submit(tasks.mark_and_wait, str(mark), str(tmp_path / "never"), 30)
    assert wait_for(future.running)
    pid = stored(direct, future.id)["result"]["pid"]
    assert future.cancel(terminate=True) is True
    assert wait_for(lambda: not os.path.exists(f"/proc/{pid}") or _zombie(pid))
    assert stored(direct, future.id)["status"] == "REVOKED"
    assert direct.celery.get(future.id).cancelled()
    assert serves(direct.celery)


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1].startswith("Z")
    except OSError:
        return True


def test_a_cold_shutdown_stops_an_at_least_once_call_without_failing_it(
    broker_url, log_dir, tmp_path
):
    """A cold shutdown stops the pool process running a call with SIGTERM: that is no
    failure of the call, which is delivered again to the next worker."""
    app = Flask("outcomes_cold")
    app.config.update(
        SECRET_KEY="outcomes-cold",
        CELERY_BROKER_URL=broker_url,
        CELERY_WORKERS=["outcomes-cold"],
        CELERY_LOG_DIR=log_dir,
        CELERY_FLOWER=False,
    )
    celery = Celery(app)
    runs = tmp_path / "runs"
    try:
        with app.app_context():
            future = celery.submit(tasks.count_and_sleep, str(runs), 2, acks_late=True)
            assert wait_for(future.running, timeout=20)
            celery.stop(timeout=0)  # SIGTERM, then at once SIGQUIT: a cold shutdown
            assert not future.done()
            celery.start()
            assert future.result(timeout=30) == 2
    finally:
        with app.app_context():
            celery.stop()
    assert len(runs.read_text().splitlines()) == 2


# --- a bad state fails its own future, and nothing else ---------------------------------
_plain = {"exc_module": "builtins", "exc_type": "ValueError", "exc_message": ["x"]}
BAD_STATES: dict[str, tuple[bytes, str, dict[str, str]]] = {
    "deep-array": (DEEP, UNREADABLE, {"why": "not Celery's JSON: RecursionError"}),
    "deep-object": (
        b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
        UNREADABLE,
        {"why": "not Celery's JSON: RecursionError"},
    ),
    "deep-result": (
        b'{"status": "SUCCESS", "result": ' + DEEP + b"}",
        UNREADABLE,
        {"why": "not Celery's JSON: RecursionError"},
    ),
    "huge-integer": (
        b'{"status": "SUCCESS", "result": ' + b"9" * 5000 + b"}",
        UNREADABLE,
        {"why": "not Celery's JSON: ValueError"},
    ),
    "invalid-utf8": (
        b'{"status": "SUCCESS", "result": "\xff\xfe"}',
        UNREADABLE,
        {"why": "not Celery's JSON: UnicodeDecodeError"},
    ),
    "kombu-typed-value": (
        b'{"status": "SUCCESS", "result": {"__type__": "decimal", "__value__": "x"}}',
        UNREADABLE,
        {"why": "not Celery's JSON: InvalidOperation"},
    ),
    "array": (b"[1, 2]", UNREADABLE, {"why": "an array, not an object"}),
    "null": (b"null", UNREADABLE, {"why": "null, not an object"}),
    "status-missing": (b'{"result": 1}', UNREADABLE, {"why": "no status string"}),
    "status-array": (b'{"status": ["SUCCESS"]}', UNREADABLE, {"why": "no status string"}),
    "status-infinite": (b'{"status": 1e999}', UNREADABLE, {"why": "no status string"}),
    "success-without-result": (
        b'{"status": "SUCCESS"}',
        REFUSED,
        {"what": "result", "detail": "Envelope is not a string."},
    ),
    "success-number": (
        b'{"status": "SUCCESS", "result": 5}',
        REFUSED,
        {"what": "result", "detail": "Envelope is not a string."},
    ),
    "failure-string": (
        b'{"status": "FAILURE", "result": "boom"}',
        UNSIGNED,
        {"claimed": "unknown", "message": "'boom'"},
    ),
    "failure-type-not-text": (
        json.dumps({"status": "FAILURE", "result": {**_plain, "exc_type": ["x"]}}).encode(),
        UNSIGNED,
        {"claimed": "['x']", "message": "['x']"},
    ),
    "failure-envelope-not-text": (
        json.dumps(
            {"status": "FAILURE", "result": {**_plain, "exc_message": [{"flask_execute": 5}]}}
        ).encode(),
        REFUSED,
        {"what": "failure", "detail": "Envelope is not a string."},
    ),
    "failure-traceback-not-text": (
        json.dumps({"status": "FAILURE", "result": _plain, "traceback": {"a": 1}}).encode(),
        UNSIGNED,
        {"claimed": "builtins.ValueError", "message": "['x']"},
    ),
}


@pytest.mark.parametrize("name", BAD_STATES)
def test_a_bad_state_fails_its_own_future_only(direct, name):
    data, message, fields = BAD_STATES[name]
    assert serves(direct.celery)  # the watcher is up
    before = subscriptions(direct)
    task_id = str(uuid.uuid4())
    try:
        waiting = direct.celery.get(task_id)
        forge_result(direct.client, task_id, data)
        errors = [waiting.exception(timeout=5)]  # published: read by the watcher
        errors.append(direct.celery.get(task_id).exception(0))  # stored: read by get()
        for exc in errors:
            assert isinstance(exc, (SignatureError, RemoteError))
            assert str(exc) == message.format(task_id=task_id, **fields)
        assert serves(direct.celery)
        assert subscriptions(direct) == before  # the watcher never reconnected
    finally:
        direct.client.delete(f"celery-task-meta-{task_id}")


def test_a_poisoned_state_published_again_and_again_slows_nobody(direct):
    assert serves(direct.celery)  # the watcher is up
    before = subscriptions(direct)
    poisoned = str(uuid.uuid4())
    victim = direct.celery.get(poisoned)  # someone waits on it
    stop = threading.Event()

    def attack() -> None:
        while not stop.is_set():
            forge_result(direct.client, poisoned, DEEP)
            forge_result(direct.client, str(uuid.uuid4()), DEEP)  # nobody waits on these
            stop.wait(0.01)

    attacker = threading.Thread(target=attack)
    attacker.start()
    try:
        started = time.monotonic()
        for i in range(20):  # milliseconds each; on main each took ~2 s, or never came
            assert direct.celery.submit(tasks.add, i, 1).result(timeout=5) == i + 1
        elapsed = time.monotonic() - started
    finally:
        stop.set()
        attacker.join(5)
        direct.client.delete(f"celery-task-meta-{poisoned}")
    assert elapsed < 10
    exc = victim.exception(0)
    assert isinstance(exc, SignatureError)
    assert poisoned in str(exc)
    assert subscriptions(direct) == before


def test_a_channel_name_that_is_not_text_is_ignored(direct):
    assert serves(direct.celery)  # the watcher is up
    before = subscriptions(direct)
    direct.client.publish(b"celery-task-meta-\xff\xfe", b'{"status": "SUCCESS"}')
    assert serves(direct.celery)  # published after it: the watcher read past it
    assert subscriptions(direct) == before


def test_a_bad_state_in_a_polled_backend_fails_its_own_future_only(tmp_path, broker_url, log_dir):
    """Result backends other than Redis are polled: the same promise holds."""
    results = tmp_path / "results"
    results.mkdir()
    app = Flask("outcomes_polled")
    app.config.update(
        SECRET_KEY="outcomes-polled",
        CELERY_BROKER_URL=broker_url,
        CELERY_RESULT_BACKEND=f"file://{results}",
        CELERY_WORKERS=["outcomes-polled"],
        CELERY_LOG_DIR=log_dir,
        CELERY_FLOWER=False,
    )
    celery = Celery(app)
    poisoned = str(uuid.uuid4())
    (results / f"celery-task-meta-{poisoned}").write_bytes(DEEP)
    try:
        with app.app_context():
            victim = celery.get(poisoned)
            assert celery.submit(tasks.add, 1, 2).result(timeout=20) == 3
            assert celery.submit(tasks.add, 2, 2).result(timeout=5) == 4
            exc = victim.exception(timeout=5)
    finally:
        with app.app_context():
            celery.stop()
    assert type(exc) is SignatureError
    why = "DecodeError in the result backend"
    assert str(exc) == UNREADABLE.format(task_id=poisoned, why=why)


# --- a failure raises its own type only when a worker of ours sealed it -----------------
FORGED_FAILURES = {
    "SystemExit": ("builtins", "SystemExit", [0]),
    "KeyboardInterrupt": ("builtins", "KeyboardInterrupt", []),
    "RequestRedirect": (
        "werkzeug.routing.exceptions",
        "RequestRedirect",
        ["https://evil.example/login"],
    ),
    "CancelledError": ("asyncio.exceptions", "CancelledError", []),
    "ValueError": ("builtins", "ValueError", ["a plausible failure"]),
}


def _plain_failure(module: str, name: str, args: list[object]) -> dict:
    return {
        "status": "FAILURE",
        "result": {"exc_module": module, "exc_type": name, "exc_message": args},
        "traceback": "Traceback (most recent call last):\n  made up\n",
    }


@pytest.mark.parametrize("name", FORGED_FAILURES)
def test_a_forged_plain_failure_raises_remote_error(direct, name):
    module, exc_type, args = FORGED_FAILURES[name]
    task_id = str(uuid.uuid4())
    future = direct.celery.get(task_id)
    try:
        forge_result(direct.client, task_id, _plain_failure(module, exc_type, args))
        exc = future.exception(timeout=5)  # never raises what it holds
    finally:
        direct.client.delete(f"celery-task-meta-{task_id}")
    assert type(exc) is RemoteError
    assert exc.type_name == f"{module}.{exc_type}"
    claimed = f"{module}.{exc_type}"
    assert str(exc) == UNSIGNED.format(claimed=claimed, task_id=task_id, message=repr(args))
    assert exc.remote_traceback == "Traceback (most recent call last):\n  made up\n"


def test_a_view_returning_a_forged_redirect_answers_500(broker_url):
    app = Flask("outcomes_view")
    app.config.update(
        SECRET_KEY="outcomes-view, a secret long enough for production",
        CELERY_BROKER_URL=broker_url,
        CELERY_START_LOCAL_WORKERS=False,
    )
    celery = Celery(app)

    @app.get("/report/<task_id>")
    def report(task_id: str) -> str:
        return str(celery.get(task_id).result(timeout=5))

    task_id = str(uuid.uuid4())
    client = redis.Redis.from_url(broker_url)
    forge_result(client, task_id, _plain_failure(*FORGED_FAILURES["RequestRedirect"]))
    client.close()
    response = app.test_client().get(f"/report/{task_id}")
    assert response.status_code == 500
    assert "Location" not in response.headers


@pytest.mark.parametrize(
    "exc",
    [SystemExit(0), KeyboardInterrupt(), GeneratorExit(), asyncio.CancelledError(), Halt("mine")],
    ids=lambda exc: type(exc).__name__,
)
def test_a_signed_base_exception_arrives_wrapped(direct, exc):
    name = f"{type(exc).__module__}.{type(exc).__qualname__}"
    task_id = str(uuid.uuid4())
    single = direct.celery.get(task_id)
    envelope = direct.state.codec.seal("error", task_id, pickle.dumps((exc, "remote tb\n")))
    failure = _plain_failure("builtins", "ValueError", ["x", {"flask_execute": envelope}])
    # a chunk of two calls whose first one raised it
    chunk = direct.celery.map(tasks.add, (1, 2), (3, 4), chunksize=2, queue=NOBODY)
    chunk_id = chunk[0].chunk.task_id  # the message, whose result holds every outcome
    outcomes = [(False, (exc, "remote tb\n")), (True, 7)]
    result = direct.state.codec.seal("result", chunk_id, pickle.dumps(outcomes))
    try:
        forge_result(direct.client, task_id, failure)
        forge_result(direct.client, chunk_id, {"status": "SUCCESS", "result": result})
        received = [single.exception(timeout=5), chunk[0].exception(timeout=5)]
        assert chunk[1].result(timeout=5) == 7
    finally:
        direct.client.delete(NOBODY, f"celery-task-meta-{task_id}", f"celery-task-meta-{chunk_id}")
    for got in received:
        assert type(got) is RemoteError
        assert got.type_name == name
        assert str(got) == f"{name}: the task raised {exc!r}"
        assert got.remote_traceback == "remote tb\n"
