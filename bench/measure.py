"""The in-process measurements, each alternating flask-execute (``fe``) and plain Celery,
and, for the round trip and ``map``, flask-execute with ``CELERY_ENCRYPT`` (``crypt``).

Alternation: blocks run in ABBA order (fe, plain, plain, fe, ...), so that a slow
drift of the machine (other load, CPU frequency, a growing Redis) weighs on both sides
alike, and neither side always runs first after the other warmed the caches. Three
sides cycle through the six orders, each followed by its mirror (ABC, CBA, BCA, ...).
"""

from __future__ import annotations

import statistics
import sys
import time
import typing as t
import uuid
from collections.abc import Callable

__all__ = ["codec_overhead", "map_many", "roundtrip", "status"]


def progress(message: str) -> None:
    print(f"  {time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


def abba(index: int) -> tuple[str, str]:
    """Order of the two sides in block ``index``: fe first in blocks 0, 3, 4, 7, ..."""
    return ("fe", "plain") if index % 4 in (0, 3) else ("plain", "fe")


_THREE = ((0, 1, 2), (2, 1, 0), (1, 2, 0), (0, 2, 1), (2, 0, 1), (1, 0, 2))


def order(sides: list[str], index: int) -> list[str]:
    """Order of the sides in round ``index``: ABBA for two, the six mirrored orders
    for three (each side in each position equally often every six rounds)."""
    if len(sides) == 2:
        return list(sides) if index % 4 in (0, 3) else list(reversed(sides))
    return [sides[k] for k in _THREE[index % len(_THREE)]]


def roundtrip(
    fe_celery: t.Any,
    plain_add: t.Any,
    blocks: int,
    block: int,
    crypt_celery: t.Any = None,
) -> dict[str, t.Any]:
    """``submit(add, i, i).result()`` versus ``add.delay(i, i).get()``, one call at a time,
    and the same ``submit`` on ``crypt_celery`` (``CELERY_ENCRYPT``) when given.

    Returns each side's latencies (ms) and client CPU per call (ms: this process, all
    threads, so flask-execute's result watcher counts too).
    """
    from bench.tasks import add

    def fe_call(i: int) -> int:
        return t.cast(int, fe_celery.submit(add, i, i).result(timeout=30))

    def plain_call(i: int) -> int:
        return t.cast(int, plain_add.delay(i, i).get(timeout=30))

    def crypt_call(i: int) -> int:
        return t.cast(int, crypt_celery.submit(add, i, i).result(timeout=30))

    calls: dict[str, Callable[[int], int]] = {"fe": fe_call, "plain": plain_call}
    if crypt_celery is not None:
        calls["crypt"] = crypt_call
    for call in calls.values():  # warm-up: connections, subscriptions, imports
        for i in range(20):
            call(i)
    sides = list(calls)
    latencies: dict[str, list[float]] = {side: [] for side in sides}
    cpu: dict[str, float] = dict.fromkeys(sides, 0.0)
    i = 0
    for index in range(len(sides) * blocks):
        side = order(sides, index // len(sides))[index % len(sides)]
        call = calls[side]
        cpu_start = time.process_time()
        for _ in range(block):
            i += 1
            start = time.perf_counter()
            value = call(i)
            latencies[side].append((time.perf_counter() - start) * 1000)
            if value != 2 * i:
                raise AssertionError(f"{side}: add({i}, {i}) returned {value!r}")
        cpu[side] += time.process_time() - cpu_start
    out: dict[str, t.Any] = {}
    for side in sides:
        out[f"{side}_ms"] = latencies[side]
        out[f"{side}_cpu_ms"] = cpu[side] * 1000 / len(latencies[side])
    return out


def map_many(
    fe_celery: t.Any,
    plain_add: t.Any,
    redis_client: t.Any,
    n: int,
    chunksize: int,
    rounds: int,
    crypt_celery: t.Any = None,
) -> dict[str, list[dict[str, t.Any]]]:
    """``n`` trivial calls, submit then collect everything, four ways:

    * ``fe``: ``celery.map(add, *calls).result()``;
    * ``fe_chunk``: the same with ``chunksize``;
    * ``plain_loop``: ``[add.delay(i, i) for i in ...]`` then ``get()`` each;
    * ``plain_group``: ``group(add.s(i, i) for i in ...).apply_async().get()``;

    and, with ``crypt_celery`` (``CELERY_ENCRYPT``), ``crypt`` and ``crypt_chunk``: the
    first two ways on it.

    Rounds run the four in mirrored orders. Returns each way's runs: seconds, and
    the Redis commands the whole system (client and worker) sent during the run, from
    ``INFO commandstats`` (the ways run one at a time; idle polling adds a few).
    """
    from celery import group

    from bench.tasks import add

    expected = [2 * i for i in range(n)]
    calls = [(i, i) for i in range(n)]

    def fe() -> tuple[float, float, list[int]]:
        start = time.perf_counter()
        pool = fe_celery.map(add, *calls)
        submitted = time.perf_counter()
        return start, submitted, pool.result(timeout=600)

    def fe_chunk() -> tuple[float, float, list[int]]:
        start = time.perf_counter()
        pool = fe_celery.map(add, *calls, chunksize=chunksize)
        submitted = time.perf_counter()
        return start, submitted, pool.result(timeout=600)

    def plain_loop() -> tuple[float, float, list[int]]:
        start = time.perf_counter()
        results = [plain_add.delay(i, i) for i in range(n)]
        submitted = time.perf_counter()
        return start, submitted, [r.get(timeout=600) for r in results]

    def plain_group() -> tuple[float, float, list[int]]:
        start = time.perf_counter()
        result = group(plain_add.s(i, i) for i in range(n)).apply_async()
        submitted = time.perf_counter()
        return start, submitted, result.get(timeout=600)

    def crypt() -> tuple[float, float, list[int]]:
        start = time.perf_counter()
        pool = crypt_celery.map(add, *calls)
        submitted = time.perf_counter()
        return start, submitted, pool.result(timeout=600)

    def crypt_chunk() -> tuple[float, float, list[int]]:
        start = time.perf_counter()
        pool = crypt_celery.map(add, *calls, chunksize=chunksize)
        submitted = time.perf_counter()
        return start, submitted, pool.result(timeout=600)

    ways: dict[str, Callable[[], tuple[float, float, list[int]]]] = {
        "fe": fe,
        "fe_chunk": fe_chunk,
        "plain_loop": plain_loop,
        "plain_group": plain_group,
    }
    if crypt_celery is not None:
        ways.update(crypt=crypt, crypt_chunk=crypt_chunk)
    runs: dict[str, list[dict[str, t.Any]]] = {name: [] for name in ways}
    for r in range(rounds):
        # mirrored rounds (ABCD, DCBA, ...): a linear drift weighs the same on every way
        sequence = list(ways) if r % 2 == 0 else list(reversed(ways))
        for name in sequence:
            redis_client.config_resetstat()
            start, submitted, results = ways[name]()
            done = time.perf_counter()
            commands = _command_counts(redis_client)
            if results != expected:
                raise AssertionError(f"{name}: wrong results")
            runs[name].append(
                {
                    "submit_s": submitted - start,
                    "collect_s": done - submitted,
                    "total_s": done - start,
                    "commands": commands,
                }
            )
            progress(f"map {n:,} {name}: {done - start:.2f} s")
    return runs


def _command_counts(redis_client: t.Any) -> dict[str, int]:
    stats = redis_client.info("commandstats")
    return {
        name.removeprefix("cmdstat_"): int(value["calls"])
        for name, value in stats.items()
        if name != "cmdstat_info"
    }


def status(fe_celery: t.Any, plain_app: t.Any, expected: str, reps: int) -> dict[str, list[float]]:
    """``celery.status()`` versus ``app.control.ping(timeout=1)`` (and, for reference,
    ``ping(timeout=1, limit=1)``, which returns after the first reply), in ms, after one
    unmeasured call per side."""
    samples: dict[str, list[float]] = {"fe": [], "plain": [], "plain_limit": []}

    def fe() -> None:
        start = time.perf_counter()
        answer = fe_celery.status()
        samples["fe"].append((time.perf_counter() - start) * 1000)
        if answer.get(expected) != "OK":
            raise AssertionError(f"status() = {answer!r}; expected {expected} OK")

    def plain() -> None:
        for key, limit in (("plain", None), ("plain_limit", 1)):
            start = time.perf_counter()
            answer = plain_app.control.ping(timeout=1, limit=limit)
            samples[key].append((time.perf_counter() - start) * 1000)
            if not answer:
                raise AssertionError("plain ping: no worker answered")

    sides = {"fe": fe, "plain": plain}
    # the first call pays for Celery's lazy control set-up (measured in fresh
    # processes by the cold start): warm both sides, then measure
    fe()
    plain()
    for values in samples.values():
        values.clear()
    for index in range(reps):
        for side in abba(index):
            sides[side]()
    return samples


def codec_overhead(n: int, repeats: int) -> dict[str, float]:
    """Per-call cost (µs) of flask-execute's signing and serialization, isolated, with
    plain Celery's JSON message body for comparison. Medians of ``repeats`` timings of
    ``n`` calls each."""
    import os
    import pickle

    from kombu.serialization import dumps as kombu_dumps
    from kombu.serialization import loads as kombu_loads

    from bench.tasks import add
    from flask_execute.envelopes import Codec
    from flask_execute.serialization import dump_call
    from flask_execute.serialization import dumps
    from flask_execute.serialization import function_label

    codec = Codec(os.urandom(32))
    crypt = Codec(os.urandom(32), encrypt=True)
    tid = str(uuid.uuid4())
    label = function_label(add)
    payload, _ = dump_call(add, (1, 1), {})
    envelope = codec.seal("call", tid, payload, extra={"fn": label})
    result_envelope = codec.seal("result", tid, dumps(2)[0])
    crypt_result_envelope = crypt.seal("result", tid, dumps(2)[0])
    embed = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}

    def fe_call(i: int) -> None:  # what one submit adds: pickle, seal; the worker opens
        data, by_value = dump_call(add, (i, i), {})
        sealed = codec.seal("call", tid, data, by_value=by_value, extra={"fn": label})
        codec.open(sealed, "call", tid)

    def dump_only(i: int) -> None:
        dump_call(add, (i, i), {})

    def seal_only(i: int) -> None:
        codec.seal("call", tid, payload, extra={"fn": label})

    def open_only(i: int) -> None:
        codec.open(envelope, "call", tid)

    def fe_result(i: int) -> None:  # the way back: the worker seals, the caller opens
        codec.seal("result", tid, dumps(i)[0])
        pickle.loads(codec.open(result_envelope, "result", tid)[1])

    def crypt_call(i: int) -> None:  # the same with CELERY_ENCRYPT: + AES-GCM both ways
        data, by_value = dump_call(add, (i, i), {})
        sealed = crypt.seal("call", tid, data, by_value=by_value, extra={"fn": label})
        crypt.open(sealed, "call", tid)

    def crypt_result(i: int) -> None:
        crypt.seal("result", tid, dumps(i)[0])
        pickle.loads(crypt.open(crypt_result_envelope, "result", tid)[1])

    def plain_call(i: int) -> None:  # plain Celery's body: JSON (args, kwargs, embed)
        ctype, encoding, body = kombu_dumps(((i, i), {}, embed), serializer="json")
        kombu_loads(body, ctype, encoding)

    def plain_result(i: int) -> None:
        ctype, encoding, body = kombu_dumps({"status": "SUCCESS", "result": i}, "json")
        kombu_loads(body, ctype, encoding)

    funcs: dict[str, Callable[[int], None]] = {
        "fe_call": fe_call,
        "plain_call": plain_call,
        "dump_call": dump_only,
        "seal": seal_only,
        "open": open_only,
        "fe_result": fe_result,
        "plain_result": plain_result,
        "crypt_call": crypt_call,
        "crypt_result": crypt_result,
    }
    timings: dict[str, list[float]] = {name: [] for name in funcs}
    for r in range(repeats):
        names = list(funcs) if r % 2 == 0 else list(reversed(funcs))
        for name in names:
            func = funcs[name]
            start = time.perf_counter()
            for i in range(n):
                func(i)
            timings[name].append((time.perf_counter() - start) * 1e6 / n)
    return {name: statistics.median(values) for name, values in timings.items()}
