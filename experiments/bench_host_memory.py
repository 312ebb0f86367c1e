"""Host allocator: page faults and step time of prefills with glibc's defaults vs executor.hostmem's "retain".

Each mode runs in a fresh Python process (the allocator setting is process-wide and one-way), the
modes alternate (system, retain, system, retain, ... for --rounds rounds) so a slow minute of the
machine hits both. Inside a process, as in a serving loop: a 16-sequence decode run of --decodes steps,
then one prefill of each size, in a seeded random order, --reps times. Per prefill it records the wall
time, minor page faults and kernel (system) CPU time from getrusage.

    python experiments/bench_host_memory.py            # about 4 minutes on an idle 2-core CPU
    python experiments/bench_host_memory.py --quick    # sizes 512,2048, 1 round: about 1 minute

Prints, per prefill size: the median step time in each mode and their ratio (retain / system), the
median minor faults per step, and the share of the step spent in the kernel.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def worker(mode: str, sizes: list[int], reps: int, decodes: int, seed: int, model: str) -> dict:
    import torch

    from executor.model import LlamaForCausalLM, preset
    from executor.runner import ModelRunner
    from sim.calibrate import GridPoint, _build_plan

    cfg = preset(model)
    num_blocks = 4096
    runner = ModelRunner(LlamaForCausalLM.from_seed(cfg, seed), num_blocks, 16, num_threads=1, host_memory=mode)
    dec = GridPoint("decode", decodes=tuple([1000] * 16))
    rows: list[tuple[int, float, int, float]] = []
    dec_times: list[float] = []

    def timed(point: GridPoint, first_id: int) -> tuple[float, int, float]:
        plan = _build_plan(point, cfg.vocab, 16, num_blocks, first_id)
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        runner.run(plan)
        dt = time.perf_counter() - t0
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        return dt, r1.ru_minflt - r0.ru_minflt, r1.ru_stime - r0.ru_stime

    rng = np.random.default_rng(seed)
    for s in sizes:  # warm-up: every shape once
        timed(GridPoint("prefill", ((0, s, True),)), 1)
    for rep in range(reps):
        for s in rng.permutation(sizes).tolist():
            for _ in range(decodes):
                dec_times.append(timed(dec, 7)[0])
            dt, faults, stime = timed(GridPoint("prefill", ((0, s, True),)), 1000 + rep)
            rows.append((s, dt, faults, stime))
    return {"mode": mode, "host_memory": runner.host_memory, "threads": torch.get_num_threads(),
            "rows": rows, "decode_ms": float(np.median(dec_times) * 1e3)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="512,1024,2048,3072", help="prefill tokens, comma-separated")
    ap.add_argument("--reps", type=int, default=4, help="prefills of each size per process")
    ap.add_argument("--rounds", type=int, default=2, help="process pairs (system, retain)")
    ap.add_argument("--decodes", type=int, default=10, help="decode steps before each prefill")
    ap.add_argument("--model", default="default")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="sizes 512,2048, 1 round, 3 reps")
    ap.add_argument("--worker", choices=("system", "retain"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        args.sizes, args.rounds, args.reps = "512,2048", 1, 3
    sizes = [int(x) for x in args.sizes.split(",")]
    if any(s < 1 for s in sizes) or args.reps < 1 or args.rounds < 1 or args.decodes < 0:
        ap.error("--sizes must be positive, --reps and --rounds >= 1, --decodes >= 0")
    if args.worker:
        print(json.dumps(worker(args.worker, sizes, args.reps, args.decodes, args.seed, args.model)))
        return 0

    t0 = time.perf_counter()
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    runs: dict[str, list[dict]] = {"system": [], "retain": []}
    for r in range(args.rounds):
        for mode in ("system", "retain"):
            cmd = [sys.executable, __file__, "--worker", mode, "--sizes", args.sizes, "--reps", str(args.reps),
                   "--decodes", str(args.decodes), "--model", args.model, "--seed", str(args.seed + r)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            res = json.loads(out.strip().splitlines()[-1])
            runs[mode].append(res)
            print(f"  round {r + 1}/{args.rounds} {mode}: done ({time.perf_counter() - t0:.0f} s)", flush=True)
    for mode in runs:
        print(f"{mode}: {runs[mode][0]['host_memory']}")

    def pooled(mode: str) -> np.ndarray:
        return np.array([row for res in runs[mode] for row in res["rows"]], dtype=np.float64)

    sysr, ret = pooled("system"), pooled("retain")
    print(f"\n{'prefill':>8} {'system ms':>10} {'retain ms':>10} {'ratio':>6} {'faults sys':>11} {'faults ret':>11}"
          f" {'kernel sys':>11} {'kernel ret':>11}")
    for s in sizes:
        a, b = sysr[sysr[:, 0] == s], ret[ret[:, 0] == s]
        ma, mb = np.median(a[:, 1]), np.median(b[:, 1])
        print(f"{s:>8} {ma * 1e3:>10.1f} {mb * 1e3:>10.1f} {mb / ma:>6.3f} {np.median(a[:, 2]):>11.0f} "
              f"{np.median(b[:, 2]):>11.0f} {a[:, 3].sum() / a[:, 1].sum():>10.1%} {b[:, 3].sum() / b[:, 1].sum():>10.1%}")
    ds = np.median([r["decode_ms"] for r in runs["system"]])
    dr = np.median([r["decode_ms"] for r in runs["retain"]])
    print(f"16-sequence decode step (context 1000): system {ds:.1f} ms, retain {dr:.1f} ms, ratio {dr / ds:.3f}")
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; took {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
