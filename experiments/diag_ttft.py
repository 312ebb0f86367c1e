"""Where one fidelity cell's TTFT error comes from, request by request.

Replays one cell of experiments/fidelity.py on the executor, then simulates the same workload with the
profile's model scaled to the pace the replay's own steps ran at (the "at real pace" attribution: the
step-time level taken from the run, so what is left is the model's shape and the schedule), and prints,
per request: prompt length, replica on each side, real and simulated TTFT, and TTFT split into queueing
(arrival to admission) and service (admission to first token). Then:

- the per-request TTFT ratio (sim / real), overall and for the shorter and longer half of the prompts:
  the model's bias on the prefill path, free of the p50's sampling;
- the sorted TTFTs around the p50: with two clusters of prompt lengths the p50 of a few dozen requests
  can fall in the gap between them, where a per-request error of a few percent moves it by tens;
- the same-shape spread of decode steps: mean / median of steps with the same batch size and padded
  context (128-token buckets), the part of step time the profile's medians leave out.

    python experiments/diag_ttft.py --profile P.toml [--trace azure-conv --scheduler chunked-512
        --router round_robin --load light] [--out DIR]

It measures; it changes no model. Runs about as long as the cell (a minute or two on a 2-core CPU).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))

from fidelity import (  # noqa: E402
    LOADS, ROUTERS, SCHEDULERS, TRACES, at_rate, cell_config, saturation_rate, trace_slice,
)


def same_shape_spread(steps: dict, min_steps: int = 20) -> tuple[float, int]:
    """Decode-only steps grouped by (decode_seqs, padded context // 128): the sum of their durations over
    the sum of each group's median times its count (groups of at least `min_steps`), and the group count."""
    pt = np.asarray(steps["prefill_tokens"])
    m = pt == 0
    d = np.asarray(steps["duration"], dtype=float)[m]
    key = np.asarray(steps["decode_seqs"])[m] * 1_000_000 + np.asarray(steps["decode_padded_context"])[m] // 128
    num = den = 0.0
    groups = 0
    for k in np.unique(key):
        x = d[key == k]
        if len(x) >= min_steps:
            num, den, groups = num + x.sum(), den + np.median(x) * len(x), groups + 1
    return (num / den if den else float("nan")), groups


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", required=True, help="profile file (twinfer profile; fidelity.py --out writes one)")
    ap.add_argument("--trace", default="azure-conv", choices=sorted(TRACES))
    ap.add_argument("--scheduler", default="chunked-512", choices=sorted(SCHEDULERS))
    ap.add_argument("--router", default="round_robin", choices=ROUTERS)
    ap.add_argument("--load", default="light", choices=sorted(LOADS))
    ap.add_argument("--requests", type=int, default=48, help="requests in the slice (default 48, as fidelity.py)")
    ap.add_argument("--offset", type=int, default=1000, help="first request of the slice (default 1000)")
    ap.add_argument("--model", default=None, help="executor model (default: the profile's)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--num-blocks", type=int, default=4096)
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--out", help="keep the replay's records.csv, steps.csv and summary.json here")
    args = ap.parse_args()
    if args.requests < 4:
        ap.error(f"--requests={args.requests} is out of range; allowed: >= 4")

    from executor.replay import read_steps, resolve_model, run_workload
    from sim.calibrate import drift_corrected, read_profile_file, step_check
    from sim.calibrate_cli import fit_to_model, profile_model_ref
    from sim.cluster import simulate

    prof = read_profile_file(args.profile)
    model = args.model or profile_model_ref(prof)
    if not model:
        ap.error(f"{args.profile}: the profile names no model; give --model")
    mp = resolve_model(model).cfg.max_position
    cost = (prof.contention_cost() if args.replicas > 1 else None) or prof.cost_at(1.0 if args.replicas > 1 else 0.0)
    w0 = trace_slice(args.trace, args.requests, args.offset, mp, 1.0)
    cfg = cell_config(args.scheduler, args.router, args.replicas, args.profile, args.num_blocks)
    w, dropped = fit_to_model(at_rate(w0, LOADS[args.load] * saturation_rate(w0, cfg, cost)), mp)
    print(f"{args.trace} {args.scheduler} {args.router} {args.load}: {len(w)} requests at "
          f"{(len(w) - 1) / w.span:.2f} req/s ({dropped} longer than the model's positions left out); replaying on "
          f"{args.replicas} {args.device} replica(s) of {model}", flush=True)
    with tempfile.TemporaryDirectory(prefix="twinfer-diag-ttft-") as tmp:
        out = Path(args.out) if args.out else Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        res = run_workload(w, cfg, model_config=model, device=args.device, out=out,
                           max_duration=float(w.arrival[-1] - w.arrival[0]) + 300.0)
        steps = read_steps(out / "steps.csv")
    fwd = cost.with_overhead(0.0)
    chk = step_check(fwd, steps, contention=fwd if hasattr(fwd, "with_base") else None)
    pace = chk["busy_ratio"]
    s, r = simulate(w, cfg, cost=drift_corrected(cost, pace)).records, res.records

    def col(rec, k):
        return np.asarray(rec[k], dtype=float)

    tt_r, tt_s = col(r, "first_token") - col(r, "arrival"), col(s, "first_token") - col(s, "arrival")
    q_r, q_s = col(r, "admitted") - col(r, "arrival"), col(s, "admitted") - col(s, "arrival")
    sv_r, sv_s = tt_r - q_r, tt_s - q_s
    inp = np.asarray(r["input_tokens"])
    rep_r, rep_s = np.asarray(r["replica"]), np.asarray(s["replica"])
    print(f"the replay's steps ran {pace:.3f} x the profile's prediction (decode "
          f"{chk['decode_only']['busy_ratio']:.3f}, with prefill {chk['with_prefill']['busy_ratio']:.3f}); the "
          f"simulator below runs at that pace")
    print(f"{'id':>4} {'prompt':>6} {'replica r/s':>11} {'TTFT real':>9} {'sim':>7} {'sim/real':>8} "
          f"{'queue real':>10} {'sim':>6} {'service real':>12} {'sim':>7}   (ms)")
    for i in np.argsort(inp, kind="stable"):
        print(f"{i:4d} {inp[i]:6d} {rep_r[i]:>5d}/{rep_s[i]:<5d} {tt_r[i] * 1e3:9.1f} {tt_s[i] * 1e3:7.1f} "
              f"{tt_s[i] / tt_r[i]:8.3f} {q_r[i] * 1e3:10.1f} {q_s[i] * 1e3:6.1f} {sv_r[i] * 1e3:12.1f} "
              f"{sv_s[i] * 1e3:7.1f}")
    ok = np.isfinite(tt_r) & np.isfinite(tt_s)
    ratio = tt_s[ok] / tt_r[ok]
    short = inp[ok] < np.median(inp[ok])
    print(f"per-request TTFT sim / real: median {np.median(ratio):.3f} (shorter half of the prompts "
          f"{np.median(ratio[short]):.3f}, longer half {np.median(ratio[~short]):.3f}); service alone "
          f"{np.median(sv_s[ok] / sv_r[ok]):.3f}; queueing median real {np.median(q_r[ok]) * 1e3:.1f} ms, "
          f"sim {np.median(q_s[ok]) * 1e3:.1f} ms")
    n = int(ok.sum())
    mid = [n // 2 - 2, n // 2 - 1, n // 2, n // 2 + 1] if n >= 4 else list(range(n))
    srt_r, srt_s = np.sort(tt_r[ok]), np.sort(tt_s[ok])
    print(f"TTFT p50: real {np.median(tt_r[ok]) * 1e3:.1f} ms, sim {np.median(tt_s[ok]) * 1e3:.1f} ms "
          f"({np.median(tt_s[ok]) / np.median(tt_r[ok]) - 1:+.1%}); sorted TTFTs around it, real "
          + ", ".join(f"{srt_r[j] * 1e3:.0f}" for j in mid) + "; sim " + ", ".join(f"{srt_s[j] * 1e3:.0f}" for j in mid)
          + " ms")
    spread, groups = same_shape_spread(steps)
    print(f"decode steps of the same shape: mean / median {spread:.3f} over {groups} shape groups of 20+ steps")
    if args.out:
        print(f"kept records.csv, steps.csv, summary.json in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
