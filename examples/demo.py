"""flask-execute in one file: ``python examples/demo.py`` (or ``make demo``).

The first ``submit`` starts a local Celery worker for this app (and, when nothing
answers on localhost:6379, a private Redis); ``celery.stop()`` stops them again.
Worker logs go to ``examples/logs/``.
"""

from __future__ import annotations

import os
import sys
import time

from flask import current_app
from flask import Flask

from flask_execute import Celery
from flask_execute import current_task

HERE = os.path.dirname(os.path.abspath(__file__))
LOG_DIR = os.path.join(HERE, "logs")
os.makedirs(LOG_DIR, exist_ok=True)

app = Flask(__name__)
app.config.update(
    SECRET_KEY="demo-only-secret-change-me",
    CELERY_LOG_DIR=LOG_DIR,
    CELERY_FLOWER=False,
    GREETING="Hello from the app context",
)
celery = Celery(app)


def add(x, y):
    return x + y


def slow_count(n, delay=0.2):
    """Count to ``n``, reporting progress after each step."""
    for i in range(1, n + 1):
        time.sleep(delay)
        current_task.update_state(state="PROGRESS", meta={"done": i, "total": n})
    return f"counted to {n}"


def check_positive(x):
    if x < 0:
        raise ValueError(f"{x} is negative")
    return x


def greeting():
    return f"{current_app.config['GREETING']} ({current_app.name})"


def progress_bar(done, total, width=20):
    filled = width * done // total if total else 0
    return f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total}"


def main() -> int:
    print(f"flask-execute demo (logs in {os.path.relpath(LOG_DIR)})")

    # (a) any function, no registration; the first submit starts the worker.
    started = time.perf_counter()
    future = celery.submit(add, 1, 2)
    result = future.result(timeout=60)
    first = time.perf_counter() - started
    print(f"add(1, 2) = {result}   first result in {first:.2f} s (worker start included)")

    started = time.perf_counter()
    result = celery.submit(add, 2, 3).result(timeout=10)
    elapsed = (time.perf_counter() - started) * 1000
    print(f"add(2, 3) = {result}   next one in {elapsed:.0f} ms")

    # (b) lambdas and closures travel by value.
    factor = 10
    scaled = celery.submit(lambda x: x * factor, 4).result(timeout=10)
    print(f"lambda x: x * factor (factor={factor}) -> {scaled}")

    # (c) map: each positional argument is ONE call's arguments.
    pool = celery.map(add, [1, 2], [3, 4], [5, 6])
    print(f"map(add, [1, 2], [3, 4], [5, 6]) -> {pool.result(timeout=10)}")

    started = time.perf_counter()
    pool = celery.map(add, *[(i, i) for i in range(1000)], chunksize=100)
    total = sum(pool.result(timeout=60))
    elapsed = time.perf_counter() - started
    print(f"1000 calls in chunks of 100: sum = {total} in {elapsed:.2f} s")

    # (d) progress through update_state, followed live by the Future.
    future = celery.submit(slow_count, 5)
    live = sys.stdout.isatty()
    shown = None
    deadline = time.monotonic() + 30
    while not future.done() and time.monotonic() < deadline:
        info = future.info
        if future.state == "PROGRESS" and isinstance(info, dict) and info != shown:
            shown = info
            bar = progress_bar(info["done"], info["total"])
            print(f"\r  {bar}", end="" if live else "\n", flush=True)
        time.sleep(0.02)
    value = future.result(timeout=10)
    print(f"\r  {progress_bar(5, 5)}")
    print(f"slow_count(5) -> {value!r} ({future.state})")

    # (e) a task's exception comes back with its own type.
    try:
        celery.submit(check_positive, -1).result(timeout=10)
    except ValueError as exc:
        print(f"check_positive(-1) raised {type(exc).__name__}: {exc}")

    # (f) task bodies run inside the app context.
    print(f"greeting() -> {celery.submit(greeting).result(timeout=10)!r}")

    celery.stop()
    print("workers stopped; bye")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
