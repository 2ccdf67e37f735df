"""Nothing leaks (issue 10, items 8 and 9).

An envelope's payload is a base64 pickle: whoever reads one reads the arguments or
the result of a call. Each test runs real workers (at DEBUG), a real Flower and real
Celery events with a secret *canary* passed as an argument and returned as a result,
and searches everything a bystander can read for the canary (plain or base64) and for
an envelope: every line of the worker's log, every ``inspect`` reply, every task
event, Flower's pages and API, the web process's log records and the exceptions a
caller gets. Logs are private files.
"""

from __future__ import annotations

import base64
import datetime
import json
import logging
import os
import pickle
import stat
import threading
import time
import uuid
from collections.abc import Callable

import pytest
from celery.exceptions import MaxRetriesExceededError
from flask import Flask

import flask_execute.state
from flask_execute import Celery
from flask_execute.processes import free_port
from flask_execute.redaction import redact
from flask_execute.redaction import RedactingFilter
from flask_execute.redaction import SealedResult
from tests.apps import tasks
from tests.conftest import TmpModules
from tests.test_security import direct  # noqa: F401  (the fixture)
from tests.test_security import forge
from tests.test_security import read
from tests.test_security import serves
from tests.test_security import size
from tests.test_security import wait_for

LEAKY_FUNCTIONS = """
import os
import time

from flask_execute import current_task


def echo(secret):
    return {"echo": secret}


def retry_once(secret):
    if current_task.request.retries < 1:
        current_task.retry(countdown=0.1)
    return [secret]


def retry_later(secret):
    current_task.retry(countdown=3600)  # waits in the worker's schedule


def fail(secret):
    raise ValueError("expected failure")


def give_up(secret):
    current_task.retry(countdown=0, max_retries=0)


def hold(secret, gate):
    deadline = time.monotonic() + 30
    while not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.01)
    return secret
"""


def canary() -> str:
    return f"CANARY-{uuid.uuid4().hex}"


def forms(secret: str) -> list[str]:
    """How ``secret`` could appear: as is, and in base64 (plain and URL-safe) at each
    of the three alignments it can take inside a longer encoded pickle."""
    found = [secret]
    for pad in range(3):
        for encode in (base64.b64encode, base64.urlsafe_b64encode):
            text = encode(b"\0" * pad + secret.encode()).decode()
            found.append(text[4 if pad else 0 : -4])
    return found


def assert_clean(where: str, text: str, secret: str) -> None:
    """No envelope and no form of ``secret`` in ``text``."""
    assert "fe1." not in text, f"an envelope in {where}: {_around(text, 'fe1.')}"
    for form in forms(secret):
        assert form not in text, f"the canary ({form}) in {where}: {_around(text, form)}"


def _around(text: str, needle: str) -> str:
    at = text.index(needle)
    return text[max(0, at - 200) : at + 200]


class EventLog:
    """Every Celery event of one app, captured by a receiver thread, as JSON text."""

    def __init__(self, controller: object) -> None:
        self.events: list[dict[str, object]] = []
        self._controller = controller
        self._receiver: object = None
        self._thread = threading.Thread(target=self._run, name="test-events", daemon=True)

    def _run(self) -> None:
        with self._controller.connection_for_read() as connection:  # type: ignore[attr-defined]
            self._receiver = self._controller.events.Receiver(  # type: ignore[attr-defined]
                connection, handlers={"*": self.events.append}
            )
            self._receiver.capture(limit=None, timeout=None, wakeup=False)

    def start(self, probe: Callable[[], str]) -> None:
        """Start capturing; return once the task id ``probe()`` submits was seen
        succeeding (events sent before the subscription are lost)."""
        self._thread.start()
        deadline = time.monotonic() + 30
        while True:
            task_id = probe()
            if wait_for(lambda: self.seen(task_id, "task-succeeded"), 2):  # noqa: B023
                return
            assert time.monotonic() < deadline, "the event receiver saw nothing"

    def seen(self, task_id: str, kind: str) -> bool:
        return any(e.get("uuid") == task_id and e.get("type") == kind for e in list(self.events))

    def text(self) -> str:
        return json.dumps(list(self.events), default=str)

    def stop(self) -> None:
        if self._receiver is not None:
            self._receiver.should_stop = True  # type: ignore[attr-defined]
        self._thread.join(10)


def leaky_app(
    name: str, broker_url: str, log_dir: str, tmp_modules: TmpModules, **config: object
) -> tuple[Flask, Celery, object]:
    """An app at DEBUG with one single-process worker, task events on, and a module
    of the functions it runs (by reference, like any importable function)."""
    module_name = f"leaky_{name}"
    tmp_modules.write(module_name, LEAKY_FUNCTIONS)
    module = tmp_modules.load(module_name)
    app = Flask(f"leaky_{name}_app")
    app.config.update(
        SECRET_KEY="leak-test-secret",
        CELERY_BROKER_URL=broker_url,
        CELERY_LOG_DIR=log_dir,
        CELERY_LOG_LEVEL="DEBUG",
        CELERY_WORKERS={name: {"concurrency": 1}},
        CELERY_FLOWER=False,
        CELERY_WORKER_SEND_TASK_EVENTS=True,
        CELERY_TASK_SEND_SENT_EVENT=True,
    )
    app.config.update(config)
    return app, Celery(app), module


def scheduled_ids(celery: Celery) -> set[str]:
    return {
        entry["request"]["id"]
        for entries in celery.inspect.scheduled(timeout=1).values()
        for entry in entries
    }


def request_ids(replies: dict[str, list[dict[str, object]]]) -> set[object]:
    return {request["id"] for requests in replies.values() for request in requests}


def probe(celery: Celery, func: Callable[[str], object]) -> Callable[[], str]:
    def submit() -> str:
        future = celery.submit(func, "probe")
        future.result(timeout=10)
        return future.id

    return submit


# --- item 8: worker log, inspect, events, the caller ---------------------------------------
def test_no_value_in_worker_log_inspect_events_or_web_log(
    broker_url, log_dir, tmp_modules, tmp_path, caplog
):
    """Every kind of call (success, retried, retry pending, ETA, failure, retries
    exhausted, chunked map, running, queued) with a canary argument and result: the
    worker's DEBUG log, every inspect reply, every event and the web process's log
    show labels and task ids only."""
    caplog.set_level(logging.DEBUG)
    secret = canary()
    app, celery, fn = leaky_app("leaky", broker_url, log_dir, tmp_modules)
    worker_log = os.path.join(log_dir, "leaky.log")
    gate = str(tmp_path / "gate")
    events = EventLog(app.extensions["celery"].controller)
    replies: dict[str, object] = {}
    try:
        with app.app_context():
            celery.start()
            events.start(probe(celery, fn.echo))
            done = {
                "echo": celery.submit(fn.echo, secret),
                "retry_once": celery.submit(fn.retry_once, secret),
                "eta": celery.submit(fn.echo, secret, countdown=0.5),
                "fail": celery.submit(fn.fail, secret),
                "give_up": celery.submit(fn.give_up, secret),
            }
            chunked = celery.map(fn.echo, secret, secret, secret, chunksize=2)
            assert done["echo"].result(timeout=10) == {"echo": secret}
            assert done["retry_once"].result(timeout=10) == [secret]
            assert done["eta"].result(timeout=10) == {"echo": secret}
            assert [f.result(timeout=10) for f in chunked] == [{"echo": secret}] * 3
            with pytest.raises(ValueError, match=r"^expected failure$"):
                done["fail"].result(timeout=10)
            with pytest.raises(MaxRetriesExceededError) as gave_up:
                done["give_up"].result(timeout=10)
            assert str(gave_up.value) == (
                f"Can't retry {fn.__name__}:give_up[{done['give_up'].id}]:"
                " max_retries (0) exceeded."
            )
            # then calls that wait: in the schedule, running (the only pool process), queued
            later = celery.submit(fn.retry_later, secret)
            eta = celery.submit(fn.echo, secret, countdown=3600)
            held = celery.submit(fn.hold, secret, gate)
            queued = celery.submit(fn.echo, secret)
            assert wait_for(lambda: {later.id, eta.id} <= scheduled_ids(celery))
            assert wait_for(lambda: held.id in request_ids(celery.inspect.active(timeout=1)))
            assert wait_for(lambda: queued.id in request_ids(celery.inspect.reserved(timeout=1)))
            ids = [later.id, eta.id, held.id, queued.id, done["echo"].id]
            for command in ("active", "reserved", "scheduled", "revoked", "stats", "conf"):
                replies[command] = getattr(celery.inspect, command)(timeout=1)
            replies["query_task"] = celery.inspect.query_task(*ids, timeout=1)
            open(gate, "w").close()
            assert held.result(timeout=10) == secret
            assert queued.result(timeout=10) == {"echo": secret}
            assert wait_for(lambda: events.seen(queued.id, "task-succeeded"))
    finally:
        open(gate, "w").close()
        events.stop()
        with app.app_context():
            celery.stop()
    label = f"{fn.__name__}:retry_later"
    (scheduled,) = [
        entry["request"]
        for entries in replies["scheduled"].values()
        for entry in entries
        if entry["request"]["id"] == later.id
    ]
    assert (scheduled["name"], scheduled["args"], scheduled["kwargs"]) == (
        label,
        f"<{label}>",
        "{}",
    )
    log_text = read(worker_log)
    success = f"Task {fn.__name__}:echo[{done['echo'].id}] succeeded in "
    assert success in log_text
    assert log_text.split(success, 1)[1].split("\n", 1)[0].endswith("s: <sealed result>")
    assert "TaskPool: Apply" in log_text  # the worker did log at DEBUG
    assert_clean("the worker log", log_text, secret)
    for command, reply in replies.items():
        assert reply, f"no worker answered inspect {command}"
        assert_clean(f"inspect {command}", json.dumps(reply, default=str), secret)
    assert events.seen(later.id, "task-sent")  # the retry's own publication
    assert_clean("the task events", events.text(), secret)
    web = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
    assert_clean("the web process log", web, secret)
    assert_clean("the caller's exception", f"{gave_up.value!s} {gave_up.value!r}", secret)


def test_no_value_in_eager_runs_logs(caplog):
    """Eager mode runs the task in the web process: Celery's trace logs, the record's
    ``data`` extra included, hold no envelope either."""
    caplog.set_level(logging.DEBUG, logger="celery.app.trace")
    secret = canary()
    app = Flask("leaky_eager_app")
    app.config.update(SECRET_KEY="leak-eager", CELERY_ALWAYS_EAGER=True)
    celery = Celery(app)
    with app.app_context():
        assert celery.submit(tasks.echo_options, secret).result() == (secret, None)
        with pytest.raises(TypeError):
            celery.submit(tasks.add, secret, 1).result()
    records = [r for r in caplog.records if r.name == "celery.app.trace"]
    assert any("succeeded in" in r.getMessage() for r in records)
    text = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in records)
    assert_clean("the eager trace log", text, secret)


def test_unregistered_task_body_dump_shows_no_envelope(direct):  # noqa: F811
    """A genuine envelope sent under a task name the worker does not know (version
    skew): Celery dumps the message body into its log; the envelope is redacted."""
    secret = canary()
    task_id, envelope = direct.envelope(tasks.add, secret, "x")
    message = forge(direct.message(task_id, envelope), task="flask_execute.not_registered")
    offset = size(direct.log)
    direct.inject(message)
    assert wait_for(lambda: "Received unregistered task" in read(direct.log, offset))
    assert serves(direct.celery)
    text = read(direct.log, offset)
    assert "<sealed>" in text
    assert_clean("the body dump", text, secret)


def test_a_message_with_the_envelope_as_argsrepr_shows_its_label(direct):  # noqa: F811
    """A retry published before this fix (Celery's default ``argsrepr`` is the
    envelope), or anyone's ``send_task``: whatever the message's ``argsrepr`` says, the
    worker shows ``<label>`` in inspect replies and its log."""
    secret = canary()
    task_id, envelope = direct.envelope(tasks.add, secret, "x")
    eta = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(minutes=5)
    message = forge(
        direct.message(task_id, envelope), argsrepr=repr((envelope,)), eta=eta.isoformat()
    )
    offset = size(direct.log)
    direct.inject(message)
    try:
        assert wait_for(lambda: task_id in scheduled_ids(direct.celery))
        replies = {
            "scheduled": direct.celery.inspect.scheduled(timeout=1),
            "query_task": direct.celery.inspect.query_task(task_id, timeout=1),
        }
    finally:
        direct.celery.control.revoke(task_id)  # it never runs
    (request,) = [
        entry["request"]
        for entries in replies["scheduled"].values()
        for entry in entries
        if entry["request"]["id"] == task_id
    ]
    assert (request["name"], request["args"], request["kwargs"]) == ("m:f", "<m:f>", "{}")
    for command, reply in replies.items():
        assert_clean(f"inspect {command}", json.dumps(reply, default=str), secret)
    assert_clean("the worker log", read(direct.log, offset), secret)


# --- item 8: log files ---------------------------------------------------------------------
def mode(path: object) -> int:
    return stat.S_IMODE(os.stat(str(path)).st_mode)


def test_log_files_are_private(monkeypatch, tmp_path):
    """Worker, beat, Flower and embedded Redis logs are created 0600, in a log
    directory created 0700; an existing directory keeps its mode (its owner's choice)
    but the files created in it are 0600 too."""
    monkeypatch.setattr(flask_execute.state, "redis_answers", lambda *a, **k: False)
    logs = tmp_path / "new" / "logs"
    existing = tmp_path / "existing"
    existing.mkdir()
    os.chmod(existing, 0o755)
    app = Flask("private_logs_app", instance_path=str(tmp_path / "instance"))
    app.config.update(
        SECRET_KEY="private logs", CELERY_LOG_DIR=str(logs),
        CELERY_WORKERS={"private": {}, "own": {"logfile": str(existing / "own.log")}},
        CELERY_FLOWER=True, CELERY_FLOWER_PORT=free_port(),
        CELERY_BEAT_SCHEDULE={"cleanup": {"task": "celery.backend_cleanup", "schedule": 3600.0}},
    )  # fmt: skip
    celery = Celery(app)
    umask = os.umask(0o022)  # the usual umask: what the files would get otherwise
    try:
        with app.app_context():
            celery.start()
            names = sorted(child.name for child in app.extensions["celery"].services.children)
            assert names == ["beat", "flower", "own", "private"]
            assert celery.submit(tasks.add, 1, 2).result(timeout=20) == 3
    finally:
        os.umask(umask)
        with app.app_context():
            celery.stop()
    assert mode(logs) == 0o700
    for name in ("private.log", "beat.log", "flower.log", "redis.log"):
        assert mode(logs / name) == 0o600, name
    assert mode(existing) == 0o755
    assert mode(existing / "own.log") == 0o600


# --- the parts -----------------------------------------------------------------------------
def test_redact_replaces_envelopes_and_their_prefixes_only():
    envelope = "fe1.eyJwIjoicmVzdWx0In0.gAWVAAAA.bWFj"
    assert redact(f"result: '{envelope}' done") == "result: '<sealed>' done"
    assert redact(f"cut: b'[[\"{envelope[:14]}...") == "cut: b'[[\"<sealed>..."
    for innocent in ("worker@fe1.example.com", "fe1.", "safe1.eyJ", "fe1.abc.eyJ"):
        assert redact(innocent) == innocent


def test_redacting_filter_cleans_message_args_data_and_traceback():
    envelope = "fe1.eyJwIjoiY2FsbCJ9.gAWV.bWFj"
    try:
        raise RuntimeError(f"bad {envelope}")
    except RuntimeError:
        import sys

        exc_info = sys.exc_info()
    record = logging.LogRecord(
        "celery.app.trace", logging.ERROR, __file__, 1, "Task %(name)s: %(exc)s",
        ({"name": "m:f", "exc": envelope},), exc_info,
    )  # fmt: skip
    record.data = {"args": f"('{envelope}',)", "id": 7}
    assert RedactingFilter().filter(record)
    assert record.getMessage() == "Task m:f: <sealed>"
    assert record.data == {"args": "('<sealed>',)", "id": 7}
    assert "fe1." not in logging.Formatter().format(record)
    assert "RuntimeError: bad <sealed>" in record.exc_text
    plain = logging.LogRecord("x", logging.INFO, __file__, 1, "hello %s", ("you",), None)
    assert RedactingFilter().filter(plain) and (plain.msg, plain.args) == ("hello %s", ("you",))


def test_sealed_result_stores_the_envelope_and_shows_none():
    from kombu.utils.json import dumps

    sealed = SealedResult("fe1.eyJ.x.y")
    assert repr(sealed) == str(sealed) == "<sealed result>"
    assert json.loads(dumps({"result": sealed})) == {"result": "fe1.eyJ.x.y"}
    restored = pickle.loads(pickle.dumps(sealed))
    assert type(restored) is str and restored == "fe1.eyJ.x.y"
