"""A 3-stage chain of trivial calls, end to end, three ways in the same run:

* ``graph``: flask-execute, futures as arguments —
  ``submit(add, submit(add, submit(add, i, 1), 1), 1).result()``: the workers start
  each stage as the one before finishes (docs/dependencies.md);
* ``blocking``: flask-execute, the web process waiting between the stages —
  ``submit(add, submit(add, submit(add, i, 1).result(), 1).result(), 1).result()``;
* ``plain``: Celery's own ``chain(add.s(i, 1), add.s(1), add.s(1)).apply_async().get()``
  on the plain worker (same shape: prefork, concurrency 2).

One chain at a time, so each sample is one chain's latency from the first ``submit``
to the last result in the web process; the three ways alternate in mirrored orders,
block by block. The web process's CPU per chain is measured too (all its threads:
flask-execute's result watcher counts).
"""

from __future__ import annotations

import time
import typing as t
from collections.abc import Callable

from bench.measure import order
from bench.report import pct
from bench.report import Row

__all__ = ["WAYS", "details", "measure", "rows"]

WAYS = ("graph", "blocking", "plain")
_NAMES = {
    "graph": "flask-execute, futures as arguments",
    "blocking": "flask-execute, `.result()` between stages",
    "plain": "plain Celery `chain`",
}


def measure(fe_celery: t.Any, plain_add: t.Any, blocks: int, block: int) -> dict[str, t.Any]:
    """``blocks`` rounds of the three ways, ``block`` chains each; returns the
    latencies (ms) and the web process's CPU per chain (ms) of each way."""
    from celery import chain

    from bench.tasks import add

    def graph(i: int) -> int:
        first = fe_celery.submit(add, i, 1)
        return t.cast(
            int, fe_celery.submit(add, fe_celery.submit(add, first, 1), 1).result(timeout=30)
        )

    def blocking(i: int) -> int:
        first = fe_celery.submit(add, i, 1).result(timeout=30)
        second = fe_celery.submit(add, first, 1).result(timeout=30)
        return t.cast(int, fe_celery.submit(add, second, 1).result(timeout=30))

    def plain(i: int) -> int:
        flow = chain(plain_add.s(i, 1), plain_add.s(1), plain_add.s(1))
        return t.cast(int, flow.apply_async().get(timeout=30))

    calls: dict[str, Callable[[int], int]] = {"graph": graph, "blocking": blocking, "plain": plain}
    for call in calls.values():  # warm-up: connections, subscriptions, scripts
        for i in range(10):
            assert call(i) == i + 3
    latencies: dict[str, list[float]] = {way: [] for way in WAYS}
    cpu: dict[str, float] = dict.fromkeys(WAYS, 0.0)
    i = 0
    for index in range(blocks):
        for way in order(list(WAYS), index):
            call = calls[way]
            cpu_start = time.process_time()
            for _ in range(block):
                started = time.perf_counter()
                value = call(i)
                latencies[way].append((time.perf_counter() - started) * 1000)
                assert value == i + 3, (way, i, value)
                i += 1
            cpu[way] += time.process_time() - cpu_start
    n = blocks * block
    return {
        "n": n,
        "latency_ms": latencies,
        "cpu_ms": {way: cpu[way] * 1000 / n for way in WAYS},
    }


def rows(result: dict[str, t.Any] | None) -> list[Row]:
    """Summary rows: futures as arguments vs Celery's ``chain``, and vs waiting in
    the web process between the stages."""
    if not result:
        return []
    lat = result["latency_ms"]
    p50 = {way: pct(lat[way], 50) for way in WAYS}
    p99 = {way: pct(lat[way], 99) for way in WAYS}
    n = result["n"]
    return [
        Row(
            f"3-stage chain of `add`, end to end p50 ({n} chains each): futures as"
            " arguments vs Celery's `chain`",
            f"{p50['graph']:.2f} ms (p99 {p99['graph']:.2f})",
            f"{p50['plain']:.2f} ms (p99 {p99['plain']:.2f})",
            f"{p50['graph'] / p50['plain']:.2f}x time",
            "—",
            None,
        ),
        Row(
            "3-stage chain p50: futures as arguments vs `.result()` between stages in"
            " the web process (flask-execute both)",
            f"{p50['graph']:.2f} ms",
            f"{p50['blocking']:.2f} ms (flask-execute, blocking)",
            f"{p50['graph'] / p50['blocking']:.2f}x time",
            "—",
            None,
        ),
    ]


def details(result: dict[str, t.Any] | None) -> list[str]:
    """The RESULTS.md section."""
    if not result:
        return []
    out = [
        "### 3-stage chain (ms)",
        "",
        "One chain at a time, from the first submit to the last result in the web"
        " process; the three ways alternate in mirrored orders, block by block. Web CPU:"
        " this process, all threads, per chain.",
        "",
        "| way | n | min | p50 | p90 | p99 | max | web CPU / chain |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for way in WAYS:
        values = result["latency_ms"][way]
        out.append(
            f"| {_NAMES[way]} | {len(values)} | {min(values):.2f} | {pct(values, 50):.2f} |"
            f" {pct(values, 90):.2f} | {pct(values, 99):.2f} | {max(values):.2f} |"
            f" {result['cpu_ms'][way]:.2f} |"
        )
    out.append("")
    return out
