"""Where a serving loop's prefill time goes: the same step shapes timed four ways on one device.

1. ModelRunner.run on grid plans, alone (what `twinfer profile` times);
2. the same, beside a neighbour process running decode batches (the profile's co-location measurement);
3. the same prefill after 300 ms idle (the "after idle" case);
4. the executor's serving loop (executor.replay.run_workload) on a slice of a real trace, with 1 and with
   2 replicas on the device: its logged prefill-only and mixed steps of 400-512 prompt tokens.

If (4) with one replica is far above (1), the serving path costs something the grid does not time;
if only (4) with two replicas is, it is co-location the profile's neighbour measurement does not capture.

`--fresh` times something else: a serving loop's prefill chunks have a new (chunk length, context) pair
almost every step, while the profile grid repeats each shape. For chunks from position 0, chunks deep in a
prompt and small final chunks, each shape is timed on its first use and then twice more; a first/repeat
ratio above 1 is a per-new-shape cost (kernel plans, allocator growth) the grid's medians leave out. Deep
chunks run with each mask kind (the explicit additive mask, torch's causal_lower_right bias).

    python experiments/diag_prefill_serving.py --device cuda --model DIR_OR_PRESET [--ops | --fresh]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))

from fidelity import at_rate, cell_config, trace_slice  # noqa: E402


def med_ms(xs) -> str:
    return f"{np.median(xs) * 1e3:7.2f} ms (n={len(xs)}, p25..p75 {np.percentile(xs, 25) * 1e3:.2f}.." \
           f"{np.percentile(xs, 75) * 1e3:.2f})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default="default")
    ap.add_argument("--requests", type=int, default=16, help="requests per serving run (default 16)")
    ap.add_argument("--rate", type=float, default=1.0, help="arrivals per second in the serving runs (default 1)")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--ops", action="store_true",
                    help="instead: one replica in this process, torch.profiler over its steps with 400-512 prefill "
                         "tokens and over the grid's mixed step, printing the top operators of each")
    ap.add_argument("--fresh", action="store_true",
                    help="instead: each new prefill shape timed on first use and repeated (per-new-shape cost)")
    args = ap.parse_args()
    if args.ops:
        return ops(args)
    if args.fresh:
        return fresh(args)

    from executor.replay import read_steps, resolve_model, run_workload
    from executor.runner import ModelRunner
    from sim.calibrate import BusyNeighbours, GridPoint, grid_blocks_needed, measure_grid

    spec = resolve_model(args.model)
    pts = [GridPoint("prefill", prefills=((0, 512, True),)),
           GridPoint("decode", decodes=(300,) * 8),
           GridPoint("mixed", prefills=((0, 512, True),), decodes=(300,) * 8)]
    need = grid_blocks_needed(pts, 16)
    runner = ModelRunner(spec.build(args.device), need, 16, device=args.device)
    alone = measure_grid(runner, pts, args.repeats, 3)
    print("1. grid plans, alone:")
    for m in alone:
        print(f"   {m.point.label():28s} {med_ms(m.samples)}")
    with BusyNeighbours(1, spec, pts, 16, need, runner.num_threads, args.device, 0, groups=[[1]]) as nb:
        nb.switch(0)
        time.sleep(2.0)
        busy = measure_grid(runner, pts, args.repeats, 1)
    print("2. grid plans, beside a neighbour process running the 8-sequence decode:")
    for m in busy:
        print(f"   {m.point.label():28s} {med_ms(m.samples)}")
    idle = []
    for _ in range(args.repeats):
        time.sleep(0.3)
        idle.append(measure_grid(runner, pts[:1], 1, 0)[0].samples[0])
    print(f"3. prefill 512 after 300 ms idle: {med_ms(idle)}")
    del runner

    w = trace_slice("azure-conv", args.requests, 1000, spec.cfg.max_position, 1.0)
    w = at_rate(w, args.rate)
    print("4. serving loop (chunked-512 scheduler, least_outstanding), "
          f"{len(w)} requests of the azure-conv trace at {args.rate} req/s:")
    for reps in (1, 2):
        cfg = cell_config("chunked-512", "least_outstanding", reps, "", 4096)
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            run_workload(w, cfg, model_config=args.model, device=args.device, out=tmp,
                         max_duration=float(w.arrival[-1] - w.arrival[0]) + 120.0)
            st = read_steps(Path(tmp) / "steps.csv")
        pt, ds, d = st["prefill_tokens"], st["decode_seqs"], st["duration"]
        first = np.zeros(len(d), bool)
        for r in np.unique(st["replica"]):
            first[np.flatnonzero(st["replica"] == r)[:3]] = True  # each replica's first steps: set-up
        big = (pt >= 400) & (pt <= 512) & ~first
        print(f"   {reps} replica(s), {time.perf_counter() - t0:.0f} s:")
        print(f"     prefill-only 400-512 tokens: {med_ms(d[big & (ds == 0)]) if (big & (ds == 0)).any() else '-'}")
        print(f"     mixed 400-512 tokens:        {med_ms(d[big & (ds > 0)]) if (big & (ds > 0)).any() else '-'}")
        print(f"     decode-only:                 {med_ms(d[(pt == 0) & ~first])}")
        f = st.get("minor_faults")
        if f is not None and big.any():
            print(f"     minor faults per 400-512-token prefill step: median {np.median(f[big]):.0f}")
    return 0


def fresh(args) -> int:
    """First use of a prefill shape against its repeats, per kind of chunk and mask."""
    from executor.device import timer
    from executor.replay import resolve_model
    from executor.runner import ModelRunner
    from sim.calibrate import GridPoint, _build_plan

    spec = resolve_model(args.model)
    blocks = 4096 // 16 + 64
    runner = ModelRunner(spec.build(args.device), blocks, 16, device=args.device)
    vocab, rng = runner.cfg.vocab, np.random.default_rng(0)
    ids = iter(range(1, 1 << 30))

    def once(pt: GridPoint) -> float:
        plan = _build_plan(pt, vocab, 16, blocks, 1000 * next(ids))
        with timer(runner.device) as t:
            runner.run(plan)
        return t.elapsed

    for n in (64, 256, 512):  # warm-up: kernels and allocator for every kind below
        for bias in (False, True):
            runner.lower_right_bias = bias
            once(GridPoint("prefill", ((0, n, True),)))
            once(GridPoint("mixed", ((1024, n, True),), (300,) * 4))
    decodes = tuple(300 + 7 * i for i in range(4))
    kinds = [("chunk from 0, ~500 tokens", None, lambda d, e: ((0, 512 - d, True),)),
             ("deep chunk, ~500 @ ~1.5k", False, lambda d, e: ((1024 + e, 512 - d, True),)),
             ("deep chunk, ~500 @ ~1.5k", True, lambda d, e: ((1024 + e, 512 - d, True),)),
             ("final chunk, ~20 @ ~3.5k", False, lambda d, e: ((3000 + e, 40 - d // 2, True),)),
             ("final chunk, ~20 @ ~3.5k", True, lambda d, e: ((3000 + e, 40 - d // 2, True),))]
    print(f"each shape new, timed on first use and then twice ({args.repeats} shapes per kind, 4 decodes beside):")
    for label, bias, chunk in kinds:
        runner.lower_right_bias = bias
        first, rep = [], []
        for _ in range(args.repeats):
            d, e = int(rng.integers(1, 40)), int(rng.integers(1, 400))
            pt = GridPoint("mixed", chunk(d, e), decodes)
            a, b, c = once(pt), once(pt), once(pt)
            first.append(a)
            rep.append(min(b, c))
        mask = {None: "", False: " explicit mask", True: " lower-right bias"}[bias]
        ratio = np.asarray(first) / np.asarray(rep)
        print(f"   {label + mask:42s} first {np.median(first) * 1e3:7.2f} ms, repeat {np.median(rep) * 1e3:7.2f} ms, "
              f"first/repeat median {np.median(ratio):.3f} (p25..p75 {np.percentile(ratio, 25):.3f}.."
              f"{np.percentile(ratio, 75):.3f})")
    return 0


def ops(args) -> int:
    """torch.profiler's operator table for serving-loop prefill steps and for the same-size grid step."""
    from torch.profiler import ProfilerActivity, profile

    from executor import runner as runner_mod
    from executor.replay import resolve_model, run_workload
    from executor.runner import ModelRunner
    from sim.calibrate import GridPoint, grid_blocks_needed, measure_grid

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
    spec = resolve_model(args.model)
    seen: dict = {"n": 0, "prof": None}
    orig = ModelRunner.run

    def run(self, plan):  # runs in the replica's thread: the profiler starts and stops there
        if not 400 <= plan.num_prefill_tokens <= 512:
            return orig(self, plan)
        seen["n"] += 1
        if seen["n"] == 3:
            seen["prof"] = profile(activities=acts)
            seen["prof"].start()
        orig(self, plan)
        if seen["n"] == 10:
            seen["prof"].stop()
        return None

    runner_mod.ModelRunner.run = run
    w = at_rate(trace_slice("azure-conv", args.requests, 1000, spec.cfg.max_position, 1.0), args.rate)
    cfg = cell_config("chunked-512", "least_outstanding", 1, "", 4096)
    with tempfile.TemporaryDirectory() as tmp:
        run_workload(w, cfg, model_config=args.model, device=args.device, out=tmp, in_process=True,
                     max_duration=float(w.arrival[-1] - w.arrival[0]) + 120.0)
    runner_mod.ModelRunner.run = orig
    key = "self_cuda_time_total" if len(acts) > 1 else "self_cpu_time_total"
    prof = seen["prof"]
    if prof is None or seen["n"] < 10:
        print(f"only {seen['n']} steps with 400-512 prefill tokens: more --requests")
        return 1
    print(f"serving loop: steps 3-10 with 400-512 prefill tokens (of {seen['n']})")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    print(prof.key_averages().table(sort_by=key, row_limit=12))
    pts = [GridPoint("mixed", prefills=((0, 512, True),), decodes=(300,) * 8)]
    r = ModelRunner(spec.build(args.device), grid_blocks_needed(pts, 16), 16, device=args.device)
    measure_grid(r, pts, 3, 3)
    with profile(activities=acts) as p2:
        measure_grid(r, pts, 8, 0)
    print("grid: 8 runs of mixed:512@0 dec8@300")
    print(p2.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    print(p2.key_averages().table(sort_by=key, row_limit=12))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
