"""The fault harness shared by tests/test_faults.py (CI) and ``make soak``: calls
submitted under load while a fault is injected, then every accepted call counted by
its side effect (a Redis counter per call, kept on the session's Redis, which no fault
touches): run once, run twice, lost, or still queued.
"""

from __future__ import annotations

import dataclasses
import os
import random
import socket
import threading
import time
import typing as t
import uuid

import redis
from flask import Flask

from flask_execute import Celery
from tests.apps import tasks

AMQP_URL = os.environ.get("FLASK_EXECUTE_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672//")


def rabbit_missing() -> str | None:
    """Why RabbitMQ cannot be used here, or None when it answers."""
    from kombu import Connection

    try:
        with Connection(AMQP_URL, connect_timeout=2) as conn:
            conn.ensure_connection(max_retries=1)
    except Exception as exc:
        return f"no RabbitMQ at {AMQP_URL}: {exc}"
    return None


class Outage:
    """A TCP proxy in front of a broker that can be cut (connections dropped, new ones
    refused) and restored: a broker outage that disturbs nobody else."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.up = threading.Event()
        self.up.set()
        self.closed = False
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self.up.is_set():
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self) -> None:
        self.up.clear()
        with self._lock:
            conns, self._conns = self._conns, []
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
                s.close()
            except OSError:
                pass

    def restore(self) -> None:
        self.up.set()

    def close(self) -> None:
        self.closed = True
        self.cut()
        self.listener.close()


@dataclasses.dataclass
class Counts:
    accepted: int = 0
    once: int = 0
    twice: int = 0
    lost: int = 0
    queued: int = 0
    refused: int = 0  # submit raised (broker down): never accepted

    def row(self, label: str) -> str:
        """One row of the counts table under :data:`HEADER`."""
        return (
            f"| {label} | {self.accepted} | {self.once} | {self.twice} | {self.lost}"
            f" | {self.queued} | {self.refused} |"
        )


HEADER = (
    "| fault, delivery | accepted | run once | run twice | lost | still queued | refused |\n"
    "|---|---|---|---|---|---|---|"
)


class Load:
    """Calls submitted at a steady pace from a thread; each increments its own
    counter key on ``counter_url`` when it runs."""

    def __init__(self, celery: Celery, app: Flask, counter_url: str, late: bool) -> None:
        self.celery, self.app, self.late = celery, app, late
        self.counter_url = counter_url
        self.prefix = f"fault:{uuid.uuid4().hex[:8]}:"
        self.futures: list[tuple[str, t.Any]] = []
        self.refused = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, rate: float = 40.0, seconds: float = 1e9, total: int = 10**9) -> None:
        def run() -> None:
            with self.app.app_context():
                deadline = time.monotonic() + seconds
                i = 0
                while not self._stop.is_set() and time.monotonic() < deadline and i < total:
                    key = f"{self.prefix}{i}"
                    try:
                        future = self.celery.submit(
                            tasks.incr_and_sleep, self.counter_url, key, 0.05, acks_late=self.late
                        )
                    except Exception:
                        self.refused += 1
                    else:
                        self.futures.append((key, future))
                    i += 1
                    self._stop.wait(1.0 / rate)

        self._thread = threading.Thread(target=run, name="fault-load", daemon=True)
        self._thread.start()

    def join(self, timeout: float) -> None:
        """Wait until the load has sent all it was asked to."""
        if self._thread is not None:
            self._thread.join(timeout)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)

    def settle(self, timeout: float, queued: t.Callable[[], int], still: float = 60.0) -> Counts:
        """Wait until every accepted call ran, or nothing ran for ``still`` seconds (a
        backlog that drains slowly keeps moving), or ``timeout``; count."""
        client = redis.Redis.from_url(self.counter_url)
        keys = [key for key, _ in self.futures]
        deadline = time.monotonic() + timeout
        runs: list[int] = []
        ran, moved = -1, time.monotonic()
        while True:
            runs = [int(v or 0) for v in client.mget(keys)] if keys else []
            now = time.monotonic()
            if len(runs) - runs.count(0) != ran:
                ran, moved = len(runs) - runs.count(0), now
            if all(runs) or now > deadline or now - moved > still:
                break
            time.sleep(0.5)
        time.sleep(1.0)  # a late duplicate would show now
        runs = [int(v or 0) for v in client.mget(keys)] if keys else []
        still = queued()
        missing = runs.count(0)
        return Counts(
            accepted=len(keys),
            once=runs.count(1),
            twice=sum(r > 1 for r in runs),
            lost=max(0, missing - still),
            queued=min(still, missing),
            refused=self.refused,
        )


def redis_queued(url: str) -> int:
    """Messages on the Redis broker ``url`` that no worker finished: on a queue, or
    taken and not acknowledged."""
    client = redis.Redis.from_url(url)
    return sum(client.llen(k) for k in client.keys("celery*") if client.type(k) == b"list") + int(
        client.hlen("unacked")
    )


def make_app(
    broker_url: str, backend_url: str, log_dir: str, name: str, **config: t.Any
) -> tuple[Flask, Celery]:
    app = Flask(f"faults_{name}")
    app.config.update(
        SECRET_KEY="faults-secret-for-tests",
        CELERY_BROKER_URL=broker_url,
        CELERY_RESULT_BACKEND=backend_url,
        CELERY_LOG_DIR=log_dir,
        CELERY_WORKERS={name: {"concurrency": 2}},
        CELERY_FLOWER=False,
    )
    app.config.update(config)
    return app, Celery(app)


def kill_workers_at_random(app: Flask, kills: int, within: float, seed: int) -> list[float]:
    """SIGKILL the local worker's main process ``kills`` times at random instants."""
    import signal

    services = app.extensions["celery"].runtime(app).services
    rng = random.Random(seed)
    at = sorted(rng.uniform(0.5, within) for _ in range(kills))
    start = time.monotonic()
    for moment in at:
        time.sleep(max(0.0, start + moment - time.monotonic()))
        deadline = time.monotonic() + 30
        while not all(c.alive() for c in services.children):  # restarted first
            assert time.monotonic() < deadline, "the supervisor did not restart the worker"
            time.sleep(0.05)
        for child in services.children:
            os.kill(child.pid, signal.SIGKILL)
    return at
