"""``CELERY_ENCRYPT`` against real workers (issue 10, item 10): arguments, results and
errors are unreadable wherever Redis keeps them, and a web process and a worker that
disagree on the setting fail the call with an error naming it, instead of hanging.

The at-rest test runs a Redis of its own (``appendonly`` with ``appendfsync always``,
so every write is in the AOF; ``rdbcompression no``, so a clear value would be
visible in the RDB dump) and looks for canary strings in every key and value, in every
pub/sub message, in the RDB dump (``SAVE``), in the AOF files and in the worker's log:
raw, and inside every base64 or base64url run, recursively (Celery's message body is
base64 JSON, whose envelope carries a base64url pickle). The same test with encryption
off finds the canaries, which proves that the search can fail.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import subprocess
import sys
import textwrap
import threading
import types
import uuid
from collections.abc import Callable
from collections.abc import Iterator

import pytest
import redis

import flask_execute
from flask_execute import SignatureError
from flask_execute.embedded import EmbeddedRedis
from flask_execute.processes import free_port
from tests.conftest import TmpModules

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SRC = os.path.dirname(os.path.dirname(os.path.abspath(flask_execute.__file__)))
_BASE64_RUN = re.compile(rb"[A-Za-z0-9+/_-]{16,}")


# --- looking for canaries ----------------------------------------------------------------
def readings(data: bytes, depth: int = 3) -> Iterator[bytes]:
    """``data``, then every decoding of its base64 / base64url runs, recursively."""
    yield data
    if depth == 0:
        return
    for run in _BASE64_RUN.findall(data):
        run = run[: len(run) - len(run) % 4] if len(run) % 4 == 1 else run
        padded = run + b"=" * (-len(run) % 4)
        for altchars in (None, b"-_"):
            try:
                decoded = base64.b64decode(padded, altchars=altchars, validate=True)
            except (binascii.Error, ValueError):
                continue
            yield from readings(decoded, depth - 1)


def found(canaries: list[str], blobs: list[bytes]) -> set[str]:
    """The canaries readable anywhere in ``blobs``."""
    seen: set[str] = set()
    for blob in blobs:
        for reading in readings(blob):
            seen.update(c for c in canaries if c.encode() in reading)
    return seen


def every_key_and_value(url: str) -> list[bytes]:
    """Every key and value of every db of the server at ``url``, whatever its type."""
    blobs: list[bytes] = []
    with redis.Redis.from_url(url) as client:
        dbs = [int(db[2:]) for db in client.info("keyspace")]
    for db in dbs:
        conn = redis.Redis.from_url(f"{url}/{db}")
        for key in conn.scan_iter(count=1000):
            kind = conn.type(key)
            blobs.append(key)
            if kind == b"string":
                blobs.append(conn.get(key) or b"")
            elif kind == b"list":
                blobs += conn.lrange(key, 0, -1)
            elif kind == b"hash":
                for field, value in conn.hgetall(key).items():
                    blobs += [field, value]
            elif kind == b"set":
                blobs += list(conn.smembers(key))
            elif kind == b"zset":
                blobs += [member for member, _ in conn.zrange(key, 0, -1, withscores=True)]
            else:  # pragma: no cover - streams are not used by Celery's Redis transport
                raise AssertionError(f"unexpected key type {kind!r} of {key!r}")
        conn.close()
    return blobs


class Listener:
    """Every pub/sub message published on the server while it listens."""

    SENTINEL = "crypt-test-sentinel"

    def __init__(self, url: str) -> None:
        self.client = redis.Redis.from_url(url)
        self.pubsub = self.client.pubsub()
        self.pubsub.psubscribe("*")
        self.messages: list[bytes] = []
        self.caught_up = threading.Event()
        self.thread = threading.Thread(target=self._listen, daemon=True)
        self.thread.start()

    def _listen(self) -> None:
        for message in self.pubsub.listen():
            if message["type"] != "pmessage":
                continue
            if message["channel"] == self.SENTINEL.encode():
                self.caught_up.set()
                return
            self.messages += [message["channel"], message["data"]]

    def drain(self) -> list[bytes]:
        """Everything published before now (Redis delivers in order of execution)."""
        self.client.publish(self.SENTINEL, b"done")
        assert self.caught_up.wait(10), "the pub/sub listener did not catch up"
        self.thread.join(10)
        return self.messages

    def close(self) -> None:
        self.pubsub.close()
        self.client.close()


def files_under(directory: str, predicate: Callable[[str], bool]) -> list[bytes]:
    """The contents of every file under ``directory`` whose name passes ``predicate``."""
    blobs = []
    for base, _, names in os.walk(directory):
        for name in names:
            if predicate(name):
                with open(os.path.join(base, name), "rb") as f:
                    blobs.append(f.read())
    return blobs


# --- the app under test --------------------------------------------------------------------
APP = """
from flask import Flask
from flask_execute import Celery

app = Flask(__name__)
app.config.update(
    SECRET_KEY="the encryption test's secret",
    CELERY_BROKER_URL={broker!r},
    CELERY_LOG_DIR={log_dir!r},
    CELERY_WORKERS=[{worker!r}],
    CELERY_FLOWER=False,
    CELERY_ENCRYPT={encrypt!r},
)
celery = Celery(app)


def reveal(secret):
    # the result is made on the worker: it never travelled as an argument
    return {{"echo": secret.replace("ARG", "RES")}}


def fail(secret):
    raise ValueError(secret.replace("ARG", "ERR"))
"""


@pytest.fixture
def private_redis(tmp_path: object) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(
        os.path.join(str(tmp_path), "redis"),
        port=free_port(),
        appendonly=True,
        extra_args=["--rdbcompression", "no", "--appendfsync", "always"],
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _calls(module: types.ModuleType, args: list[str], listener: Listener) -> list[bytes]:
    """A call, a failing call, a map chunk and a failing map chunk, each checked in the
    caller (decrypted there), then the workers stopped; returns what was published."""
    try:
        with module.app.app_context():
            celery = module.celery
            assert celery.submit(module.reveal, args[0]).result(timeout=30) == {
                "echo": args[0].replace("ARG", "RES")
            }
            error = celery.submit(module.fail, args[1]).exception(timeout=10)
            assert (type(error), str(error)) == (ValueError, args[1].replace("ARG", "ERR"))
            chunk = celery.map(module.reveal, [args[2]], [args[3]], chunksize=2)
            assert chunk.result(timeout=10) == [
                {"echo": a.replace("ARG", "RES")} for a in args[2:4]
            ]
            failed = celery.map(module.fail, [args[4]], [args[5]], chunksize=2)
            assert [str(f.exception(timeout=10)) for f in failed] == [
                a.replace("ARG", "ERR") for a in args[4:6]
            ]
    finally:
        with module.app.app_context():
            module.celery.stop()
    return listener.drain()


@pytest.mark.parametrize("encrypt", [True, False], ids=["encrypted", "clear"])
def test_arguments_results_and_errors_are_unreadable_at_rest(
    encrypt: bool, private_redis: EmbeddedRedis, tmp_modules: TmpModules, tmp_path: object
) -> None:
    name = f"crypt_{'on' if encrypt else 'off'}"
    log_dir = os.path.join(str(tmp_path), "logs")
    worker = name.replace("_", "-")
    tmp_modules.write(
        name,
        textwrap.dedent(APP).format(
            broker=private_redis.url, log_dir=log_dir, worker=worker, encrypt=encrypt
        ),
    )
    listener = Listener(private_redis.url)
    module = tmp_modules.load(name)
    args = [f"ARG{uuid.uuid4().hex}" for _ in range(6)]
    try:
        published = _calls(module, args, listener)
    finally:
        listener.close()
    stored = every_key_and_value(private_redis.url)
    with redis.Redis.from_url(private_redis.url) as client:
        client.save()
    sources = {
        "keys and values": stored,
        "pub/sub messages": published,
        "RDB dump": files_under(private_redis.directory, lambda n: n.endswith(".rdb")),
        "AOF files": files_under(private_redis.directory, lambda n: ".aof" in n),
        "worker log": files_under(log_dir, lambda n: n == f"{worker}.log"),
    }
    assert all(sources.values()), {k: len(v) for k, v in sources.items()}
    returned = [args[0], args[2], args[3]]  # reveal()ed; the others fail()ed
    results = [a.replace("ARG", "ERR" if a not in returned else "RES") for a in args]
    canaries = args + results
    seen = {source: found(canaries, blobs) for source, blobs in sources.items()}
    if encrypt:
        assert seen == {source: set() for source in sources}
    else:
        # the search can fail: in clear, results and errors are readable where they
        # are kept, and the AOF also holds every call message that was ever queued
        assert set(results) <= seen["keys and values"]
        assert set(results) <= seen["pub/sub messages"]
        assert set(results) <= seen["RDB dump"]
        assert set(canaries) == seen["AOF files"]


# --- web process and worker disagree ---------------------------------------------------------
FACTORY = """
import os
from flask import Flask
from flask_execute import Celery

celery = Celery()


def create_app(encrypt=None):
    app = Flask(__name__)
    app.config.update(
        SECRET_KEY="the mismatch test's secret",
        CELERY_BROKER_URL={broker!r},
        CELERY_START_LOCAL_WORKERS=False,
        CELERY_ENCRYPT=os.environ["CRYPT_WORKER"] == "1" if encrypt is None else encrypt,
    )
    celery.init_app(app)
    return app


def reveal(secret):
    return {{"echo": secret}}
"""
SAME = "Set the same CELERY_ENCRYPT on the web and worker processes."


@pytest.mark.parametrize(
    ("web", "worker", "message"),
    [
        (
            True,
            False,
            "This error envelope is not encrypted, but CELERY_ENCRYPT is on in this process:"
            f" the process that sealed it runs with CELERY_ENCRYPT off. {SAME}",
        ),
        (
            False,
            True,
            "This error envelope is encrypted (CELERY_ENCRYPT is on where it was sealed), but"
            f" CELERY_ENCRYPT is off in this process. {SAME}",
        ),
    ],
    ids=["web-encrypts", "worker-encrypts"],
)
def test_a_mismatch_fails_the_call_naming_the_setting(
    web: bool,
    worker: bool,
    message: str,
    tmp_modules: TmpModules,
    tmp_path: object,
    broker_url: str,
) -> None:
    tmp_modules.write("cryptmix", textwrap.dedent(FACTORY).format(broker=broker_url))
    process = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "flask_execute.celery", "worker",
         "-n", "cryptmix@%h", "--pool=solo", "--without-mingle", "--without-gossip",
         "--loglevel=INFO"],
        cwd=str(tmp_path),
        env={**os.environ, "FLASK_APP": "cryptmix:create_app", "CRYPT_WORKER": str(int(worker)),
             "PYTHONPATH": os.pathsep.join([SRC, str(tmp_path), ROOT])},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    try:
        cryptmix = tmp_modules.load("cryptmix")
        mismatched, matching = cryptmix.create_app(web), cryptmix.create_app(worker)
        with mismatched.app_context():
            # (the first call also waits for the worker to be up)
            future = cryptmix.celery.submit(cryptmix.reveal, "x")
            error = future.exception(timeout=60)
        assert isinstance(error, SignatureError)
        refused = (
            f"The failure stored for task {future.id} was refused (encryption_mismatch):"
            f" {message} Nothing in it was unpickled."
        )
        assert (error.reason, str(error)) == ("encryption_mismatch", refused)
        with matching.app_context():  # the worker still serves a call it can read
            assert cryptmix.celery.submit(cryptmix.reveal, "y").result(timeout=10) == {"echo": "y"}
    finally:
        process.terminate()
        process.wait(20)
