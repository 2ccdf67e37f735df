"""``flask_execute.stream``: a task's states as server-sent events, pushed by the result
watcher, bounded, showing only what the view chose (tests/apps/streaming.py).

Real workers on the test Redis; the views are served over real HTTP by werkzeug in a
thread of this process, both by the app that submits (its calls' states arrive on its
reply channel) and by an observer app on the same broker (another web process: every
task is foreign to it, followed on the task's own result channel).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import socket
import threading
import time
import typing as t
import uuid
from collections.abc import Iterator

import pytest
import redis
from flask import Flask
from werkzeug.exceptions import NotFound
from werkzeug.serving import make_server

from flask_execute import stream
from tests.apps import streaming
from tests.apps import tasks
from tests.conftest import keep_alive

Event = tuple[str, t.Any]


@pytest.fixture(scope="module")
def app() -> Iterator[Flask]:
    with streaming.app.app_context():
        streaming.celery.start()
    keep_alive(streaming.app)
    try:
        yield streaming.app
    finally:
        with streaming.app.app_context():
            streaming.celery.stop()


@pytest.fixture(scope="module")
def observer(app: Flask) -> Flask:
    return streaming.make_app("observer")


@contextlib.contextmanager
def served(app: Flask) -> Iterator[tuple[str, int]]:
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, name="stream-tests", daemon=True)
    thread.start()
    try:
        yield "127.0.0.1", server.port
    finally:
        server.shutdown()
        thread.join(10)
        server.server_close()


class Client:
    """One event stream read over a socket of our own (so that the test can drop it)."""

    def __init__(self, address: tuple[str, int], path: str) -> None:
        self.sock = socket.create_connection(address, timeout=20)
        request = f"GET {path} HTTP/1.1\r\nHost: test\r\nAccept: text/event-stream\r\n\r\n"
        self.sock.sendall(request.encode())
        self.response = http.client.HTTPResponse(self.sock)
        self.response.begin()

    def next(self) -> tuple[str, t.Any, float]:
        """The next event (name, data, when it arrived); comments are ``(":", text)``."""
        name, data = "message", None
        while True:
            line = self.response.readline().decode()
            if not line:
                return "", None, time.time()  # the server ended the response
            line = line.rstrip("\n")
            if line.startswith(":"):
                return ":", line[1:].strip(), time.time()
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                data = json.loads(line[6:])
            elif line == "" and data is not None:
                return name, data, time.time()

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.response.close()


def parse(body: str) -> list[Event]:
    """Every event of a whole response body; comments as ``(":", text)``."""
    events: list[Event] = []
    for block in body.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if block.startswith(":"):
            events.append((":", block[1:].strip()))
        elif "data" in fields:
            events.append((fields.get("event", "message"), json.loads(fields["data"])))
    return events


def watched(app: Flask) -> list[str]:
    return t.cast(list[str], app.extensions["celery"].runtime(app).client.watcher().pending_ids())


def subscribers(task_id: str) -> int:
    channel = f"celery-task-meta-{task_id}"
    client = redis.Redis.from_url(streaming.BROKER_URL)
    try:
        return int(client.pubsub_numsub(channel)[0][1])
    finally:
        client.close()


def request_threads() -> int:
    return sum("process_request_thread" in th.name for th in threading.enumerate())


def eventually(check: t.Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.mark.parametrize("where", ["submitter", "observer"])
def test_progress_arrives_live(app: Flask, observer: Flask, where: str) -> None:
    served_by = app if where == "submitter" else observer
    with app.app_context():
        future = streaming.celery.submit(tasks.report_times, 5, 0.3)
    with served(served_by) as address:
        client = Client(address, f"/events/{future.id}")
        try:
            assert client.response.status == 200
            assert client.response.getheader("Content-Type") == "text/event-stream; charset=utf-8"
            assert client.response.getheader("Cache-Control") == "no-cache"
            events: list[tuple[str, t.Any, float]] = []
            while not events or events[-1][0] not in ("end", ""):
                events.append(client.next())
        finally:
            client.close()
    progress = [
        (data["info"], at) for name, data, at in events if name == "state" and "info" in data
    ]
    assert [info["done"] for info, _ in progress] == [1, 2, 3, 4, 5], events
    # each step within moments of the worker reporting it (the safety sweep runs every
    # 5 s; a poller would have to ask many times a second to keep up)
    late = [round(at - info["at"], 3) for info, at in progress if at - info["at"] > 0.5]
    assert not late, f"steps arrived late (s): {late}"
    assert events[-1][:2] == ("end", {"state": "SUCCESS"})
    assert future.result(timeout=10) == 5
    assert eventually(lambda: future.id not in watched(served_by))


def test_only_chosen_values_are_shown(app: Flask) -> None:
    client = app.test_client()
    with app.app_context():
        value = streaming.celery.submit(tasks.add, "s3cret-", "value")
        failure = streaming.celery.submit(tasks.fail, "s3cret-message")
        assert value.result(timeout=20) == "s3cret-value"
        assert isinstance(failure.exception(timeout=20), ValueError)

    body = client.get(f"/events/{value.id}").get_data(as_text=True)
    assert parse(body) == [("end", {"state": "SUCCESS"})]
    body = client.get(f"/events/{failure.id}").get_data(as_text=True)
    assert parse(body) == [("end", {"state": "FAILURE"})]
    # neither the exception's message nor its traceback, nor the worker (STARTED's meta)
    assert "s3cret" not in body and "Traceback" not in body and "streaming@" not in body

    body = client.get(f"/events/{value.id}?result").get_data(as_text=True)
    assert parse(body) == [("end", {"state": "SUCCESS", "result": "s3cret-value"})]
    body = client.get(f"/events/{failure.id}?error").get_data(as_text=True)
    assert parse(body) == [("end", {"state": "FAILURE", "error": "ValueError: s3cret-message"})]

    with app.test_request_context():
        shown = stream(value.id, result=lambda v: {"length": len(v)})
        assert parse(shown.get_data(as_text=True)) == [
            ("end", {"state": "SUCCESS", "result": {"length": 12}})
        ]


def test_progress_meta_can_be_hidden_or_summarised(app: Flask) -> None:
    with app.app_context():
        future = streaming.celery.submit(tasks.report_progress, 3, 0.2)
        body = app.test_client().get(f"/events/{future.id}?noinfo").get_data(as_text=True)
    states = [data for name, data in parse(body) if name == "state"]
    assert {"state": "PROGRESS"} in states
    assert all(set(data) == {"state"} for data in states), states
    with app.app_context():
        future = streaming.celery.submit(tasks.report_progress, 3, 0.2)
        with app.test_request_context():
            # what a task stores cannot start an event of its own: JSON escapes newlines
            response = stream(future.id, info=lambda meta: f"{meta['done']}\n\nevent: end")
            body = response.get_data(as_text=True)
    events = parse(body)
    shown = [data.get("info") for name, data in events if name == "state"]
    assert [x for x in shown if x is not None] == [f"{i}\n\nevent: end" for i in (1, 2, 3)]
    assert [name for name, _ in events].count("end") == 1
    assert events[-1] == ("end", {"state": "SUCCESS"})


def test_a_summary_that_is_not_json_is_left_out(
    app: Flask, caplog: pytest.LogCaptureFixture
) -> None:
    with app.app_context():
        future = streaming.celery.submit(tasks.add, 1, 2)
        future.result(timeout=20)
    caplog.set_level(logging.ERROR, "flask_execute.stream")
    with app.test_request_context():
        body = stream(future.id, result=lambda v: object()).get_data(as_text=True)
    assert parse(body) == [("end", {"state": "SUCCESS"})]
    assert "pass result= a function returning JSON-serializable data" in caplog.text


def test_disconnect_frees_everything(observer: Flask) -> None:
    task_id = str(uuid.uuid4())  # nobody submitted it: PENDING until the client leaves
    threads = request_threads()
    with served(observer) as address:
        client = Client(address, f"/events/{task_id}?heartbeat=0.2")
        try:
            assert client.next()[:2] == ("state", {"state": "PENDING"})
            assert client.next()[:2] == (":", "keep-alive")
            assert task_id in watched(observer)
            assert subscribers(task_id) == 1
            assert request_threads() == threads + 1
        finally:
            client.close()
        # the next heartbeat finds the client gone: the watcher forgets the task,
        # unsubscribes from its channel, and the request's thread ends
        assert eventually(lambda: task_id not in watched(observer))
        assert eventually(lambda: subscribers(task_id) == 0)
        assert eventually(lambda: request_threads() == threads)


def test_a_call_of_this_process_leaves_no_subscription(app: Flask, tmp_path: t.Any) -> None:
    release = tmp_path / "release"
    with app.app_context():
        future = streaming.celery.submit(tasks.wait_for_file, str(release))
    with served(app) as address:
        client = Client(address, f"/events/{future.id}?heartbeat=0.2")
        try:
            assert client.next()[0] == "state"
        finally:
            client.close()
        # its states come on the reply channel: no subscription to its own channel,
        # during the stream or after it
        assert subscribers(future.id) == 0
        release.touch()
        assert future.result(timeout=20) == "released"
        assert eventually(lambda: future.id not in watched(app))
        assert eventually(lambda: subscribers(future.id) == 0)
        client = Client(address, f"/events/{future.id}")  # final already: at once
        try:
            assert client.next()[:2] == ("end", {"state": "SUCCESS"})
        finally:
            client.close()


def test_idle_timeout_ends_the_stream(observer: Flask) -> None:
    task_id = str(uuid.uuid4())
    started = time.monotonic()
    body = (
        observer.test_client()
        .get(f"/events/{task_id}?idle=0.6&heartbeat=0.25")
        .get_data(as_text=True)
    )
    elapsed = time.monotonic() - started
    assert body.startswith("retry: 2000\n\n"), body
    events = parse(body)
    assert events[0] == ("state", {"state": "PENDING"})
    assert (":", "keep-alive") in events
    assert events[-1] == ("idle", {"state": "PENDING"})
    assert 0.6 <= elapsed < 5, elapsed
    assert task_id not in watched(observer)


def test_the_view_decides_who_follows(app: Flask) -> None:
    owner, stranger = app.test_client(), app.test_client()
    task_id = owner.post("/jobs").json["id"]  # type: ignore[index]
    refused = stranger.get(f"/jobs/{task_id}/events")
    assert refused.status_code == 404
    assert refused.mimetype == "text/html"
    followed = owner.get(f"/jobs/{task_id}/events")
    assert followed.mimetype == "text/event-stream"
    events = parse(followed.get_data(as_text=True))
    assert events[-1] == ("end", {"state": "SUCCESS", "result": 3})


def test_bad_arguments(observer: Flask) -> None:
    task_id = str(uuid.uuid4())
    with observer.test_request_context():
        with pytest.raises(NotFound) as info:
            stream("no spaces in task ids")
        assert info.value.description == "'no spaces in task ids' is not a task id."
        with pytest.raises(TypeError) as type_error:
            stream(uuid.uuid4())  # type: ignore[arg-type]
        assert str(type_error.value) == "'task_id' must be a str (a task id); got UUID."
        with pytest.raises(ValueError) as value_error:
            stream(task_id, idle_timeout=0)
        assert str(value_error.value) == (
            "'idle_timeout' must be a number of seconds above 0; got 0."
        )
        with pytest.raises(TypeError) as type_error:
            stream(task_id, result="yes")  # type: ignore[arg-type]
        assert str(type_error.value) == (
            "'result' must be True, False or a function returning what to show; got 'yes'."
        )
    assert task_id not in watched(observer)
    plain = Flask("plain")
    with plain.test_request_context(), pytest.raises(RuntimeError) as runtime_error:
        stream(task_id)
    assert str(runtime_error.value) == (
        "The app 'plain' has no flask-execute extension: call 'celery.init_app(app)' first."
    )


def test_eager_mode() -> None:
    eager = streaming.make_app("eager", CELERY_ALWAYS_EAGER=True)
    client = eager.test_client()
    with eager.app_context():
        future = eager.extensions["celery"].submit(tasks.add, 1, 2)
        body = client.get(f"/events/{future.id}?result").get_data(as_text=True)
        assert parse(body) == [("end", {"state": "SUCCESS", "result": 3})]
        failed = eager.extensions["celery"].submit(tasks.fail, "no")
        body = client.get(f"/events/{failed.id}?error").get_data(as_text=True)
        assert parse(body) == [("end", {"state": "FAILURE", "error": "ValueError: no"})]
    assert client.get(f"/events/{uuid.uuid4()}").status_code == 404
