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


Way = Callable[[], dict[str, t.Any]]


def map_many(
    fe_celery: t.Any,
    plain_add: t.Any,
    redis_client: t.Any,
    n: int,
    chunksize: int,
    rounds: int,
    crypt_celery: t.Any = None,
    dask: t.Any = None,
) -> dict[str, list[dict[str, t.Any]]]:
    """``n`` trivial calls, submit then collect everything, in these ways:

    * ``fe``: ``celery.map(add, *calls).result()`` — no ``chunksize``: ``map`` picks one;
    * ``fe_stream``: the same ``map``, collected through ``pool.as_completed()``
      (``first_s``: the map call to the first result out of it);
    * ``fe_chunk``: ``map`` with ``chunksize``;
    * ``plain_loop``: ``[add.delay(i, i) for i in ...]`` then ``get()`` each;
    * ``plain_group``: ``group(add.s(i, i) for i in ...).apply_async().get()``;
    * ``plain_chunks``: Celery's own ``add.chunks(calls, chunksize).apply_async().get()``
      (one task per ``chunksize`` calls, results per chunk);
    * with ``dask`` (a :class:`bench.dask_peer.DaskPeer`): ``dask``, ``client.map`` +
      ``client.gather``, and ``dask_stream``, ``client.map`` + ``as_completed``;
    * with ``crypt_celery`` (``CELERY_ENCRYPT``): ``crypt`` and ``crypt_chunk``, the
      first and third ways on it.

    For the plain ways ``first_s`` is the map call to the first result a caller of that
    recipe holds (the first ``get()`` of the loop, of the group's first member, of the
    first chunk), after everything was sent.

    Rounds run the ways in mirrored orders. Returns each way's runs: seconds, and the
    Redis commands the whole system (client and worker) sent during the run, from
    ``INFO commandstats`` (the ways run one at a time; idle polling adds a few; Dask
    sends none).
    """
    from celery import group

    from bench.tasks import add

    expected = [2 * i for i in range(n)]
    calls = [(i, i) for i in range(n)]

    def timed(
        submit: Callable[[], t.Any], collect: Callable[[t.Any], list[int]]
    ) -> dict[str, t.Any]:
        start = time.perf_counter()
        handle = submit()
        submitted = time.perf_counter()
        out: dict[str, t.Any] = {"start": start, "submitted": submitted, "first": None}
        out["results"] = collect((handle, out))
        return out

    def pool_result(arg: t.Any) -> list[int]:
        return t.cast(list[int], arg[0].result(timeout=600))

    def pool_stream(arg: t.Any) -> list[int]:
        pool, out = arg
        for future in pool.as_completed(timeout=600):
            if out["first"] is None:
                out["first"] = time.perf_counter()
            future.result()
        return t.cast(list[int], [f.result() for f in pool])

    def first_then(rest: Callable[[t.Any], list[int]], first: Callable[[t.Any], object]):
        def collect(arg: t.Any) -> list[int]:
            handle, out = arg
            first(handle)
            out["first"] = time.perf_counter()
            return rest(handle)

        return collect

    def fe() -> dict[str, t.Any]:
        return timed(lambda: fe_celery.map(add, *calls), pool_result)

    def fe_stream() -> dict[str, t.Any]:
        return timed(lambda: fe_celery.map(add, *calls), pool_stream)

    def fe_chunk() -> dict[str, t.Any]:
        return timed(lambda: fe_celery.map(add, *calls, chunksize=chunksize), pool_result)

    def plain_loop() -> dict[str, t.Any]:
        return timed(
            lambda: [plain_add.delay(i, i) for i in range(n)],
            first_then(
                lambda rs: [r.get(timeout=600) for r in rs], lambda rs: rs[0].get(timeout=600)
            ),
        )

    def plain_group() -> dict[str, t.Any]:
        return timed(
            lambda: group(plain_add.s(i, i) for i in range(n)).apply_async(),
            first_then(lambda r: r.get(timeout=600), lambda r: r.results[0].get(timeout=600)),
        )

    def plain_chunks() -> dict[str, t.Any]:
        def collect(r: t.Any) -> list[int]:
            return [value for part in r.get(timeout=600) for value in part]

        return timed(
            lambda: plain_add.chunks(calls, chunksize).apply_async(),
            first_then(collect, lambda r: r.results[0].get(timeout=600)),
        )

    def crypt() -> dict[str, t.Any]:
        return timed(lambda: crypt_celery.map(add, *calls), pool_result)

    def crypt_chunk() -> dict[str, t.Any]:
        return timed(lambda: crypt_celery.map(add, *calls, chunksize=chunksize), pool_result)

    def dask_way(kind: str) -> Way:
        def way() -> dict[str, t.Any]:
            answer = dask.run(kind, n)  # timed inside the Dask process
            return {
                "start": 0.0,
                "submitted": answer["submit_s"],
                "first": answer["first_s"],
                "done": answer["total_s"],
                "results": expected,  # checked by the Dask process itself
            }

        return way

    ways: dict[str, Way] = {
        "fe": fe,
        "fe_stream": fe_stream,
        "fe_chunk": fe_chunk,
        "plain_loop": plain_loop,
        "plain_group": plain_group,
        "plain_chunks": plain_chunks,
    }
    if dask is not None:
        ways.update(dask=dask_way("map"), dask_stream=dask_way("stream"))
    if crypt_celery is not None:
        ways.update(crypt=crypt, crypt_chunk=crypt_chunk)
    runs: dict[str, list[dict[str, t.Any]]] = {name: [] for name in ways}
    for r in range(rounds):
        # mirrored rounds (ABC..., ...CBA): a linear drift weighs the same on every way
        sequence = list(ways) if r % 2 == 0 else list(reversed(ways))
        for name in sequence:
            redis_client.config_resetstat()
            out = ways[name]()
            done = out.get("done") or time.perf_counter() - out["start"]
            commands = _command_counts(redis_client)
            if out["results"] != expected:
                raise AssertionError(f"{name}: wrong results")
            first = out["first"]
            runs[name].append(
                {
                    "submit_s": out["submitted"] - out["start"],
                    "collect_s": done - (out["submitted"] - out["start"]),
                    "total_s": done,
                    "first_s": None if first is None else first - out["start"],
                    "commands": commands,
                }
            )
            progress(f"map {n:,} {name}: {done:.2f} s")
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
