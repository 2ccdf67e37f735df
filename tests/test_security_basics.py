"""Nothing from the broker runs unless we signed it (the basics; see issue 4)."""

from __future__ import annotations

import os
import pickle
import time
import uuid

import pytest
import redis

from tests.apps import tasks


class Canary:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _wait_log(path, needle, timeout=10):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path) and needle in open(path).read():
            return True
        time.sleep(0.05)
    return False


def test_tampered_and_unsigned_messages_never_run(direct_app, tmp_path, log_dir, redis_url):
    from tests.apps import direct

    state = direct_app.extensions["celery"].runtime(direct_app)
    canary = tmp_path / "pwned"
    client = redis.Redis.from_url(redis_url + "/1")
    with direct_app.app_context():
        # a valid envelope for touch(canary), then one byte of its payload changed
        good_id = str(uuid.uuid4())
        payload, _ = __import__("flask_execute.serialization").serialization.dump_call(
            tasks.touch, (str(canary),), {}
        )
        envelope = state.codec.seal("call", good_id, payload, extra={"fn": "x"})
        head, body = envelope.rsplit(".", 2)[0], envelope.rsplit(".", 2)[1:]
        flipped = body[0][:10] + ("A" if body[0][10] != "A" else "B") + body[0][11:]
        tampered = f"{head}.{flipped}.{body[1]}"
        raw = pickle.dumps(Canary(str(canary))).hex()
        attacks = {str(uuid.uuid4()): tampered, str(uuid.uuid4()): raw}
        # the valid envelope replayed under another task id
        attacks[str(uuid.uuid4())] = envelope
        for task_id, body_ in attacks.items():
            state.dispatch.apply_async((body_,), task_id=task_id)
        log = os.path.join(log_dir, "direct.log")
        for task_id in attacks:
            assert _wait_log(log, f"rejected task {task_id}"), task_id
        # the worker still serves the next task
        assert direct.celery.submit(tasks.add, 1, 2).result(timeout=10) == 3
    assert not canary.exists()
    for task_id in attacks:  # no result written under an attacker's id
        assert client.get(f"celery-task-meta-{task_id}") is None


def test_forged_result_is_refused_without_unpickling(direct_app, tmp_path, redis_url):
    from flask_execute import SignatureError
    from flask_execute.futures import Future

    state = direct_app.extensions["celery"].runtime(direct_app)
    canary = tmp_path / "pwned-web"
    future = Future(str(uuid.uuid4()), state.client)
    raw = pickle.dumps(Canary(str(canary))).hex()
    state.outcomes.deliver(future.id, {"status": "SUCCESS", "result": raw}, future)
    exc = future.exception(0)
    assert isinstance(exc, SignatureError) and exc.reason == "malformed"
    assert not canary.exists()


def test_python_mismatch_is_reported_to_the_caller(direct_app, monkeypatch):
    """A by-value payload from another Python: not an attack, a set-up mistake."""
    from flask_execute import envelopes
    from flask_execute import SerializationError
    from tests.apps import direct

    monkeypatch.setattr(envelopes, "PYTHON", "2.7")  # what the caller claims
    with direct_app.app_context():
        future = direct.celery.submit(lambda: 1)
        with pytest.raises(SerializationError, match=r"pickled by value on Python 2\.7"):
            future.result(timeout=10)
