"""The "P web processes" scenario (issue 11, item 5): what a task costs the *other*
web processes of a deployment.

A deployment runs P web processes (gunicorn workers) against one Redis and one set of
workers. Each process that ever served a request holds what the product keeps live
after one call: flask-execute's result watcher; plain Celery's result backend
connection. The scenario starts P fresh web processes (:func:`bench.child.webproc`),
each makes one call and waits for its result (as a gunicorn worker that served one
request), P - 1 then stay idle while the remaining one submits N calls and waits for
every result. Measured over exactly those N calls, per task:

* Redis output and input bytes (``INFO stats`` ``total_net_output_bytes`` /
  ``total_net_input_bytes`` deltas: the whole server, so the worker's traffic is in;
  the idle workers of the other measurements add a few bytes a second to both sides);
* the CPU time of the idle processes (``/proc/<pid>/stat`` utime + stime deltas,
  summed over the P - 1), of the busy process (its own ``time.process_time()``, all
  threads) and of ``redis-server`` (``INFO cpu``);
* the wall time of the N calls.

flask-execute runs :mod:`bench.webp_app` (its own db, key prefix and worker
``bench-webp``, started by the orchestrator with ``celery.start()``, so that the
orchestrator itself watches none of the scenario's results); plain Celery runs
:mod:`bench.plain_app` on the plain worker of the other measurements. Each (side, P)
configuration gets fresh processes, stopped before the next starts; the two sides
alternate in ABBA order and the P values run ascending, then descending, round after
round. The target (issue 11): Redis bytes and web-process CPU per task at P = 16
within 1.15x of P = 1.
"""

from __future__ import annotations

import statistics
import subprocess
import time
import typing as t

from bench.measure import abba
from bench.measure import progress
from bench.procs import proc_cpu_seconds
from bench.procs import read_json_line
from bench.procs import start_child
from bench.procs import stop_group
from bench.report import Row

__all__ = ["TARGET", "details", "measure", "rows"]

#: Issue 11: Redis bytes and CPU per task at the largest P within this factor of P = 1.
TARGET = 1.15
_READY_TIMEOUT = 120.0  # 16 interpreters importing Flask and Celery on 2 busy cores
_RUN_TIMEOUT = 600.0
_SIDES = {"fe": "flask-execute", "plain": "plain Celery"}


def measure(
    counts: tuple[int, ...], calls: int, rounds: int, env: dict[str, str], log_path: str,
    redis_client: t.Any,
) -> list[dict[str, t.Any]]:  # fmt: skip
    """Every (side, P) configuration, ``rounds`` times; one record per configuration
    run (see :func:`_configuration`)."""
    runs: list[dict[str, t.Any]] = []
    index = 0
    for r in range(rounds):
        # mirrored rounds: a drift of the machine weighs alike on small and large P
        for p in counts if r % 2 == 0 else tuple(reversed(counts)):
            for side in abba(index):
                run = _configuration(side, p, calls, env, log_path, redis_client)
                run["round"] = r + 1
                runs.append(run)
                progress(
                    f"{p} web processes, {side}: {calls:,} calls {run['wall_s']:.2f} s,"
                    f" Redis out {run['out_bytes'] / calls:,.0f} B/task, idle CPU"
                    f" {run['idle_cpu_s'] * 1e6 / calls:.1f} µs/task"
                )
            index += 1
    return runs


def _configuration(
    side: str, p: int, calls: int, env: dict[str, str], log_path: str, redis_client: t.Any
) -> dict[str, t.Any]:
    """P fresh web processes of ``side``; the first makes ``calls`` calls, the others idle."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for _ in range(p):
            procs.append(start_child(["webproc", f"--side={side}"], env, log_path))
        deadline = time.monotonic() + _READY_TIMEOUT
        pids = [
            int(read_json_line(proc, max(deadline - time.monotonic(), 1.0), log_path)["pid"])
            for proc in procs
        ]
        busy, idle_pids = procs[0], pids[1:]
        subscriptions = _subscriptions(redis_client)  # its reply is no part of the run
        idle_before = _settle(idle_pids)
        before = _redis_counters(redis_client)
        assert busy.stdin is not None
        busy.stdin.write(f"run {calls}\n".encode())
        busy.stdin.flush()
        answer = read_json_line(busy, _RUN_TIMEOUT, log_path)
        after = _redis_counters(redis_client)
        # the last notifications may still be on their way through the idle processes
        idle_after = _settle(idle_pids)
    finally:
        for proc in procs:
            _stop(proc)
    return {
        "side": side,
        "p": p,
        "calls": calls,
        "wall_s": answer["wall_s"],
        "busy_cpu_s": answer["cpu_s"],
        "idle_cpu_s": idle_after - idle_before,
        "web_cpu_s": answer["cpu_s"] + idle_after - idle_before,
        "out_bytes": after["out"] - before["out"],
        "in_bytes": after["in"] - before["in"],
        "redis_cpu_s": after["cpu"] - before["cpu"],
        "commands": after["commands"] - before["commands"],
        **subscriptions,
    }


def _settle(pids: list[int], quiet: float = 0.2, limit: float = 3.0) -> float:
    """The summed CPU seconds of ``pids`` once it stopped growing for ``quiet`` seconds
    (or after ``limit`` seconds: an idle process that keeps working is a finding, and
    its CPU is counted)."""
    deadline = time.monotonic() + limit
    total = sum(proc_cpu_seconds(pid) for pid in pids)
    still_since = time.monotonic()
    while pids and time.monotonic() < deadline and time.monotonic() - still_since < quiet:
        time.sleep(0.05)
        now = sum(proc_cpu_seconds(pid) for pid in pids)
        if now != total:
            total, still_since = now, time.monotonic()
    return total


def _redis_counters(client: t.Any) -> dict[str, float]:
    stats, cpu = client.info("stats"), client.info("cpu")
    return {
        "out": stats["total_net_output_bytes"],
        "in": stats["total_net_input_bytes"],
        "commands": stats["total_commands_processed"],
        "cpu": cpu["used_cpu_sys"] + cpu["used_cpu_user"],
    }


def _subscriptions(client: t.Any) -> dict[str, int]:
    """Pub/sub on the server as the N calls start (``CLIENT LIST``, all dbs: the
    workers' control connections and the orchestrator's result watchers of the other
    apps are in too): connections that subscribe to anything, and their channel and
    pattern subscriptions in all."""
    clients = client.client_list()
    counts = [int(c.get("sub", 0)) + int(c.get("psub", 0)) for c in clients]
    return {"subscribers": sum(1 for n in counts if n), "subscriptions": sum(counts)}


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """End of stdin ends a web process; :func:`stop_group` makes sure of it."""
    try:
        if proc.stdin is not None:
            proc.stdin.close()
        proc.wait(5)
    except (OSError, subprocess.TimeoutExpired):
        pass
    finally:
        stop_group(proc)


# --- report ----------------------------------------------------------------------------
def _per_task(runs: list[dict[str, t.Any]], side: str, p: int, key: str) -> float:
    """Median over the rounds of ``key`` per task (bytes, or seconds)."""
    return statistics.median(
        float(r[key] / r["calls"]) for r in runs if r["side"] == side and r["p"] == p
    )


def _series(runs: list[dict[str, t.Any]], side: str, key: str, counts: list[int]) -> list[float]:
    return [_per_task(runs, side, p, key) for p in counts]


def _ratio(values: list[float]) -> float:
    return values[-1] / values[0] if values[0] else float("inf")


def rows(runs: list[dict[str, t.Any]]) -> list[Row]:
    """The summary rows: flask-execute and plain Celery side by side, per P, with the
    largest P ÷ the smallest as the ratio (the issue's target on bytes and CPU)."""
    if not runs:
        return []
    counts = sorted({r["p"] for r in runs})
    calls = runs[0]["calls"]
    ps = " / ".join(map(str, counts))
    hi, lo = counts[-1], counts[0]
    head = f"P web processes ({ps}; P-1 idle, each after one call), {calls:,} calls from one:"
    out: list[Row] = []

    def row(
        what: str, key: str, scale: float, unit: str, spec: str, target: bool, note: str = ""
    ) -> None:
        fe, plain = (_series(runs, side, key, counts) for side in ("fe", "plain"))
        text = {
            side: " / ".join(format(v * scale, spec) for v in values) + f" {unit}"
            for side, values in (("fe", fe), ("plain", plain))
        }
        out.append(
            Row(
                f"{head} {what}",
                text["fe"],
                text["plain"],
                f"P={hi} ÷ P={lo}: {_ratio(fe):.2f}x (plain {_ratio(plain):.2f}x){note}",
                f"≤ {TARGET}x P={hi} ÷ P={lo} (issue 11)" if target else "—",
                _ratio(fe) <= TARGET if target else None,
            )
        )

    row("Redis output per task", "out_bytes", 1 / 1024, "KB", ",.2f", True)
    row("Redis input per task", "in_bytes", 1 / 1024, "KB", ",.2f", True)
    # The same ratio within one configuration run: all P processes ÷ the busy one alone
    # (what P = 1 would cost, minus the drift of the machine between two runs).
    within = {
        side: _per_task(runs, side, hi, "web_cpu_s") / _per_task(runs, side, hi, "busy_cpu_s")
        for side in ("fe", "plain")
    }
    row(
        "CPU per task of all P web processes (busy + idle)",
        "web_cpu_s",
        1e6,
        "µs",
        ",.0f",
        True,
        f"; at P={hi}, all ÷ the busy one alone: {within['fe']:.2f}x"
        f" (plain {within['plain']:.2f}x)",
    )
    # per idle process: P = 1 has none
    idle = {
        side: " / ".join(
            "—" if p == 1 else f"{_per_task(runs, side, p, 'idle_cpu_s') * 1e6 / (p - 1):.1f}"
            for p in counts
        )
        + " µs"
        for side in ("fe", "plain")
    }
    out.append(
        Row(
            f"{head} CPU per task of the busy process, in EACH idle process",
            idle["fe"],
            idle["plain"],
            "— (in the row above)",
            "—",
            None,
        )
    )
    row("wall time of the calls", "wall_s", calls, "s", ".2f", False)
    return out


def details(runs: list[dict[str, t.Any]]) -> list[str]:
    """The RESULTS.md section: every configuration run."""
    if not runs:
        return []
    out = [
        "### P web processes (every configuration run)",
        "",
        "P fresh web processes per configuration; each made one call and waited for it"
        " (flask-execute `submit().result()` on `bench.webp_app`, whose worker"
        " `bench-webp` has the same shape as the others; plain `delay().get()` on the"
        " plain worker), then one submitted the N calls (all first, then each result in"
        " order) while P - 1 stayed idle. Per task: Redis bytes (server-wide `INFO stats`"
        " deltas), CPU of `redis-server`, of the busy process and of the idle ones"
        ' (`/proc/<pid>/stat`). "pub/sub": connections subscribed to anything, and'
        " their subscriptions in all, as the calls start (`CLIENT LIST`, all dbs: the"
        " workers' control connections and the orchestrator's result watchers of the"
        " other apps are in too).",
        "",
        "| side | P | round | calls | wall s | Redis out / task | Redis in / task |"
        " Redis CPU / task | busy CPU / task | idle CPU / task (all) | per idle process |"
        " commands / task | pub/sub connections (subscriptions) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(runs, key=lambda r: (r["side"], r["p"], r["round"])):
        n = r["calls"]
        per_idle = "—" if r["p"] == 1 else f"{r['idle_cpu_s'] * 1e6 / n / (r['p'] - 1):.1f} µs"
        out.append(
            f"| {_SIDES[r['side']]} | {r['p']} | {r['round']} | {n:,} | {r['wall_s']:.2f} |"
            f" {r['out_bytes'] / n:,.0f} B | {r['in_bytes'] / n:,.0f} B |"
            f" {r['redis_cpu_s'] * 1e6 / n:.0f} µs | {r['busy_cpu_s'] * 1e6 / n:.0f} µs |"
            f" {r['idle_cpu_s'] * 1e6 / n:.1f} µs | {per_idle} | {r['commands'] / n:.2f} |"
            f" {r['subscribers']} ({r['subscriptions']}) |"
        )
    return out
