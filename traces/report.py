"""Report: latency percentiles, throughput, goodput and SLO attainment, from exact samples.

Definitions (DESIGN.md): TTFT = first token - intended send time; TPOT =
(E2E - TTFT) / (output tokens - 1); ITL = gaps between consecutive tokens of a
request; E2E = finish - intended send time; queueing = admission - arrival.
Latencies are over completed requests. Goodput counts requests per second
that completed and met every given SLO; SLO attainment is their share of all
requests, so rejections, time-outs and failures count as misses.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from traces.records import RunResult

QUANTILES = (50, 90, 95, 99)


def weighted_percentiles(values: np.ndarray, weights: np.ndarray, qs=QUANTILES) -> list[float]:
    """Percentiles (linear interpolation) of the sample that repeats values[i] weights[i] times."""
    keep = weights > 0
    values, weights = values[keep], weights[keep]
    if not len(values):
        return [math.nan] * len(qs)
    order = np.argsort(values, kind="stable")
    v, cw = values[order], np.cumsum(weights[order])
    n = int(cw[-1])
    out = []
    for q in qs:
        h = (n - 1) * q / 100.0
        lo = int(math.floor(h))
        hi = min(lo + 1, n - 1)
        a = v[np.searchsorted(cw, lo, side="right")]
        b = v[np.searchsorted(cw, hi, side="right")]
        out.append(float(a + (h - lo) * (b - a)))
    return out


def _dist(x: np.ndarray) -> dict[str, float]:
    x = x[np.isfinite(x)]
    if not len(x):
        return {"n": 0, "mean": math.nan, **{f"p{q}": math.nan for q in QUANTILES}}
    ps = np.percentile(x, QUANTILES)
    return {"n": int(len(x)), "mean": float(x.mean()), **{f"p{q}": float(p) for q, p in zip(QUANTILES, ps)}}


def request_metrics(rec: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per-request TTFT, TPOT, E2E and queueing (NaN where undefined)."""
    arrival = rec["arrival"]
    ttft = rec["first_token"] - arrival
    e2e = rec["finish"] - arrival
    out = rec["generated_tokens"].astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        tpot = np.where(out > 1, (e2e - ttft) / (out - 1), np.nan)
    queue = rec["admitted"] - arrival
    ok = rec["status"] == "ok"
    nan = np.nan
    return {"ttft": np.where(ok, ttft, nan), "tpot": np.where(ok, tpot, nan),
            "e2e": np.where(ok, e2e, nan), "queueing": queue}


def summarize(result: RunResult, slo=None) -> dict[str, Any]:
    rec = result.records
    m = request_metrics(rec)
    n = result.n
    counts = result.status_counts()
    duration = max(result.end - result.start, 1e-12)
    ok = rec["status"] == "ok"
    gen = int(rec["generated_tokens"][ok].sum())
    itl = {"n": result.itl.count(), "mean": result.itl.mean()}
    itl.update({f"p{q}": p for q, p in zip(QUANTILES, result.itl.quantiles(QUANTILES))})
    met = ok.copy()
    slo_d = {}
    if slo is not None:
        for k in ("ttft", "tpot", "e2e"):
            lim = getattr(slo, k)
            if lim is not None:
                slo_d[k] = lim
                v = m[k]
                # a one-token request has no TPOT: it cannot miss that SLO
                met &= (v <= lim) | (np.isnan(v) & (k == "tpot"))
    nmet = int(met.sum())
    queries = sum(r.prefix_queries for r in result.replicas)
    hits = sum(r.prefix_hits for r in result.replicas)
    return {
        "requests": n,
        **counts,
        "duration_s": duration,
        "ttft": _dist(m["ttft"]),
        "tpot": _dist(m["tpot"]),
        "itl": itl,
        "e2e": _dist(m["e2e"]),
        "queueing": _dist(m["queueing"]),
        "throughput_rps": counts["ok"] / duration,
        "output_tokens_per_s": gen / duration,
        "slo": slo_d,
        "goodput_rps": nmet / duration,
        "slo_attainment": nmet / n if n else math.nan,
        "prefix_cache_queries": queries,
        "prefix_cache_hits": hits,
        "prefix_hit_rate": hits / queries if queries else 0.0,
        "cached_prompt_tokens": int(rec["cached_tokens"].sum()),
        **_result_cache(rec, n),
        **({"sessions": sess} if (sess := session_summary(rec)) else {}),
        "preemptions": int(sum(r.preemptions for r in result.replicas)),
        "replicas": [
            {"replica": i, "utilisation": r.busy_time / duration, "steps": r.steps, "tokens": r.tokens,
             "preemptions": r.preemptions, "kv_blocks": r.kv_blocks,
             "prefix_hit_rate": r.prefix_hits / r.prefix_queries if r.prefix_queries else 0.0}
            for i, r in enumerate(result.replicas)
        ],
        "reasons": _reasons(rec),
        **({"gpu_tasks": result.meta["gpu_tasks"]} if "gpu_tasks" in result.meta else {}),
        "meta": {k: v for k, v in result.meta.items() if k != "gpu_tasks"},
    }


def _result_cache(rec: dict[str, np.ndarray], n: int) -> dict[str, Any]:
    """Requests answered by a result cache in front of the engines (records column result_cache_hit)."""
    col = rec.get("result_cache_hit")
    hits = int(col.sum()) if col is not None else 0
    return {"result_cache_hits": hits, "result_cache_hit_rate": hits / n if n else 0.0}


def session_summary(rec: dict[str, np.ndarray]) -> dict[str, Any] | None:
    """Agent sessions (rows with a session id): task completion time = last finish - first intended send,
    over sessions whose every call completed; calls per session; per-session prefix-cache reuse = cached
    prompt tokens / prompt tokens over its calls."""
    sid = rec.get("session_id")
    if sid is None:
        return None
    mask = sid != ""
    if not mask.any():
        return None
    ids, inv = np.unique(sid[mask].astype(str), return_inverse=True)
    k = len(ids)
    calls = np.bincount(inv, minlength=k)
    bad = np.bincount(inv, weights=(rec["status"][mask] != "ok").astype(np.float64), minlength=k)
    first = np.full(k, np.inf)
    np.minimum.at(first, inv, rec["arrival"][mask])
    last = np.full(k, -np.inf)
    np.maximum.at(last, inv, np.nan_to_num(rec["finish"][mask], nan=-np.inf))
    inp = np.bincount(inv, weights=rec["input_tokens"][mask].astype(np.float64), minlength=k)
    cached = np.bincount(inv, weights=rec["cached_tokens"][mask].astype(np.float64), minlength=k)
    done = bad == 0
    return {
        "sessions": int(k),
        "completed": int(done.sum()),
        "incomplete": int(k - done.sum()),
        "task_completion_s": _dist(np.where(done, last - first, np.nan)),
        "calls_per_session": _dist(calls.astype(np.float64)),
        "cache_reuse": _dist(np.where(inp > 0, cached / np.maximum(inp, 1), np.nan)),
        "cache_reuse_overall": float(cached.sum() / inp.sum()) if inp.sum() else 0.0,
    }


def _reasons(rec: dict[str, np.ndarray]) -> dict[str, int]:
    out: dict[str, int] = {}
    for st, why in zip(rec["status"], rec["reason"]):
        if st != "ok":
            key = f"{st}: {why}"
            out[key] = out.get(key, 0) + 1
    return out


def _ms(x: float) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x * 1e3:,.1f}"


def render(summary: dict[str, Any], title: str = "twinfer report"):
    """A rich renderable: the latency table and a compact summary."""
    from rich.console import Group
    from rich.table import Table

    lat = Table(title=title, title_justify="left")
    lat.add_column("latency (ms)")
    for c in ("mean", "p50", "p90", "p95", "p99", "n"):
        lat.add_column(c, justify="right")
    for key, label in (("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL"), ("e2e", "E2E"), ("queueing", "queueing")):
        d = summary[key]
        lat.add_row(label, *(_ms(d[c]) for c in ("mean", "p50", "p90", "p95", "p99")), f"{d['n']:,}")

    s = Table(show_header=False, box=None, pad_edge=False)
    s.add_column(style="bold")
    s.add_column()
    s.add_row("requests", f"{summary['requests']:,}: {summary['ok']:,} ok, {summary['rejected']:,} rejected, "
                          f"{summary['timed_out']:,} timed out, {summary['failed']:,} failed")
    s.add_row("duration", f"{summary['duration_s']:,.1f} s")
    s.add_row("throughput", f"{summary['throughput_rps']:,.2f} req/s, {summary['output_tokens_per_s']:,.0f} output tok/s")
    if summary["slo"]:
        slo = ", ".join(f"{k} <= {v * 1e3:g} ms" for k, v in summary["slo"].items())
        s.add_row("SLO", slo)
        s.add_row("goodput", f"{summary['goodput_rps']:,.2f} req/s, attainment {summary['slo_attainment']:.1%}")
    s.add_row("prefix cache", f"{summary['prefix_hit_rate']:.1%} of prompt tokens hit "
                              f"({summary['cached_prompt_tokens']:,} tokens at first admission)")
    meta = summary.get("meta") or {}
    rc = meta.get("result_cache")
    if rc:
        acked = ", ".join(f"{v:,} to {k}" for k, v in rc.get("writes_acked", {}).items())
        s.add_row("result cache", f"{summary['result_cache_hit_rate']:.1%} of requests answered by it "
                                  f"({rc['hits']:,} hits / {rc['lookups']:,} lookups, {rc['uncacheable']:,} "
                                  f"uncacheable); writes acknowledged by replicas: {acked or '-'}")
    sess = summary.get("sessions")
    if sess:
        tct = sess["task_completion_s"]
        s.add_row("sessions", f"{sess['sessions']:,} ({sess['completed']:,} completed); task completion p50 "
                              f"{tct['p50']:.2f} s, p99 {tct['p99']:.2f} s; {sess['calls_per_session']['mean']:.1f} "
                              f"calls each; prefix reuse {sess['cache_reuse_overall']:.1%} of prompt tokens")
    fl = meta.get("faults")
    if fl:
        s.add_row("faults", f"{sum(fl['crashes'])} crash(es), {sum(fl['downtime_s']):,.0f} replica-s down; "
                            f"{fl['requests_retried']:,} requests re-routed ({fl['retries']:,} retries), "
                            f"{fl['failed_by_crash']:,} failed by a crash")
    pl = meta.get("placement")
    if pl:
        un = "; ".join(f"{u['replica']}: {u['reason']}" for u in pl["unplaced"]) or "none"
        s.add_row("placement", f"{len(pl['placed'])} replica(s) of {pl['replica_memory_gib']:.1f} GiB on "
                               f"{pl['devices']} device(s); unplaced: {un}")
    mem = meta.get("memory")
    if mem and "reclaimed_blocks" in mem:
        s.add_row("KV reclaim", f"{sum(mem['reclaimed_blocks']):,} cached blocks reclaimed above "
                                f"{mem['reclaim_high']:.0%} (down to {mem['reclaim_low']:.0%})")
    gt = summary.get("gpu_tasks")
    if gt:
        u = gt["utilisation"]
        s.add_row("GPU tasks", f"{gt['count']:,} on {len(u)} device(s); wait p50 {_ms(gt['wait_s']['p50'])} ms, "
                               f"p99 {_ms(gt['wait_s']['p99'])} ms; latency p50 {_ms(gt['latency_s']['p50'])} ms, "
                               f"p99 {_ms(gt['latency_s']['p99'])} ms; finish error {_ms(gt['finish_error_s'])} ms; "
                               f"utilisation {', '.join(f'{x:.0%}' for x in u)}")
    s.add_row("preemptions", f"{summary['preemptions']:,}")
    util = [r["utilisation"] for r in summary["replicas"]]
    if util:
        s.add_row("utilisation", f"mean {np.mean(util):.1%}, min {min(util):.1%}, max {max(util):.1%} "
                                 f"over {len(util)} replica(s)")
    for why, c in sorted(summary["reasons"].items(), key=lambda kv: -kv[1])[:5]:
        s.add_row("not ok", f"{c:,} x {why}")
    return Group(lat, s)


def write_outputs(result: RunResult, summary: dict[str, Any], out: str | Path) -> list[Path]:
    """summary.json and records.csv under `out` (created)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sp, rp = out / "summary.json", out / "records.csv"
    sp.write_text(to_json(summary) + "\n")
    result.write_csv(rp)
    return [sp, rp]


def to_json(summary: dict[str, Any]) -> str:
    """Strict JSON: NaN and infinities (undefined metrics) become null."""
    return json.dumps(_clean(summary), indent=2, default=_json_default, allow_nan=False)


def _clean(o: Any) -> Any:
    if isinstance(o, dict):
        return {k: _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    if isinstance(o, (float, np.floating)):
        return float(o) if math.isfinite(o) else None
    return o


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)
