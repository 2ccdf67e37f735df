"""Turn the measurements into the summary table, the console output and RESULTS.md.

Ratios: for latencies, ``flask-execute ÷ plain`` ("x time": below 1 is faster); for
``map``, ``plain ÷ flask-execute`` ("x faster": above 1 is faster). Every figure is a
median unless it says otherwise. Targets are the ones of issue 6, unless a row names
another issue. The P-web-processes rows come from :mod:`bench.webprocs`.
"""

from __future__ import annotations

import dataclasses
import statistics
import typing as t

if t.TYPE_CHECKING:
    from bench.runner import Plan

__all__ = ["Row", "console", "markdown", "summary"]


@dataclasses.dataclass
class Row:
    measurement: str
    fe: str
    plain: str
    ratio: str
    target: str
    met: bool | None  # None: no target

    @property
    def met_text(self) -> str:
        return "—" if self.met is None else ("yes" if self.met else "**NO**")


def pct(values: list[float], p: float) -> float:
    """The ``p``-th percentile (linear interpolation between closest ranks)."""
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    rank = (len(ordered) - 1) * p / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def med(values: t.Iterable[float]) -> float:
    return statistics.median(list(values))


def _total(runs: list[dict[str, float]]) -> float:
    return med(r["total_s"] for r in runs)


def _rate(n: int, seconds: float) -> str:
    return f"{seconds:.2f} s ({n / seconds:,.0f}/s)"


def summary(results: dict[str, t.Any], plan: Plan) -> list[Row]:
    rows: list[Row] = []
    rt = results["roundtrip"]
    fe50, pl50 = pct(rt["fe_ms"], 50), pct(rt["plain_ms"], 50)
    fe99, pl99 = pct(rt["fe_ms"], 99), pct(rt["plain_ms"], 99)
    n_rt = len(rt["fe_ms"])
    rows.append(
        Row(
            f"Round trip p50, `submit(add, i, i).result()` vs `add.delay(i, i).get()`"
            f" ({n_rt} each)",
            f"{fe50:.2f} ms",
            f"{pl50:.2f} ms",
            f"{fe50 / pl50:.2f}x time",
            "≤ 0.8x time",
            fe50 / pl50 <= 0.8,
        )
    )
    rows.append(
        Row(
            "Round trip p99",
            f"{fe99:.2f} ms",
            f"{pl99:.2f} ms",
            f"{fe99 / pl99:.2f}x time",
            "—",
            None,
        )
    )
    rows.append(
        Row(
            "Client CPU per round trip (web process, all threads)",
            f"{rt['fe_cpu_ms']:.2f} ms",
            f"{rt['plain_cpu_ms']:.2f} ms",
            f"{rt['fe_cpu_ms'] / rt['plain_cpu_ms']:.2f}x time",
            "—",
            None,
        )
    )

    m = results["map"]
    n = plan.map_n
    c = plan.map_chunksize
    fe_chunk = _total(m["fe_chunk"])
    loop, grp = _total(m["plain_loop"]), _total(m["plain_group"])
    rows.append(
        Row(
            f"`map` of {n:,}, chunksize={c}, vs the `delay()` loop",
            _rate(n, fe_chunk),
            _rate(n, loop),
            f"{loop / fe_chunk:.2f}x faster",
            "≥ 20x faster",
            loop / fe_chunk >= 20,
        )
    )
    rows.append(
        Row(
            f"`map` of {n:,}, chunksize={c}, vs the `group`",
            _rate(n, fe_chunk),
            _rate(n, grp),
            f"{grp / fe_chunk:.2f}x faster",
            "—",
            None,
        )
    )

    s = results["status"]
    cold = results["cold"]
    fe_s, pl_s = med(s["fe"]), med(s["plain"])
    rows.append(
        Row(
            "`celery.status()`, all local workers up, vs `control.ping(timeout=1)`"
            f" ({len(s['fe'])} calls each after a first one)",
            f"{fe_s:.1f} ms (worst {max(s['fe']):.1f})",
            f"{pl_s:.1f} ms",
            f"{fe_s / pl_s:.3f}x time",
            "≤ 50 ms",
            max(s["fe"]) <= 50,
        )
    )
    fe_first, pl_first = med(cold["fe_status"]), med(cold["plain_status"])
    rows.append(
        Row(
            "First `status()` / `ping(timeout=1)` in a fresh process, right after the"
            " cold start below",
            f"{fe_first:.1f} ms (worst {max(cold['fe_status']):.1f})",
            f"{pl_first:.1f} ms",
            f"{fe_first / pl_first:.3f}x time",
            "≤ 50 ms",
            max(cold["fe_status"]) <= 50,
        )
    )
    pl_lim = med(s["plain_limit"])
    rows.append(
        Row(
            "`celery.status()` vs `control.ping(timeout=1, limit=1)` (reference: a caller"
            " who knows how many workers answer)",
            f"{fe_s:.1f} ms",
            f"{pl_lim:.1f} ms",
            f"{fe_s / pl_lim:.2f}x time",
            "—",
            None,
        )
    )

    fe_c, pl_c = med(cold["fe"]), med(cold["plain"])
    rows.append(
        Row(
            "First submit → first result, fresh app, worker auto-started, vs a bare"
            " `celery worker` start + first result",
            f"{fe_c:.2f} s (worst {max(cold['fe']):.2f})",
            f"{pl_c:.2f} s",
            f"{fe_c / pl_c:.2f}x time",
            "≤ 2 s",
            max(cold["fe"]) <= 2.0,
        )
    )

    codec = results["codec"]
    rows.append(
        Row(
            "Signing + serialization per call, isolated: `dump_call` + `Codec.seal` +"
            " `Codec.open` vs kombu JSON body dumps + loads",
            f"{codec['fe_call']:.1f} µs",
            f"{codec['plain_call']:.1f} µs",
            f"{codec['fe_call'] / codec['plain_call']:.2f}x time",
            "—",
            None,
        )
    )
    if "crypt_ms" in rt:
        rows += _encryption_rows(results, plan)
    return rows


def _versus(value: float, unencrypted: float, plain: float, faster: bool = False) -> str:
    """Ratio of an encrypted figure to the unencrypted one and to plain Celery's."""
    if faster:
        theirs = f"{plain / value:.2f}x faster than plain"
    else:
        theirs = f"{value / plain:.2f}x plain's"
    return f"{value / unencrypted:.2f}x the unencrypted time; {theirs}"


def _encryption_rows(results: dict[str, t.Any], plan: Plan) -> list[Row]:
    """``CELERY_ENCRYPT``: the same measurements on the encrypted app, run alternated
    with the two sides above (the "flask-execute" column is the encrypted figure)."""
    rt, m, codec = results["roundtrip"], results["map"], results["codec"]
    n, c = plan.map_n, plan.map_chunksize
    fe50, pl50, cr50 = (pct(rt[f"{side}_ms"], 50) for side in ("fe", "plain", "crypt"))
    fe99, pl99, cr99 = (pct(rt[f"{side}_ms"], 99) for side in ("fe", "plain", "crypt"))
    loop, grp = _total(m["plain_loop"]), _total(m["plain_group"])
    cr, cr_chunk = _total(m["crypt"]), _total(m["crypt_chunk"])
    rows = [
        Row(
            "`CELERY_ENCRYPT` round trip p50 (vs the unencrypted p50 above, and plain Celery)",
            f"{cr50:.2f} ms (unencrypted {fe50:.2f})",
            f"{pl50:.2f} ms",
            _versus(cr50, fe50, pl50),
            "—",
            None,
        ),
        Row(
            "`CELERY_ENCRYPT` round trip p99",
            f"{cr99:.2f} ms (unencrypted {fe99:.2f})",
            f"{pl99:.2f} ms",
            _versus(cr99, fe99, pl99),
            "—",
            None,
        ),
        Row(
            "`CELERY_ENCRYPT` client CPU per round trip",
            f"{rt['crypt_cpu_ms']:.2f} ms (unencrypted {rt['fe_cpu_ms']:.2f})",
            f"{rt['plain_cpu_ms']:.2f} ms",
            _versus(rt["crypt_cpu_ms"], rt["fe_cpu_ms"], rt["plain_cpu_ms"]),
            "—",
            None,
        ),
        Row(
            f"`CELERY_ENCRYPT` `map` of {n:,}, no chunksize (vs unencrypted, and the"
            " `delay()` loop)",
            f"{_rate(n, cr)} (unencrypted {_total(m['fe']):.2f} s)",
            _rate(n, loop),
            _versus(cr, _total(m["fe"]), loop, faster=True),
            "—",
            None,
        ),
        Row(
            f"`CELERY_ENCRYPT` `map` of {n:,}, chunksize={c} (vs unencrypted, and the `group`)",
            f"{_rate(n, cr_chunk)} (unencrypted {_total(m['fe_chunk']):.2f} s)",
            _rate(n, grp),
            _versus(cr_chunk, _total(m["fe_chunk"]), grp, faster=True),
            "—",
            None,
        ),
        Row(
            "`CELERY_ENCRYPT` signing + encryption + serialization per call, isolated (vs"
            " unencrypted, and kombu's JSON body)",
            f"{codec['crypt_call']:.1f} µs (unencrypted {codec['fe_call']:.1f})",
            f"{codec['plain_call']:.1f} µs",
            _versus(codec["crypt_call"], codec["fe_call"], codec["plain_call"]),
            "—",
            None,
        ),
    ]
    return rows


def _per_pending(p: dict[str, t.Any] | None) -> tuple[float, float]:
    if p is None:
        return (0.0, 0.0)
    return p["traced_bytes"] / p["size"], p["rss_bytes"] / p["size"]


# --- output ----------------------------------------------------------------------------
HEADER = (
    "measurement",
    "flask-execute",
    "plain Celery",
    "ratio",
    "target (issue 6 unless noted)",
    "met?",
)


def table(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for r in rows:
        cells = (r.measurement, r.fe, r.plain, r.ratio, r.target, r.met_text)
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def console(rows: list[Row], results: dict[str, t.Any], plan: Plan, elapsed: float) -> str:
    out = [f"\nflask-execute vs plain Celery ({plan.name} run, {elapsed:.0f} s)\n"]
    for r in rows:
        out.append(f"- {r.measurement.replace('`', '')}")
        out.append(
            f"    flask-execute {r.fe} | plain {r.plain} | {r.ratio}"
            + ("" if r.met is None else f" | target {r.target}: {'met' if r.met else 'NOT MET'}")
        )
    return "\n".join(out)


def markdown(
    rows: list[Row],
    results: dict[str, t.Any],
    plan: Plan,
    machine: dict[str, t.Any],
    elapsed: float,
    extra_details: list[str] | None = None,
) -> str:
    """RESULTS.md: ``extra_details`` (lines) ends the Details section."""
    v = machine["versions"]
    redis = results["redis"]
    out = [
        "# flask-execute benchmark results",
        "",
        f"Generated by `python -m bench` (`make bench`) on {machine['date']}, in"
        f" {elapsed:.0f} s. Every full run rewrites this file; do not edit it by hand.",
        "",
        "## Machine",
        "",
        f"- CPU: {machine['cpu']}, {machine['cores']} cores ({machine['usable_cores']} usable),"
        f" {machine['memory']} RAM, {machine['kernel']}",
        f"- {machine['python']}; Celery {v['celery']}, kombu {v['kombu']}, redis-py"
        f" {v['redis']}, Flask {v['flask']}, cloudpickle {v['cloudpickle']}; Redis server"
        f" {redis['version']}; {_dask_versions(results)}",
        f"- flask-execute at commit {machine['commit']}",
        f"- Load average (1/5/15 min) at start {machine['load_start']}, at end"
        f" {machine['load_end']} (other work on the machine shows here; both sides share it)",
        "",
        "## Set-up",
        "",
        "- One private `redis-server` on a free loopback TCP port, started and stopped by the"
        " run: flask-execute on db 1, plain Celery on db 2 (its result keys prefixed"
        " `plain:` so that flask-execute's pattern subscription does not receive them), the"
        " cold starts on dbs 3 and 4.",
        "- The same worker shape on both sides: one `celery worker`, prefork pool,"
        " concurrency 2, without mingle and gossip, log level WARNING. flask-execute's is"
        " auto-started by the first `submit` (`CELERY_WORKERS={'bench': {'concurrency': 2,"
        " 'without_gossip': True}}`); the plain one is `celery -A bench.plain_app worker"
        " --pool=prefork -c 2 --without-mingle --without-gossip -Q bench-plain`, with JSON"
        " serializers and a registered task `add`.",
        "- Both run the same trivial `add(x, y)`; flask-execute sends it by reference inside"
        " its signed envelope, with the `STARTED` report and the claim it always makes.",
        "- The `CELERY_ENCRYPT` rows: a second flask-execute app, identical but for"
        " `CELERY_ENCRYPT=True`, with its own worker `bench-crypt` of the same shape, on db"
        " 5 (result keys prefixed `crypt:`). Its round trips and `map`s run in the same"
        " alternation as the other two sides (three sides cycle through the six orders,"
        " each followed by its mirror); its worker is stopped before the later measurements.",
        "- The Dask rows (issue 14): `distributed.LocalCluster(n_workers=2,"
        " threads_per_worker=1, processes=True)` — two worker processes, the shape of the"
        " Celery workers — and its `Client`, in a process of their own (the scheduler runs"
        " in the client's process, as `LocalCluster` does), started once before the `map`"
        " measurements and stopped after them; `client.map(add, xs, xs, pure=False)` (every"
        " call runs: no reuse of an earlier round's keys) then `client.gather`, or"
        " `distributed.as_completed`; timed inside that process. Its workers idle (with"
        " Dask's heartbeats) while the other ways run.",
        f"- Celery's own `chunks`: `add.chunks(calls, {plan.map_chunksize}).apply_async()"
        f".get()`, the chunk size `map` picks for {plan.map_n:,} calls on 2 processes"
        " (`flask_execute.capacity.auto_chunksize`).",
        "- The P-web-processes rows (issue 11): P fresh web processes (P = "
        + " / ".join(map(str, plan.web_processes))
        + "), each after one call, P - 1 idle while one submits"
        f" {plan.web_calls:,} calls and waits for all; flask-execute on a third app of"
        " the same shape (`bench-webp` worker, db 6, result keys prefixed `webp:`, its"
        " worker started with `celery.start()` so that the orchestrator watches none of"
        " its results), plain Celery on its worker above. Fresh processes per"
        " configuration, sides in ABBA order, P ascending then descending per round"
        f" ({plan.web_rounds} round(s)).",
        "- Alternation: round trips in blocks of"
        f" {plan.rt_block} calls ({plan.rt_blocks} blocks per side);"
        f" {plan.map_rounds} round(s) of the {len(results['map'])} `map` ways, in mirrored"
        " orders (ABC..., ...CBA); status and cold starts in ABBA order. Cold starts and"
        " memory run in a fresh process each.",
        "",
        "## Summary",
        "",
        "Ratios: \"x time\" is flask-execute's time ÷ plain Celery's (below 1 is faster);"
        " \"x faster\" is plain Celery's time ÷ flask-execute's. Medians unless stated;"
        " `status()` and the cold start are judged on their worst sample; memory per"
        " pending future on the Python heap it holds (the RSS figure next to it also counts"
        " allocator memory freed during the submit but kept by the process).",
        "",
        table(rows),
        "",
    ]
    missed = [r for r in rows if r.met is False]
    out += ["## Targets not met", ""]
    if missed:
        out.append(
            "These targets (of issue 6 unless the row names another) are **not met** by"
            " this run (no benchmark-specific code path exists to make them look better):"
        )
        out.append("")
        for r in missed:
            out.append(
                f"- {r.measurement}: flask-execute {r.fe}, plain Celery {r.plain}, {r.ratio};"
                f" target {r.target}."
            )
    else:
        out.append("None: every target is met by this run.")
    unmeasured = [r for r in rows if r.met is None and not r.target.startswith("—")]
    if unmeasured:
        out += ["", "These targets were **not measured** by this run:", ""]
        out += [f"- {r.measurement}: {r.plain}." for r in unmeasured]
    out += ["", "## Details", ""]
    out += _details(results, plan)
    if extra_details:
        out += ["", *extra_details]
    return "\n".join(out) + "\n"


def _details(results: dict[str, t.Any], plan: Plan) -> list[str]:
    out: list[str] = []
    rt = results["roundtrip"]
    out += [
        "### Round trip (ms)",
        "",
        "| side | n | min | p50 | p90 | p99 | max | mean | client CPU / call |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    sides = [("flask-execute", "fe"), ("plain", "plain")]
    if "crypt_ms" in rt:
        sides.append(("flask-execute, `CELERY_ENCRYPT`", "crypt"))
    for side, key in sides:
        values = rt[f"{key}_ms"]
        cpu_value = rt[f"{key}_cpu_ms"]
        out.append(
            f"| {side} | {len(values)} | {min(values):.2f} | {pct(values, 50):.2f} |"
            f" {pct(values, 90):.2f} | {pct(values, 99):.2f} | {max(values):.2f} |"
            f" {statistics.fmean(values):.2f} | {cpu_value:.2f} |"
        )
    out += [
        "",
        f"### `map` of {plan.map_n:,} calls (seconds; submit = until the call returned)",
        "",
        "First result: from the map call to the first result the recipe holds (flask-execute"
        " and Dask: their `as_completed`; plain Celery: the first `get()` of the loop, of the"
        " group's first member, of the first chunk)."
        " Dask sends no Redis commands (its runs' counts are the idle workers' polling).",
        "",
        "| way | run | submit | first result | collect | total | calls/s |"
        " Redis commands / call | top commands / call |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    names = {
        "fe": "flask-execute `map` (no chunksize), `pool.result()`",
        "fe_stream": "flask-execute `map` (no chunksize), `pool.as_completed()`",
        "fe_chunk": f"flask-execute `map(chunksize={plan.map_chunksize})`",
        "plain_loop": "plain `delay()` loop, then `get()` each",
        "plain_group": "plain `group(...).apply_async().get()`",
        "plain_chunks": f"plain `add.chunks(calls, {plan.map_chunksize}).apply_async().get()`",
        "dask": "Dask `client.map` + `client.gather`",
        "dask_stream": "Dask `client.map` + `as_completed`",
        "crypt": "flask-execute `map`, `CELERY_ENCRYPT`",
        "crypt_chunk": f"flask-execute `map(chunksize={plan.map_chunksize})`, `CELERY_ENCRYPT`",
    }
    for key, label in names.items():
        if key not in results["map"]:
            continue
        for i, run in enumerate(results["map"][key], 1):
            commands = run["commands"]
            top = sorted(commands.items(), key=lambda kv: -kv[1])[:8]
            top_text = ", ".join(f"{name} {count / plan.map_n:.2f}" for name, count in top)
            first = "—" if run.get("first_s") is None else f"{run['first_s']:.3f}"
            out.append(
                f"| {label} | {i} | {run['submit_s']:.2f} | {first} | {run['collect_s']:.2f} |"
                f" {run['total_s']:.2f} | {plan.map_n / run['total_s']:,.0f} |"
                f" {sum(commands.values()) / plan.map_n:.2f} | {top_text} |"
            )
    s = results["status"]
    out += [
        "",
        "### `status()` (ms, every sample; one unmeasured call per side first)",
        "",
        f"- flask-execute `celery.status()`: {_list(s['fe'], '.1f')}",
        f"- plain `control.ping(timeout=1)`: {_list(s['plain'], '.1f')}",
        f"- plain `control.ping(timeout=1, limit=1)`: {_list(s['plain_limit'], '.1f')}",
        "- first call in a fresh process (after the cold start), flask-execute"
        f" `celery.status()`: {_list(results['cold']['fe_status'], '.1f')}",
        "- first call in a fresh process (after the cold start), plain"
        f" `control.ping(timeout=1)`: {_list(results['cold']['plain_status'], '.1f')}",
        "",
        "### First submit → first result on a fresh app (s, every sample)",
        "",
        "flask-execute: from `submit()` on a freshly imported app, whose first submit starts"
        " its local worker and waits until it is ready, to `result()`. Plain: from spawning"
        " `celery worker` (then `delay()` at once) to `get()`. Both in a fresh process.",
        "",
        f"- flask-execute: {_list(results['cold']['fe'], '.2f')}",
        f"- plain Celery: {_list(results['cold']['plain'], '.2f')}",
        "",
        "### `map` cost growth (one fresh process per size; memory from /proc/self/status)",
        "",
        "No chunksize argument unless the column gives one (— : `map` picks it; the"
        " orchestrator's worker advertises concurrency 2). Time: the median of the runs,"
        " with the web process's CPU time in that run (all threads: the result watcher's"
        " work is in); memory: around the first run.",
        "",
        "| calls | chunksize | runs | submit s | collect s | total s | µs / call |"
        " web CPU µs / call | peak RSS | peak - baseline | per call |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for g in results["growth"]:
        grown = (g["peak_rss_kb"] - g["base_rss_kb"]) * 1024
        out.append(
            f"| {g['size']:,} | {g['chunksize'] or '—'} | {g['repeat']} | {g['submit_s']:.2f} |"
            f" {g['collect_s']:.2f} |"
            f" {g['total_s']:.2f} | {g['total_s'] / g['size'] * 1e6:.0f} |"
            f" {g['cpu_s'] / g['size'] * 1e6:.0f} |"
            f" {g['peak_rss_kb'] / 1024:.1f} MiB | {grown / 2**20:.1f} MiB |"
            f" {grown / g['size']:,.0f} B |"
        )
    out += [
        "",
        "### Memory held per pending call",
        "",
        "The calls go to a queue no worker consumes, so every one is pending while measured"
        " (no worker advertises that queue's concurrency: `map` picks its chunk size from"
        " this host's CPU count, as it does before any worker advertised)."
        " Python heap: bytes still allocated after the submit returned (tracemalloc, started"
        " just before it), per call. RSS: growth of the process's resident memory over the"
        " same span, per call (includes freed-but-kept allocator memory).",
        "",
        "| side | calls | chunksize | pending | Python heap / call | RSS / call |",
        "|---|---|---|---|---|---|",
    ]
    for p in results["parked"]:
        heap, rss = _per_pending(p)
        side = "flask-execute `map`" if p["side"] == "fe" else "plain `apply_async` loop"
        out.append(
            f"| {side} | {p['size']:,} | {p['chunksize'] or '—'} | {p['pending']:,} |"
            f" {heap:,.0f} B | {rss:,.0f} B |"
        )
    c = results["codec"]
    out += [
        "",
        "### Signing and serialization per call, isolated (µs, median)",
        "",
        "In-process, no Redis. Each step is also timed alone in a tight loop; on this"
        " machine the three in sequence cost more than the sum of the three alone (the first"
        " row is the figure to use).",
        "",
        "| step | µs |",
        "|---|---|",
        f"| flask-execute call: `dump_call` + `Codec.seal` + `Codec.open` | {c['fe_call']:.1f} |",
        f"| … `dump_call` (cloudpickle of `(add, (i, i), {{}})`) | {c['dump_call']:.1f} |",
        f"| … `Codec.seal` (header JSON, base64, HMAC-SHA256) | {c['seal']:.1f} |",
        f"| … `Codec.open` (parse, checks, constant-time MAC compare) | {c['open']:.1f} |",
        f"| flask-execute result: pickle + seal + open + unpickle | {c['fe_result']:.1f} |",
        f"| plain Celery call body: kombu JSON dumps + loads | {c['plain_call']:.1f} |",
        f"| plain Celery result meta: kombu JSON dumps + loads | {c['plain_result']:.1f} |",
    ]
    if "crypt_call" in c:
        out += [
            f"| `CELERY_ENCRYPT` call: `dump_call` + seal + open, AES-GCM both ways |"
            f" {c['crypt_call']:.1f} |",
            f"| `CELERY_ENCRYPT` result: pickle + seal + open + unpickle |"
            f" {c['crypt_result']:.1f} |",
        ]
    return out


def _dask_versions(results: dict[str, t.Any]) -> str:
    dask = results.get("dask") or {}
    if dask.get("versions"):
        v = dask["versions"]
        return f"Dask {v['dask']}, distributed {v['distributed']}"
    return f"Dask not measured ({dask.get('missing') or 'not run'})"


def _list(values: list[float], spec: str) -> str:
    return ", ".join(format(v, spec) for v in values)
