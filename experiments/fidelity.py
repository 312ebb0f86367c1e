"""Fidelity: how far the simulator's predictions are from the executor's measurements.

1. Profile the executor's model runner on a grid of synthetic step shapes (`twinfer profile`'s code)
   and fit the cost model. No trace-driven step is used for the fit: every cell below is held out.
2. For each cell of  2 real traces x 3 load levels x 2 scheduler settings x 2 routers,  on 2 replicas,
   run the same workload and configuration in the simulator (fitted profile) and on the executor in
   real time (executor.replay.run_workload: one worker process per replica, 1 torch thread each), and
   compare p50/p99 TTFT, TPOT and E2E and throughput (`twinfer validate`'s code).
   With the drift check (default on the CPU, off on CUDA; `--no-drift-check` / `--drift-check`),
   `twinfer validate`'s code times a few reference shapes of the profile's own grid right before and
   right after each cell's replay, alone
   in this process, and scales the simulator's step times by the geometric mean of now / profiled: the
   machine's speed at the time of the cell (this CPU's drifts by 10 % and more between cells), measured
   without looking at the cell's own steps. The uncorrected prediction is kept next to it.
   With the co-located drift check (`--busy-drift-check`, off by default),
   the same shapes are timed again beside a neighbour process running the profile's decode batches (after
   a 6 s warm-up), against the profile's medians beside the same, and the contention factors are scaled
   by busy / alone: on a VM, how much
   two busy cores slow each other moves by itself (measured: the same plans 20-35 % slower on one day
   while the alone check read 0.87-1.12). The alone-only correction is kept next to it.
   With the loop drift check (`--loop-drift-check`, on by default where the drift check is: the CPU), a
   short mix of requests with the cell's trace's prompt and output lengths, under the cell's scheduler,
   router and arrivals (`--loop-mix cell`: from run Z3 on, gaps drawn from the slice's own inter-arrival
   gaps, `--loop-arrivals gaps`; none of its outcomes) is replayed on the replicas
   right before and right after each cell, and the
   prediction scaled by the pace of its steps against the cost model, before and after each cell, is the
   headline, the reference-shape check's beside it (sim.calibrate.loop_pace: the replicas' processes, shared
   cores and serving loop, where the reference shapes are timed alone in this process; in four full runs it
   read the cells' pace better every time). The check read by kind is reported beside it: decode-only steps
   scaled by its decode steps' pace, steps with prefill tokens by its prefill and mixed steps'
   (sim.calibrate.kind_corrected); rescored over nine full runs it did no better than the single factor.
   With `--repeat N` each cell runs N times on the executor; the errors are against the median of the runs,
   and the report adds how far one real run of a cell is from another (the floor under any prediction).
3. Print the error table (the drift-corrected prediction when the check is on) with the median and worst
   cell per metric, the median |error| with and without the correction, and two diagnostics per cell:
   "steps real/pred", the executor's own steps against the profile's prediction for their exact
   shapes (>1: the machine ran slower than when profiled, e.g. other processes on its cores), and
   "|err| at real pace", the median latency error of the simulator re-run with its steps scaled by
   that ratio (what is left when the step-time level is right: scheduling, routing, overheads).
   Last, how far each check's factor was from the pace the cells' steps actually ran at.
   experiments/diag_ttft.py takes one cell apart request by request.

The two replicas share the 2-core CPU (one torch thread each), so each can slow the other down, by an
amount that depends on what the other runs: the profile (`--concurrent 2`) measures every shape alone
and beside a neighbour process running each kind of step (few-sequence decodes, decode batches,
prefills; and random grid shapes), the conditions interleaved round by round; the simulator then times
every step by what the other replica has in progress when it starts (sim.contention.ContentionCost).
Profiles without that measurement fall back to the busy-neighbour blend (sim.calibrate.neighbour_share).

Other sessions' processes on the machine: Linux autogroup scheduling shares the CPU between sessions
first, so their nice 19 does not make them yield to this run (measured: with a neighbour replica and
one niced process from another session busy, steps took 2 to 3 times as long). By default this
script sets its own session's autogroup nice to -19 (`--group-nice`), which gives its profiling and
replays the priority nice 19 meant to give them; children (the replica processes) share it. Other
load still takes a core a replica leaves idle; each cell reports the share of the machine niced
processes used during its replay.

Traces: Azure LLM inference 2023 conversation (decode-heavy) and code (prefill-heavy), a slice of
consecutive requests each (from ../shared/traces when present, else the vendored test slices),
arrivals rate-scaled to the executor's capacity. Requests longer than the model's positions are left
out of both sides. Loads are shares of a saturation rate the fitted simulator gives for the slice
(all requests at once: requests / makespan).

    python experiments/fidelity.py --quick      # 1 scheduler x 1 router: 6 cells, a few minutes
    python experiments/fidelity.py              # all 24 cells (about an hour on 2 cores with the default checks)
    python experiments/fidelity.py --profile p.toml --out results/   # reuse a profile; write JSON
    python experiments/fidelity.py --repeat 2 --out results/   # two real runs per cell: the executor against itself
    python experiments/fidelity.py --budget 8 --out results/   # the cells that fit 8 minutes, interleaved
    python experiments/fidelity.py --device cuda --model /models/llama --out fid-gpu/   # 2 replicas on one GPU
    # one cell (the four filters pick the cells):
    python experiments/fidelity.py --profile p.toml --traces azure-conv --loads light --schedulers chunked-512 --routers least_outstanding
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from policies.scheduler import SchedulerConfig  # noqa: E402
from sim.calibrate import SAMPLING_LEVEL, read_profile_file, save_profile_file  # noqa: E402
from sim.calibrate_cli import LOOP_ARRIVALS, LOOP_MIXES  # noqa: E402
from sim.cluster import simulate  # noqa: E402
from sim.config import SimConfig  # noqa: E402
from traces import transforms  # noqa: E402
from traces.loaders import load_trace  # noqa: E402
from traces.workload import Workload  # noqa: E402

SHARED = ROOT.parent / "shared" / "traces" / "azure2023"
VENDORED = ROOT / "tests" / "data" / "azure2023"
TRACES = {"azure-conv": "AzureLLMInferenceTrace_conv", "azure-code": "AzureLLMInferenceTrace_code"}
LOADS = {"light": 0.3, "70%": 0.7, "near-sat": 0.9}
SCHEDULERS = {
    "chunked-512": {"kind": "continuous", "chunked_prefill": True, "max_num_batched_tokens": 512, "max_num_seqs": 32},
    "prefill-first": {"kind": "continuous", "chunked_prefill": False, "max_num_batched_tokens": 2048,
                      "max_num_seqs": 32},
}
ROUTERS = ("least_outstanding", "round_robin")
PACE_MOVED = 0.10  # a cell whose steps' pace moved this much between quarters of its run (pace_swing_summary)
REPORT_WIDTH = 200  # the table's 16 columns: narrower, rich cuts the trace, scheduler and summary labels
METRICS = (("ttft.p50", "TTFT p50"), ("tpot.p50", "TPOT p50"), ("e2e.p50", "E2E p50"), ("ttft.p99", "TTFT p99"),
           ("tpot.p99", "TPOT p99"), ("e2e.p99", "E2E p99"), ("throughput_rps", "tput"))


def trace_slice(name: str, n: int, offset: int, max_position: int, length_scale: float) -> Workload:
    stem = TRACES[name]
    full = SHARED / f"{stem}.csv"
    path = full if full.is_file() else VENDORED / f"{stem}.head300.csv"
    w = load_trace(path)
    if not full.is_file():
        if offset > 0:
            print(f"{full} not found: {name} comes from the vendored {path.relative_to(ROOT)} (the trace's first "
                  f"{len(w)} requests), from request 0 instead of --offset {offset}: not the slice the runs in "
                  "experiments/FIDELITY.md used", file=sys.stderr, flush=True)
        offset = 0
    if length_scale != 1.0:
        w = dataclasses.replace(w, input_tokens=np.maximum(1, np.round(w.input_tokens * length_scale)).astype(np.int64),
                                output_tokens=np.maximum(1, np.round(w.output_tokens * length_scale)).astype(np.int64))
    fits = np.flatnonzero(w.input_tokens + w.output_tokens - 1 <= max_position)
    fits = fits[fits >= offset][:n]
    w = w.take(fits, name=f"{name}[{int(fits[0])}:{int(fits[-1]) + 1}]")
    return transforms.rebase(w)


def saturation_rate(w: Workload, cfg: SimConfig, cost) -> float:
    """Requests per second the simulated cluster completes with every request of `w` waiting at t=0."""
    burst = dataclasses.replace(w, arrival=np.zeros(len(w)))
    r = simulate(burst, cfg, cost=cost)
    return len(w) / (float(np.nanmax(r.records["finish"])) or 1e-9)


def at_rate(w: Workload, rate: float) -> Workload:
    base = (len(w) - 1) / max(w.span, 1e-9)
    return transforms.scale_rate(w, rate / base)


def tokens_of(w: Workload) -> list[int]:
    """A cell's prompt and output tokens in all: with the request count and rate, what --rescore checks a
    rebuilt workload against."""
    return [int(np.sum(w.input_tokens)), int(np.sum(w.output_tokens))]


def cell_config(sched: str, router: str, replicas: int, profile: str, num_blocks: int) -> SimConfig:
    return SimConfig(replicas=replicas, router=router, profile=profile, num_blocks=num_blocks,
                     scheduler=SchedulerConfig(prefix_caching=False, **SCHEDULERS[sched]))


def interleaved(cells: list[tuple]) -> list[tuple]:
    """The cells (trace, scheduler, router, load, ...) in an order whose every prefix covers the traces, load
    levels, schedulers and routers about evenly (`--budget` runs such a prefix): the traces take turns; within
    each, the scheduler x router settings go in a Latin-square order (for 2 x 2: chunked + least outstanding,
    prefill-first + round robin, then the other two), each through its load levels. The same cells, reordered."""
    traces = list(dict.fromkeys(c[0] for c in cells))
    scheds = list(dict.fromkeys(c[1] for c in cells))
    routers = list(dict.fromkeys(c[2] for c in cells))
    loads = list(dict.fromkeys(c[3] for c in cells))

    def key(c: tuple) -> tuple[int, int, int]:
        i_s, i_r = scheds.index(c[1]), routers.index(c[2])
        return (i_r - i_s) % len(routers), i_s, loads.index(c[3])

    per_trace = [sorted((c for c in cells if c[0] == tr), key=key) for tr in traces]
    out = []
    for k in range(max(map(len, per_trace), default=0)):
        out += [group[k] for group in per_trace if k < len(group)]
    return out


def next_cell_fits(elapsed_s: float, budget_s: float, predicted_s: float,
                   done: list[tuple[float, float]]) -> tuple[bool, float]:
    """Whether the next cell ends inside the budget: its wall time is estimated as its predicted replay
    (`predicted_s`, the simulator's makespan) times the median wall / predicted of the cells done so far
    (`done`: (wall s, predicted s) pairs; the checks and replica start-ups ride on that ratio). The first cell
    always runs (no estimate yet: a budget under one cell's time runs one). Returns (fits, estimate in s; nan
    for the first)."""
    if not (math.isfinite(budget_s) and budget_s > 0):
        raise ValueError(f"--budget: {budget_s / 60:g} min is out of range; allowed: > 0")
    if not done:
        return True, math.nan
    est = predicted_s * float(np.median([w / max(p, 1e-9) for w, p in done]))
    return elapsed_s + est <= budget_s, est


def machine_busy(interval: float = 2.0) -> float:
    """Share of all cores busy over `interval` seconds (from /proc/stat; this script idles meanwhile, so it is
    other processes' load). The 1-minute load average lags too much to tell when a burst has ended."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        idle = v[3] + (v[4] if len(v) > 4 else 0)
        return sum(v), idle

    try:
        t0, i0 = sample()
        time.sleep(interval)
        t1, i1 = sample()
    except OSError:
        return os.getloadavg()[0] / (os.cpu_count() or 1)
    return 1.0 - (i1 - i0) / max(t1 - t0, 1)


def cpu_times() -> tuple[int, int, int]:
    """(total, idle, nice) jiffies over all cores since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return sum(v), v[3] + (v[4] if len(v) > 4 else 0), v[1]


def niced_share(t0: tuple[int, int, int], t1: tuple[int, int, int]) -> float:
    """Share of all cores niced processes used between two cpu_times() (this script runs at nice 0, so:
    other sessions' niced work)."""
    return (t1[2] - t0[2]) / max(t1[0] - t0[0], 1)


def set_group_nice(value: int) -> str:
    """Set this session's autogroup nice (/proc/self/autogroup; children inherit the session). Returns what
    happened, for the log."""
    try:
        with open("/proc/self/autogroup", "w") as f:
            f.write(str(value))
        with open("/proc/self/autogroup") as f:
            return f.read().strip()
    except OSError as e:
        return f"not set ({e.strerror or e})"


def wait_quiet(threshold: float, max_wait: float) -> tuple[float, float]:
    """Wait until other processes use less than `threshold` of the cores (or max_wait s pass).
    Returns (busy share last seen, seconds waited)."""
    t0 = time.perf_counter()
    busy = machine_busy()
    while busy > threshold and time.perf_counter() - t0 < max_wait:
        busy = machine_busy(5.0)
    return busy, time.perf_counter() - t0


def kind_ratios(chk: dict) -> dict[str, float]:
    """A step check's real/predicted busy time for decode-only steps and for steps with prefill tokens."""
    return {"decode": chk.get("decode_only", {}).get("busy_ratio", math.nan),
            "with_prefill": chk.get("with_prefill", {}).get("busy_ratio", math.nan)}


def rel_error(sim: float, real: float, metric: str) -> float | None:
    """(sim - real) / real as `twinfer validate` computes it (None where the real figure is ~0)."""
    from sim.calibrate import ZERO_S, _rel

    return _rel(sim, real, 1e-12 if metric == "throughput_rps" else ZERO_S)


def median_check(checks: list[dict]) -> dict:
    """One cell's step check over its real runs: the median busy ratios (the one run's check when it ran once)."""
    ok = [c for c in checks if c.get("steps")]
    if len(ok) <= 1:
        return ok[0] if ok else (checks[0] if checks else {})

    def med(key: str, sub: str | None = None) -> float:
        return float(np.median([(c.get(sub, {}) if sub else c).get(key, math.nan) for c in ok]))

    return {"steps": sum(c["steps"] for c in ok), "busy_ratio": med("busy_ratio"), "median_ratio": med("median_ratio"),
            "decode_only": {"busy_ratio": med("busy_ratio", "decode_only")},
            "with_prefill": {"busy_ratio": med("busy_ratio", "with_prefill")}, "pace_swing": med("pace_swing")}


def pace_swing_summary(rows: list[dict], moved: float = PACE_MOVED) -> str | None:
    """How far the machine's pace moved within the cells' real runs (step_check's "pace_swing": the busy ratio of
    the steps' slowest quarter over their fastest's), and the model's error at the cells' real pace for the
    cells that moved by `moved` or more against the others: a single factor, even the cell's own, cannot
    follow a run whose machine changed speed part-way."""
    known = [r for r in rows if r.get("step_pace_swing") is not None and math.isfinite(r["step_pace_swing"])]
    if not known:
        return None  # (runs before the swing was recorded, rescored without their step logs)
    big = [r for r in known if r["step_pace_swing"] >= 1 + moved]
    steady = [r for r in known if r["step_pace_swing"] < 1 + moved]

    def at_pace(rs: list[dict]) -> str:
        return fmt_num(finite_stat(np.median, [r.get("corrected_median_abs_rel_error") for r in rs]), ".1%")

    def p50s(rs: list[dict]) -> str:  # the headline's median |error| on p50 TTFT / TPOT / E2E over those cells
        if not rs:
            return "n/a"
        a = aggregate(rs, "errors")
        return " / ".join(fmt_num(a[m]["median"], ".1%") for m in ("ttft.p50", "tpot.p50", "e2e.p50"))

    swings = [r["step_pace_swing"] for r in known]
    return (f"the machine's pace within a cell (busy ratio of the steps' slowest quarter over their fastest): median "
            f"x{np.median(swings):.2f}, worst x{max(swings):.2f}; {len(big)}/{len(known)} cells moved by {moved:.0%} "
            f"or more: |error| at real pace median {at_pace(big)} there against {at_pace(steady)} in the others, "
            f"the headline's p50 TTFT / TPOT / E2E {p50s(big)} against {p50s(steady)}")


def fmt_err(e: float | None) -> str:
    return "n/a" if e is None or not math.isfinite(e) else f"{e:+.1%}"


def finite_stat(f, xs: list[float]) -> float:
    """f over the finite values of xs; NaN when there are none."""
    v = [x for x in xs if x is not None and math.isfinite(x)]
    return float(f(v)) if v else math.nan


def fmt_num(v: float, spec: str) -> str:
    """A diagnostic figure, or "-" where there is none (a rescored run without its step logs)."""
    return "-" if v is None or not math.isfinite(v) else format(v, spec)


def aggregate(rows: list[dict], key: str) -> dict[str, dict[str, float]]:
    """Median and worst |error| per metric over the cells (`key`: errors, errors_uncorrected, ...)."""
    out = {}
    for m, _ in METRICS:
        e = np.array([abs(r[key][m]) for r in rows if r[key][m] is not None])
        out[m] = {"median": float(np.median(e)) if len(e) else math.nan,
                  "worst": float(e.max()) if len(e) else math.nan}
    return out


def by_trace(rows: list[dict], value) -> dict[str, dict[str, float]]:
    """Per trace, per metric (not throughput): the median over that trace's cells of `value(row, metric)`
    (None values left out; NaN where a trace has none)."""
    out: dict[str, dict[str, float]] = {}
    for tr in dict.fromkeys(r["trace"] for r in rows):
        out[tr] = {}
        for m, _ in METRICS:
            if m == "throughput_rps":
                continue
            v = [x for x in (value(r, m) for r in rows if r["trace"] == tr) if x is not None]
            out[tr][m] = float(np.median(v)) if v else math.nan
    return out


def abs_error(r: dict, m: str) -> float | None:
    """A cell's headline |error| for metric m (None where it has none)."""
    e = r["errors"][m]
    return None if e is None else abs(e)


def band_width(r: dict, m: str) -> float | None:
    """The width of a cell's real resampling band for metric m, relative to the real figure: how closely the
    figure is pinned down by which requests ran (a p50 between two clusters of latencies: tens of percent)."""
    b = (r.get("sampling_band_rel") or {}).get(m)
    return b[1] - b[0] if b else None


def run_to_run(runs: list[float]) -> float | None:
    """The executor against itself: mean over ordered pairs of real runs (i != j) of |run i / run j - 1|, what a
    predictor that is another real run of the same cell scores against one real run. None under two runs."""
    r = [x for x in runs if x is not None and math.isfinite(x) and x > 0]
    if len(r) < 2:
        return None
    return float(np.mean([abs(a / b - 1) for i, a in enumerate(r) for j, b in enumerate(r) if i != j]))


def noise_aggregate(rows: list[dict]) -> dict[str, dict[str, float]] | None:
    """With two or more real runs per cell: per metric, the median over cells of `run_to_run` next to the
    simulator's mean |error| against one real run (the same footing: one run is the reference), and how many
    cells' simulator figures lie inside their runs' min..max. None when the cells ran once."""
    rows = [r for r in rows if len(next(iter(r.get("real_runs", {}).values()), [])) >= 2]
    if not rows:
        return None
    out = {}
    for m, _ in METRICS:
        rr = [x for x in (run_to_run(r["real_runs"][m]) for r in rows) if x is not None]
        one = [float(np.mean([abs(e) for e in es])) for es in (r["errors_each_run"][m] for r in rows)
               if es and all(e is not None for e in es)]
        out[m] = {"run_to_run": float(np.median(rr)) if rr else math.nan,
                  "sim_vs_one_run": float(np.median(one)) if one else math.nan,
                  "in_noise": sum(1 for r in rows if r["in_noise"][m]), "cells": len(rows)}
    return out


def settings_of(args: argparse.Namespace, n_req: int) -> dict:
    """What rebuilds the cells' workloads (--rescore reads it back)."""
    return {"requests": n_req, "offset": args.offset, "length_scale": args.length_scale, "replicas": args.replicas,
            "num_blocks": args.num_blocks, "model": args.model, "device": getattr(args, "device", "cpu")}


def write_json(out_dir: Path, prof_path: str, args: argparse.Namespace, rows: list[dict], **extra) -> None:
    (out_dir / "fidelity.json").write_text(json.dumps(
        {"profile": prof_path, "drift_check": args.drift_check, "loop_mix": getattr(args, "loop_mix", None),
         "loop_arrivals": getattr(args, "loop_arrivals", None),
         "settings": settings_of(args, args.n_req), **extra,
         "cells": rows, "aggregate": aggregate(rows, "errors"),
         "aggregate_uncorrected": aggregate(rows, "errors_uncorrected"),
         "aggregate_alone_drift": aggregate(rows, "errors_alone_drift"),
         **({"aggregate_loop_drift": aggregate(rows, "errors_loop_drift")}
            if rows and all("errors_loop_drift" in r for r in rows) else {}),
         **({"aggregate_loop_kind": aggregate(rows, "errors_loop_kind")}
            if rows and all(r.get("errors_loop_kind") for r in rows) else {}),
         **({"aggregate_loop_jitter": aggregate(rows, "errors_loop_jitter")}
            if rows and all(r.get("errors_loop_jitter") for r in rows) else {}),
         **({"aggregate_loop_also": aggregate(rows, "errors_loop_also"), "loop_also": rows[0]["loop_also"]["mix"]}
            if rows and all(r.get("errors_loop_also") for r in rows) else {}),
         **({"aggregate_reference_drift": aggregate(rows, "errors_reference_drift")}
            if rows and all(r.get("errors_reference_drift") for r in rows) else {}),
         "aggregate_by_trace": by_trace(rows, abs_error),
         "sampling_band_width": by_trace(rows, band_width),
         **({"aggregate_noise": noise_aggregate(rows)} if noise_aggregate(rows) else {})}, indent=2) + "\n")


def budget_record(budget_min: float | None, planned: int | None, skipped: list[str]) -> dict:
    """What fidelity.json says of a --budget run: the budget, the cells planned and those left out."""
    return {} if budget_min is None else {"budget_min": budget_min, "cells_planned": planned,
                                          "cells_skipped": skipped}


def report(rows: list[dict], con, replicas: int, n_req: int, t_start: float, skipped: list[str] | None = None,
           planned: int | None = None) -> None:
    from rich.table import Table

    ref_on = any(r["drift"] for r in rows)
    # runs before the loop check led: the reference check; runs before it was read by kind: one loop factor
    loop_head = bool(rows) and all(r.get("headline") in ("loop", "loop-kind") for r in rows)
    kind_head = loop_head and all(r.get("headline") == "loop-kind" for r in rows)
    drift_on = ref_on or loop_head  # the table has a drift column

    def head_drift(r) -> dict | None:  # the headline check's factors
        return r.get("loop_drift") if loop_head else r["drift"]

    t = Table(title=f"sim vs executor: relative error (sim - real) / real, {len(rows)} cells, {replicas} "
                    f"replicas, {n_req} requests per cell"
                    + ("; sim corrected by the loop drift check" + (", decode and prefill steps each by their own pace"
                                                                    if kind_head else "")
                       + " (drift: the loop check's steps against the cost model on the replicas, before/after "
                       "the replay)" if loop_head else
                       "; sim drift-corrected (drift: the reference shapes' now / profiled, before/after the replay)"
                       if drift_on else ""), title_justify="left")
    for col in ("trace", "scheduler", "router", "load", "req/s"):
        t.add_column(col)
    for _, lab in METRICS:
        t.add_column(lab, justify="right")
    if drift_on:
        t.add_column("drift", justify="right")
    t.add_column("steps real/pred", justify="right")
    t.add_column("with prefill", justify="right")
    t.add_column("|err| at real pace", justify="right")
    t.add_column("niced load", justify="right")

    def pf_ratio(r) -> float:  # runs recorded before the split have no step_kind_ratio
        return r.get("step_kind_ratio", {}).get("with_prefill", math.nan)

    def drift_cell(r) -> list[str]:
        if not drift_on:
            return []
        d = head_drift(r)
        return [f"{d['before']:.2f}/{d['after']:.2f}" if d else "-"]

    for r in rows:
        t.add_row(r["trace"], r["scheduler"], r["router"], r["load"], f"{r['rate']:.2f}",
                  *(fmt_err(r["errors"][m]) for m, _ in METRICS), *drift_cell(r), fmt_num(r['step_busy_ratio'], ".2f"),
                  fmt_num(pf_ratio(r), ".2f"), fmt_num(r['corrected_median_abs_rel_error'], ".1%"),
                  f"{r['niced_load_during']:.0%}")

    agg, agg_raw, agg_alone = (aggregate(rows, "errors"), aggregate(rows, "errors_uncorrected"),
                               aggregate(rows, "errors_alone_drift"))
    busy_on = any(r["drift"] and r["drift"]["colocated"] for r in rows)
    factors = [head_drift(r)["factor"] for r in rows if head_drift(r)]
    t.add_section()
    t.add_row("median |error|", "", "", "", "", *(f"{agg[m]['median']:.1%}" for m, _ in METRICS),
              *([f"x{np.median(factors):.2f}"] if drift_on else []),
              fmt_num(np.median([r['step_busy_ratio'] for r in rows]), ".2f"),
              fmt_num(finite_stat(np.median, [pf_ratio(r) for r in rows]), ".2f"),
              fmt_num(np.median([r['corrected_median_abs_rel_error'] for r in rows]), ".1%"),
              f"{np.median([r['niced_load_during'] for r in rows]):.0%}")
    t.add_row("worst |error|", "", "", "", "", *(f"{agg[m]['worst']:.1%}" for m, _ in METRICS),
              *([f"{min(factors):.2f}..{max(factors):.2f}"] if drift_on else []),
              fmt_num(max(r['step_busy_ratio'] for r in rows), ".2f"),
              fmt_num(finite_stat(max, [pf_ratio(r) for r in rows]), ".2f"),
              fmt_num(max(r['corrected_median_abs_rel_error'] for r in rows), ".1%"),
              f"{max(r['niced_load_during'] for r in rows):.0%}")
    if busy_on:
        t.add_row("median |error|, alone drift only", "", "", "", "",
                  *(f"{agg_alone[m]['median']:.1%}" for m, _ in METRICS), "", "", "", "", "")
        t.add_row("worst |error|, alone drift only", "", "", "", "",
                  *(f"{agg_alone[m]['worst']:.1%}" for m, _ in METRICS), "", "", "", "", "")
    # beside the headline: the other checks' predictions (the reference shapes', the loop check's single factor
    # or by kind, whichever does not lead)
    others = ([("errors_loop_drift", "loop check, one factor", "loop_drift")] if kind_head else
              [("errors_loop_kind", "loop check by kind", "loop_drift")] if loop_head else
              [("errors_loop_drift", "loop drift", "loop_drift"), ("errors_loop_kind", "loop check by kind",
                                                                   "loop_drift")])
    also_mix = (rows[0].get("loop_also") or {}).get("mix") if rows else None
    others += [("errors_loop_jitter", "loop check + step jitter", "loop_drift")] if loop_head else []
    others += [("errors_loop_also", f"loop check, {also_mix} mix", "loop_also")] if loop_head and also_mix else []
    others += [("errors_reference_drift", "reference-shape check", "drift")] if loop_head else []
    others = [(key, lab, fk, aggregate(rows, key)) for key, lab, fk in others
              if rows and all(r.get(key) and r.get(fk) for r in rows)]
    for key, lab, fk, agg_other in others:
        t.add_row(f"median |error|, {lab}", "", "", "", "",
                  *(f"{agg_other[m]['median']:.1%}" for m, _ in METRICS),
                  *([f"x{np.median([r[fk]['factor'] for r in rows]):.2f}"] if drift_on else []),
                  "", "", "", "")
        t.add_row(f"worst |error|, {lab}", "", "", "", "", *(f"{agg_other[m]['worst']:.1%}" for m, _ in METRICS),
                  *([""] if drift_on else []), "", "", "", "")
    if drift_on:
        t.add_row("median |error|, uncorrected", "", "", "", "", *(f"{agg_raw[m]['median']:.1%}" for m, _ in METRICS),
                  "", "", "", "", "")
        t.add_row("worst |error|, uncorrected", "", "", "", "", *(f"{agg_raw[m]['worst']:.1%}" for m, _ in METRICS),
                  "", "", "", "", "")
    con.print(t)

    def targets(a: dict[str, dict[str, float]]) -> str:
        p50_ok = all(a[m]["median"] <= 0.05 for m in ("ttft.p50", "tpot.p50", "e2e.p50"))
        p99_ok = all(a[m]["median"] <= 0.10 for m in ("ttft.p99", "tpot.p99", "e2e.p99"))
        return (f"median p50 error <= 5%: {'met' if p50_ok else 'MISSED'}; "
                f"median p99 error <= 10%: {'met' if p99_ok else 'MISSED'}"
                + (f" (PARTIAL: {len(rows)} of {planned} cells)" if skipped else ""))

    con.print(f"inside the real run's {SAMPLING_LEVEL:.0%} resampling band (the measurement's own sampling error "
              "over its requests; marked * per cell above): "
              + ", ".join(f"{lab} {sum(1 for r in rows if r['in_sampling_band'][m])}/{len(rows)}"
                          for m, lab in METRICS if m != "throughput_rps"))
    widths = by_trace(rows, band_width)
    con.print(f"how closely the requests pin each real figure down: median width of its {SAMPLING_LEVEL:.0%} "
              "resampling band, relative to it: "
              + "; ".join(f"{tr} " + ", ".join(f"{lab} {fmt_num(w[m], '.0%')}" for m, lab in METRICS if m in w)
                          for tr, w in widths.items()))
    errs = by_trace(rows, abs_error)
    con.print("median |error| by trace (headline): "
              + "; ".join(f"{tr} " + ", ".join(f"{lab} {fmt_num(e[m], '.1%')}" for m, lab in METRICS if m in e)
                          for tr, e in errs.items()))
    if rows and all(r.get("in_jitter_band") for r in rows):
        from sim.calibrate import JITTER_BAND, JITTER_RUNS

        con.print(f"inside the step-jitter prediction's p{JITTER_BAND[0]:.0f}..p{JITTER_BAND[1]:.0f} over "
                  f"{JITTER_RUNS} seeds (what the checks' step-to-step spread alone moves the prediction by): "
                  + ", ".join(f"{lab} {sum(1 for r in rows if r['in_jitter_band'][m])}/{len(rows)}"
                              for m, lab in METRICS if m != "throughput_rps"))
    if drift_on:
        con.print("drift correction, median |error| over cells (uncorrected -> corrected): "
                  + ", ".join(f"{lab} {agg_raw[m]['median']:.1%} -> {agg[m]['median']:.1%}" for m, lab in METRICS))
        if busy_on:
            ref_other = [a for key, _, _, a in others if key == "errors_reference_drift"]
            agg_busy = ref_other[0] if loop_head and ref_other else agg  # the reference-shape check with the busy one
            scales = [r["drift"]["colocated"]["contention_scale"] for r in rows if r["drift"] and r["drift"]["colocated"]]
            con.print("co-located drift check: contention factors scaled by "
                      f"{min(scales):.2f}..{max(scales):.2f} (median {np.median(scales):.2f}); median |error| "
                      "alone drift only -> with it: "
                      + ", ".join(f"{lab} {agg_alone[m]['median']:.1%} -> {agg_busy[m]['median']:.1%}"
                                  for m, lab in METRICS))
            con.print(f"targets, alone drift only: {targets(agg_alone)}")
        head_lab = ("loop-drift-corrected by kind (headline)" if kind_head else
                    "loop-drift-corrected (headline)" if loop_head else "drift-corrected")
        con.print(f"targets, {head_lab}: {targets(agg)}")
        for _, lab, fk, agg_other in others:
            of = [r[fk]["factor"] for r in rows]
            con.print(f"targets, {lab} (x{min(of):.2f}..x{max(of):.2f}): {targets(agg_other)}")
        con.print(f"targets, uncorrected: {targets(agg_raw)}")
    else:
        con.print(f"targets: {targets(agg)}")
    # how far each check's factor was from the pace the cell's own steps ran at (real / model busy time)
    def pace_miss(factor_of) -> float:
        return finite_stat(np.median, [abs(math.log(r["step_busy_ratio"] / factor_of(r))) for r in rows
                                       if factor_of(r) and r["step_busy_ratio"] and r["step_busy_ratio"] > 0])

    misread = {lab: pace_miss(f) for lab, f in (
        ("reference-shape check", lambda r: (r["drift"] or {}).get("factor")),
        ("loop check", lambda r: (r.get("loop_drift") or {}).get("factor")),
        (f"loop check, {also_mix} mix", lambda r: (r.get("loop_also") or {}).get("factor")))}
    misread = {lab: v for lab, v in misread.items() if math.isfinite(v)}
    if misread:
        con.print("the cells' step pace against each check's factor, median |log(pace / factor)|: "
                  + ", ".join(f"{lab} {v:.1%}" for lab, v in misread.items()))

    swing_line = pace_swing_summary(rows)
    if swing_line:
        con.print(swing_line)

    def kind_miss(kind: str, factor_of) -> float:  # the cells' steps of one kind against a loop factor
        return finite_stat(np.median, [abs(math.log(r["step_kind_ratio"][kind] / factor_of(r))) for r in rows
                                       if factor_of(r) and (r.get("step_kind_ratio") or {}).get(kind, 0) > 0])

    if rows and all((r.get("loop_drift") or {}).get("decode_factor") for r in rows):
        one = lambda r: r["loop_drift"]["factor"]  # noqa: E731
        km = (kind_miss("decode", lambda r: r["loop_drift"]["decode_factor"]),
              kind_miss("with_prefill", lambda r: r["loop_drift"]["with_prefill_factor"]),
              kind_miss("decode", one), kind_miss("with_prefill", one))
        if all(math.isfinite(v) for v in km):  # (a rescore without the run's step logs has no pace by kind)
            con.print("by kind, median |log(pace / factor)| of the cells' decode-only steps and of their steps with "
                      f"prefill tokens: loop check by kind {km[0]:.1%} and {km[1]:.1%}, one factor {km[2]:.1%} and "
                      f"{km[3]:.1%}")
    paired = [r for r in rows if r.get("paired")]  # runs recorded before per-request pairing have none
    if paired:
        con.print("request by request (each cell's median sim / real - 1 over its requests; signed median over cells, "
                  "median |.| in brackets): "
                  + ", ".join(f"{lab} {finite_stat(np.median, [r['paired'][m] for r in paired]):+.1%} "
                              f"({finite_stat(np.median, [abs(r['paired'][m]) for r in paired]):.1%})"
                              for m, lab in (("ttft", "TTFT"), ("tpot", "TPOT"), ("e2e", "E2E")))
                  + "; at the cells' own step pace: "
                  + ", ".join(f"{lab} {finite_stat(np.median, [r['paired_at_pace'][m] for r in paired]):+.1%} "
                              f"({finite_stat(np.median, [abs(r['paired_at_pace'][m]) for r in paired]):.1%})"
                              for m, lab in (("ttft", "TTFT"), ("tpot", "TPOT"), ("e2e", "E2E"))))
    noise = noise_aggregate(rows)
    if noise:
        a_rr = {m: {"median": v["run_to_run"]} for m, v in noise.items()}
        con.print(f"the executor against itself ({len(rows[0]['real_runs']['ttft.p50'])} real runs per cell), median "
                  "over cells of |run i / run j - 1| -> the simulator's mean |error| against one run: "
                  + ", ".join(f"{lab} {noise[m]['run_to_run']:.1%} -> {noise[m]['sim_vs_one_run']:.1%}"
                              for m, lab in METRICS))
        con.print(f"targets, one real run predicting another: {targets(a_rr)}")
        con.print("the simulator inside the real runs' min..max: "
                  + ", ".join(f"{lab} {noise[m]['in_noise']}/{noise[m]['cells']}" for m, lab in METRICS))
        pr = [r for r in rows if r.get("paired_real")]
        if pr:
            con.print("request by request, run 2 over run 1 (each cell's median; signed median over cells, median "
                      "|.| in brackets): "
                      + ", ".join(f"{lab} {finite_stat(np.median, [r['paired_real'][m] for r in pr]):+.1%} "
                                  f"({finite_stat(np.median, [abs(r['paired_real'][m]) for r in pr]):.1%})"
                                  for m, lab in (("ttft", "TTFT"), ("tpot", "TPOT"), ("e2e", "E2E"))))
    if skipped:
        con.print(f"PARTIAL: the budget ran {len(rows)} of {planned} cells; every median, worst figure and target "
                  f"above is over those {len(rows)}. Left out: " + "; ".join(skipped))
    con.print(f"total {(time.perf_counter() - t_start) / 60:.1f} min; load average at end: "
              f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")


def rescore(args: argparse.Namespace) -> int:
    """The simulator side of a finished run again, with another profile, against the same real measurements:
    each cell's workload is rebuilt from the run's settings (checked against its recorded request count and
    rate), simulated with --profile's co-location model times the cell's recorded drift factor(s), and
    compared with the cell's recorded real figures. Nothing runs on the executor, so a change to the cost
    model is judged without the run-to-run noise of a new real run. The steps diagnostics are recomputed
    from the run's kept step logs (steps/cellNN.0.csv) when there."""
    from executor.replay import read_steps, resolve_model
    from rich.console import Console
    from sim.calibrate import drift_corrected, jittered_prediction, kind_corrected, loop_kind_factors, step_check
    from sim.calibrate_cli import fit_to_model, profile_model_ref, same_model
    from sim.jitter import StepJitter
    from traces.report import summarize

    src = Path(args.rescore)
    path = src / "fidelity.json" if src.is_dir() else src
    run = json.loads(path.read_text())
    st = {**settings_of(args, args.requests or 48), **run.get("settings", {})}
    prof = read_profile_file(args.profile)
    if not same_model(prof, st["model"]):
        raise ValueError(f"{args.profile}: profiled on model {profile_model_ref(prof)!r}; the run used {st['model']!r}")
    mcfg = resolve_model(st["model"]).cfg
    ccost = prof.contention_cost() if st["replicas"] > 1 else None
    base = ccost or prof.cost_at(1.0)
    con = Console(width=REPORT_WIDTH)
    print(f"rescoring {len(run['cells'])} cells of {path} with {args.profile} (recorded: {run.get('profile')})",
          flush=True)
    slices: dict[str, Workload] = {}
    rows = []
    for k, cell in enumerate(run["cells"]):
        tr = cell["trace"]
        if tr not in slices:
            full = SHARED / f"{TRACES[tr]}.csv"
            if not cell.get("slice") and st["offset"] > 0 and not full.is_file():  # (runs before slices were kept)
                # trace_slice would fall back to the vendored head: other requests, the same count
                raise ValueError(f"{path}: cell {k + 1}: the run's {tr} slice starts at request {st['offset']} of "
                                 f"{full}, which is not here; rescore where the run's traces are")
            slices[tr] = trace_slice(tr, st["requests"], st["offset"], mcfg.max_position, st["length_scale"])
            if cell.get("slice") and cell["slice"] != slices[tr].name:
                raise ValueError(f"{path}: cell {k + 1}: the run replayed {cell['slice']}, these settings rebuild "
                                 f"{slices[tr].name}: different trace files or settings")
        w = at_rate(slices[tr], LOADS[cell["load"]] * cell["saturation_rate"])
        cfg = cell_config(cell["scheduler"], cell["router"], st["replicas"], args.profile, st["num_blocks"])
        w, _ = fit_to_model(w, mcfg.max_position)
        if (len(w) != cell["requests"] or not math.isclose((len(w) - 1) / w.span, cell["rate"], rel_tol=1e-9)
                or cell.get("tokens", tokens_of(w)) != tokens_of(w)):
            raise ValueError(f"{path}: cell {k + 1}: the rebuilt workload ({len(w)} requests at "
                             f"{(len(w) - 1) / w.span:.4f} req/s, {tokens_of(w)} prompt and output tokens) is not the "
                             f"one that ran ({cell['requests']} at {cell['rate']:.4f}"
                             + (f", {cell['tokens']}" if cell.get("tokens") else "")
                             + "): different trace files or settings")
        dr = cell.get("drift")

        def figures(sm: dict) -> dict:
            return {m: (sm[m] if m == "throughput_rps" else sm[m.split(".")[0]][m.split(".")[1]]) for m, _ in METRICS}

        def errors_of(cost) -> tuple[dict, dict]:
            sim = figures(summarize(simulate(w, cfg, cost=cost), cfg.slo))
            return sim, {m: rel_error(sim[m], cell["real"][m], m) for m, _ in METRICS}

        sim_u, err_u = errors_of(base)
        sim_a, err_a = errors_of(drift_corrected(base, dr["factor"])) if dr else (sim_u, err_u)
        sim, err = sim_a, err_a
        if dr and dr.get("colocated"):
            sim, err = errors_of(drift_corrected(base, dr["factor"], dr["colocated"]["factor"]))
        err_ref, err_loop, err_kind, kf = err, None, None, None
        lp = cell.get("loop_drift")
        if lp:
            sim_loop, err_loop = errors_of(drift_corrected(base, lp["factor"]))
            kf = loop_kind_factors(lp.get("before_detail") or {}, lp.get("after_detail") or {})
            if kf is not None:
                sim_kind, err_kind = errors_of(kind_corrected(base, *kf))
        headline = args.headline or cell.get("headline", "reference")  # runs before the loop check led: reference
        if headline == "loop":
            if err_loop is None:
                raise ValueError(f"{path}: cell {k + 1} has no loop drift check to lead with (--headline reference)")
            sim, err = sim_loop, err_loop
        elif headline == "loop-kind":
            if err_kind is None:
                raise ValueError(f"{path}: cell {k + 1} has no loop drift check by kind to lead with (its checks' "
                                 f"decode and with-prefill ratios were not recorded; --headline loop)")
            sim, err = sim_kind, err_kind
        band = {m: ([cell["real"][m] * (1 + b) for b in cell["sampling_band_rel"][m]]
                    if cell.get("sampling_band_rel", {}).get(m) else None) for m, _ in METRICS}
        in_band = {m: (bool(band[m][0] - 1e-6 <= sim[m] <= band[m][1] + 1e-6) if band[m] else None)
                   for m, _ in METRICS}
        busy_ratio = pace_err = swing = math.nan
        kinds = {"decode": math.nan, "with_prefill": math.nan}
        logs = sorted((src / "steps").glob(f"cell{k + 1:02d}.*.csv")) if src.is_dir() else []
        if logs:  # one per real run
            fwd = base.with_overhead(0.0)
            chk = median_check([step_check(fwd, read_steps(log), contention=fwd if ccost is not None else None)
                                for log in logs])
            busy_ratio, kinds, swing = chk["busy_ratio"], kind_ratios(chk), chk.get("pace_swing", math.nan)
            _, ep = errors_of(drift_corrected(base, busy_ratio))  # at the pace the cell's steps ran
            pace_err = float(np.median([abs(ep[m]) for m, _ in METRICS if m != "throughput_rps" and ep[m] is not None]))
        if err_loop is not None:
            cell = {**cell, "errors_loop_drift": err_loop}
        jit = StepJitter.from_checks(lp.get("before_detail"), lp.get("after_detail")) if lp else None
        if jit is not None:  # the checks' step spread as recorded (against the run's own profile)
            js, jb, _ = jittered_prediction(w, cfg, drift_corrected(base, lp["factor"]), jit)
            sim_j = figures(js)
            cell = {**cell, "errors_loop_jitter": {m: rel_error(sim_j[m], cell["real"][m], m) for m, _ in METRICS},
                    "in_jitter_band": {m: (bool(jb[m][0] - 1e-9 <= cell["real"][m] <= jb[m][1] + 1e-9)
                                           if m in jb else None) for m, _ in METRICS}}
        if cell.get("loop_also"):  # a second check's mix, its prediction again with this profile
            cell = {**cell, "errors_loop_also": errors_of(drift_corrected(base, cell["loop_also"]["factor"]))[1]}
        if err_kind is not None:
            cell = {**cell, "errors_loop_kind": err_kind,
                    "loop_drift": {**lp, "decode_factor": kf[0], "with_prefill_factor": kf[1]}}
        if cell.get("real_runs"):
            runs = cell["real_runs"]
            cell = {**cell, "errors_each_run": {m: [rel_error(sim[m], x, m) for x in runs[m]] for m, _ in METRICS},
                    "in_noise": {m: (bool(min(runs[m]) - 1e-6 <= sim[m] <= max(runs[m]) + 1e-6)
                                     if len(runs[m]) >= 2 else None) for m, _ in METRICS}}
        row = {**cell, "headline": headline, "errors": err, "errors_reference_drift": err_ref,
               "errors_uncorrected": err_u, "errors_alone_drift": err_a, "in_sampling_band": in_band,
               "sim": sim, "sim_uncorrected": sim_u, "step_busy_ratio": busy_ratio, "step_kind_ratio": kinds,
               "step_pace_swing": swing,
               "corrected_median_abs_rel_error": pace_err, "rescored_from": str(path),
               "paired": None, "paired_at_pace": None}  # the run's per-request records are not kept
        rows.append(row)
        print(f"[{k + 1}/{len(run['cells'])}] {tr} {cell['scheduler']} {cell['router']} {cell['load']}: "
              + ", ".join(f"{lab} {fmt_err(err[m])}" + ("*" if in_band[m] else "") for m, lab in METRICS)
              + " (recorded: " + ", ".join(f"{lab} {fmt_err(cell['errors'][m])}" for m, lab in METRICS[:3]) + ")",
              flush=True)
    skipped = run.get("cells_skipped") or []  # a --budget run's cells left out stay left out
    report(rows, con, st["replicas"], st["requests"], time.perf_counter(), skipped=skipped,
           planned=run.get("cells_planned"))
    if args.out:
        out_dir = Path(args.out)
        out_dir.mkdir(parents=True, exist_ok=True)
        args.drift_check = run.get("drift_check", True)
        args.n_req = st["requests"]
        write_json(out_dir, args.profile, args, rows, rescored_from=str(path),
                   **budget_record(run.get("budget_min"), run.get("cells_planned"), skipped))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="6 cells (chunked-512, least_outstanding), quick profile")
    ap.add_argument("--profile", help="reuse this profile file instead of profiling first")
    ap.add_argument("--model", default="default",
                    help="executor model: a preset (weights from seed 0) or a local Hugging Face Llama directory "
                         "(default: default)")
    ap.add_argument("--device", default="cpu",
                    help="where the replicas (and the profile) run: cpu | cuda | cuda:N (default: cpu). On one GPU "
                         "the replicas share it, as they share the CPU")
    ap.add_argument("--requests", type=int, default=None, help="requests per cell (default 48; 20 with --quick)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="real runs per cell (default 1). With 2 or more the errors are against their median, and "
                         "the report adds the executor against itself: how far one real run of a cell is from "
                         "another, the floor under any prediction on this machine")
    ap.add_argument("--offset", type=int, default=1000, help="first request of each slice in the full trace")
    ap.add_argument("--length-scale", type=float, default=1.0, help="multiply token counts (default 1: as recorded)")
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--num-blocks", type=int, default=4096, help="KV blocks per replica, both sides")
    ap.add_argument("--traces", default=",".join(TRACES), help="comma-separated: " + ", ".join(TRACES))
    ap.add_argument("--loads", default=",".join(LOADS), help="comma-separated: " + ", ".join(LOADS).replace("%", "%%"))
    ap.add_argument("--schedulers", default=None, help="comma-separated: " + ", ".join(SCHEDULERS))
    ap.add_argument("--routers", default=None, help="comma-separated: " + ", ".join(ROUTERS))
    ap.add_argument("--out", help="directory for profile.toml and fidelity.json")
    ap.add_argument("--budget", type=float, default=None, metavar="MIN",
                    help="wall-clock minutes for the whole run, profiling included: the cells run in an interleaved "
                         "order (traces taking turns, every load level early) and no cell starts that would end past "
                         "the budget, by the pace of the cells before it; the report and JSON name the cells left "
                         "out (default: none, every cell in grid order). For a GPU lent for a few minutes")
    ap.add_argument("--quiet", type=float, default=1.0,
                    help="before profiling and before each cell, wait until other processes use less than this "
                         "share of the cores (default 1: never wait; with this session's priority raised, see "
                         "--group-nice, other work only gets cores the run leaves idle)")
    ap.add_argument("--max-wait", type=float, default=900.0, help="longest wait for a quiet machine, s (default 900)")
    ap.add_argument("--drift-check", action=argparse.BooleanOptionalAction, default=None,
                    help="per cell, time the profile's reference shapes right before and after the replay and "
                         "scale the simulator's step times by the machine's current speed (default: on for the "
                         "CPU, off for CUDA, as `twinfer validate`; the uncorrected errors are reported too)")
    ap.add_argument("--busy-drift-check", action=argparse.BooleanOptionalAction, default=False,
                    help="with the drift check: also re-time the reference shapes beside a neighbour running decode "
                         "batches, against the profile's medians beside the same, and correct the contention "
                         "factors by busy / alone (default: off; with it, the alone-only correction is reported "
                         "too)")
    ap.add_argument("--loop-drift-check", action=argparse.BooleanOptionalAction, default=None,
                    help="before and after each cell, replay a short mix on the replicas (sim.calibrate.loop_pace, "
                         "see --loop-mix; 13-40 s each on this CPU) and scale the prediction by the pace its steps "
                         "ran: the headline, with the reference-shape check's prediction beside it (default: on for "
                         "the CPU, off for CUDA, as `twinfer validate`)")
    ap.add_argument("--loop-mix", choices=LOOP_MIXES, default="cell",
                    help="the loop drift check's requests: 'cell' (default from run V on), lengths drawn from the "
                         "cell's trace slice replayed under the cell's scheduler, router and rate (each cell its own "
                         "two checks); 'workload', those lengths under chunked prefill and round robin at 60%% of "
                         "capacity (the same requests for every cell of a trace, so one check serves two cells of "
                         "the same trace; the default in runs T and U); 'calibration', log-uniform lengths that "
                         "way, nothing from the traces (the default up to run S)")
    ap.add_argument("--loop-arrivals", choices=LOOP_ARRIVALS, default="gaps",
                    help="how the 'cell' check's requests arrive: 'gaps' (default from run Z3 on), gaps drawn from "
                         "the slice's own inter-arrival gaps (a fixed seed, each cut to 5 s); 'poisson', Poisson at "
                         "the cell's mean rate (up to run Z2)")
    ap.add_argument("--loop-also", choices=LOOP_MIXES, default=None,
                    help="a second loop drift check with this mix, before and after every cell (never shared), its "
                         "prediction and pace reading reported beside the headline's: two mixes on the same cells")
    ap.add_argument("--group-nice", default="-19",
                    help="this session's autogroup nice (its replica processes share it), so other sessions' "
                         "niced work yields to the measurements (default -19; 'keep': leave it)")
    ap.add_argument("--headline", choices=("reference", "loop", "loop-kind"),
                    help="with --rescore: which drift check's prediction leads: the reference shapes', the loop "
                         "check's single factor, or the loop check by kind (default: as the run recorded it; runs "
                         "made before the loop drift check led: reference)")
    ap.add_argument("--rescore", metavar="RUN",
                    help="measure nothing: simulate the cells of a finished run (its --out directory or fidelity.json) "
                         "again with --profile and compare with its recorded real figures (a cost-model change "
                         "judged on the same measurements)")
    args = ap.parse_args()
    if args.drift_check is None:
        from sim.calibrate_cli import default_drift_check

        args.drift_check = default_drift_check(args.device)
    if args.loop_drift_check is None:
        from sim.calibrate_cli import default_drift_check

        args.loop_drift_check = default_drift_check(args.device)
    if args.rescore:
        if not args.profile:
            ap.error("--rescore needs --profile (the profile to simulate with)")
        return rescore(args)
    if args.repeat < 1:
        ap.error(f"--repeat={args.repeat} is out of range; allowed: >= 1")
    if args.budget is not None and not (math.isfinite(args.budget) and args.budget > 0):
        ap.error(f"--budget={args.budget:g} is out of range; allowed: minutes > 0")
    n_req = args.n_req = args.requests or (20 if args.quick else 48)
    scheds = (args.schedulers or ("chunked-512" if args.quick else ",".join(SCHEDULERS))).split(",")
    routers = (args.routers or ("least_outstanding" if args.quick else ",".join(ROUTERS))).split(",")
    traces, loads = args.traces.split(","), args.loads.split(",")
    out_dir = Path(args.out) if args.out else None
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)

    from executor.replay import resolve_model
    from sim.calibrate_cli import render_profile, run_profile, run_validate

    t_start = time.perf_counter()
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    if args.group_nice != "keep":
        print(f"autogroup: {set_group_nice(int(args.group_nice))}", flush=True)
    if args.profile:
        prof_path = args.profile
        prof = read_profile_file(prof_path)
    else:
        busy, waited = wait_quiet(args.quiet, args.max_wait)
        print(f"profiling (other load {busy:.0%} of the cores after waiting {waited:.0f} s)", flush=True)
        threads = 1 if args.device == "cpu" else None  # on a GPU: torch's default, as the replicas get
        prof, _ = run_profile(args.model, args.device, 3 if args.quick else 5, 2, args.quick, 0.25, "auto", threads,
                              args.num_blocks, 16, 2048, 0, concurrent=args.replicas)
        prof_path = str((out_dir or Path("/tmp")) / f"fidelity-profile-{os.getpid()}.toml")
        save_profile_file(prof, prof_path)
    from rich.console import Console

    con = Console(width=REPORT_WIDTH)
    con.print(render_profile(prof))
    mcfg = resolve_model(args.model).cfg
    # the saturation rate: the co-location model (or, without one, every replica's neighbours busy)
    cost = (prof.contention_cost() if args.replicas > 1 else None) or prof.cost_at(1.0)

    cells = []
    w0_names = {}  # each trace's slice, "azure-conv[1000:1048]": which requests ran (rescore checks it)
    for tr in traces:
        w0 = trace_slice(tr, n_req, args.offset, mcfg.max_position, args.length_scale)
        w0_names[tr] = w0.name
        for sc in scheds:
            for ro in routers:
                cfg = cell_config(sc, ro, args.replicas, prof_path, args.num_blocks)
                sat = saturation_rate(w0, cfg, cost)
                for ld in loads:
                    w = at_rate(w0, LOADS[ld] * sat)
                    cells.append((tr, sc, ro, ld, sat, w, cfg))
    if args.budget is not None:
        cells = interleaved(cells)
    # each cell's predicted replay: the simulator's makespan, and a few seconds to start the replicas
    predicted = [float(np.nanmax(simulate(w, cfg, cost=cost).records["finish"])) + 6 for *_, w, cfg in cells]
    print(f"{len(cells)} cells, {n_req} requests each; the simulator expects about {sum(predicted) / 60:.1f} min of "
          "replay" + (f"; budget {args.budget:g} min, profiling included: cells in interleaved order, none started "
                      "that would end past it" if args.budget is not None else ""), flush=True)

    rows = []
    loop_prev = None  # the loop drift check after the previous cell: this cell's before
    prev_trace = None
    done: list[tuple[float, float]] = []  # (wall s, predicted replay s) of each cell run, for --budget
    skipped: list[str] = []
    for k, (tr, sc, ro, ld, sat, w, cfg) in enumerate(cells):
        if args.budget is not None:
            fits, est_s = next_cell_fits(time.perf_counter() - t_start, args.budget * 60, predicted[k], done)
            if not fits:
                skipped = [" ".join(c[:4]) for c in cells[k:]]
                print(f"budget: cell {k + 1} would take about {est_s:.0f} s and end past {args.budget:g} min "
                      f"({(time.perf_counter() - t_start) / 60:.1f} min gone); {len(skipped)} cells left out",
                      flush=True)
                break
        t_cell = time.perf_counter()
        if (args.loop_mix == "workload" and tr != prev_trace) or args.loop_mix == "cell":
            loop_prev = None  # another trace's mix, or (cell) another configuration and rate
        prev_trace = tr
        other, waited = wait_quiet(args.quiet, args.max_wait)
        load0 = os.getloadavg()[0]
        t0 = cpu_times()
        res = run_validate(w, cfg, prof_path, args.model, args.device, args.repeat, 300.0,
                           keep_steps=out_dir / "steps" / f"cell{k + 1:02d}" if out_dir else None,
                           keep_records=out_dir / "records" / f"cell{k + 1:02d}" if out_dir else None,
                           drift_check=args.drift_check, busy_drift_check=args.busy_drift_check,
                           loop_drift_check=args.loop_drift_check, loop_mix=args.loop_mix, loop_also=args.loop_also,
                           loop_arrivals=args.loop_arrivals,
                           loop_before=loop_prev if waited <= 10 else None)  # stale after a wait for quiet
        lp = res["loop_drift"]
        loop_prev = lp["after"] if lp["enabled"] else None
        niced = niced_share(t0, cpu_times())
        c = res["comparison"]["metrics"]
        cu = res["comparison_uncorrected"]["metrics"]
        cr = res["comparison_reference_drift"]["metrics"]
        ca = res["comparison_alone_drift"]["metrics"]
        chk = median_check(res["step_check"])
        dr = res["drift"]
        row = {"trace": tr, "scheduler": sc, "router": ro, "load": ld, "rate": (len(w) - 1) / w.span,
               "saturation_rate": sat, "requests": len(w), "slice": w0_names[tr], "tokens": tokens_of(w),
               "loadavg_1m": [load0, os.getloadavg()[0]],
               "other_load_before": other, "waited_s": waited, "niced_load_during": niced,
               "cost_model": res["cost_model"],
               "errors": {m: c[m]["rel_error"] for m, _ in METRICS},
               "headline": res["headline"],
               "errors_uncorrected": {m: cu[m]["rel_error"] for m, _ in METRICS},
               "errors_reference_drift": {m: cr[m]["rel_error"] for m, _ in METRICS},
               "errors_alone_drift": {m: ca[m]["rel_error"] for m, _ in METRICS},
               **({"errors_loop_drift": {m: res["comparison_loop_drift"]["metrics"][m]["rel_error"]
                                         for m, _ in METRICS},
                   **({"errors_loop_kind": {m: res["comparison_loop_kind"]["metrics"][m]["rel_error"]
                                            for m, _ in METRICS}} if res["comparison_loop_kind"] else {}),
                   **({"errors_loop_jitter": {m: res["comparison_loop_jitter"]["metrics"][m]["rel_error"]
                                              for m, _ in METRICS},
                       "in_jitter_band": {m: res["comparison_loop_jitter"]["metrics"][m]["real_in_prediction_band"]
                                          for m, _ in METRICS}} if res.get("comparison_loop_jitter") else {}),
                   **({"errors_loop_also": {m: res["comparison_loop_also"]["metrics"][m]["rel_error"]
                                            for m, _ in METRICS},
                       "loop_also": {"mix": lp["also"]["mix"], "before": lp["also"]["before"]["factor"],
                                     "after": lp["also"]["after"]["factor"], "factor": lp["also"]["factor"],
                                     "before_detail": lp["also"]["before"], "after_detail": lp["also"]["after"]}}
                      if lp.get("also") else {}),
                   "loop_drift": {"before": lp["before"]["factor"], "after": lp["after"]["factor"],
                                  "factor": lp["factor"], "mix": lp["mix"], "decode_factor": lp["decode_factor"],
                                  "with_prefill_factor": lp["with_prefill_factor"], "jitter": lp.get("jitter"),
                                  "before_detail": lp["before"], "after_detail": lp["after"],
                                  "steps_real_over_corrected": lp["steps_real_over_corrected"]}}
                  if lp["enabled"] else {}),
               "in_sampling_band": {m: c[m].get("in_sampling_band") for m, _ in METRICS},
               "sampling_band_rel": {m: ([b / c[m]["real"] - 1 for b in c[m]["sampling_band"]]
                                         if c[m].get("sampling_band") and c[m]["real"] else None)
                                     for m, _ in METRICS},
               "drift": ({"before": dr["before"]["factor"], "after": dr["after"]["factor"], "factor": dr["factor"],
                          "shapes_before": dr["before"]["shapes"], "shapes_after": dr["after"]["shapes"],
                          "colocated": ({"before": dr["colocated"]["before"]["factor"],
                                         "after": dr["colocated"]["after"]["factor"],
                                         "factor": dr["colocated"]["factor"],
                                         "contention_scale": dr["colocated"]["contention_scale"],
                                         "steps_real_over_corrected": dr["colocated"]["steps_real_over_corrected"],
                                         "shapes_before": dr["colocated"]["before"]["shapes"],
                                         "shapes_after": dr["colocated"]["after"]["shapes"]}
                                        if dr["colocated"]["enabled"] else None),
                          "steps_real_over_corrected": dr["steps_real_over_corrected"]}
                         if dr["enabled"] else None),
               "sim": {m: c[m]["sim"] for m, _ in METRICS}, "real": {m: c[m]["real"] for m, _ in METRICS},
               "real_runs": {m: c[m]["real_runs"] for m, _ in METRICS},
               "errors_each_run": {m: [rel_error(c[m]["sim"], x, m) for x in c[m]["real_runs"]] for m, _ in METRICS},
               "in_noise": {m: c[m]["in_noise"] for m, _ in METRICS},
               "paired_real": ({m: res["paired_real"][0][m]["median"] for m in ("ttft", "tpot", "e2e")}
                               if res["paired_real"] else None),
               "sim_uncorrected": {m: cu[m]["sim"] for m, _ in METRICS},
               "step_busy_ratio": chk.get("busy_ratio"), "step_median_ratio": chk.get("median_ratio"),
               "step_kind_ratio": kind_ratios(chk), "step_pace_swing": chk.get("pace_swing", math.nan),
               "queueing": {q: {"sim": c[f"queueing.{q}"]["sim"], "real": c[f"queueing.{q}"]["real"],
                                "rel_error": c[f"queueing.{q}"]["rel_error"]} for q in ("p50", "p99")},
               "neighbours_busy_share": res["neighbours_busy_share"],
               "corrected_median_abs_rel_error": res["step_time_corrected"]["median_abs_rel_error"],
               # request by request, median sim / real - 1: the headline's, and at the cell's own step pace
               "paired": {m: res["paired"][0][m]["median"] for m in ("ttft", "tpot", "e2e")},
               "paired_at_pace": {m: res["step_time_corrected"]["paired"][0][m]["median"]
                                  for m in ("ttft", "tpot", "e2e")},
               "real_status": res["real"][0]["ok"], "notes": res["notes"]}
        rows.append(row)
        done.append((time.perf_counter() - t_cell, predicted[k]))
        drift_txt = ""
        if row["drift"]:
            d = row["drift"]
            if d["colocated"]:
                cb = d["colocated"]
                drift_txt = (f"; busy drift x{cb['before']:.3f} / x{cb['after']:.3f} -> contention x"
                             f"{cb['contention_scale']:.3f} (alone drift only: "
                             + ", ".join(f"{lab} {fmt_err(row['errors_alone_drift'][m])}" for m, lab in METRICS[:3])
                             + ")")
            drift_txt += (f"; drift x{d['before']:.3f} before / x{d['after']:.3f} after -> x{d['factor']:.3f}"
                         f" (uncorrected: " + ", ".join(f"{lab} {fmt_err(row['errors_uncorrected'][m])}"
                                                       for m, lab in METRICS[:3]) + ")")
        if lp["enabled"]:  # the headline
            drift_txt += (f"; loop drift x{lp['before']['factor']:.3f} / x{lp['after']['factor']:.3f} -> "
                          f"x{lp['factor']:.3f}"
                          + " (the headline"
                          + (f"; by kind, decode x{lp['decode_factor']:.3f} and with prefill "
                             f"x{lp['with_prefill_factor']:.3f}: " + ", ".join(
                                 f"{lab} {fmt_err(row['errors_loop_kind'][m])}" for m, lab in METRICS[:3])
                             if row.get("errors_loop_kind") else "")
                          + (f"; with a {row['loop_also']['mix']} mix check (x{row['loop_also']['before']:.3f} / "
                             f"x{row['loop_also']['after']:.3f}) instead: " + ", ".join(
                                 f"{lab} {fmt_err(row['errors_loop_also'][m])}" for m, lab in METRICS[:3])
                             if row.get("loop_also") else "")
                          + ("; with the reference-shape check's instead: " + ", ".join(
                              f"{lab} {fmt_err(row['errors_reference_drift'][m])}" for m, lab in METRICS[:3])
                             if row["drift"] else "") + ")")
        print(f"[{k + 1}/{len(cells)}] {tr} {sc} {ro} {ld} ({row['rate']:.2f} req/s): "
              + ", ".join(f"{lab} {fmt_err(row['errors'][m])}" + ("*" if row["in_sampling_band"][m] else "")
                          for m, lab in METRICS)
              + drift_txt
              + f"; steps x{row['step_busy_ratio']:.2f} (decode x{row['step_kind_ratio']['decode']:.2f}, with prefill"
              f" x{row['step_kind_ratio']['with_prefill']:.2f}); queueing p50 sim"
              f" {row['queueing']['p50']['sim'] * 1e3:.0f}"
              f" / real {row['queueing']['p50']['real'] * 1e3:.0f} ms"
              + f"; at real pace {row['corrected_median_abs_rel_error']:.1%}"
              + f" (its pace moved x{row['step_pace_swing']:.2f} within the run)"
              + "; per request TTFT " + fmt_err(row["paired"]["ttft"]) + " (at real pace "
              + fmt_err(row["paired_at_pace"]["ttft"]) + ")"
              + ("; run to run |.| " + ", ".join(f"{lab} {fmt_num(run_to_run(row['real_runs'][m]), '.1%')}"
                                             for m, lab in METRICS[:3]) if args.repeat > 1 else "")
              + f"; other load before {other:.0%} (waited {waited:.0f} s), niced load during {niced:.0%}",
              flush=True)
        if out_dir:
            write_json(out_dir, prof_path, args, rows, **budget_record(args.budget, len(cells), skipped))

    report(rows, con, args.replicas, n_req, t_start, skipped=skipped, planned=len(cells))
    if out_dir:
        write_json(out_dir, prof_path, args, rows, **budget_record(args.budget, len(cells), skipped))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
