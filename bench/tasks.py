"""The trivial function both sides run. flask-execute sends it by reference (it is
importable); plain Celery runs the same body as a registered task (:mod:`bench.plain_app`)."""

from __future__ import annotations


def add(x: int, y: int) -> int:
    return x + y
