"""Measurements that need a fresh process, run as ``python -m bench.child KIND ...``.

Each prints one JSON object as its last line of stdout. ``coldstart-fe`` and
``coldstart-plain`` time the first result on a fresh app (then the first status
call: ``celery.status()`` / ``control.ping(timeout=1)``); ``growth`` times a ``map`` and
reads this process's memory (``/proc/self/status``); ``parked`` measures what pending
futures hold, by routing the calls to a queue no worker consumes.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import signal
import subprocess
import time
import tracemalloc
import typing as t

from bench.procs import proc_status_kb
from bench.procs import start_plain_worker


def coldstart_fe() -> dict[str, t.Any]:
    """First ``submit`` → first result on a fresh app; local workers start on demand."""
    from bench.cold_app import app
    from bench.cold_app import celery
    from bench.tasks import add

    pids: list[int] = []
    try:
        start = time.perf_counter()
        value = celery.submit(add, 1, 1).result(timeout=60)
        seconds = time.perf_counter() - start
        pids = [child.pid for child in app.extensions["celery"].services.children]
        # the first status() of a process also pays for Celery's lazy control set-up
        start = time.perf_counter()
        answer = celery.status()
        status_ms = (time.perf_counter() - start) * 1000
    finally:
        celery.stop(timeout=10)
    assert value == 2, value
    assert list(answer.values()) == ["OK"], answer
    return {"seconds": seconds, "pids": pids, "status_ms": status_ms}


def coldstart_plain(log_path: str) -> dict[str, t.Any]:
    """Start a bare ``celery worker`` and publish at once; time to the first result.

    The worker stays in this process's group, so the orchestrator's final group kill
    also reaches it if this process dies first.
    """
    from bench.plain_app import add
    from bench.plain_app import app
    from bench.plain_app import QUEUE

    start = time.perf_counter()
    worker = start_plain_worker(
        dict(os.environ), log_path, queue=QUEUE, name="plaincold", new_session=False
    )
    try:
        value = add.delay(1, 1).get(timeout=60)
        seconds = time.perf_counter() - start
        start = time.perf_counter()
        answer = app.control.ping(timeout=1)
        ping_ms = (time.perf_counter() - start) * 1000
    finally:
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(15)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait(10)
    assert value == 2, value
    assert answer, "no worker answered the ping"
    return {"seconds": seconds, "status_ms": ping_ms}


def growth(size: int, chunksize: int | None, repeat: int) -> dict[str, t.Any]:
    """``map`` of ``size`` calls, submit + collect, in a process of its own (peak RSS).

    Memory is read around the first run; the time is the median of ``repeat`` runs (a
    small ``map`` takes milliseconds, and one sample of that is mostly noise).
    """
    from bench.fe_app import celery
    from bench.tasks import add

    celery.submit(add, 0, 0).result(timeout=30)  # connections and result watcher up
    calls = [(i, i) for i in range(size)]
    expected = [2 * i for i in range(size)]
    gc.collect()
    base = proc_status_kb("VmRSS")
    peak = after_submit = 0
    runs: list[tuple[float, float]] = []
    for _ in range(repeat):
        start = time.perf_counter()
        pool = celery.map(add, *calls, chunksize=chunksize)
        submitted = time.perf_counter()
        after_submit = after_submit or proc_status_kb("VmRSS")
        results = pool.result(timeout=600)
        collected = time.perf_counter()
        peak = peak or proc_status_kb("VmHWM")
        assert results == expected, "wrong results"
        runs.append((submitted - start, collected - submitted))
        del pool, results
    submit_s, collect_s = sorted(runs, key=sum)[len(runs) // 2]  # the median run
    return {
        "size": size,
        "chunksize": chunksize,
        "repeat": repeat,
        "submit_s": submit_s,
        "collect_s": collect_s,
        "total_s": submit_s + collect_s,
        "base_rss_kb": base,
        "after_submit_rss_kb": after_submit,
        "peak_rss_kb": peak,
    }


def parked(side: str, size: int, chunksize: int | None, queue: str) -> dict[str, t.Any]:
    """What ``size`` pending calls hold in the caller: they go to ``queue``, which no
    worker consumes, so every one stays pending while we measure.

    ``traced`` is the Python memory still allocated after the submit (tracemalloc,
    started just before it: the live objects the pending calls keep); ``rss`` is the
    growth of the process's resident memory over the same span, less tracemalloc's own
    memory.
    """
    if side == "fe":
        from bench.fe_app import celery
        from bench.tasks import add

        celery.submit(add, 0, 0).result(timeout=30)
        calls = [(i, i) for i in range(size)]

        def submit() -> object:
            return celery.map(add, *calls, chunksize=chunksize, queue=queue)

    else:
        from bench.plain_app import add as plain_add

        plain_add.delay(0, 0).get(timeout=30)

        def submit() -> object:
            return [plain_add.apply_async((i, i), queue=queue) for i in range(size)]

    gc.collect()
    base = proc_status_kb("VmRSS")
    tracemalloc.start()
    held = submit()
    gc.collect()
    traced, _ = tracemalloc.get_traced_memory()
    # tracemalloc's own bookkeeping is resident too: leave it out of the RSS growth
    bookkeeping = tracemalloc.get_tracemalloc_memory()
    rss = proc_status_kb("VmRSS")
    tracemalloc.stop()
    # a flask-execute future knows its state locally; a plain AsyncResult would ask Redis
    futures = t.cast(t.Iterable[t.Any], held)
    pending = sum(1 for f in futures if f.state == "PENDING") if side == "fe" else size
    return {
        "side": side,
        "size": size,
        "chunksize": chunksize,
        "traced_bytes": traced,
        "rss_bytes": (rss - base) * 1024 - bookkeeping,
        "pending": pending,
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.child")
    sub = parser.add_subparsers(dest="kind", required=True)
    sub.add_parser("coldstart-fe")
    plain = sub.add_parser("coldstart-plain")
    plain.add_argument("--log", required=True)
    grow = sub.add_parser("growth")
    grow.add_argument("--size", type=int, required=True)
    grow.add_argument("--chunksize", type=int)
    grow.add_argument("--repeat", type=int, default=1)
    park = sub.add_parser("parked")
    park.add_argument("--side", choices=["fe", "plain"], required=True)
    park.add_argument("--size", type=int, required=True)
    park.add_argument("--chunksize", type=int)
    park.add_argument("--queue", required=True)
    args = parser.parse_args()
    if args.kind == "coldstart-fe":
        out = coldstart_fe()
    elif args.kind == "coldstart-plain":
        out = coldstart_plain(args.log)
    elif args.kind == "growth":
        out = growth(args.size, args.chunksize, args.repeat)
    else:
        out = parked(args.side, args.size, args.chunksize, args.queue)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
