"""Policy matrix: every router x queue discipline x result cache on/off, at two loads, on three real traces.

    python experiments/policy_matrix.py              # ~3 min of CPU: under 2 min on 2 idle cores
    python experiments/policy_matrix.py --quick      # bundled 300-request slices only (about a minute)
    python experiments/policy_matrix.py --out DIR    # also write matrix.json

Traces (the full files from ../shared/traces when present, else the bundled slices in tests/data):
- Azure LLM inference 2023, code: 8,819 requests in an hour, very bursty (inter-arrival CV 13), long
  prompts, short answers; 2 replicas, the recorded rate (x1) and three times it (x3).
- Mooncake (Kimi) conversation: the first 1,500 requests, prompts of 12k tokens on average that share
  512-token prefix blocks; 4 replicas, half the recorded rate (x0.5) and the recorded rate (x1).
- LMCache tau-bench agent sessions, replayed closed loop (step k+1 sent when step k finishes plus the
  recorded think time): 2 replicas of llama3-70b on 4 x A100 each (agents run large models; on one
  H100 with 8B the trace is idle), sessions starting as recorded (x1, mostly one after another) and
  with their start times compressed 30-fold (x30: all sessions at once; think times unchanged).

Otherwise every run: llama3-8b on one H100 (analytic profile), continuous batching with the default
scheduler, SLO TTFT <= 2 s and TPOT <= 100 ms. Goodput = completed requests per second that met both.

Queue disciplines: fcfs; sjf (shortest prompt + output first, aging 100 tokens/s; it knows the true
output length, an oracle only a simulator has); edf (earliest deadline first). None of these traces
carries SLO classes, so this study assigns them, documented here: a request whose prompt is at most the
trace's median prompt is class "short" with a 1 s deadline, the rest "long" with 10 s. (Without classes
EDF orders by send time, i.e. it is FCFS.)

The result cache (10,000 entries, TTL 300 s, 1 ms lookup) can only answer a request whose prompt was
seen before. Where no request of a trace repeats an earlier one (or the trace has no content identity
at all), cache-on runs would equal cache-off ones up to the lookup latency; they are skipped and the
table says so.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared" / "traces"
DATA = ROOT / "tests" / "data"

ROUTERS = ("round_robin", "least_outstanding", "power_of_two", "prefix_affinity", "predicted_latency")
QUEUES = ("fcfs", "sjf", "edf")
EDF_DEADLINES = {"short": 1.0, "long": 10.0}


def _path(shared: str, bundled: str, quick: bool) -> Path:
    p = SHARED / shared
    return p if p.exists() and not quick else DATA / bundled


# name -> file, first n requests, replicas, profile, (low, high) rate scale, closed loop
def scenarios(quick: bool) -> dict[str, dict]:
    return {
        "azure-code": dict(path=_path("azure2023/AzureLLMInferenceTrace_code.csv",
                                      "azure2023/AzureLLMInferenceTrace_code.head300.csv", quick),
                           limit=None, replicas=2, profile=("llama3-8b@h100-80gb", 1), loads=(1.0, 3.0),
                           closed=False),
        "mooncake-conv": dict(path=_path("mooncake/conversation_trace.jsonl",
                                         "mooncake/conversation_trace.head300.jsonl", quick),
                              limit=1500, replicas=4, profile=("llama3-8b@h100-80gb", 1), loads=(0.5, 1.0),
                              closed=False),
        "lmcache-agent": dict(path=_path("lmcache-taubench", "lmcache-taubench", quick),
                              limit=None, replicas=2, profile=("llama3-70b@a100-80gb", 4), loads=(1.0, 30.0),
                              closed=True),
    }


_WORKLOADS: dict[tuple, object] = {}


def workload(name: str, spec: dict, load: float):
    """The scenario's workload at one load, with the study's SLO classes (cached per process)."""
    key = (name, str(spec["path"]), load)
    if key not in _WORKLOADS:
        from traces import transforms
        from traces.loaders import load_trace

        w = load_trace(spec["path"])
        if spec["limit"]:
            w = transforms.first_n(w, spec["limit"])
        med = float(np.median(w.input_tokens))
        w = dataclasses.replace(w, slo_class=["short" if x <= med else "long" for x in w.input_tokens])
        # closed loop: compress when sessions start, keep the think times
        _WORKLOADS[key] = transforms.scale_rate(w, load, scale_think_time=not spec["closed"])
    return _WORKLOADS[key]


def repeats(w) -> int:
    """Requests whose result-cache key was seen on an earlier request (what a result cache could answer)."""
    from policies.result_cache import key_for_request

    seen, n = set(), 0
    for i in range(len(w)):
        k = key_for_request(w.request(i))
        if k is None:
            continue
        n += k in seen
        seen.add(k)
    return n


def run_cell(args: tuple) -> dict:
    name, spec, load, router, queue, cache = args
    from policies.scheduler import SchedulerConfig
    from sim.cluster import simulate
    from sim.config import SLO, QueueSettings, ResultCacheSettings, SessionSettings, SimConfig
    from traces.report import summarize

    w = workload(name, spec, load)
    cfg = SimConfig(
        replicas=spec["replicas"], profile=spec["profile"][0], tp=spec["profile"][1], router=router, scheduler=SchedulerConfig(queue=queue),
        queue=QueueSettings(edf_deadlines=EDF_DEADLINES),
        result_cache=ResultCacheSettings(capacity=10_000 if cache else 0, ttl=300.0, latency=0.001),
        sessions=SessionSettings(mode="closed" if spec["closed"] else "open"),
        slo=SLO(ttft=2.0, tpot=0.1))
    t0 = time.perf_counter()
    r = simulate(w, cfg)
    wall = time.perf_counter() - t0
    s = summarize(r, cfg.slo)
    row = {"trace": name, "load": load, "router": router, "queue": queue, "cache": cache,
           "requests": s["requests"], "ok": s["ok"],
           "ttft_p50": s["ttft"]["p50"], "ttft_p99": s["ttft"]["p99"],
           "e2e_p50": s["e2e"]["p50"], "e2e_p99": s["e2e"]["p99"],
           "goodput": s["goodput_rps"], "attainment": s["slo_attainment"],
           "prefix_hit": s["prefix_hit_rate"], "rc_hit": s["result_cache_hit_rate"], "wall_s": wall}
    if "sessions" in s:
        row["task_p50"] = s["sessions"]["task_completion_s"]["p50"]
        row["task_p99"] = s["sessions"]["task_completion_s"]["p99"]
    return row


def _f(x: float, unit: str = "s") -> str:
    if x is None or (isinstance(x, float) and np.isnan(x)):
        return "-"
    if unit == "%":
        return f"{100 * x:.0f}%"
    if unit == "rps":
        return f"{x:.3f}"
    return f"{x:.3f}" if x < 10 else f"{x:.1f}"


def print_tables(rows: list[dict], notes: dict[str, str]) -> None:
    for trace in dict.fromkeys(r["trace"] for r in rows):
        sub = [r for r in rows if r["trace"] == trace]
        agent = any("task_p50" in r for r in sub)
        loads = sorted({r["load"] for r in sub})
        print(f"\n### {trace}  ({sub[0]['requests']:,} requests; {notes[trace]})")
        head = ["load", "router", "queue", "cache", "TTFT p50", "TTFT p99", "E2E p50", "E2E p99",
                "goodput/s", "SLO met", "prefix hit", "cache hit"] + (["task p50", "task p99"] if agent else [])
        print("| " + " | ".join(head) + " |")
        print("|" + "|".join("---" for _ in head) + "|")
        for load in loads:
            for r in (x for x in sub if x["load"] == load):
                cells = [f"x{load:g}", r["router"], r["queue"], "on" if r["cache"] else "off",
                         _f(r["ttft_p50"]), _f(r["ttft_p99"]), _f(r["e2e_p50"]), _f(r["e2e_p99"]),
                         _f(r["goodput"], "rps"), _f(r["attainment"], "%"), _f(r["prefix_hit"], "%"),
                         _f(r["rc_hit"], "%")]
                if agent:
                    cells += [_f(r.get("task_p50")), _f(r.get("task_p99"))]
                print("| " + " | ".join(cells) + " |")


def print_findings(rows: list[dict]) -> None:
    """Per trace and load: the best cell, and each factor's effect averaged over the others."""
    print("\n### Findings (computed from the table)")
    for trace in dict.fromkeys(r["trace"] for r in rows):
        for load in sorted({r["load"] for r in rows if r["trace"] == trace}):
            sub = [r for r in rows if r["trace"] == trace and r["load"] == load]
            best = max(sub, key=lambda r: (round(r["goodput"], 9), -r["ttft_p99"]))
            fast = min(sub, key=lambda r: r["ttft_p99"])
            line = (f"- {trace} x{load:g}: best goodput {best['goodput']:.3f}/s with {best['router']}/{best['queue']}/"
                    f"cache {'on' if best['cache'] else 'off'}; lowest p99 TTFT {fast['ttft_p99']:.3f} s with "
                    f"{fast['router']}/{fast['queue']}/cache {'on' if fast['cache'] else 'off'}.")
            by = {}
            for key, vals in (("router", ROUTERS), ("queue", QUEUES)):
                parts = []
                for v in vals:
                    xs = [r for r in sub if r[key] == v]
                    if xs:
                        parts.append(f"{v} {np.mean([r['ttft_p99'] for r in xs]):.2f}s/"
                                     f"{np.mean([r['goodput'] for r in xs]):.3f}")
                by[key] = ", ".join(parts)
            print(line)
            print(f"  mean p99 TTFT / goodput by router: {by['router']}")
            print(f"  by queue: {by['queue']}")
            on = [r for r in sub if r["cache"]]
            if on:
                off = [r for r in sub if not r["cache"]]
                print(f"  result cache on vs off: p50 TTFT {np.mean([r['ttft_p50'] for r in on]):.4f} vs "
                      f"{np.mean([r['ttft_p50'] for r in off]):.4f} s, goodput "
                      f"{np.mean([r['goodput'] for r in on]):.3f} vs {np.mean([r['goodput'] for r in off]):.3f}/s, "
                      f"{np.mean([r['rc_hit'] for r in on]):.0%} of requests answered by the cache")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="bundled 300-request slices only")
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--out", help="directory for matrix.json")
    args = ap.parse_args()

    t0 = time.perf_counter()
    specs = scenarios(args.quick)
    cells, notes = [], {}
    for name, spec in specs.items():
        w = workload(name, spec, spec["loads"][0])
        rep = repeats(w)
        caches = (False, True) if rep else (False,)
        notes[name] = (f"{spec['replicas']} x {spec['profile'][0]}" + (f" tp={spec['profile'][1]}" if spec['profile'][1] > 1 else "")
                       + "; " + ("closed loop; " if spec["closed"] else "")
                       + (f"{rep:,} requests repeat an earlier prompt" if rep else
                          "no request repeats an earlier prompt: result cache n/a"))
        for load in spec["loads"]:
            for router in ROUTERS:
                for queue in QUEUES:
                    for cache in caches:
                        cells.append((name, spec, load, router, queue, cache))
    print(f"{len(cells)} runs on {args.workers} worker(s) ...", file=sys.stderr, flush=True)
    if args.workers > 1:
        with ProcessPoolExecutor(args.workers) as pool:
            rows = list(pool.map(run_cell, cells, chunksize=1))
    else:
        rows = [run_cell(c) for c in cells]
    print(f"policy matrix: SLO TTFT <= 2 s and TPOT <= 100 ms; times in seconds; "
          f"{'bundled slices' if args.quick else 'full traces where present'}")
    print_tables(rows, notes)
    print_findings(rows)
    wall = time.perf_counter() - t0
    print(f"\n{len(rows)} simulations in {wall:.0f} s wall ({sum(r['wall_s'] for r in rows):.0f} s of simulation)")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "matrix.json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
