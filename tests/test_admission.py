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
import copy
import json
import os
import random
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
from flask_execute.envelopes import Codec
from tests import conftest
from tests.apps import guarded as guarded_app
from tests.apps import tasks
from tests.test_security import ATTACKER_KEY
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

    def alive(self, pid: int) -> bool:
        """The worker's main process is still process ``pid``, alive."""
        (worker,) = self.state.services.children
        return worker.pid == pid and worker.alive()

    def settle(self, pid: int, offset: int, timeout: float = 10.0) -> None:
        """Wait until the worker alerted (since ``offset``) or process ``pid`` died."""
        wait_for(lambda: self.alerts(offset) or not self.alive(pid), timeout)

    def registered_message(self, task_id: str, *args: object) -> dict:
        """The message of ``echo.apply_async(args)``, as kombu wrote it."""
        queue = f"inspect-only-{task_id}"
        guarded_app.echo.apply_async(args, task_id=task_id, queue=queue)
        raw = self.client.rpop(queue)
        for key in self.client.scan_iter(f"_*{queue}"):  # bindings, bell
            self.client.delete(key)
        assert raw is not None
        return json.loads(raw)

    def alerts(self, offset: int = 0) -> list[str]:
        """The admission alerts the worker logged since ``offset``."""
        return [x for x in read(self.log, offset).splitlines() if ALERT in x]

    def assert_survived(self, pid: int) -> None:
        """The same worker process is alive and serves the next call; every injected
        message left the queue and was acknowledged."""
        assert self.alive(pid), "the worker's main process died"
        assert serves(self.celery)
        # the genuine call itself is acknowledged by the main process, maybe just after
        # its result was stored
        assert wait_for(lambda: self.client.hlen("unacked") == 0)
        assert self.client.llen("celery") == 0
        self.assert_acknowledged()


def _running(name: str, redis_url: str, log_dir: str, **config: object) -> Iterator[Guarded]:
    """A guarded app with its one worker running, on a Redis db of its own."""
    broker_url = conftest.fresh_db_url(redis_url)
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


def test_pooled_connections_use_the_gated_transports(broker_url):
    """Celery's broker pool (every publish, and the replies of celery.status() and
    inspect) took kombu 5.7's plain PooledConnection, with kombu's own transport: its
    reply consumer had none of the gates below."""
    app = Flask("admission_pool")
    app.config.update(SECRET_KEY="pool-secret-for-tests", CELERY_BROKER_URL=broker_url,
                      CELERY_START_LOCAL_WORKERS=False)  # fmt: skip
    Celery(app)
    controller = app.extensions["celery"].runtime(app).controller
    with controller.pool.acquire(block=True, timeout=5) as connection:
        assert isinstance(connection, transports.Connection)
        assert isinstance(connection.transport, transports.RedisTransport)


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
    attack.settle(pid, offset)
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
    attack.settle(pid, offset)
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
    attack.settle(pid, offset)
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
    attack.settle(pid, offset, timeout=30)
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
    gzipped.settle(pid, offset, timeout=30)
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
    gzipped.settle(pid, offset)
    gzipped.assert_survived(pid)
    (line,) = gzipped.alerts(offset)
    assert line.endswith(f"{ALERT}task {task_id} ({reason}): {detail}{DROPPED}")


# --- item 4: fuzz ---------------------------------------------------------------------------
#: CI runs this seed; set FLASK_EXECUTE_FUZZ_SEED to explore others
SEED = int(os.environ.get("FLASK_EXECUTE_FUZZ_SEED", "1004"))
MUTANTS = int(os.environ.get("FLASK_EXECUTE_FUZZ_MUTANTS", "600"))
BATCH = 50
BROADCAST = 6  # of each batch: published to every worker instead of queued
FANOUTS = ["celery.pidbox", "celeryev/worker.heartbeat"]
DEEP = "\x00deep\x00"  # stands for JSON nested deeper than any parser's recursion limit
_DEEP_JSON = "[" * 100_000 + "]" * 100_000
#: values of every JSON type, and what kombu's JSON decodes into other types
NASTY: list[object] = [
    None,
    True,
    False,
    0,
    -1,
    7,
    2**70,
    -(2**70),
    1.5,
    -2.5,
    float("nan"),
    float("inf"),
    "",
    "x",
    "\n",
    "a\nb",
    "\ud800",
    "é",
    "x" * 5000,
    "1",
    "null",
    "2020-01-01T00:00:00",
    "2020-01-01T00:00:00+00:00",
    "0001-01-01T00:00:00",
    "not a date",
    [],
    [None],
    [1],
    [None, None],
    [1, 2],
    [-1, 5],
    ["x", "y"],
    [1, 2, 3],
    [[]],
    [{}],
    {},
    {"a": 1},
    {"": None},
    {"task": "x"},
    {"task": "tests.apps.guarded.echo", "args": [1]},
    {"__type__": "bytes", "__value__": 5},
    {"__type__": "uuid", "__value__": 1},
    {"__type__": "datetime", "__value__": "x"},
    {"__type__": "decimal", "__value__": "x"},
    {"__type__": "datetime", "__value__": "2020-01-01T00:00:00"},
    {"__type__": "nope", "__value__": 1},
    DEEP,
]
#: header names beyond the captured ones: Celery's optional ones, request attributes
EXTRA_HEADERS = [
    "compression",
    "redelivered",
    "groups",
    "periodic_task_name",
    "is_eager",
    "hostname",
    "delivery_info",
    "args",
    "reply_to",
    "update",
    "get",
    "__class__",
]
PROPERTIES = [
    "correlation_id",
    "reply_to",
    "delivery_mode",
    "delivery_info",
    "priority",
    "body_encoding",
    "delivery_tag",
]
EMBED = ["callbacks", "errbacks", "chain", "chord", "is_eager", "id", "task", "hostname"]
TASK_NAMES = [
    "flask_execute.dispatch",
    "flask_execute.dispatch_acks_late",
    "tests.apps.guarded.echo",
    "no.such.task",
    "",
]
CONTENT_TYPES = [
    "application/json",
    "application/x-python-serialize",
    "application/x-yaml",
    "application/data",
    "text/plain",
    "",
]
QUEUE_ITEMS = [
    b"",
    b"x",
    b"{",
    b"\xff\xfe",
    b"null",
    b"[]",
    b"{}",
    b'{"properties": {}}',
    b"[" * 100_000,
    _DEEP_JSON.encode(),
]


def _plain(message: dict) -> bytes:
    """The body bytes of a captured message (base64, maybe compressed); after other
    mutations, whatever can still be read, else a valid empty body."""
    try:
        body = base64.b64decode(message["body"])
        if message["headers"].get("compression"):
            body = zlib.decompress(body)
        return body
    except Exception:
        return b"[[], {}, null]"


def _mapping(message: dict, name: str) -> dict:
    """``message[name]``, made a mapping again if an earlier mutation broke it."""
    if not isinstance(message.get(name), dict):
        message[name] = {}
    return message[name]


def _encode(value: object) -> bytes:
    text = json.dumps(value)
    return text.replace(json.dumps(DEEP), _DEEP_JSON).encode()


class Mutator:
    """Deterministic mutations of captured messages (``random.Random(seed)``)."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def nasty(self) -> object:
        return copy.deepcopy(self.rng.choice(NASTY))

    def __call__(self, message: dict) -> bytes:
        """One mutant of ``message`` (a forged copy), as the bytes to LPUSH."""
        operators = [
            self.header,
            self.header,
            self.property,
            self.envelope,
            self.body,
            self.body,
            self.encoding,
            self.compression,
            self.content_type,
            self.item,
        ]
        for _ in range(self.rng.choice([1, 1, 1, 2, 3])):
            mutated = self.rng.choice(operators)(message)
            if isinstance(mutated, bytes):
                return mutated
        return _encode(message)

    def header(self, message: dict) -> None:
        headers = _mapping(message, "headers")
        name = self.rng.choice([*headers, *EXTRA_HEADERS])
        if name in headers and self.rng.random() < 0.25:
            del headers[name]
        elif name == "task" and self.rng.random() < 0.5:
            headers[name] = self.rng.choice(TASK_NAMES)
        else:
            headers[name] = self.nasty()

    def property(self, message: dict) -> None:
        properties = _mapping(message, "properties")
        name = self.rng.choice(PROPERTIES)
        if name == "delivery_info" and self.rng.random() < 0.5:
            info = _mapping(properties, name)
            info[self.rng.choice(["exchange", "routing_key"])] = self.nasty()
        elif self.rng.random() < 0.25:
            properties.pop(name, None)
        elif name == "delivery_tag":  # never two messages under one valid tag
            properties[name] = self.rng.choice([None, "", 5, [], {}])
        else:
            properties[name] = self.nasty()

    def envelope(self, message: dict) -> None:
        name = self.rng.choice(
            ["body", "content-type", "content-encoding", "headers", "properties"]
        )
        if self.rng.random() < 0.3:
            message.pop(name, None)
        else:
            message[name] = self.nasty()

    def body(self, message: dict) -> None:
        try:
            body = json.loads(_plain(message))
            body[2] = body[2] if isinstance(body[2], dict) else {}
        except Exception:  # an earlier mutation broke it: start from a valid shape
            body = [[], {}, {}]
        choice = self.rng.randrange(6)
        if choice == 0:
            body = self.nasty()
        elif choice == 1:
            body[self.rng.randrange(3)] = self.nasty()
        elif choice == 2:
            body[2][self.rng.choice(EMBED)] = self.nasty()
        elif choice == 3:
            body = [*body, self.nasty()]
        elif choice == 4:
            body = body[: self.rng.randrange(3)]
        else:
            body[1] = {self.rng.choice(["", "x", "__class__", "self"]): self.nasty()}
        self.set_body(message, _encode(body))

    def set_body(self, message: dict, data: bytes) -> None:
        if _mapping(message, "headers").get("compression") == "application/x-gzip":
            data = zlib.compress(data)
        message["body"] = base64.b64encode(data).decode()
        _mapping(message, "properties")["body_encoding"] = "base64"

    def encoding(self, message: dict) -> None:
        body = message["body"] if isinstance(message.get("body"), str) else ""
        choice = self.rng.randrange(5)
        if choice == 0:  # the body as text, no body encoding
            _mapping(message, "properties").pop("body_encoding", None)
            message["body"] = _plain(message).decode("latin-1")
        elif choice == 1:
            message["body"] = body[:-1]  # bad padding
        elif choice == 2:
            message["body"] = "%%%" + body
        elif choice == 3:
            properties = _mapping(message, "properties")
            properties["body_encoding"] = self.rng.choice(["base32", "hex", 5, ""])
        else:
            message["body"] = "\ud800"

    def compression(self, message: dict) -> None:
        plain = _plain(message)
        method = self.rng.choice(
            [
                "application/x-gzip",
                "application/x-gzip",
                "gzip",
                "zlib",
                "application/x-bz2",
                "zstd",
                "",
                5,
                None,
            ]
        )
        data = {
            0: zlib.compress(plain),
            1: zlib.compress(plain)[:-4],
            2: plain,
            3: bz2.compress(plain),
            4: bomb(8 * LIMIT),
        }[self.rng.randrange(5)]
        _mapping(message, "headers")["compression"] = method
        message["body"] = base64.b64encode(data).decode()
        _mapping(message, "properties")["body_encoding"] = "base64"

    def content_type(self, message: dict) -> None:
        if self.rng.random() < 0.7:
            message["content-type"] = self.rng.choice(CONTENT_TYPES)
        else:
            message["content-encoding"] = self.rng.choice(["binary", "utf-16", "nope", ""])

    def item(self, message: dict) -> bytes:
        if self.rng.random() < 0.5:
            return self.rng.choice(QUEUE_ITEMS)
        return _encode(self.nasty())


def test_fuzzed_messages_never_stop_the_worker(gzipped, tmp_path):
    """Mutants of real captured messages (a genuine call, a registered task, a forged
    call), in batches pushed onto the queue, a few also published to every worker:
    after each batch, the same worker process serves a genuine call."""
    pid = gzipped.worker_pid
    db = gzipped.client.connection_pool.connection_kwargs["db"]
    canary = tmp_path / "pwned"
    attacker = Codec(ATTACKER_KEY)
    mutate = Mutator(SEED)
    offset = size(gzipped.log)
    fresh: list[str] = []

    def captured(i: int) -> dict:
        task_id = str(uuid.uuid4())
        fresh.append(task_id)
        if i % 3 == 0:
            _, envelope = gzipped.envelope(tasks.add, 1, 2, task_id=task_id)
            return gzipped.message(task_id, envelope, late=i % 2 == 0)
        if i % 3 == 1:
            _, forged = gzipped.envelope(tasks.touch, str(canary), task_id=task_id, codec=attacker)
            return gzipped.message(task_id, forged)
        return gzipped.registered_message(task_id, "x")

    for start in range(0, MUTANTS, BATCH):
        mutants = [mutate(forge(captured(i))) for i in range(start, start + BATCH)]
        queued, published = mutants[:-BROADCAST], mutants[-BROADCAST:]
        gzipped.client.lpush("celery", *queued)
        for i, mutant in enumerate(published):  # to remote control and to worker events
            gzipped.client.publish(f"/{db}.{FANOUTS[i % len(FANOUTS)]}", mutant)
        assert wait_for(lambda: gzipped.client.llen("celery") == 0, timeout=30)
        assert gzipped.alive(pid)
        assert serves(gzipped.celery), f"no genuine call served after mutants {start}+"
        assert wait_for(lambda: gzipped.client.hlen("unacked") == 0, timeout=30)
        assert not canary.exists()
    text = read(gzipped.log, offset)
    for failure in ("Unrecoverable error", "Connection to broker lost", "(unhandled)"):
        assert failure not in text  # not even restarted, nor caught by the safety net
    alerts = "\n".join(gzipped.alerts(offset))
    assert all(alerts.count(task_id) <= 1 for task_id in fresh)  # each logged once at most
    assert gzipped.client.llen("celery") == 0 and gzipped.client.hlen("unacked") == 0


# --- what is published to every worker (control commands, worker events) -------------------
NO_BODY = object()


def _fanout(properties: dict, body: object = "x", **fields: object) -> bytes:
    """A published kombu message: ``body`` as JSON (``NO_BODY``: none at all),
    ``properties`` and ``fields`` (top-level keys) replacing kombu's."""
    message = {
        "content-type": "application/json",
        "content-encoding": "utf-8",
        "headers": {},
        "properties": {"delivery_tag": str(uuid.uuid4()), "body_encoding": "base64",
                       **properties},
        **fields,
    }  # fmt: skip
    if body is not NO_BODY:
        message["body"] = base64.b64encode(json.dumps(body).encode()).decode()
    return _encode(message)


PUBLISHED = {
    "event-body-a-string": ("celeryev/worker.heartbeat", "a worker event",
                            _fanout({"delivery_info": {"exchange": "celeryev",
                                                       "routing_key": "worker.heartbeat"}})),
    "item-not-decodable": ("celery.pidbox", "task <unknown>",
                           b'{"__type__": "bytes", "__value__": 5}'),
    "item-a-number": ("celery.pidbox", "task <unknown>", b"5"),
    "item-too-deep": ("celery.pidbox", "task <unknown>", _DEEP_JSON.encode()),
    "control-without-a-body": (
        "celery.pidbox", "a message",
        _fanout({"delivery_info": {"exchange": "celery.pidbox", "routing_key": ""}},
                NO_BODY, **{"content-type": "application/x-yaml"}),
    ),
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
    attack.settle(pid, offset)
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
    return app.extensions["celery"].runtime(app).controller


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


def test_message_protocol_1_is_refused():
    with pytest.raises(ConfigurationError) as info:
        _controller(CELERY_TASK_PROTOCOL=1)
    assert str(info.value) == (
        "'CELERY_TASK_PROTOCOL' is 1: flask-execute workers accept Celery's message protocol 2"
        " only (Celery's default); remove the setting."
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
