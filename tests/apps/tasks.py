"""Importable functions the tests submit (they travel by reference)."""

from __future__ import annotations

import os
import threading
import time

from flask import current_app
from flask import g

from flask_execute import current_task


def add(x, y):
    return x + y


def fail(message="boom"):
    raise ValueError(message)


class CustomError(Exception):
    def __init__(self, code, detail):
        super().__init__(code, detail)
        self.code = code
        self.detail = detail


def fail_custom():
    raise CustomError(42, "custom")


def unpicklable_result():
    return threading.Lock()


def echo_options(queue, countdown=None):
    return queue, countdown


def config_value(key):
    return current_app.config.get(key)


def app_name():
    return current_app.import_name


def pid():
    return os.getpid()


def touch(path):
    with open(path, "a") as f:
        f.write(f"{os.getpid()}\n")
    return path


def wait_for_file(path, timeout=20.0):
    """Block until ``path`` exists (bounded); tests use it to hold a task running."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(path)
        time.sleep(0.02)
    return "released"


def mark_and_wait(mark, release, timeout=20.0):
    touch(mark)
    return wait_for_file(release, timeout)


def report_progress(n, delay=0.05):
    for i in range(n):
        current_task.update_state(state="PROGRESS", meta={"done": i + 1, "total": n})
        time.sleep(delay)
    return n


def task_facts():
    """What a task sees of its context."""
    before = getattr(g, "seen", None)
    g.seen = current_task.request.id
    return {
        "task_id": current_task.request.id,
        "bool": bool(current_task),
        "g_before": before,
        "app": current_app.import_name,
    }


def sleep(seconds):
    time.sleep(seconds)
    return seconds


def _count(path):
    with open(path, "a") as f:
        f.write(f"{os.getpid()}\n")
    with open(path) as f:
        return len(f.read().splitlines())


def die_once(path):
    """SIGKILL the worker process running it on the first delivery only."""
    if _count(path) == 1:
        os.kill(os.getpid(), 9)
    return "survived"


def die_always(path):
    _count(path)
    os.kill(os.getpid(), 9)


def count_and_sleep(path, seconds):
    _count(path)
    time.sleep(seconds)
    return seconds


def incr(redis_url, key):
    """A side effect counted in Redis (exactly-once checks)."""
    import redis

    client = getattr(incr, "_clients", {}).get(redis_url)
    if client is None:
        client = redis.Redis.from_url(redis_url)
        incr.__dict__.setdefault("_clients", {})[redis_url] = client
    return client.incr(key)


def worker_name():
    """The node that ran it (routing checks)."""
    return current_task.request.hostname


def retry_until(path, runs):
    """Retries itself (``current_task.retry``) until it has run ``runs`` times."""
    with open(path, "a") as f:
        f.write("run\n")
    with open(path) as f:
        count = f.read().count("\n")
    if count < runs:
        current_task.retry(countdown=0.05, max_retries=runs)
    return count


class Halt(BaseException):
    """An application's own ``BaseException`` (not an ``Exception``)."""


def raise_it(exc):
    raise exc


def incr_and_sleep(redis_url, key, seconds):
    """Count a run of this call (exactly-once checks under faults), then take a while."""
    incr(redis_url, key)
    time.sleep(seconds)
    return key


def fail_after_touch(path, message):
    """A side effect, then ``ValueError(message)``."""
    touch(path)
    raise ValueError(message)


def report_times(n, delay):
    """Report ``n`` steps ``delay`` seconds apart, each with the time it was reported."""
    for i in range(n):
        time.sleep(delay)
        current_task.update_state(state="PROGRESS", meta={"done": i + 1, "at": time.time()})
    return n
