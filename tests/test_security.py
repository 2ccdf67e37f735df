"""The attacker's tests (issue 4): nothing from the broker runs unless we signed it.

Each scenario plays an attacker who can read and write the broker (Redis): task
messages are ``LPUSH``-ed onto the ``celery`` list the way kombu writes them (starting
from a real message the web process published), forged results are ``SET`` and
``PUBLISH``-ed on the result keys. Every scenario runs against real workers and checks
that a canary side effect did not happen and that the worker still serves the next
task; a rejected message leaves no result under the attacker's task id and exactly one
CRITICAL "rejected task <id> (<reason>)" line in the worker's log.

The SEC-xx ids are those of the scenario table in ``research/reliability-security.md``
§7.1. SEC-13/14 do not apply (we pickle by value on purpose, after the MAC), SEC-15 is
in ``test_security_basics.py``; the unit-level envelope checks are in
``test_serialization.py``.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import hmac
import json
import os
import pickle
import shutil
import socket
import sqlite3
import stat
import textwrap
import threading
import time
import uuid
from collections.abc import Callable
from collections.abc import Iterator

import pytest
import redis
from flask import Flask
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from kombu import Connection
from kombu import Exchange
from kombu import Producer

from flask_execute import Celery
from flask_execute import ConfigurationError
from flask_execute import ExecuteError
from flask_execute import RemoteError
from flask_execute import SerializationError
from flask_execute import SignatureError
from flask_execute.dispatch import DISPATCH
from flask_execute.dispatch import DISPATCH_LATE
from flask_execute.envelopes import Codec
from flask_execute.envelopes import derive_key
from flask_execute.envelopes import key_id
from flask_execute.serialization import dump_call
from flask_execute.serialization import function_label
from tests import conftest
from tests.apps import tasks

DIRECT_DB = 1  # tests/apps/direct.py: its broker and result backend
ATTACKER_KEY = derive_key(b"the attacker's own secret")
NOBODY = "nobody-consumes-this"  # a queue no worker reads: proves nothing was published


class Canary:
    """Unpickling this creates ``path``: the stand-in for a ``__reduce__`` RCE payload."""

    def __init__(self, path: object) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[object, ...]:
        return (open, (self.path, "w"))


# --- helpers ----------------------------------------------------------------------------
def wait_for(predicate: Callable[[], object], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return bool(predicate())


def read(path: str, offset: int = 0) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            f.seek(offset)
            return f.read()
    except FileNotFoundError:
        return ""


def size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except FileNotFoundError:
        return 0


def rejections(log_path: str, task_id: str) -> list[str]:
    """The CRITICAL lines the worker logged about ``task_id``."""
    return [line for line in read(log_path).splitlines() if f"rejected task {task_id} (" in line]


def serves(celery: Celery) -> bool:
    """The worker still serves the next task."""
    return celery.submit(tasks.add, 1, 2).result(timeout=10) == 3


class Target:
    """An app under attack: its extension, state, Redis db and worker log."""

    def __init__(self, app: Flask, celery: Celery, client: redis.Redis, log: str) -> None:
        self.app = app
        self.celery = celery
        self.state = app.extensions["celery"].runtime(app)
        self.client = client
        self.log = log
        self.injected: list[str] = []  # delivery tags

    def envelope(
        self,
        func: Callable[..., object],
        *args: object,
        task_id: str | None = None,
        codec: Codec | None = None,
        **header: object,
    ) -> tuple[str, str]:
        """(task id, envelope) of a call sealed like ``submit`` seals it; ``codec``
        and ``header`` fields replace the app's key and header fields."""
        task_id = task_id or str(uuid.uuid4())
        payload, by_value = dump_call(func, args, {})
        fields = {"fn": function_label(func), "task": DISPATCH, "root": task_id, "parent": None}
        fields.update(header)
        codec = codec or self.state.codec
        return task_id, codec.seal("call", task_id, payload, by_value=by_value, extra=fields)

    def message(self, task_id: str, envelope: object = "placeholder", late: bool = False) -> dict:
        """The message the web process publishes for task ``task_id``, exactly as kombu
        wrote it (sent to a queue nobody consumes, then taken off it)."""
        queue = f"inspect-only-{task_id}"
        task = self.state.dispatch_late if late else self.state.dispatch
        task.apply_async((envelope,), task_id=task_id, queue=queue, shadow="m:f", argsrepr="<m:f>")
        raw = self.client.rpop(queue)
        for key in self.client.scan_iter(f"_*{queue}"):  # bindings, bell
            self.client.delete(key)
        assert raw is not None
        return json.loads(raw)

    def inject(self, message: dict) -> None:
        """What an attacker with broker access does: LPUSH onto the ``celery`` list."""
        self.injected.append(message["properties"]["delivery_tag"])
        self.client.lpush("celery", json.dumps(message))

    def assert_acknowledged(self) -> None:
        """Every injected message left the queue and was acknowledged (not requeued).

        An at-least-once message is acknowledged by the worker's main process once the
        pool reports back, which may come a moment after the log line: wait for it."""

        def settled() -> bool:
            queued = b"".join(self.client.lrange("celery", 0, -1))
            return not any(
                tag.encode() in queued or self.client.hget("unacked", tag) is not None
                for tag in self.injected
            )

        assert wait_for(settled, timeout=10), "an injected message was not acknowledged"

    def assert_rejected(self, reasons: dict[str, str], *secrets: str) -> None:
        """Each task id of ``reasons`` was rejected for its reason: logged once at
        CRITICAL (without ``secrets``), received once, acknowledged, no result; and
        the worker still serves the next task."""

        def logged() -> bool:
            text = read(self.log)
            return all(f"rejected task {task_id} (" in text for task_id in reasons)

        assert wait_for(logged), f"not all of {sorted(reasons)} were rejected"
        assert serves(self.celery)
        text = read(self.log)
        for task_id, reason in reasons.items():
            (line,) = rejections(self.log, task_id)
            assert "CRITICAL/ForkPoolWorker-" in line
            assert f"flask-execute rejected task {task_id} ({reason}): " in line
            assert line.endswith(" The message was dropped unexecuted.")
            assert text.count(f"[{task_id}] received") == 1  # no redelivery
            assert self.client.get(f"celery-task-meta-{task_id}") is None
            for secret in secrets:
                assert secret not in line
        self.assert_acknowledged()


def forge(
    message: dict,
    *,
    args: list[object] | None = None,
    body: bytes | None = None,
    content_type: str | None = None,
    redelivered: bool = False,
    **headers: object,
) -> dict:
    """A copy of a captured message with its arguments, body, content type or headers
    changed, a fresh delivery tag, routed to the ``celery`` queue."""
    msg = copy.deepcopy(message)
    if args is not None:
        _, kwargs, embed = json.loads(base64.b64decode(msg["body"]))
        body = json.dumps([args, kwargs, embed]).encode()
    if body is not None:
        msg["body"] = base64.b64encode(body).decode()
    if content_type is not None:
        msg["content-type"] = content_type
        msg["content-encoding"] = "binary"
    if "id" in headers:
        headers.setdefault("root_id", headers["id"])
        msg["properties"]["correlation_id"] = headers["id"]
    msg["headers"].update(headers)
    msg["properties"]["delivery_tag"] = str(uuid.uuid4())
    msg["properties"]["delivery_info"] = {"exchange": "", "routing_key": "celery"}
    if redelivered:  # where kombu's Redis transport marks a restored message
        msg["headers"]["redelivered"] = True
        msg["properties"]["delivery_info"]["redelivered"] = True
    return msg


def forge_result(client: redis.Redis, task_id: str, meta: object) -> None:
    """Write a result for ``task_id`` the way our workers' result backend does: stored,
    and published on its result channel and on the reply channels of the web processes
    (an attacker with access to Redis lists them with PUBSUB CHANNELS, or reads them
    from the queued messages)."""
    key = f"celery-task-meta-{task_id}"
    data = meta if isinstance(meta, bytes) else json.dumps(meta).encode()
    client.set(key, data)
    client.publish(key, data)
    if not isinstance(meta, dict) or "task_id" in meta:
        # what is on a reply channel names its task; without one it reaches nobody
        for channel in client.pubsub_channels("flask-execute:reply:*"):
            client.publish(channel, data)
    else:
        forged = json.dumps({**meta, "task_id": task_id}).encode()
        for channel in client.pubsub_channels("flask-execute:reply:*"):
            client.publish(channel, forged)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def handmade(header: dict[str, object], payload: bytes, key: bytes, purpose: str) -> str:
    """An envelope built by hand (any header), MAC'd with ``key`` as we would."""
    signed = f"fe1.{b64(json.dumps(header).encode())}.{b64(payload)}"
    purpose_key = hmac.new(key, b"flask-execute/v1/" + purpose.encode(), hashlib.sha256).digest()
    return f"{signed}.{b64(hmac.new(purpose_key, signed.encode(), hashlib.sha256).digest())}"


def edit_header(envelope: str, **fields: object) -> str:
    """``envelope`` with header fields changed, the MAC kept."""
    version, head, body, mac = envelope.split(".")
    header = json.loads(base64.urlsafe_b64decode(head + "=="))
    return f"{version}.{b64(json.dumps({**header, **fields}).encode())}.{body}.{mac}"


def flip(envelope: str, segment: int, position: int) -> str:
    """``envelope`` with one character of one segment changed."""
    parts = envelope.split(".")
    char = parts[segment][position]
    parts[segment] = (
        parts[segment][:position] + ("A" if char != "A" else "B") + parts[segment][position + 1 :]
    )
    return ".".join(parts)


@pytest.fixture
def direct(direct_app: Flask, redis_url: str, log_dir: str) -> Iterator[Target]:
    """The shared direct app (its worker is running), an app context pushed."""
    from tests.apps import direct as module

    client = redis.Redis.from_url(f"{redis_url}/{DIRECT_DB}")
    with direct_app.app_context():
        yield Target(direct_app, module.celery, client, os.path.join(log_dir, "direct.log"))
    client.close()


LIMIT = 4096  # CELERY_MAX_MESSAGE_SIZE of the rotated app


@pytest.fixture(scope="module")
def rotated(redis_url: str, log_dir: str) -> Iterator[Target]:
    """An app whose key was rotated (``SECRET_KEY`` new, ``SECRET_KEY_FALLBACKS`` the
    old one) and whose messages are limited to ``LIMIT`` bytes, its worker running."""
    broker_url = f"{redis_url}/{next(conftest._db)}"  # a db of its own, like broker_url
    app = Flask("sec_rotated")
    app.config.update(
        SECRET_KEY="new secret, rotated in",
        SECRET_KEY_FALLBACKS=["old secret, rotated out"],
        CELERY_MAX_MESSAGE_SIZE=LIMIT,
        CELERY_BROKER_URL=broker_url,
        CELERY_LOG_DIR=log_dir,
        CELERY_FLOWER=False,
        CELERY_WORKERS=["sec-rotated"],
    )
    celery = Celery(app)
    client = redis.Redis.from_url(broker_url)
    log = os.path.join(log_dir, "sec-rotated.log")
    try:
        with app.app_context():
            celery.start()
            yield Target(app, celery, client, log)
    finally:
        with app.app_context():
            celery.stop()
        client.close()


# --- SEC-01, SEC-02: pickle refused by Celery itself --------------------------------------
def test_sec01_vulhub_pickle_task_message_is_refused(direct, tmp_path):
    """The classic exploit: a pickled task message for a registered task name."""
    canary = tmp_path / "pwned"
    task_id = str(uuid.uuid4())
    body = pickle.dumps(((Canary(canary),), {}, {}))
    message = forge(
        direct.message(task_id), body=body, content_type="application/x-python-serialize"
    )
    assert message["headers"]["task"] == DISPATCH
    offset = size(direct.log)
    direct.inject(message)
    refused = "Refusing to deserialize untrusted content of type pickle"
    assert wait_for(lambda: refused in read(direct.log, offset))
    assert serves(direct.celery)
    assert not canary.exists()
    direct.assert_acknowledged()  # dropped, not requeued
    assert direct.client.get(f"celery-task-meta-{task_id}") is None


def test_sec02_pickled_control_message_is_refused(direct, tmp_path, redis_url):
    canary = tmp_path / "pwned"
    exchange = Exchange("celery.pidbox", type="fanout")
    offset = size(direct.log)
    with Connection(f"{redis_url}/{DIRECT_DB}") as connection:
        Producer(connection.default_channel).publish(
            {"method": "ping", "arguments": {"x": Canary(canary)}, "destination": None},
            exchange=exchange,
            routing_key="",
            serializer="pickle",
            declare=[exchange],
        )
    refused = "Can't decode message body: ContentDisallowed('Refusing to deserialize"
    assert wait_for(lambda: refused in read(direct.log, offset))
    assert direct.celery.status() == {f"direct@{socket.gethostname()}": "OK"}
    assert serves(direct.celery)
    assert not canary.exists()


# --- SEC-03, SEC-23: forged results -------------------------------------------------------
def _forged_result(direct: Target, kind: str, task_id: str, canary: str) -> object:
    """The result meta an attacker writes for ``task_id``."""
    pickled = pickle.dumps(Canary(canary))
    now = int(time.time())
    header = {"p": "result", "tid": task_id, "kid": direct.state.codec.kid, "iat": now,
              "exp": now + 60}  # fmt: skip
    attacker = Codec(ATTACKER_KEY)
    results = {
        "pickle-string": base64.b64encode(pickled).decode(),
        "other-key": attacker.seal("result", task_id, pickled),
        "our-kid-their-mac": handmade(header, pickled, ATTACKER_KEY, "result"),
        # a call envelope read off the broker, stored as the result of its own task id
        "call-as-result": direct.envelope(tasks.add, 1, 2, task_id=task_id)[1],
    }
    if kind in results:
        return {"status": "SUCCESS", "result": results[kind]}
    if kind == "os.system-failure":
        exc = {"exc_module": "os", "exc_type": "system", "exc_message": [f"touch {canary}"]}
    else:  # a failure carrying an error envelope, as ours do
        error = {"flask_execute": attacker.seal("error", task_id, pickled)}
        exc = {"exc_module": "builtins", "exc_type": "ValueError", "exc_message": ["x", error]}
    return {"status": "FAILURE", "result": exc}


_FORGED_RESULTS = {
    "pickle-string": "SignatureError: malformed",
    "os.system-failure": "RemoteError: os.system: unsigned failure stored for task {task_id};"
    " not raised as its claimed type (forged, or not stored by a flask-execute worker):"
    " ['touch {canary}']",
    "other-key": "SignatureError: unknown_key",
    "our-kid-their-mac": "SignatureError: bad_mac",
    "forged-error-envelope": "SignatureError: unknown_key",
    "call-as-result": "SignatureError: binding_mismatch",
}


@pytest.mark.parametrize("kind", _FORGED_RESULTS)
def test_sec03_forged_result_raises_in_the_web_process(direct, tmp_path, kind):
    canary = tmp_path / "pwned-web"
    task_id = str(uuid.uuid4())
    future = direct.celery.get(task_id)  # an id nobody runs; we wait on it
    forge_result(direct.client, task_id, _forged_result(direct, kind, task_id, str(canary)))
    exc = future.exception(timeout=5)
    assert isinstance(exc, ExecuteError)
    if isinstance(exc, SignatureError):
        shown = f"SignatureError: {exc.reason}"
    else:
        shown = f"{type(exc).__name__}: {exc}"
    assert shown == _FORGED_RESULTS[kind].format(canary=canary, task_id=task_id)
    assert not canary.exists()
    assert serves(direct.celery)


def test_sec03_get_of_an_unreadable_forged_result_is_a_clear_error(direct, tmp_path):
    canary = tmp_path / "pwned-web"
    task_id = str(uuid.uuid4())
    try:
        forge_result(direct.client, task_id, pickle.dumps(Canary(canary)))
        future = direct.celery.get(task_id)
        assert isinstance(future.exception(timeout=2), ExecuteError)
    finally:
        direct.client.delete(f"celery-task-meta-{task_id}")
        assert not canary.exists()


def test_sec03_unreadable_forged_result_does_not_stall_other_futures(direct, tmp_path, monkeypatch):
    # the sweep runs every 5 s otherwise
    monkeypatch.setattr(direct.state.watcher, "sweep_every", 0.1)
    canary = tmp_path / "pwned-web"
    task_id = str(uuid.uuid4())
    future = direct.celery.get(task_id)
    try:
        forge_result(direct.client, task_id, pickle.dumps(Canary(canary)))
        time.sleep(1.5)  # the watcher sweeps once its pub/sub read (1 s) times out
        for _ in range(3):  # each takes milliseconds when the watcher is live
            assert direct.celery.submit(tasks.add, 1, 2).result(timeout=1.5) == 3
    finally:
        direct.client.delete(f"celery-task-meta-{task_id}")
        del future
        assert not canary.exists()


def test_sec23_result_of_another_task_is_refused(direct):
    a = direct.celery.submit(tasks.add, 40, 2)
    assert a.result(timeout=10) == 42
    stolen = json.loads(direct.client.get(f"celery-task-meta-{a.id}"))
    b_id = str(uuid.uuid4())
    b = direct.celery.get(b_id)
    forge_result(direct.client, b_id, {**stolen, "task_id": b_id})
    exc = b.exception(timeout=5)
    assert isinstance(exc, SignatureError) and exc.reason == "binding_mismatch"
    assert str(exc) == (
        f"The result stored for task {b_id} was refused (binding_mismatch): Envelope belongs"
        " to another task id. Nothing in it was unpickled."
    )
    assert serves(direct.celery)


# --- SEC-04 .. SEC-09: forged calls, rejected by the worker ---------------------------------
Attack = tuple[str, object, str, dict[str, object]]


def _attacks(direct: Target, canary: str) -> dict[str, Attack]:
    """name -> (task id, dispatch argument, expected reason, message headers)."""
    plant = Canary(canary)
    attacks: dict[str, Attack] = {}
    # SEC-04: one character of the payload (the pickle of touch(canary)) changed
    tid, good = direct.envelope(tasks.touch, canary)
    attacks["sec04-flipped-payload"] = (tid, flip(good, 2, 20), "bad_mac", {})
    tid, good = direct.envelope(tasks.touch, canary)
    attacks["sec04-extended-expiry"] = (tid, edit_header(good, exp=2**40), "bad_mac", {})
    # SEC-05: no envelope at all, or not ours
    raw = base64.b64encode(pickle.dumps(plant)).decode()
    attacks["sec05-raw-base64-pickle"] = (str(uuid.uuid4()), raw, "malformed", {})
    tid, good = direct.envelope(tasks.touch, canary)
    attacks["sec05-wrong-version"] = (tid, "fe2" + good[3:], "malformed", {})
    tid, good = direct.envelope(tasks.touch, canary)
    attacks["sec05-three-parts"] = (tid, good.rsplit(".", 1)[0], "malformed", {})
    # SEC-06: signed, but not by us
    tid, forged = direct.envelope(tasks.touch, canary, codec=Codec(ATTACKER_KEY))
    attacks["sec06-unknown-key"] = (tid, forged, "unknown_key", {})
    tid = str(uuid.uuid4())
    now = int(time.time())
    header = {"p": "call", "tid": tid, "kid": direct.state.codec.kid, "iat": now,
              "exp": now + 60, "task": DISPATCH}  # fmt: skip
    call = pickle.dumps((open, (canary, "w"), {}))
    forged = handmade(header, call, ATTACKER_KEY, "call")
    attacks["sec06-our-kid-their-mac"] = (tid, forged, "bad_mac", {})
    # SEC-07: a valid envelope, misdirected
    _, good = direct.envelope(tasks.touch, canary)
    attacks["sec07-other-task-id"] = (str(uuid.uuid4()), good, "binding_mismatch", {})
    tid, good = direct.envelope(tasks.touch, canary)
    late = {"task": DISPATCH_LATE}
    attacks["sec07-sent-to-dispatch-acks-late"] = (tid, good, "binding_mismatch", late)
    tid, other = direct.envelope(tasks.touch, canary, task=DISPATCH_LATE)
    attacks["sec07-acks-late-sent-to-dispatch"] = (tid, other, "binding_mismatch", {})
    tid, other = direct.envelope(tasks.touch, canary, task="myapp.other_task")
    attacks["sec07-other-task-name"] = (tid, other, "binding_mismatch", {})
    tid = str(uuid.uuid4())
    result = direct.state.codec.seal("result", tid, pickle.dumps("x"))
    attacks["sec07-result-as-call"] = (tid, result, "binding_mismatch", {})
    # SEC-09: expired (sealed by our key with a validity window already over)
    expired = Codec(direct.state.codec_keys[0], max_age=-60)
    tid, old = direct.envelope(tasks.touch, canary, codec=expired)
    attacks["sec09-expired"] = (tid, old, "expired", {})
    return attacks


_ATTACKS = [
    "sec04-flipped-payload",
    "sec04-extended-expiry",
    "sec05-raw-base64-pickle",
    "sec05-wrong-version",
    "sec05-three-parts",
    "sec06-unknown-key",
    "sec06-our-kid-their-mac",
    "sec07-other-task-id",
    "sec07-sent-to-dispatch-acks-late",
    "sec07-acks-late-sent-to-dispatch",
    "sec07-other-task-name",
    "sec07-result-as-call",
    "sec09-expired",
]


@pytest.mark.parametrize("name", _ATTACKS)
def test_forged_call_is_rejected_unexecuted(direct, tmp_path, name):
    canary = tmp_path / "pwned"
    task_id, argument, reason, headers = _attacks(direct, str(canary))[name]
    direct.inject(forge(direct.message(task_id), args=[argument], **headers))
    secrets = [p for p in str(argument).split(".") if len(p) > 8]
    direct.assert_rejected({task_id: reason}, *secrets)
    assert not canary.exists()
    assert not direct.client.keys(f"*{task_id}*")  # no claim, no result, nothing


def test_sec07_replay_under_another_id_leaves_the_original_alone(direct, tmp_path):
    counter = tmp_path / "count"
    original = direct.celery.submit(tasks.touch, str(counter))
    assert original.result(timeout=10) == str(counter)
    meta = direct.client.get(f"celery-task-meta-{original.id}")
    envelope = json.loads(meta)["result"]  # anything signed the attacker can read
    _, call = direct.envelope(tasks.touch, str(counter), task_id=original.id)
    attacker_id = str(uuid.uuid4())
    direct.inject(forge(direct.message(attacker_id), args=[call]))
    direct.assert_rejected({attacker_id: "binding_mismatch"})
    assert read(str(counter)).count("\n") == 1
    assert direct.client.get(f"celery-task-meta-{original.id}") == meta
    assert direct.state.outcomes.value(original.id, envelope) == str(counter)


@pytest.mark.parametrize(
    "args",
    [
        pytest.param([], id="missing-argument"),
        pytest.param(["fe1.a.b.c", "extra"], id="extra-argument"),
    ],
)
def test_sec05_wrong_number_of_arguments_is_rejected(direct, args):
    task_id = str(uuid.uuid4())
    direct.inject(forge(direct.message(task_id), args=args))
    assert wait_for(
        lambda: rejections(direct.log, task_id) or f"[{task_id}] raised" in read(direct.log)
    )
    assert serves(direct.celery)
    assert direct.client.get(f"celery-task-meta-{task_id}") is None
    (line,) = rejections(direct.log, task_id)
    assert f"rejected task {task_id} (malformed)" in line


# --- SEC-08: replays ----------------------------------------------------------------------
@pytest.mark.parametrize("late", [False, True], ids=["dispatch", "dispatch_acks_late"])
def test_sec08_replayed_message_runs_once(direct, tmp_path, late):
    counter = tmp_path / "count"
    task = DISPATCH_LATE if late else DISPATCH
    task_id, envelope = direct.envelope(tasks.touch, str(counter), task=task)
    captured = direct.message(task_id, envelope, late=late)
    assert captured["headers"]["task"] == task
    direct.inject(forge(captured))
    assert direct.celery.get(task_id).result(timeout=10) == str(counter)
    meta = direct.client.get(f"celery-task-meta-{task_id}")
    offset = size(direct.log)
    direct.inject(forge(captured))  # the same message again
    direct.inject(forge(captured, redelivered=True))  # claiming to be a redelivery
    assert wait_for(lambda: read(direct.log, offset).count(f"[{task_id}] ignored") == 2)
    assert serves(direct.celery)
    lines = rejections(direct.log, task_id)
    replayed = f"rejected task {task_id} (replayed): This task id already ran."
    assert all(replayed in x and "CRITICAL/" in x for x in lines)
    if late:  # at-least-once: a redelivery of a finished task is dropped quietly
        assert len(lines) == 1
        dropped = f"tests.apps.tasks:touch [{task_id}] already finished; redelivery dropped"
        assert dropped in read(direct.log, offset)
    else:
        assert len(lines) == 2
    assert read(str(counter)).count("\n") == 1  # the function ran exactly once
    assert direct.client.get(f"celery-task-meta-{task_id}") == meta  # result untouched
    direct.assert_acknowledged()


def test_sec08_replay_with_a_forged_retry_count_runs_once(direct, tmp_path):
    counter = tmp_path / "count"
    task_id, envelope = direct.envelope(tasks.touch, str(counter))
    captured = direct.message(task_id, envelope)
    direct.inject(forge(captured))
    assert direct.celery.get(task_id).result(timeout=10) == str(counter)
    direct.inject(forge(captured, retries=1))
    wait_for(lambda: rejections(direct.log, task_id) or read(str(counter)).count("\n") > 1)
    assert serves(direct.celery)
    assert read(str(counter)).count("\n") == 1
    (line,) = rejections(direct.log, task_id)
    assert "(replayed)" in line


# --- SEC-10: ETA and expiry -----------------------------------------------------------------
def test_sec10_expiry_follows_the_eta(direct, tmp_path, monkeypatch):
    canary = tmp_path / "pwned"
    monkeypatch.setattr(direct.state.codec, "max_age", 2)
    # submit: exp = ETA + max age, so a countdown longer than the max age still runs
    later = direct.celery.submit(tasks.add, 20, 22, countdown=3)
    # by hand: exp = now + max age, before the ETA: expired when its time comes
    task_id, envelope = direct.envelope(tasks.touch, str(canary))
    direct.state.dispatch.apply_async((envelope,), task_id=task_id, countdown=3)
    header = json.loads(base64.urlsafe_b64decode(envelope.split(".")[1] + "=="))
    assert header["exp"] <= time.time() + 2
    assert later.result(timeout=15) == 42
    direct.assert_rejected({task_id: "expired"})
    assert not canary.exists()


# --- SEC-11: size limit (the rotated app allows LIMIT bytes) --------------------------------
def test_sec11_oversized_envelope_is_rejected(rotated, tmp_path):
    canary = tmp_path / "pwned"

    def plant(padding):
        open(canary, "w").close()

    big = Codec(rotated.state.codec_keys[0], max_size=10 * LIMIT)
    task_id, envelope = rotated.envelope(plant, "x" * 2 * LIMIT, codec=big)
    assert len(envelope) > LIMIT
    rotated.inject(forge(rotated.message(task_id), args=[envelope]))
    rotated.assert_rejected({task_id: "too_large"})
    assert not canary.exists()


def test_sec11_oversized_argument_and_result(rotated):
    with pytest.raises(SerializationError) as info:
        rotated.celery.submit(tasks.add, "x" * LIMIT, "y", queue=NOBODY)
    assert str(info.value).startswith("The call payload is ")
    assert str(info.value).endswith(
        f" bytes, over the CELERY_MAX_MESSAGE_SIZE limit of {LIMIT} bytes."
    )
    assert rotated.client.llen(NOBODY) == 0

    def grow(n):
        return "x" * n

    exc = rotated.celery.submit(grow, LIMIT).exception(timeout=10)
    assert isinstance(exc, SerializationError)
    assert str(exc).startswith("The result payload is ")
    assert str(exc).endswith(f" bytes, over the CELERY_MAX_MESSAGE_SIZE limit of {LIMIT} bytes.")
    assert serves(rotated.celery)


# --- SEC-12: fuzz ----------------------------------------------------------------------------
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
_segment = st.text(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_=+/", max_size=64
)


def test_sec12_fuzzed_dispatch_arguments_are_all_rejected(direct, tmp_path):
    canary = tmp_path / "pwned"
    pickled = b64(pickle.dumps((open, (str(canary), "w"), {})))
    kid = direct.state.codec.kid
    _, valid = direct.envelope(tasks.touch, str(canary))
    mac_at = valid.rindex(".")

    def shaped(draw_header: dict, mac: str) -> str:
        return f"fe1.{b64(json.dumps(draw_header).encode())}.{pickled}.{mac}"

    garbage = st.one_of(
        st.text(max_size=200),
        st.binary(max_size=200),  # kombu's JSON carries bytes as bytes
        _json,
        st.builds(lambda a, b, c: f"fe1.{a}.{b}.{c}", _segment, _segment, _segment),
        # well-formed, our key id, the canary pickle as payload, a made-up MAC
        st.builds(
            lambda extra, mac: shaped({"p": "call", "kid": kid, **extra}, mac),
            st.dictionaries(st.sampled_from(["tid", "iat", "exp", "task", "py"]), _json),
            _segment,
        ),
        # a valid envelope of touch(canary) with one character changed (before the MAC,
        # whose last character may carry unused bits)
        st.builds(
            lambda i, c: valid[:i] + c + valid[i + 1 :],
            st.integers(0, mac_at - 1),
            st.sampled_from("AZaz09-_."),
        ).filter(lambda s: s != valid),
    )
    sent: list[str] = []

    @settings(max_examples=50, deadline=None, database=None)
    @given(garbage)
    def publish(value: object) -> None:
        task_id = str(uuid.uuid4())
        direct.state.dispatch.apply_async((value,), task_id=task_id)
        sent.append(task_id)

    publish()
    assert wait_for(lambda: all(f"rejected task {t} (" in read(direct.log) for t in sent))
    assert serves(direct.celery)
    assert not canary.exists()
    assert not any(direct.client.mget([f"celery-task-meta-{t}" for t in sent]))
    lines = [x for x in read(direct.log).splitlines() if "flask-execute rejected task " in x]
    for task_id in sent:
        (line,) = [x for x in lines if f" {task_id} (" in x]
        assert "CRITICAL" in line


# --- SEC-16, SEC-17: configuration -----------------------------------------------------------
@pytest.mark.parametrize(
    "config",
    [
        {"CELERY_ACCEPT_CONTENT": ["json", "pickle"]},
        {"CELERY_TASK_SERIALIZER": "pickle"},
        {"CELERY": {"result_accept_content": ["application/x-python-serialize"]}},
    ],
)
def test_sec16_pickle_config_is_refused_at_init_app(config):
    app = Flask("sec_pickle")
    app.config.update(SECRET_KEY="s-secret-for-tests", CELERY_START_LOCAL_WORKERS=False, **config)
    with pytest.raises(ConfigurationError, match="keeps Celery's own serializers JSON-only"):
        Celery(app)
    assert "celery" not in app.extensions


def test_sec16_unsafe_switch_allows_pickle_with_a_warning(caplog):
    app = Flask("sec_unsafe")
    app.config.update(
        SECRET_KEY="s-secret-for-tests",
        CELERY_START_LOCAL_WORKERS=False,
        CELERY_ACCEPT_CONTENT=["json", "pickle"],
        CELERY_UNSAFE_ALLOW_PICKLE=True,
    )
    with caplog.at_level("WARNING", logger="flask_execute.security"):
        Celery(app)
    conf = app.extensions["celery"].runtime(app).controller.conf
    assert conf.accept_content == ["json", "pickle"]
    assert conf.task_serializer == "json"  # only what was asked for
    (record,) = [r for r in caplog.records if r.name == "flask_execute.security"]
    assert record.levelname == "WARNING"
    assert record.getMessage() == (
        "CELERY_UNSAFE_ALLOW_PICKLE is on: Celery will unpickle accept_content from the"
        " broker; anyone who can write to the broker can run code on the workers."
    )


def test_sec17_production_without_a_key_is_refused():
    app = Flask("sec_prod")
    app.config.update(CELERY_START_LOCAL_WORKERS=False, SECRET_KEY=None)
    with pytest.raises(ConfigurationError) as info:
        Celery(app)
    assert str(info.value) == (
        "flask-execute signs every task and result and needs a key: set 'SECRET_KEY'"
        " or 'CELERY_SIGNING_KEY' (the same value on the web and worker processes)."
    )


def test_sec17_development_key_is_created_once_and_shared(tmp_path, broker_url, log_dir):
    def make() -> tuple[Flask, Celery]:
        app = Flask("sec_devkey", instance_path=str(tmp_path / "instance"))
        app.config.update(
            CELERY_BROKER_URL=broker_url,
            CELERY_LOG_DIR=log_dir,
            CELERY_FLOWER=False,
            CELERY_WORKERS=["sec-devkey"],
        )
        assert "SECRET_KEY" not in app.config or not app.config["SECRET_KEY"]
        return app, Celery(app)

    first, first_celery = make()
    second, second_celery = make()  # a reloader restart, a second web process
    state = first.extensions["celery"].runtime(first)
    path = os.path.join(state.runtime_dir, "signing.key")
    try:
        info = os.stat(path)
        assert stat.S_IMODE(info.st_mode) == 0o600
        with open(path, "rb") as f:
            key = f.read()
        assert len(key) == 32
        assert (
            state.codec.kid == second.extensions["celery"].runtime(second).codec.kid == key_id(key)
        )
        with first.app_context():
            assert first_celery.submit(tasks.add, 1, 2).result(timeout=20) == 3
        with second.app_context():  # the first one's worker verifies its envelopes
            assert second_celery.submit(tasks.add, 2, 2).result(timeout=20) == 4
        again = os.stat(path)  # created once, never rewritten
        assert (again.st_ino, again.st_mtime_ns) == (info.st_ino, info.st_mtime_ns)
    finally:
        for app, celery in ((second, second_celery), (first, first_celery)):
            with app.app_context():
                celery.stop()
        shutil.rmtree(state.runtime_dir, ignore_errors=True)


# --- SEC-06, SEC-18: key rotation --------------------------------------------------------------
def test_sec18_rotation_old_key_verifies_new_key_signs(rotated):
    old, new = derive_key(b"old secret, rotated out"), derive_key(b"new secret, rotated in")
    assert rotated.state.codec.kid == key_id(new)
    # a message sealed before the rotation still runs
    task_id, envelope = rotated.envelope(tasks.add, 2, 3, codec=Codec(old))
    future = rotated.celery.get(task_id)
    rotated.state.dispatch.apply_async((envelope,), task_id=task_id)
    assert future.result(timeout=10) == 5
    # a web process that only knows the new key: signs with it, the worker runs it
    web = Flask("sec_rotated_web")
    web.config.update(
        SECRET_KEY="new secret, rotated in",
        CELERY_BROKER_URL=rotated.state.broker_url,
        CELERY_START_LOCAL_WORKERS=False,
    )
    web_celery = Celery(web)
    with web.app_context():
        web_celery.submit(tasks.add, 1, 1, queue=NOBODY)  # what does it send?
        (sent,) = rotated.client.lrange(NOBODY, 0, -1)
        ((envelope,), _, _) = json.loads(base64.b64decode(json.loads(sent)["body"]))
        header = json.loads(base64.urlsafe_b64decode(envelope.split(".")[1] + "=="))
        assert header["kid"] == key_id(new)
        assert web_celery.submit(tasks.add, 3, 4).result(timeout=10) == 7


def test_sec06_retired_key_is_rejected(rotated, tmp_path):
    """Signed with the key retired by the rotation before the last one."""
    canary = tmp_path / "pwned"
    retired = Codec(derive_key(b"older secret"))
    task_id, envelope = rotated.envelope(tasks.touch, str(canary), codec=retired)
    rotated.inject(forge(rotated.message(task_id), args=[envelope]))
    rotated.assert_rejected({task_id: "unknown_key"})
    assert not canary.exists()


# --- SEC-22, SEC-24: what logs and monitoring show ----------------------------------------------
def test_sec22_logs_show_the_label_not_the_arguments(direct):
    secret = "secret-value-123"
    offset = size(direct.log)
    future = direct.celery.submit(tasks.add, secret, "x")
    assert future.result(timeout=10) == secret + "x"
    failed = direct.celery.submit(tasks.fail, "boom")  # the failure path logs too
    assert isinstance(failed.exception(timeout=10), ValueError)
    raised = f"Task tests.apps.tasks:fail[{failed.id}] raised unexpected: ValueError"
    assert wait_for(lambda: raised in read(direct.log, offset))  # logged after the result
    text = read(direct.log, offset)
    assert f"Task tests.apps.tasks:add[{future.id}] received" in text
    assert f"Task tests.apps.tasks:add[{future.id}] succeeded in " in text
    assert secret not in text


def test_sec22_inspect_shows_the_label_not_the_arguments(direct, tmp_path):
    secret = "secret-value-123"
    mark, release = tmp_path / "mark", tmp_path / f"{secret}-release"
    running = direct.celery.submit(tasks.mark_and_wait, str(mark), str(release))
    try:
        assert wait_for(mark.exists)
        active = direct.celery.inspect.active()
    finally:
        release.touch()
    assert running.result(timeout=10) == "released"
    (requests,) = active.values()
    (request,) = [r for r in requests if r["id"] == running.id]
    assert request["args"] == "<tests.apps.tasks:mark_and_wait>"
    assert request["kwargs"] == "{}"


def test_sec24_the_key_is_never_shown(direct):
    key = direct.state.codec_keys[0]
    shown = [repr(direct.state.codec), repr(direct.state), read(direct.log)]
    for secret in (key.hex(), b64(key), repr(key)[2:-1], "direct-secret"):
        for text in shown:
            assert secret not in text
    assert repr(direct.state.codec) == f"<Codec kid={key_id(key)} keys=1>"
    # the boot file handing the key to the workers is gone once they are up
    assert not [f for f in os.listdir(direct.state.runtime_dir) if f.startswith("boot-")]


# --- issue 4, item 3: Flask-SQLAlchemy models --------------------------------------------------
def test_models_travel_by_primary_key(tmp_path, tmp_modules, broker_url, log_dir):
    pytest.importorskip("flask_sqlalchemy")
    database = tmp_path / "db.sqlite"
    tmp_modules.write(
        "secmodels",
        textwrap.dedent(
            f"""
            from flask import Flask
            from flask_sqlalchemy import SQLAlchemy
            from flask_execute import Celery

            db = SQLAlchemy()
            celery = Celery()

            class Item(db.Model):
                id = db.Column(db.Integer, primary_key=True)
                name = db.Column(db.String(50))

            def create_app(**config):
                app = Flask(__name__)
                app.config.update(
                    SECRET_KEY="models-secret-for-tests", CELERY_BROKER_URL={broker_url!r},
                    CELERY_LOG_DIR={log_dir!r}, CELERY_WORKERS=["sec-models"],
                    CELERY_FLOWER=False, SQLALCHEMY_DATABASE_URI="sqlite:///{database}",
                )
                app.config.update(config)
                db.init_app(app)
                celery.init_app(app)
                return app

            def describe(item):
                return item.id, item.name, db.session.get(Item, item.id) is item
            """
        ),
    )
    secmodels = tmp_modules.load("secmodels")
    app = secmodels.create_app()
    strict = secmodels.create_app(CELERY_SANITIZE_ARGUMENTS=False, CELERY_START_LOCAL_WORKERS=False)
    with app.app_context():
        secmodels.db.create_all()
        item = secmodels.Item(name="first")
        secmodels.db.session.add(item)
        secmodels.db.session.commit()
        assert item.name == "first"
        with sqlite3.connect(database) as connection:  # changed behind the session
            connection.execute("UPDATE item SET name = 'renamed' WHERE id = ?", (item.id,))
        try:
            found = secmodels.celery.submit(secmodels.describe, item).result(timeout=20)
            assert found == (item.id, "renamed", True)  # queried again on the worker
            unsaved = secmodels.Item(name="never committed")
            with pytest.raises(SerializationError) as info:
                secmodels.celery.submit(secmodels.describe, unsaved, queue=NOBODY)
            message = str(info.value)
            assert message.startswith(
                "Argument 'item' (position 0) of secmodels:describe cannot be serialized"
                " (Item value): SerializationError: The Item instance has no primary key"
                " yet (it was never saved): commit it before submitting"
            )
        finally:
            secmodels.celery.stop()
    with strict.app_context():
        with pytest.raises(SerializationError) as info:
            secmodels.celery.submit(secmodels.describe, item, queue=NOBODY)
        assert "A model instance (Item) cannot be sent to a worker: pass its primary key" in str(
            info.value
        )
    client = redis.Redis.from_url(broker_url)
    assert client.llen(NOBODY) == 0
    client.close()


# --- issue 4, item 4: bad inputs, answered -------------------------------------------------------
def _pool(direct: Target) -> set[int]:
    (worker,) = direct.state.services.children
    return conftest.descendants(worker.pid)


@pytest.mark.parametrize("exit_exc", [SystemExit(3), KeyboardInterrupt()], ids=repr)
def test_exit_inside_a_task_is_reported_and_the_worker_survives(direct, exit_exc):
    pool = _pool(direct)

    def leave():
        raise exit_exc

    exc = direct.celery.submit(leave).exception(timeout=10)
    name = type(exit_exc).__name__
    assert isinstance(exc, RemoteError)
    assert exc.type_name == f"builtins.{name}"
    assert str(exc) == (
        f"builtins.{name}: the task raised {exit_exc!r}; the worker was kept running"
    )
    assert ", in leave\n" in exc.remote_traceback
    assert exc.remote_traceback.rstrip().splitlines()[-1].startswith(name)
    assert serves(direct.celery)
    assert _pool(direct) == pool  # not even the pool process was replaced


def test_unpicklable_exception_comes_back_as_remote_error(direct):
    class LockedError(Exception):
        def __init__(self, detail):
            super().__init__(detail)
            self.lock = threading.Lock()

    def fail():
        raise LockedError("holds a lock")

    exc = direct.celery.submit(fail).exception(timeout=10)
    assert isinstance(exc, RemoteError)
    # (cloudpickle rebuilds a class sent by value without its "<locals>" qualname)
    assert exc.type_name == f"{__name__}.LockedError"
    assert exc.remote_message == "holds a lock"
    assert str(exc) == f"{__name__}.LockedError: holds a lock"
    assert ", in fail\n" in exc.remote_traceback
    assert exc.remote_traceback.rstrip().endswith("LockedError: holds a lock")
    assert serves(direct.celery)


def test_pickle_by_value_off_refuses_a_lambda_at_submit(broker_url):
    app = Flask("sec_by_reference")
    app.config.update(
        SECRET_KEY="s-secret-for-tests",
        CELERY_BROKER_URL=broker_url,
        CELERY_START_LOCAL_WORKERS=False,
        CELERY_PICKLE_BY_VALUE=False,
    )
    celery = Celery(app)
    with app.app_context(), pytest.raises(SerializationError) as info:
        celery.submit(lambda: 1, queue=NOBODY)
    assert str(info.value) == (
        f"{__name__}:test_pickle_by_value_off_refuses_a_lambda_at_submit.<locals>.<lambda>"
        " (or something in its arguments) is not importable by reference — a lambda, a"
        " closure or code from __main__ — and CELERY_PICKLE_BY_VALUE is off. Move it to an"
        " importable module."
    )
    client = redis.Redis.from_url(broker_url)
    assert client.llen(NOBODY) == 0
    client.close()


# --- property: arbitrary picklable values survive the round trip -----------------------------
_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.complex_numbers(allow_nan=False)
    | st.text()
    | st.binary()
    | st.decimals(allow_nan=False)
    | st.datetimes()
    | st.uuids()
    | st.fractions(),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.tuples(inner, inner)
        | st.frozensets(st.integers() | st.text(), max_size=4)
        | st.dictionaries(st.text(max_size=8) | st.integers(), inner, max_size=4)
    ),
    max_leaves=10,
)


def test_arbitrary_values_round_trip_through_a_worker(direct):
    identity = lambda value: value  # noqa: E731 - travels by value

    @settings(max_examples=20, deadline=None, database=None)
    @given(_values)
    def round_trip(value: object) -> None:
        assert direct.celery.submit(identity, value).result(timeout=10) == value

    round_trip()
