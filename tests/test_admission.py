"""Workers survive any message (issue 10, items 4 and 5).

An attacker who can write to the broker pushes broken task messages onto the queue:
bodies and headers of the wrong type, queue items that are not JSON, compressed
messages that inflate to gigabytes. Each scenario starts from a real protocol-2 message
the web process published (``Target.message``), changes it, ``LPUSH``-es it, and checks
that the worker's main process is still the same process, still serves a genuine call,
logged the refusal once at CRITICAL and left nothing queued or unacknowledged.
"""

from __future__ import annotations

import base64
import bz2
import json
import os
import uuid
import zlib
from collections.abc import Callable
from collections.abc import Iterator

import pytest
import redis
from flask import Flask

from flask_execute import Celery
from flask_execute import ConfigurationError
from flask_execute import transports
from flask_execute.admission import Consumer
from flask_execute.admission import Policy
from tests import conftest
from tests.apps import guarded as guarded_app
from tests.apps import tasks
from tests.test_security import forge
from tests.test_security import read
from tests.test_security import serves
from tests.test_security import size
from tests.test_security import Target
from tests.test_security import wait_for

LIMIT = 1024 * 1024  # CELERY_MAX_MESSAGE_SIZE of the guarded app
ALERT = "flask-execute rejected "
DROPPED = " The message was dropped unexecuted."


class Guarded(Target):
    """The guarded app under attack: its worker's pid, its registered task."""

    @property
    def worker_pid(self) -> int:
        (worker,) = self.state.services.children
        return worker.pid

    def registered_message(self, task_id: str, *args: object) -> dict:
        """The message of ``echo.apply_async(args)``, as kombu wrote it."""
        queue = f"inspect-only-{task_id}"
        guarded_app.echo.apply_async(args, task_id=task_id, queue=queue)
        raw = self.client.rpop(queue)
        for key in self.client.scan_iter(f"_kombu.*{queue}"):
            self.client.delete(key)
        assert raw is not None
        return json.loads(raw)

    def alerts(self, offset: int = 0) -> list[str]:
        """The admission alerts the worker logged since ``offset``."""
        return [x for x in read(self.log, offset).splitlines() if ALERT in x]

    def assert_survived(self, pid: int) -> None:
        """The same worker process is alive and serves the next call; every injected
        message left the queue and was acknowledged."""
        assert conftest._alive(pid), "the worker's main process died"
        assert self.worker_pid == pid
        assert serves(self.celery)
        # the genuine call itself is acknowledged by the main process, maybe just after
        # its result was stored
        assert wait_for(lambda: self.client.hlen("unacked") == 0)
        assert self.client.llen("celery") == 0
        self.assert_acknowledged()


def _running(name: str, redis_url: str, log_dir: str, **config: object) -> Iterator[Guarded]:
    """A guarded app with its one worker running, on a Redis db of its own."""
    broker_url = f"{redis_url}/{next(conftest._db)}"
    app = guarded_app.create_app(
        CELERY_BROKER_URL=broker_url,
        CELERY_LOG_DIR=log_dir,
        CELERY_WORKERS={name: {"concurrency": 1}},
        **config,
    )
    client = redis.Redis.from_url(broker_url)
    celery = guarded_app.celery
    try:
        with app.app_context():
            celery.start()
            yield Guarded(app, celery, client, os.path.join(log_dir, f"{name}.log"))
    finally:
        with app.app_context():
            celery.stop()
        client.flushdb()  # a message that killed the worker would poison the next one
        client.close()


@pytest.fixture(scope="module")
def guarded(redis_url: str, log_dir: str) -> Iterator[Guarded]:
    """The guarded app with Celery's defaults: it never compresses."""
    yield from _running("guarded", redis_url, log_dir)


@pytest.fixture(scope="module")
def compressing(redis_url: str, log_dir: str) -> Iterator[Guarded]:
    """The guarded app compressing with gzip, messages limited to LIMIT bytes."""
    yield from _running(
        "compressing",
        redis_url,
        log_dir,
        CELERY_TASK_COMPRESSION="gzip",
        CELERY_MAX_MESSAGE_SIZE=LIMIT,
    )


@pytest.fixture
def attack(guarded: Guarded) -> Iterator[Guarded]:
    """The guarded app with an app context pushed for one test."""
    with guarded.app.app_context():
        guarded.injected = []
        yield guarded


def _body(value: object) -> bytes:
    return json.dumps(value).encode()


def _without(key: str) -> Callable[[dict], dict]:
    def mutate(message: dict) -> dict:
        del message["headers"][key]
        return message

    return mutate


def _headers_string(message: dict) -> dict:
    message["headers"] = "not a mapping"
    return message


# --- item 4: each crash the attack run observed on main -------------------------------------
#: name -> how the captured message is changed (after ``forge`` gave it a fresh tag)
CRASHES: dict[str, Callable[[dict], dict]] = {
    "body-empty-object": lambda m: forge(m, body=_body({})),
    "body-empty-list": lambda m: forge(m, body=_body([])),
    "body-null": lambda m: forge(m, body=_body(None)),
    "body-string": lambda m: forge(m, body=_body("fe1.a.b.c")),
    "body-four-items": lambda m: forge(m, body=_body([["x"], {}, {}, 1])),
    "timelimit-string": lambda m: forge(m, timelimit="x"),
    "stamped-headers-int": lambda m: forge(m, stamped_headers=5),
    "headers-string": lambda m: _headers_string(forge(m)),
    "missing-id-header": lambda m: _without("id")(forge(m)),
}


@pytest.mark.parametrize("kind", ["dispatch", "registered"])
@pytest.mark.parametrize("crash", CRASHES)
def test_a_malformed_message_is_refused_and_the_worker_lives(attack, crash, kind):
    pid = attack.worker_pid
    task_id = str(uuid.uuid4())
    if kind == "dispatch":
        captured = attack.message(task_id, attack.envelope(tasks.add, 1, 2, task_id=task_id)[1])
    else:
        captured = attack.registered_message(task_id, "hello")
    offset = size(attack.log)
    attack.inject(CRASHES[crash](captured))
    wait_for(lambda: attack.alerts(offset) or not conftest._alive(pid))
    attack.assert_survived(pid)
    (line,) = attack.alerts(offset)  # logged once, by the worker's main process
    assert "CRITICAL/MainProcess" in line
    assert f"{ALERT}task {task_id} (malformed): " in line
    assert line.endswith(DROPPED)
    assert captured["body"] not in line
    assert attack.client.get(f"celery-task-meta-{task_id}") is None


@pytest.mark.parametrize(
    "item",
    [b"not json at all", b'{"body": "trunc', b"\xff\xfe\x00", b"[1, 2, 3]", b"42", b'"x"'],
    ids=["text", "truncated", "binary", "list", "number", "string"],
)
def test_a_queue_item_that_is_not_a_message_is_dropped(attack, item):
    pid = attack.worker_pid
    offset = size(attack.log)
    attack.client.lpush("celery", item)
    wait_for(lambda: attack.alerts(offset) or not conftest._alive(pid))
    attack.assert_survived(pid)
    (line,) = attack.alerts(offset)
    assert "CRITICAL/MainProcess" in line
    assert f"{ALERT}task <unknown> (malformed): " in line
    assert line.endswith(DROPPED)


def test_a_missing_id_does_not_loop_on_restarts(attack):
    """The message without an id is gone for good: not restored, not delivered again."""
    pid = attack.worker_pid
    task_id = str(uuid.uuid4())
    message = _without("id")(forge(attack.registered_message(task_id, "x")))
    offset = size(attack.log)
    attack.inject(message)
    wait_for(lambda: attack.alerts(offset) or not conftest._alive(pid))
    attack.assert_survived(pid)
    attack.celery.stop()  # a worker's shutdown restores what it did not acknowledge
    attack.celery.start()
    conftest.keep_alive(attack.app)  # the module's worker again
    pid = attack.worker_pid
    attack.assert_survived(pid)
    assert len(attack.alerts(offset)) == 1


# --- item 5: compressed messages ----------------------------------------------------------
BOMB = 512 * 1024 * 1024  # what the bomb inflates to


def bomb(size: int = BOMB) -> bytes:
    """``size`` zero bytes, zlib-compressed (kombu's "gzip") to about size / 1000."""
    packer = zlib.compressobj(9)
    chunk = bytes(1024 * 1024)
    return b"".join([*(packer.compress(chunk) for _ in range(size // len(chunk))), packer.flush()])


def compressed(message: dict, body: bytes, method: str = "application/x-gzip") -> dict:
    """``message`` (forged) carrying ``body`` under a ``compression`` header."""
    forged = forge(message, body=body)
    forged["headers"]["compression"] = method
    return forged


def peaks(pid: int) -> dict[int, int]:
    """Peak resident memory (VmHWM, KiB) of process ``pid`` and of its children."""
    found = {}
    for each in {pid, *conftest.descendants(pid)}:
        try:
            with open(f"/proc/{each}/status") as f:
                status = f.read()
        except OSError:
            continue
        (line,) = [x for x in status.splitlines() if x.startswith("VmHWM:")]
        found[each] = int(line.split()[1])
    return found


def growth(before: dict[int, int], after: dict[int, int]) -> int:
    """How much higher (KiB) the peaks went; a new process counts whole."""
    return max(after[p] - before.get(p, 0) for p in after)


@pytest.mark.parametrize("kind", ["dispatch", "registered"])
def test_a_compressed_message_is_refused_uninflated_by_an_app_that_never_compresses(attack, kind):
    pid = attack.worker_pid
    task_id = str(uuid.uuid4())
    if kind == "dispatch":
        captured = attack.message(task_id, attack.envelope(tasks.add, 1, 2, task_id=task_id)[1])
    else:
        captured = attack.registered_message(task_id, "hello")
    payload = bomb()
    assert len(payload) < 0.7 * 1024 * 1024
    before = peaks(pid)
    offset = size(attack.log)
    attack.inject(compressed(captured, payload))
    wait_for(lambda: attack.alerts(offset) or not conftest._alive(pid), timeout=30)
    attack.assert_survived(pid)
    assert growth(before, peaks(pid)) < 16 * 1024  # KiB: nothing was inflated
    (line,) = attack.alerts(offset)
    assert line.endswith(
        f"{ALERT}task {task_id} (compressed): It is compressed, but this app does not compress its"
        f" messages (CELERY_TASK_COMPRESSION is not set).{DROPPED}"
    )


@pytest.fixture
def gzipped(compressing: Guarded) -> Iterator[Guarded]:
    with compressing.app.app_context():
        compressing.injected = []
        yield compressing


def test_an_app_that_compresses_gets_its_calls_through(gzipped):
    """Calls and registered tasks travel gzip-compressed and run."""
    task_id = str(uuid.uuid4())
    captured = gzipped.registered_message(task_id, "hello")
    assert captured["headers"]["compression"] == "application/x-gzip"
    gzipped.inject(forge(captured))
    key = f"celery-task-meta-{task_id}"
    assert wait_for(lambda: gzipped.client.get(key))
    assert json.loads(gzipped.client.get(key))["result"] == "hello"
    assert gzipped.celery.submit(tasks.add, 1, 2).result(timeout=10) == 3
    big = "x" * (LIMIT // 2)  # compresses to almost nothing, inflates under the limit
    assert gzipped.celery.submit(tasks.add, big, "y").result(timeout=10) == big + "y"


@pytest.mark.parametrize("kind", ["dispatch", "registered"])
def test_a_decompression_bomb_inflates_no_further_than_the_limit(gzipped, kind):
    pid = gzipped.worker_pid
    task_id = str(uuid.uuid4())
    if kind == "dispatch":
        captured = gzipped.message(task_id, gzipped.envelope(tasks.add, 1, 2, task_id=task_id)[1])
    else:
        captured = gzipped.registered_message(task_id, "hello")
    before = peaks(pid)
    offset = size(gzipped.log)
    gzipped.inject(compressed(captured, bomb()))
    wait_for(lambda: gzipped.alerts(offset) or not conftest._alive(pid), timeout=30)
    gzipped.assert_survived(pid)
    assert growth(before, peaks(pid)) < 16 * 1024  # KiB; the limit is 1 MiB
    (line,) = gzipped.alerts(offset)
    assert line.endswith(
        f"{ALERT}task {task_id} (too_large): It inflates to more than the CELERY_MAX_MESSAGE_SIZE"
        f" limit of {LIMIT} bytes; it was not inflated further.{DROPPED}"
    )


@pytest.mark.parametrize(
    "method, body, reason, detail",
    [
        (
            "application/x-bz2",
            bz2.compress(b"[[], {}, {}]"),
            "compressed",
            "It is compressed with 'application/x-bz2'; this app compresses with"
            " 'application/x-gzip' only (CELERY_TASK_COMPRESSION).",
        ),
        (
            "zstd",
            b"\x28\xb5\x2f\xfd",
            "compressed",
            "It is compressed with 'zstd'; this app compresses with 'application/x-gzip' only"
            " (CELERY_TASK_COMPRESSION).",
        ),
        (
            "application/x-gzip",
            b"not compressed at all",
            "malformed",
            "Its body does not inflate: error: Error -3 while decompressing data: incorrect"
            " header check.",
        ),
        (
            "application/x-gzip",
            zlib.compress(b"[[], {}, {}]")[:-6],
            "malformed",
            "Its compressed body is truncated.",
        ),
    ],
    ids=["other-method", "unknown-method", "not-compressed", "truncated"],
)
def test_a_compressed_message_the_app_did_not_send_is_refused(
    gzipped, method, body, reason, detail
):
    pid = gzipped.worker_pid
    task_id = str(uuid.uuid4())
    offset = size(gzipped.log)
    gzipped.inject(compressed(gzipped.registered_message(task_id, "x"), body, method))
    wait_for(lambda: gzipped.alerts(offset) or not conftest._alive(pid))
    gzipped.assert_survived(pid)
    (line,) = gzipped.alerts(offset)
    assert line.endswith(f"{ALERT}task {task_id} ({reason}): {detail}{DROPPED}")


_DEEP_JSON = "[" * 100_000 + "]" * 100_000


def _encode(value: object) -> bytes:
    return json.dumps(value).encode()


# --- what is published to every worker (control commands, worker events) -------------------
def _fanout(message: dict | None, body: object = "x") -> bytes:
    """A published kombu message (or, with ``message=None``, the raw item)."""
    return _encode(
        {
            "body": base64.b64encode(json.dumps(body).encode()).decode(),
            "content-type": "application/json",
            "content-encoding": "utf-8",
            "headers": {},
            "properties": {"delivery_tag": str(uuid.uuid4()), "body_encoding": "base64", **message},
        }
    )


PUBLISHED = {
    "event-body-a-string": ("celeryev/worker.heartbeat", "a worker event",
                            _fanout({"delivery_info": {"exchange": "celeryev",
                                                       "routing_key": "worker.heartbeat"}})),
    "item-not-decodable": ("celery.pidbox", "task <unknown>",
                           b'{"__type__": "bytes", "__value__": 5}'),
    "item-a-number": ("celery.pidbox", "task <unknown>", b"5"),
    "item-too-deep": ("celery.pidbox", "task <unknown>", _DEEP_JSON.encode()),
}  # fmt: skip


@pytest.mark.parametrize("case", PUBLISHED)
def test_a_broken_published_message_is_dropped(attack, case):
    """Control commands and worker events are published to every worker (Redis
    PUBLISH), no queue in between."""
    channel, subject, item = PUBLISHED[case]
    pid = attack.worker_pid
    db = attack.client.connection_pool.connection_kwargs["db"]
    offset = size(attack.log)
    assert attack.client.publish(f"/{db}.{channel}", item) == 1  # the worker listens
    wait_for(lambda: attack.alerts(offset) or not conftest._alive(pid))
    attack.assert_survived(pid)
    (line,) = attack.alerts(offset)
    assert f"CRITICAL/MainProcess] flask-execute rejected {subject} (malformed): " in line
    assert line.endswith(DROPPED)


# --- wiring (no worker needed) -----------------------------------------------------------------
class OwnConsumer(Consumer):
    """A user's consumer built on ours."""


def _controller(**config: object) -> object:
    app = Flask("admission_wiring")
    app.config.update(
        SECRET_KEY="admission wiring secret, long enough",
        CELERY_BROKER_URL="redis://127.0.0.1:6399/3",
        CELERY_START_LOCAL_WORKERS=False,
    )
    app.config.update(config)
    Celery(app)
    return app.extensions["celery"].controller


@pytest.mark.parametrize(
    "url, transport",
    [
        ("redis://127.0.0.1:6399/3", transports.RedisTransport),
        ("rediss://127.0.0.1:6399/3", transports.RedisTransport),
        ("sentinel://127.0.0.1:26399", transports.SentinelTransport),
        ("amqp://guest:guest@127.0.0.1:5699//", transports.AMQPTransport),
    ],
)
def test_every_broker_connection_is_gated(url, transport):
    controller = _controller(
        CELERY_BROKER_URL=url, CELERY_RESULT_BACKEND="redis://127.0.0.1:6399/4"
    )
    assert controller.conf.worker_consumer == "flask_execute.admission:Consumer"
    for connection in (controller.connection_for_read(), controller.connection_for_write()):
        with connection:
            assert connection.get_transport_cls() is transport
            assert connection.as_uri().split("://")[0] == url.split("://")[0]  # for Flower, logs
            if url.startswith("rediss"):  # kombu's default TLS options for rediss:// stay
                assert connection.ssl


def test_a_consumer_built_on_ours_is_kept():
    controller = _controller(CELERY_WORKER_CONSUMER=f"{__name__}:OwnConsumer")
    assert controller.conf.worker_consumer == f"{__name__}:OwnConsumer"


def test_a_consumer_that_does_not_check_messages_is_refused():
    with pytest.raises(ConfigurationError) as info:
        _controller(CELERY_WORKER_CONSUMER="celery.worker.consumer.gossip:Gossip")
    assert str(info.value) == (
        "'CELERY_WORKER_CONSUMER' is 'celery.worker.consumer.gossip:Gossip': flask-execute"
        " workers check every message in their own consumer; derive yours from"
        " flask_execute.admission:Consumer."
    )


@pytest.mark.parametrize(
    "method, content_type",
    [("gzip", "application/x-gzip"), ("zlib", "application/x-gzip"),
     ("bzip2", "application/x-bz2"), ("xz", "application/x-lzma")],
)  # fmt: skip
def test_the_configured_compression_is_the_one_accepted(method, content_type):
    controller = _controller(CELERY_TASK_COMPRESSION=method, CELERY_MAX_MESSAGE_SIZE=1000)
    assert controller.flask_execute_admission == Policy(1000, content_type)


@pytest.mark.parametrize("method", ["brotli", "zstd", "snappy"])
def test_a_compression_without_a_bound_is_refused(method):
    with pytest.raises(ConfigurationError) as info:
        _controller(CELERY_TASK_COMPRESSION=method)
    assert str(info.value) == (
        f"'CELERY_TASK_COMPRESSION' is {method!r}: workers inflate messages with a bound"
        " (CELERY_MAX_MESSAGE_SIZE) and can do so for 'gzip', 'bzip2' and 'xz' only;"
        " choose one of them."
    )
