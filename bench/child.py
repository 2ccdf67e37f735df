"""Measurements that need a fresh process, run as ``python -m bench.child KIND ...``.

Each prints one JSON object as its last line of stdout. ``coldstart-fe`` and
``coldstart-plain`` time the first result on a fresh app (then the first status
call: ``celery.status()`` / ``control.ping(timeout=1)``); ``growth`` times a ``map`` and
reads this process's memory (``/proc/self/status``); ``parked`` measures what pending
futures hold, by routing the calls to a queue no worker consumes.

``webproc`` is different: a long-lived "web process" of the P-web-processes scenario
(:mod:`bench.webprocs`), driven through lines on its stdin, answering one JSON line
each on its stdout.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import signal
import subprocess
import sys
import time
import tracemalloc
import typing as t

from bench.procs import child_pids
from bench.procs import proc_status_kb
from bench.procs import start_plain_worker


def coldstart_fe() -> dict[str, t.Any]:
    """First ``submit`` → first result on a fresh app; local workers start on demand."""
    from bench.cold_app import celery
    from bench.tasks import add

    pids: list[int] = []
    try:
        start = time.perf_counter()
        value = celery.submit(add, 1, 1).result(timeout=60)
        seconds = time.perf_counter() - start
        # the local services are this process's only children (read from /proc: no
        # reliance on how the extension keeps them)
        pids = child_pids()
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
    small ``map`` takes milliseconds, and one sample of that is mostly noise), with its
    CPU time in this process (all threads: the result watcher's work is in).
    """
    from bench.fe_app import celery
    from bench.tasks import add

    celery.submit(add, 0, 0).result(timeout=30)  # connections and result watcher up
    calls = [(i, i) for i in range(size)]
    expected = [2 * i for i in range(size)]
    gc.collect()
    base = proc_status_kb("VmRSS")
    peak = after_submit = 0
    # no chunksize argument at all when none is given: map picks one
    options = {} if chunksize is None else {"chunksize": chunksize}
    runs: list[tuple[float, float, float]] = []
    for _ in range(repeat):
        cpu = time.process_time()
        start = time.perf_counter()
        pool = celery.map(add, *calls, **options)
        submitted = time.perf_counter()
        after_submit = after_submit or proc_status_kb("VmRSS")
        results = pool.result(timeout=600)
        collected = time.perf_counter()
        cpu = time.process_time() - cpu
        peak = peak or proc_status_kb("VmHWM")
        assert results == expected, "wrong results"
        runs.append((submitted - start, collected - submitted, cpu))
        del pool, results
    # the median run (by wall time)
    submit_s, collect_s, cpu_s = sorted(runs, key=lambda r: r[0] + r[1])[len(runs) // 2]
    return {
        "cpu_s": cpu_s,
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
        options = {} if chunksize is None else {"chunksize": chunksize}

        def submit() -> object:
            return celery.map(add, *calls, queue=queue, **options)

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


def webproc(side: str) -> dict[str, t.Any]:
    """A web process that served one request, then takes orders on stdin.

    First it makes one call and waits for its result, as a gunicorn worker that served
    one request would (flask-execute: ``submit(add, 0, 0).result()``, which leaves its
    result watcher live; plain Celery: ``add.delay(0, 0).get()`` on its result backend),
    then prints ``{"ready": ..., "pid": ...}``. Each line ``run N`` on stdin then makes N
    calls: all submitted first (flask-execute ``submit``, plain ``delay()``), then every
    result waited for in order (``Future.result()`` / ``AsyncResult.get()`` each, the
    plain recipe of the other ``delay()`` loops of this benchmark); it answers with the
    wall time and this process's CPU time (all threads, so flask-execute's watcher
    counts) for the N calls. An idle web process gets no ``run``. End of stdin ends it.
    """
    # the protocol owns the real stdout; anything a library prints goes to the log
    protocol = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def answer(out: dict[str, t.Any]) -> None:
        protocol.write(json.dumps(out) + "\n")
        protocol.flush()

    if side == "fe":
        from bench.tasks import add
        from bench.webp_app import celery

        def call_all(n: int) -> list[int]:
            futures = [celery.submit(add, i, i) for i in range(n)]
            return [f.result(timeout=600) for f in futures]

        first = celery.submit(add, 0, 0).result(timeout=60)
    else:
        from bench.plain_app import add as plain_add

        def call_all(n: int) -> list[int]:
            results = [plain_add.delay(i, i) for i in range(n)]
            return [r.get(timeout=600) for r in results]

        first = plain_add.delay(0, 0).get(timeout=60)
    assert first == 0, first
    answer({"ready": side, "pid": os.getpid()})
    runs = 0
    for line in sys.stdin:
        command, _, arg = line.strip().partition(" ")
        if command != "run":
            raise SystemExit(f"webproc: unknown command {line.strip()!r}; expected 'run N'")
        n = int(arg)
        cpu = time.process_time()
        start = time.perf_counter()
        values = call_all(n)
        wall = time.perf_counter() - start
        cpu = time.process_time() - cpu
        if values != [2 * i for i in range(n)]:
            raise AssertionError(f"webproc {side}: wrong results")
        runs += 1
        answer({"calls": n, "wall_s": wall, "cpu_s": cpu})
    return {"side": side, "runs": runs}


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
    sub.add_parser("dask")
    web = sub.add_parser("webproc")
    web.add_argument("--side", choices=["fe", "plain"], required=True)
    args = parser.parse_args()
    if args.kind == "coldstart-fe":
        out = coldstart_fe()
    elif args.kind == "coldstart-plain":
        out = coldstart_plain(args.log)
    elif args.kind == "growth":
        out = growth(args.size, args.chunksize, args.repeat)
    elif args.kind == "webproc":
        out = webproc(args.side)
    elif args.kind == "dask":
        from bench.dask_peer import serve

        out = serve()
    else:
        out = parked(args.side, args.size, args.chunksize, args.queue)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
