"""The orchestrator behind ``python -m bench``: start, measure, stop, report.

What runs, all started and stopped here (``finally``), never the system Redis:

* one private ``redis-server`` on a free loopback port (:class:`EmbeddedRedis`);
  flask-execute uses db 1, plain Celery db 2, the two cold starts dbs 3 and 4;
* the flask-execute worker ``bench@<host>``, auto-started by the extension on the
  first ``submit`` and stopped with ``celery.stop()``;
* the encrypted flask-execute worker ``bench-crypt@<host>`` (``CELERY_ENCRYPT``, db
  5), the same way, stopped once the round trip and ``map`` are measured;
* the worker ``bench-webp@<host>`` of the P-web-processes scenario (db 6), started
  with ``celery.start()`` and stopped with ``celery.stop()``;
* the plain worker ``plain@<host>``: ``celery -A bench.plain_app worker --pool=prefork
  -c 2 --without-mingle --without-gossip -Q bench-plain``;
* Dask's ``LocalCluster`` (2 worker processes) and its client, in a child process of
  their own (:mod:`bench.dask_peer`), for the ``map`` measurements only; skipped, and
  said so, when ``dask[distributed]`` is not installed;
* fresh child processes (:mod:`bench.child`) for the cold starts, the memory
  measurements and the web processes of :mod:`bench.webprocs`, each killed with its
  process group if it overruns.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import typing as t
from importlib import metadata

from bench import issue14
from bench import measure
from bench import report
from bench import ROOT
from bench import webprocs
from bench.dask_peer import DaskPeer
from bench.dask_peer import missing as dask_missing
from bench.measure import progress
from bench.procs import free_port
from bench.procs import run_child
from bench.procs import start_plain_worker
from bench.procs import stop_group
from bench.procs import wait_gone

__all__ = ["FULL", "QUICK", "Plan", "main"]

PLAIN_QUEUE = "bench-plain"
PARKED_QUEUE = "bench-parked"


@dataclasses.dataclass(frozen=True)
class Plan:
    """How much of each measurement one run does."""

    name: str
    rt_blocks: int  # round trip: blocks per side ...
    rt_block: int  # ... of this many calls
    map_n: int
    map_chunksize: int  # given to `map(chunksize=)` and Celery's `chunks` (what map picks)
    map_rounds: int
    status_reps: int
    cold_reps: int
    growth: tuple[tuple[int, int | None, int], ...]  # (calls, chunksize, runs), a process each
    parked: tuple[tuple[str, int, int | None], ...]  # (side, calls, chunksize)
    codec_n: int
    codec_repeats: int
    web_processes: tuple[int, ...]  # P: web processes, P - 1 of them idle ...
    web_calls: int  # ... while one makes this many calls ...
    web_rounds: int  # ... every (side, P) this many times


FULL = Plan(
    name="full",
    rt_blocks=6,
    rt_block=50,
    map_n=10_000,
    map_chunksize=100,
    map_rounds=2,
    status_reps=5,
    cold_reps=3,
    growth=((1_000, None, 9), (10_000, None, 3), (100_000, None, 1)),
    parked=(("fe", 10_000, None), ("plain", 10_000, None), ("fe", 100_000, None)),
    codec_n=3_000,
    codec_repeats=9,
    web_processes=(1, 4, 16),
    web_calls=2_000,
    web_rounds=2,
)

QUICK = Plan(
    name="quick",
    rt_blocks=2,
    rt_block=25,
    map_n=1_000,
    map_chunksize=100,
    map_rounds=1,
    status_reps=2,
    cold_reps=1,
    growth=((1_000, None, 3), (10_000, None, 1)),
    parked=(("fe", 1_000, None), ("plain", 1_000, None), ("fe", 10_000, None)),
    codec_n=1_000,
    codec_repeats=3,
    web_processes=(1, 4, 16),
    web_calls=500,
    web_rounds=1,
)


def _sigterm(signum: int, frame: object) -> None:
    raise SystemExit(f"stopped by signal {signum}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description="flask-execute versus plain Celery."
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a ~1.5 minute smoke run with small sizes; writes bench/RESULTS.tmp only",
    )
    parser.add_argument(
        "--no-dask",
        action="store_true",
        help="leave Dask out (its rows then say 'not measured'), as when it is not installed",
    )
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    out_path = os.path.join(ROOT, "bench", "RESULTS.tmp" if args.quick else "RESULTS.md")
    signal.signal(signal.SIGTERM, _sigterm)  # so that every finally below runs
    os.chdir(ROOT)
    started = time.monotonic()
    machine = describe_machine()
    tmp = tempfile.mkdtemp(prefix="fe-bench-")
    try:
        results = run(plan, tmp, with_dask=not args.no_dask)
    except BaseException:
        print(f"\nThe run failed; its logs are kept in {tmp}", file=sys.stderr)
        raise
    shutil.rmtree(tmp, ignore_errors=True)
    elapsed = time.monotonic() - started
    machine["load_end"] = _loadavg()
    rows = (
        issue14.rows(results, plan)
        + report.summary(results, plan)
        + webprocs.rows(results["webprocs"])
    )
    print(report.console(rows, results, plan, elapsed))
    with open(out_path, "w") as f:
        text = report.markdown(
            rows, results, plan, machine, elapsed, webprocs.details(results["webprocs"])
        )
        f.write(text)
    print(f"\nwrote {os.path.relpath(out_path)} ({plan.name} run, {elapsed:.0f} s)")
    return 0


def run(plan: Plan, tmp: str, with_dask: bool = True) -> dict[str, t.Any]:
    """Start the services, run every measurement, stop everything (even on errors)."""
    import redis as redis_client

    from flask_execute.local import EmbeddedRedis

    log_dir = os.path.join(tmp, "logs")
    os.makedirs(log_dir)
    redis = EmbeddedRedis(
        os.path.join(tmp, "redis"),
        port=free_port(),
        log_path=os.path.join(log_dir, "redis.log"),
        extra_args=["--databases", "8"],
    )
    plain_worker: subprocess.Popen[bytes] | None = None
    fe_celery: t.Any = None
    crypt_celery: t.Any = None
    webp_celery: t.Any = None
    dask: DaskPeer | None = None
    results: dict[str, t.Any] = {"plan": dataclasses.asdict(plan)}
    try:
        progress(f"starting a private Redis on port {redis.port}")
        redis.start()
        url = redis.url
        base_env = {
            "BENCH_FE_BROKER": f"{url}/1",
            "BENCH_PLAIN_BROKER": f"{url}/2",
            "BENCH_PLAIN_QUEUE": PLAIN_QUEUE,
            "BENCH_COLD_BROKER": f"{url}/3",
            "BENCH_CRYPT_BROKER": f"{url}/5",
            "BENCH_WEBP_BROKER": f"{url}/6",
            "BENCH_LOG_DIR": log_dir,
        }
        os.environ.update(base_env)  # the benchmark apps read it at import
        env = dict(os.environ)
        results["redis"] = {"url": url, "version": redis_version(redis.argv()[0])}

        from bench.crypt_app import celery as crypt_celery_app
        from bench.fe_app import celery as fe_celery_app
        from bench.fe_app import WORKER
        from bench.plain_app import add as plain_add
        from bench.plain_app import app as plain_app
        from bench.tasks import add

        progress("starting the plain worker and, through a first submit, the flask-execute one")
        plain_worker = start_plain_worker(
            env, os.path.join(log_dir, "plain.log"), queue=PLAIN_QUEUE, name="plain"
        )
        fe_celery = fe_celery_app
        fe_celery.submit(add, 0, 0).result(timeout=60)
        plain_add.delay(0, 0).get(timeout=60)
        progress("starting the encrypted flask-execute worker (CELERY_ENCRYPT)")
        crypt_celery = crypt_celery_app
        crypt_celery.submit(add, 0, 0).result(timeout=60)
        expected = f"{WORKER}@{platform.node()}"

        n = plan.rt_blocks * plan.rt_block
        progress(f"round trip: {n} calls per side in blocks of {plan.rt_block}")
        results["roundtrip"] = measure.roundtrip(
            fe_celery, plain_add, plan.rt_blocks, plan.rt_block, crypt_celery
        )

        results["dask"] = {"missing": dask_missing() if with_dask else "left out (--no-dask)"}
        if results["dask"]["missing"]:
            progress(f"NOT measuring Dask: {results['dask']['missing']}")
        else:
            progress(f"starting Dask's LocalCluster ({dask_peer_shape()}) in a process of its own")
            dask = DaskPeer(env, os.path.join(log_dir, "dask.log"))
            results["dask"]["versions"] = dask.versions
        progress(f"map of {plan.map_n:,} calls, every way")
        stats_client = redis_client.Redis.from_url(url)
        try:
            results["map"] = measure.map_many(
                fe_celery,
                plain_add,
                stats_client,
                plan.map_n,
                plan.map_chunksize,
                plan.map_rounds,
                crypt_celery,
                dask,
            )
        finally:
            stats_client.close()
        if dask is not None:
            progress("stopping Dask (not used by the measurements below)")
            dask.stop()
        progress("stopping the encrypted worker (not used by the measurements below)")
        crypt_celery.stop(timeout=10)

        progress("status() versus control.ping(timeout=1)")
        results["status"] = measure.status(fe_celery, plain_app, expected, plan.status_reps)

        progress("first submit to first result on a fresh app, versus a bare worker")
        results["cold"] = coldstarts(plan, env, log_dir, url)

        progress("map cost growth, one fresh process per size")
        child_env = {**env, "BENCH_FE_LOCAL": "0"}
        growth = []
        for size, chunksize, repeat in plan.growth:
            argv = ["growth", f"--size={size}", f"--repeat={repeat}"]
            if chunksize:
                argv.append(f"--chunksize={chunksize}")
            growth.append(
                run_child(
                    argv,
                    child_env,
                    os.path.join(log_dir, "children.log"),
                    timeout=300,
                )
            )
            progress(f"map {size:,} chunksize={chunksize}: {growth[-1]['total_s']:.2f} s")
        results["growth"] = growth

        progress("memory held by pending calls (parked on a queue nobody consumes)")
        parked = []
        for side, size, chunksize in plan.parked:
            argv = ["parked", f"--side={side}", f"--size={size}", f"--queue={PARKED_QUEUE}"]
            if chunksize:
                argv.append(f"--chunksize={chunksize}")
            parked.append(
                run_child(argv, child_env, os.path.join(log_dir, "children.log"), timeout=300)
            )
            progress(f"parked {side} {size:,} chunksize={chunksize}: done")
        results["parked"] = parked

        progress("signing and serialization per call, isolated")
        results["codec"] = measure.codec_overhead(plan.codec_n, plan.codec_repeats)

        ps = "/".join(map(str, plan.web_processes))
        progress(f"P web processes ({ps}), {plan.web_calls:,} calls from one; worker first")
        from bench.webp_app import celery as webp_celery_app

        webp_celery = webp_celery_app
        # start(), not a first submit: this process must watch none of the results
        webp_celery.start()
        stats_client = redis_client.Redis.from_url(url)
        try:
            results["webprocs"] = webprocs.measure(
                plan.web_processes,
                plan.web_calls,
                plan.web_rounds,
                {**env, "BENCH_WEBP_LOCAL": "0"},
                os.path.join(log_dir, "webprocs.log"),
                stats_client,
            )
        finally:
            stats_client.close()
    finally:
        progress("stopping everything")
        if dask is not None:
            try:
                dask.stop()
            except Exception as exc:  # keep stopping the rest
                print(f"could not stop Dask: {exc!r}", file=sys.stderr)
        _stop_all(fe_celery, plain_worker, redis, crypt_celery, webp_celery)
    return results


def dask_peer_shape() -> str:
    from bench.dask_peer import WORKERS

    return f"{WORKERS} worker processes, 1 thread each"


def _stop_all(
    fe_celery: t.Any,
    plain_worker: subprocess.Popen[bytes] | None,
    redis: t.Any,
    crypt_celery: t.Any = None,
    webp_celery: t.Any = None,
) -> None:
    """Stop what :func:`run` started; one failing stop does not skip the others."""

    def stop_watchers() -> None:
        # imported here, inside a step, so that a failing import cannot keep the
        # private Redis from stopping
        from flask_execute.watcher import stop_all

        stop_all()

    steps: list[tuple[str, t.Callable[[], object]]] = []
    if fe_celery is not None:
        steps.append(("the flask-execute worker", lambda: fe_celery.stop(timeout=10)))
    if crypt_celery is not None:  # stop() is idempotent
        steps.append(("the encrypted worker", lambda: crypt_celery.stop(timeout=10)))
    if webp_celery is not None:
        steps.append(("the web-processes worker", lambda: webp_celery.stop(timeout=10)))
    if plain_worker is not None:
        steps.append(("the plain worker", lambda: stop_group(plain_worker)))
    # the result watchers first, then the Redis they watch
    steps += [("the result watchers", stop_watchers), ("the private Redis", redis.stop)]
    for what, stop in steps:
        try:
            stop()
        except Exception as exc:  # keep stopping the rest
            print(f"could not stop {what}: {exc!r}", file=sys.stderr)


def coldstarts(plan: Plan, env: dict[str, str], log_dir: str, url: str) -> dict[str, list[float]]:
    """``cold_reps`` fresh processes per side, alternating (ABBA). Returns the seconds
    to the first result and the ms of the first status call, per side."""
    plain_env = {**env, "BENCH_PLAIN_BROKER": f"{url}/4", "BENCH_PLAIN_QUEUE": "bench-cold"}
    log = os.path.join(log_dir, "children.log")
    seconds: dict[str, list[float]] = {"fe": [], "plain": [], "fe_status": [], "plain_status": []}
    for index in range(plan.cold_reps):
        for side in measure.abba(index):
            if side == "fe":
                out = run_child(["coldstart-fe"], env, log, timeout=120)
                # its workers are in sessions of their own: make sure stop() got them
                left = wait_gone(out["pids"])
                if left:
                    progress(f"cold-start workers {left} outlived their app; killed")
            else:
                plain_log = os.path.join(log_dir, "plain-cold.log")
                out = run_child(["coldstart-plain", f"--log={plain_log}"], plain_env, log, 120)
            seconds[side].append(out["seconds"])
            seconds[f"{side}_status"].append(out["status_ms"])
            progress(f"cold start {side}: {out['seconds']:.2f} s")
    return seconds


# --- the machine ---------------------------------------------------------------------
def describe_machine() -> dict[str, t.Any]:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    memory = "unknown"
    try:
        with open("/proc/meminfo") as f:
            kb = int(f.readline().split()[1])
        memory = f"{kb / 1024 / 1024:.1f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    versions = {}
    for dist in ("celery", "kombu", "redis", "flask", "cloudpickle"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    return {
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "memory": memory,
        "kernel": f"{platform.system()} {platform.release()}",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "versions": versions,
        "commit": _git_commit(),
        "load_start": _loadavg(),
    }


def redis_version(binary: str) -> str:
    try:
        out = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    for word in out.split():
        if word.startswith("v="):
            return word[2:]
    return out.strip() or "unknown"


def _loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def _git_commit() -> str:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, timeout=10, cwd=ROOT, check=True,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "src"],
            capture_output=True, text=True, timeout=10, cwd=ROOT, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + (" (src/ has uncommitted changes)" if dirty else "")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
