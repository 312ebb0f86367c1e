"""Summary statistics of a workload, as a JSON-able dict and as a rich table.

Definitions (so numbers can be checked against a trace's published figures):
- span: last arrival - first arrival; mean rate: (n - 1) / span, i.e. one
  over the mean inter-arrival gap;
- inter-arrival CV: population std / mean of the n - 1 gaps;
- busiest minute: most arrivals in a 60 s bin, bins counted from the first
  arrival ([t0, t0 + 60), ...);
- percentiles: numpy's linear interpolation on the exact samples;
- prefix block reuse: over all block ids in arrival order, the share already
  seen in an earlier position (of this or an earlier request), i.e. the hit
  rate of an infinite prefix cache at trace block granularity.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
from rich.table import Table

from traces.workload import Workload


def _dist(x: np.ndarray) -> dict[str, float] | None:
    if len(x) == 0:
        return None
    p50, p90, p99 = np.percentile(x, [50, 90, 99]).tolist()
    return {"mean": float(x.mean()), "p50": p50, "p90": p90, "p99": p99, "min": int(x.min()), "max": int(x.max())}


def compute_stats(w: Workload) -> dict[str, Any]:
    """Request count, timing, lengths, prefix reuse, sessions and data-quality notes of `w`."""
    n = len(w)
    a = w.arrival
    span = w.span
    s: dict[str, Any] = {"name": w.name, "format": w.meta.get("format"), "requests": n, "span_s": span}
    gaps = np.diff(a)
    s["mean_rate"] = (n - 1) / span if span > 0 else None
    s["interarrival_cv"] = float(gaps.std() / gaps.mean()) if len(gaps) and gaps.mean() > 0 else None
    if n:
        counts = np.bincount(((a - a[0]) // 60.0).astype(np.int64))
        k = int(counts.argmax())
        s["busiest_minute"] = {"count": int(counts[k]), "start_s": float(a[0] + 60.0 * k)}
    else:
        s["busiest_minute"] = None
    s["input_tokens"] = _dist(w.input_tokens)
    s["output_tokens"] = _dist(w.output_tokens)

    if w.block_hashes is not None:
        # Positions seen before = all positions - first occurrences (one per distinct id).
        total = sum(map(len, w.block_hashes))
        try:
            unique = len(np.unique(np.fromiter(itertools.chain.from_iterable(w.block_hashes), np.int64, total)))
        except OverflowError:  # ids beyond int64 (not from our loaders): count them in Python
            unique = len(set(itertools.chain.from_iterable(w.block_hashes)))
        s["prefix"] = {"block_tokens": w.hash_block_size, "blocks": total, "distinct": unique,
                       "reuse": (total - unique) / total if total else None}
    if w.session_id is not None:
        sizes = np.array(list(_session_sizes(w.session_id).values()), dtype=np.int64)
        s["sessions"] = {"count": len(sizes), "calls_mean": float(sizes.mean()) if len(sizes) else None,
                         "calls_max": int(sizes.max()) if len(sizes) else None,
                         "no_session": sum(1 for x in w.session_id if x is None)}

    notes: dict[str, Any] = {}
    z = w.meta.get("zero_tokens")
    if z:
        for kind in ("input", "output"):
            if z[kind]["rows"]:
                notes[f"zero_{kind}_rows"] = f"{z[kind]['rows']} ({z[kind]['policy']})"
        if z.get("dropped_rows"):
            notes["dropped_rows"] = z["dropped_rows"]
    for key in ("out_of_order_rows", "empty_outputs"):
        if w.meta.get(key):
            notes[key] = w.meta[key]
    if w.meta.get("empty_files"):
        notes["empty_files"] = len(w.meta["empty_files"])
    if "tokens_estimated" in w.meta:
        notes["tokens_estimated"] = w.meta["tokens_estimated"]
    if "arrivals" in w.meta:
        arr = w.meta["arrivals"]
        notes["synthetic_arrivals"] = f"{arr['process']} {arr['rate']} req/s, cv {arr['cv']}, seed {arr['seed']}"
    s["notes"] = notes
    return s


def _session_sizes(session_id: Any) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for sid in session_id:
        if sid is not None:
            sizes[sid] = sizes.get(sid, 0) + 1
    return sizes


def _fmt(x: Any, digits: int = 2) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:,.{digits}f}"
    if isinstance(x, int):
        return f"{x:,}"
    return str(x)


def render_stats(stats: dict[str, Any]) -> Table:
    """A two-column rich table of `compute_stats` output."""
    t = Table(title=f"workload {stats['name']}" + (f" ({stats['format']})" if stats.get("format") else ""),
              show_header=False)
    t.add_column("what", style="bold")
    t.add_column("value", justify="right")
    t.add_row("requests", _fmt(stats["requests"]))
    t.add_row("span", f"{_fmt(stats['span_s'], 1)} s")
    t.add_row("mean rate", "-" if stats["mean_rate"] is None else f"{stats['mean_rate']:,.2f} req/s")
    t.add_row("inter-arrival CV", _fmt(stats["interarrival_cv"]))
    bm = stats["busiest_minute"]
    if bm:
        t.add_row("busiest minute", f"{bm['count']:,} req from t={bm['start_s']:,.0f} s")
    for key in ("input_tokens", "output_tokens"):
        d = stats[key]
        if d:
            t.add_row(key.replace("_", " "), f"mean {d['mean']:,.0f}  p50 {d['p50']:,.0f}  "
                      f"p90 {d['p90']:,.0f}  p99 {d['p99']:,.0f}  max {d['max']:,}")
    if "prefix" in stats:
        p = stats["prefix"]
        reuse = "-" if p["reuse"] is None else f"{100 * p['reuse']:.1f}%"
        t.add_row("prefix blocks seen before", f"{reuse} of {p['blocks']:,} ({p['block_tokens']}-token blocks)")
    if "sessions" in stats:
        ss = stats["sessions"]
        t.add_row("sessions", f"{ss['count']:,}, calls/session mean {_fmt(ss['calls_mean'], 1)} "
                  f"max {_fmt(ss['calls_max'])}")
    for k, v in stats.get("notes", {}).items():
        t.add_row(k.replace("_", " "), _fmt(v), style="yellow")
    return t
