"""Dask distributed as a peer of the ``map`` measurements (issue 14), in a process of its
own.

``python -m bench.child dask`` (:func:`serve`) starts ``LocalCluster(n_workers=2,
threads_per_worker=1, processes=True)`` — two worker processes, the shape of the Celery
workers — and a ``Client`` on it; the scheduler runs inside that process, as a
``LocalCluster`` does, so it shares neither the orchestrator's GIL nor its result
watchers. Driven like the web processes (:func:`bench.procs.start_child`): each line
``map N`` or ``stream N`` on its stdin runs the ``bench.tasks.add`` calls ``(i, i)`` for
``i < N`` and answers one JSON line with the times, measured inside the child:

* ``map``: ``client.map(add, xs, xs, pure=False)`` then ``client.gather(futures)``;
* ``stream``: the same ``client.map``, then ``distributed.as_completed(futures)``,
  the time of its first result and of the last.

``pure=False``: every call runs (Dask would otherwise key the calls by their
arguments and could hand back the results of the previous round). Dask is an
optional extra (``pip install -e '.[bench]'``, which ``make bench`` does): without it
:func:`missing` says so and the benchmark reports the Dask rows as not measured.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
import typing as t

from bench.procs import read_json_line
from bench.procs import start_child
from bench.procs import stop_group

__all__ = ["DaskPeer", "missing", "serve"]

WORKERS = 2
_READY_TIMEOUT = 180.0
_RUN_TIMEOUT = 900.0


def missing() -> str | None:
    """Why Dask cannot be measured here, or None when it can."""
    if importlib.util.find_spec("distributed") is None:
        return (
            "dask[distributed] is not installed: `make bench` installs it (the `bench`"
            " extra: pip install -e '.[bench]')"
        )
    return None


class DaskPeer:
    """The orchestrator's handle on the Dask child; stop it in a ``finally``."""

    def __init__(self, env: dict[str, str], log_path: str) -> None:
        self._log = log_path
        self._proc = start_child(["dask"], env, log_path)
        ready = read_json_line(self._proc, _READY_TIMEOUT, log_path)
        self.versions: dict[str, str] = ready["versions"]

    def run(self, kind: str, n: int) -> dict[str, t.Any]:
        """``kind`` ``map`` or ``stream`` of ``n`` calls; the child's answer."""
        assert self._proc.stdin is not None
        self._proc.stdin.write(f"{kind} {n}\n".encode())
        self._proc.stdin.flush()
        return read_json_line(self._proc, _RUN_TIMEOUT, self._log)

    def stop(self) -> None:
        try:
            if self._proc.stdin is not None:
                self._proc.stdin.close()
            self._proc.wait(30)
        except (OSError, Exception):
            pass
        finally:
            stop_group(self._proc)


def serve() -> dict[str, t.Any]:
    """The child's side: start the cluster, answer ``map N`` / ``stream N`` lines."""
    import logging

    import dask
    import distributed
    from distributed import as_completed
    from distributed import Client
    from distributed import LocalCluster

    from bench.tasks import add

    protocol = os.fdopen(os.dup(1), "w")  # the protocol owns stdout; logs go to stderr
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def answer(out: dict[str, t.Any]) -> None:
        protocol.write(json.dumps(out) + "\n")
        protocol.flush()

    cluster = LocalCluster(
        n_workers=WORKERS,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address=None,
        silence_logs=logging.WARNING,
    )
    client = Client(cluster)
    runs = 0
    try:
        client.wait_for_workers(WORKERS, timeout=120)
        assert client.gather(client.map(add, range(100), range(100), pure=False)) == [
            2 * i for i in range(100)
        ]
        answer({"ready": True, "versions": {"dask": dask.__version__,
                                            "distributed": distributed.__version__}})  # fmt: skip
        for line in sys.stdin:
            kind, _, arg = line.strip().partition(" ")
            n = int(arg)
            xs = list(range(n))
            start = time.perf_counter()
            futures = client.map(add, xs, xs, pure=False)
            submitted = time.perf_counter()
            first = None
            if kind == "map":
                values = client.gather(futures)
            elif kind == "stream":
                by_key = {}
                for future in as_completed(futures):
                    if first is None:
                        first = time.perf_counter()
                    by_key[future.key] = future.result()
                values = [by_key[f.key] for f in futures]
            else:
                raise SystemExit(f"dask child: unknown command {line.strip()!r}")
            done = time.perf_counter()
            if values != [2 * i for i in xs]:
                raise AssertionError(f"dask {kind}: wrong results")
            del futures, values
            runs += 1
            answer(
                {
                    "submit_s": submitted - start,
                    "collect_s": done - submitted,
                    "total_s": done - start,
                    "first_s": None if first is None else first - start,
                }
            )
    finally:
        client.close()
        cluster.close()
    return {"runs": runs}
