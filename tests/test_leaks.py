"""Nothing leaks (issue 10, items 8 and 9).

An envelope's payload is a base64 pickle: whoever reads one reads the arguments or
the result of a call. Each test runs real workers (at DEBUG), a real Flower and real
Celery events with a secret *canary* passed as an argument and returned as a result,
and searches everything a bystander can read for the canary (plain or base64) and for
an envelope: every line of the worker's log, every ``inspect`` reply, every task
event, Flower's pages and API, the web process's log records and the exceptions a
caller gets. Logs are private files; the local Flower asks for a login.
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
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable

import pytest
from celery.exceptions import MaxRetriesExceededError
from flask import Flask

import flask_execute.runtime
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

    def count(self, task_id: str, kind: str) -> int:
        return sum(e.get("uuid") == task_id and e.get("type") == kind for e in list(self.events))

    def seen(self, task_id: str, kind: str) -> bool:
        return self.count(task_id, kind) > 0

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
    events = EventLog(app.extensions["celery"].runtime(app).controller)
    replies: dict[str, object] = {}
    try:
        with app.app_context():
            celery.start()
            events.start(probe(celery, fn.echo))
            done = {
                "echo": celery.submit(fn.echo, secret),
                "eta": celery.submit(fn.echo, secret, countdown=0.5),
                "fail": celery.submit(fn.fail, secret),
                "give_up": celery.submit(fn.give_up, secret),
            }
            chunked = celery.map(fn.echo, secret, secret, secret, chunksize=2)
            retried = celery.submit(fn.retry_once, secret)
            assert done["echo"].result(timeout=10) == {"echo": secret}
            # the retry is published, delivered and started (what it shows is what
            # matters here, whatever the second attempt's outcome)
            assert wait_for(lambda: events.count(retried.id, "task-started") == 2)
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


# --- item 9: Flower ------------------------------------------------------------------------
def fetch(url: str, login: str | None = None) -> tuple[int, str]:
    """(status, body) of a GET, with HTTP basic auth when ``login`` is given."""
    request = urllib.request.Request(url)
    if login is not None:
        request.add_header("Authorization", "Basic " + base64.b64encode(login.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def wait_for_flower(url: str, login: str, probe: Callable[[], str]) -> None:
    """Until Flower answers and follows the task events (a probe task shows up)."""
    deadline = time.monotonic() + 30
    while True:
        try:
            path = f"{url}/api/task/info/{probe()}"
            if wait_for(lambda: fetch(path, login)[0] == 200, 2):  # noqa: B023
                return
        except OSError:
            pass
        assert time.monotonic() < deadline, "Flower did not follow the task events"


PAGES = ("/", "/workers", "/tasks", "/api/tasks", "/api/workers?refresh=1")
DATATABLE = (
    "/tasks/datatable?draw=1&start=0&length=100&search%5Bvalue%5D="
    "&order%5B0%5D%5Bcolumn%5D=0&order%5B0%5D%5Bdir%5D=asc&columns%5B0%5D%5Bdata%5D=name"
)


def test_flower_asks_for_the_configured_login_and_shows_no_value(broker_url, log_dir, tmp_modules):
    """CELERY_FLOWER_BASIC_AUTH: every page and API call answers 401 without it (or
    with a wrong password), 200 with it; and what Flower shows of a success, a failure,
    a pending retry and a chunked map holds no envelope and no value."""
    secret = canary()
    login = f"admin:{uuid.uuid4().hex}"
    app, celery, fn = leaky_app(
        "flowered", broker_url, log_dir, tmp_modules, CELERY_FLOWER=True,
        CELERY_FLOWER_PORT=free_port(), CELERY_FLOWER_BASIC_AUTH=["ops:other-password", login],
    )  # fmt: skip
    try:
        with app.app_context():
            celery.start()
            url = app.extensions["celery"].runtime(app).services.flower_url
            wait_for_flower(url, login, probe(celery, fn.echo))
            ok = celery.submit(fn.echo, secret)
            failed = celery.submit(fn.fail, secret)
            later = celery.submit(fn.retry_later, secret)
            chunk = celery.map(fn.echo, secret, secret, chunksize=2)
            assert ok.result(timeout=10) == {"echo": secret}
            with pytest.raises(ValueError):
                failed.result(timeout=10)
            assert [f.result(timeout=10) for f in chunk] == [{"echo": secret}] * 2
            assert wait_for(lambda: later.id in scheduled_ids(celery))
            # a chunk is one Celery task; its members' outcomes have their own ids
            ids = [ok.id, failed.id, later.id, chunk[0].chunk.task_id]
            known = [f"{url}/api/task/info/{task_id}" for task_id in ids]
            assert wait_for(lambda: all(fetch(info, login)[0] == 200 for info in known))
            shown = {"sealed": 0}
            paths = [*PAGES, DATATABLE, "/metrics"]
            for task_id in ids:
                paths += [f"/task/{task_id}", f"/api/task/info/{task_id}"]
                paths += [f"/api/task/result/{task_id}"]
            paths += [f"/api/task/result/{member.id}" for member in chunk]
            for path in paths:
                status, body = fetch(url + path, login)
                assert status in (200, 503), (path, status)  # 503: no backend for results
                assert_clean(f"Flower {path}", body, secret)
                shown["sealed"] += body.count("<sealed result>")
            assert shown["sealed"] > 0  # the results are there, as labels
            info = json.loads(fetch(f"{url}/api/task/info/{ok.id}", login)[1])
            assert (info["args"], info["result"]) == (f"<{fn.__name__}:echo>", "<sealed result>")
            for path in [*PAGES, DATATABLE, f"/task/{ok.id}", f"/api/task/info/{ok.id}"]:
                assert fetch(url + path)[0] == 401, path
                assert fetch(url + path, "admin:wrong")[0] == 401, path
            assert fetch(url + "/", "ops:other-password")[0] == 200
    finally:
        with app.app_context():
            celery.stop()


def listening_addresses(port: int) -> set[str]:
    """The local addresses listening on TCP ``port`` (from /proc/net/tcp and tcp6)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                address, _, hex_port = local.partition(":")
                if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                    found.add(address)
    return found


def test_flower_generated_login_is_logged_once_and_only_flower_sees_it(broker_url, log_dir, caplog):
    """No CELERY_FLOWER_BASIC_AUTH: a random password, logged once by the web process,
    handed to Flower in its environment (not on its command line, not to the workers),
    required by every page; Flower listens on 127.0.0.1 only."""
    caplog.set_level(logging.INFO, logger="flask_execute.local")
    port = free_port()
    app = Flask("flower_generated_app")
    app.config.update(
        SECRET_KEY="generated", CELERY_BROKER_URL=broker_url, CELERY_LOG_DIR=log_dir,
        CELERY_WORKERS=["flowergen"], CELERY_FLOWER=True, CELERY_FLOWER_PORT=port,
    )  # fmt: skip
    celery = Celery(app)
    try:
        with app.app_context():
            celery.start()
            services = app.extensions["celery"].runtime(app).services

            def announced() -> list[logging.LogRecord]:
                return [r for r in caplog.records if "Flower is up at" in r.getMessage()]

            assert wait_for(announced, 30)
            (record,) = announced()
            assert record.levelno == logging.WARNING
            password = str(record.args[1])  # type: ignore[index]
            assert len(password) >= 20
            assert f"log in as 'flower' with password {password} " in record.getMessage()
            url = services.flower_url
            assert url == f"http://127.0.0.1:{port}"
            assert fetch(url + "/workers")[0] == 401
            assert fetch(url + "/workers", f"flower:{password}")[0] == 200
            assert fetch(url + "/api/tasks", f"flower:{password}")[0] == 200
            assert fetch(url + "/workers", "flower:guess")[0] == 401
            assert listening_addresses(port) == {"0100007F"}  # 127.0.0.1, nothing else
            by_name = {child.name: child.pid for child in services.children}
            with open(f"/proc/{by_name['flower']}/cmdline", "rb") as f:
                assert password.encode() not in f.read()
            with open(f"/proc/{by_name['flower']}/environ", "rb") as f:
                assert f"FLOWER_BASIC_AUTH=flower:{password}".encode() in f.read().split(b"\0")
            with open(f"/proc/{by_name['flowergen']}/environ", "rb") as f:
                assert b"FLOWER_BASIC_AUTH" not in f.read()
    finally:
        with app.app_context():
            celery.stop()
    for name in ("flower.log", "flowergen.log"):
        assert password not in read(os.path.join(log_dir, name))
    assert len([r for r in caplog.records if password in r.getMessage()]) == 1


# --- item 8: log files ---------------------------------------------------------------------
def mode(path: object) -> int:
    return stat.S_IMODE(os.stat(str(path)).st_mode)


def test_log_files_are_private(monkeypatch, tmp_path):
    """Worker, beat, Flower and embedded Redis logs are created 0600, in a log
    directory created 0700; an existing directory keeps its mode (its owner's choice)
    but the files created in it are 0600 too."""
    monkeypatch.setattr(flask_execute.runtime, "redis_answers", lambda *a, **k: False)
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
            names = sorted(child.name for child in celery.runtime(app).services.children)
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
