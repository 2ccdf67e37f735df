"""The summary rows of issue 14's targets: ``map`` without ``chunksize`` against plain
Celery (``delay()`` loop, ``group``, ``chunks``) and Dask, its first result, the round
trip, and cost and memory per call from 1k to 100k calls, all without ``chunksize``.

Every row names its target and issue; :mod:`bench.report` places them in the table.
"""

from __future__ import annotations

import itertools
import typing as t

from bench.report import med
from bench.report import pct
from bench.report import Row

if t.TYPE_CHECKING:
    from bench.runner import Plan

__all__ = ["FLAT", "KB2", "first_text", "rows"]

#: issue 14: each 10x step of the calls may cost at most this much more per call
FLAT = 1.15
#: issue 14: web-process memory per pending future
KB2 = 2048
#: issue 14: the first result within this share of the whole map's time
FIRST_SHARE = 0.10
#: issue 14: round trip p50 against plain Celery's
ROUND_TRIP = 1.05


def _total(runs: list[dict[str, t.Any]]) -> float:
    return med(r["total_s"] for r in runs)


def _first(runs: list[dict[str, t.Any]]) -> float:
    return med(r["first_s"] for r in runs)


def _rate(n: int, seconds: float) -> str:
    return f"{seconds:.2f} s ({n / seconds:,.0f}/s)"


def first_text(runs: list[dict[str, t.Any]]) -> str:
    first, total = _first(runs), _total(runs)
    return f"{first:.3f} s of {total:.2f} s ({first / total:.1%})"


def rows(results: dict[str, t.Any], plan: Plan) -> list[Row]:
    out = [_round_trip(results)]
    out += _maps(results, plan)
    out += _growth(results["growth"])
    out += _parked(results["parked"])
    return out


def _round_trip(results: dict[str, t.Any]) -> Row:
    rt = results["roundtrip"]
    fe50, pl50 = pct(rt["fe_ms"], 50), pct(rt["plain_ms"], 50)
    return Row(
        f"Round trip p50, `submit(add, i, i).result()` vs `add.delay(i, i).get()`"
        f" ({len(rt['fe_ms'])} each)",
        f"{fe50:.2f} ms",
        f"{pl50:.2f} ms",
        f"{fe50 / pl50:.2f}x time",
        f"≤ {ROUND_TRIP}x time (issue 14)",
        fe50 / pl50 <= ROUND_TRIP,
    )


def _maps(results: dict[str, t.Any], plan: Plan) -> list[Row]:
    m = results["map"]
    n, c = plan.map_n, plan.map_chunksize
    fe = _total(m["fe"])
    loop, grp, chunks = (_total(m[k]) for k in ("plain_loop", "plain_group", "plain_chunks"))
    head = f"`map` of {n:,}, no chunksize,"
    out = [
        Row(
            f"{head} vs a `delay()` loop then `get()` each",
            _rate(n, fe),
            _rate(n, loop),
            f"{loop / fe:.2f}x faster",
            "≥ 10x faster (issue 14; issue 6: ≥ 3x)",
            loop / fe >= 10,
        ),
        Row(
            f"{head} vs Celery's own `add.chunks(calls, {c}).apply_async().get()`",
            _rate(n, fe),
            _rate(n, chunks),
            f"{chunks / fe:.2f}x faster",
            "≥ 3x faster (issue 14)",
            chunks / fe >= 3,
        ),
        Row(
            f"{head} vs `group(...).apply_async().get()`",
            _rate(n, fe),
            _rate(n, grp),
            f"{grp / fe:.2f}x faster",
            "— (reported, issue 14)",
            None,
        ),
    ]
    dask = results.get("dask", {})
    dask_label = f"{head} vs Dask `LocalCluster` (2 worker processes) `client.map` + `gather`"
    if "dask" in m:
        dk = _total(m["dask"])
        out.append(
            Row(
                dask_label,
                _rate(n, fe),
                _rate(n, dk) + " (Dask)",
                f"{dk / fe:.2f}x faster",
                "ahead: > 1x faster (issue 14)",
                dk / fe > 1,
            )
        )
    else:
        why = dask.get("missing") or "not run"
        out.append(Row(dask_label, _rate(n, fe), f"not measured: {why}", "—", "ahead (issue 14)",
                       None))  # fmt: skip
    stream = m["fe_stream"]
    share = _first(stream) / _total(stream)
    out.append(
        Row(
            f"{head} the `map` call to its FIRST result (`pool.as_completed()`), of the"
            " whole map (the same run, collected through `as_completed`)",
            first_text(stream),
            f"{first_text(m['plain_loop'])} (`delay()` loop: first `get()`)",
            f"{share:.1%} of the whole map",
            f"≤ {FIRST_SHARE:.0%} (issue 14)",
            share <= FIRST_SHARE,
        )
    )
    peers = [
        f"Celery `chunks` (first chunk's `get()`): {first_text(m['plain_chunks'])}",
        f"`group` (first member's `get()`): {first_text(m['plain_group'])}",
    ]
    if "dask_stream" in m:
        peers.insert(0, f"Dask `as_completed`: {first_text(m['dask_stream'])}")
    out.append(
        Row(
            f"{head} first result, the peers (each from its own recipe's run)",
            f"{_first(stream):.3f} s",
            "; ".join(peers),
            "—",
            "—",
            None,
        )
    )
    out.append(
        Row(
            f"{head} collected through `as_completed` vs `pool.result()` (reference)",
            _rate(n, _total(stream)),
            f"{_rate(n, fe)} (flask-execute `pool.result()`)",
            f"{_total(stream) / fe:.2f}x time",
            "—",
            None,
        )
    )
    return out


def _growth(growth: list[dict[str, t.Any]]) -> list[Row]:
    if not growth:
        return []
    sizes = " / ".join(f"{g['size'] // 1000}k" for g in growth)
    chunks = "/".join(sorted({str(g["chunksize"]) for g in growth}))
    label = "no chunksize" if chunks == "None" else f"chunksize={chunks}"
    out = []
    for what, key in (("time per call", "total_s"), ("web-process CPU per call", "cpu_s")):
        per_call = [g[key] / g["size"] * 1e6 for g in growth]
        steps = [b / a for a, b in itertools.pairwise(per_call)]
        out.append(
            Row(
                f"`map` cost {sizes} calls ({label}, a fresh process each): {what}",
                " / ".join(f"{x:.0f} µs" for x in per_call),
                "—",
                "step " + " / ".join(f"{x:.2f}x" for x in steps),
                f"flat: each step ≤ {FLAT}x (issue 14)",
                all(x <= FLAT for x in steps),
            )
        )
    per_mem = [(g["peak_rss_kb"] - g["base_rss_kb"]) * 1024 / g["size"] for g in growth]
    mem_steps = [b / a for a, b in itertools.pairwise(per_mem) if a > 0]
    out.append(
        Row(
            f"`map` cost {sizes} ({label}): peak web-process RSS over baseline, per call",
            " / ".join(f"{x:,.0f} B" for x in per_mem)
            + " ("
            + " / ".join(f"{g['peak_rss_kb'] / 1024:.0f}" for g in growth)
            + " MiB)",
            "—",
            "step " + " / ".join(f"{x:.2f}x" for x in mem_steps),
            "linear: each step ≤ 1.25x (issue 6)",
            all(x <= 1.25 for x in mem_steps),
        )
    )
    return out


def _per_pending(p: dict[str, t.Any]) -> tuple[float, float]:
    return p["traced_bytes"] / p["size"], p["rss_bytes"] / p["size"]


def _parked(parked: list[dict[str, t.Any]]) -> list[Row]:
    out = []
    plain = {p["size"]: p for p in parked if p["side"] == "plain"}
    for p in (p for p in parked if p["side"] == "fe"):
        heap, rss = _per_pending(p)
        ref = plain.get(p["size"])
        label = f"chunksize={p['chunksize']}" if p["chunksize"] else "no chunksize"
        theirs = "—"
        ratio = "—"
        if ref is not None:
            ref_heap, ref_rss = _per_pending(ref)
            theirs = f"{ref_heap:,.0f} B / {ref_rss:,.0f} B (`AsyncResult`)"
            ratio = f"{heap / ref_heap:.2f}x heap"
        out.append(
            Row(
                f"Web-process memory per pending future, `map` of {p['size']:,}, {label}"
                " (Python heap / RSS)",
                f"{heap:,.0f} B / {rss:,.0f} B",
                theirs,
                ratio,
                "≤ 2 KB heap (issue 14; issue 6: ≤ 4 KB)",
                heap <= KB2,
            )
        )
    return out
