"""Checked by mypy in .ci/run (`make lint`), never run: the public API's types."""

from __future__ import annotations

import concurrent.futures
from typing import Any

from flask import Flask
from typing_extensions import assert_type

from flask_execute import Celery
from flask_execute import CeleryExecutor
from flask_execute import Future
from flask_execute import FuturePool

app = Flask(__name__)
celery = Celery(app)


def add(x: int, y: int) -> int:
    return x + y


def greet(name: str, *, loud: bool = False) -> str:
    return name.upper() if loud else name


future = celery.submit(add, 1, 2)
assert_type(future, Future[int])
assert_type(future.result(timeout=1), int)
assert_type(celery.submit(greet, "a", loud=True), Future[str])
assert_type(celery.apply(greet, ("a",)), Future[str])
assert_type(celery.get("some-id"), Future[Any])
pool = celery.map(add, [1, 2], [3, 4])
assert_type(pool, FuturePool[int])
assert_type(pool.result(timeout=5), list[int])
assert_type(pool[0], Future[int])
executor = celery.executor()
assert_type(executor, CeleryExecutor)
assert_type(executor.submit(add, 1, 2), Future[int])
stdlib: concurrent.futures.Future[int] = future  # a Future IS a stdlib Future
