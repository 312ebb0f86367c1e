"""Executor speed: the paged runner's decode throughput, and continuous batching vs one request at a time.

(1) Decode tokens/s of the model at several batch sizes through the paged runner (every sequence
    at the same context length, after its prefill; only all-decode steps are timed).
(2) A small workload (lengths sampled from the bundled Azure 2023 conversation trace, scaled down
    by --length-scale to suit a CPU, all arriving at t=0) served by the engine with continuous
    batching and chunked prefill, against a loop that serves the same requests one at a time with
    the same model, runner and kernels in the same process. Prints the throughput ratio.

    python experiments/bench_executor.py               # about 2 minutes on an idle 2-core CPU
    python experiments/bench_executor.py --quick       # smaller everything, for a smoke run

CPU timings are sensitive to other load: with every core busy elsewhere, torch's OpenMP threads
wait on each other and steps can slow down several-fold. The load average is printed with the results.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from executor.engine import Engine
from executor.model import PRESETS, LlamaForCausalLM, preset
from executor.runner import ModelRunner, kv_block_bytes
from policies.scheduler import ContinuousBatchingScheduler, SchedulerConfig
from policies.sequence import Sequence
from traces.workload import Request

_SLACK = 64


def decode_speed(runner: ModelRunner, batch: int, context: int, steps: int, block_size: int) -> dict:
    sched = ContinuousBatchingScheduler(
        SchedulerConfig(block_size=block_size, max_num_seqs=batch, max_num_batched_tokens=4096, prefix_caching=False),
        runner.num_blocks)
    engine = Engine(runner, sched)
    for i in range(batch):  # outputs long enough that nobody finishes while the others still prefill
        engine.add(Sequence(Request(i, 0.0, context, steps + _SLACK)), 0.0)
    while len(sched.waiting) or any(s.num_generated == 0 for s in sched.running):
        engine.step()
    engine.step()  # one untimed decode step
    t0 = time.perf_counter()
    for _ in range(steps):
        out = engine.step()
        assert len(out.plan.decode) == batch and not out.plan.prefill
    dt = time.perf_counter() - t0
    return {"batch": batch, "ms_per_step": dt / steps * 1e3, "tok_s": batch * steps / dt}


def workload(n: int, scale: float, max_len: int, seed: int) -> tuple[list[Request], str]:
    try:
        from traces.loaders import load_default_trace

        w = load_default_trace()
        inp, out, src = w.input_tokens, w.output_tokens, "Azure 2023 conv (bundled)"
    except (ImportError, OSError) as e:  # a checkout without the trace: lognormal lengths of similar shape
        rng0 = np.random.default_rng(1)
        inp = np.maximum(1, rng0.lognormal(6.8, 0.8, 10000)).astype(np.int64)
        out = np.maximum(1, rng0.lognormal(4.9, 1.0, 10000)).astype(np.int64)
        src = f"synthetic lognormal ({type(e).__name__}: bundled trace unavailable)"
    rng = np.random.default_rng(seed)
    rows = rng.choice(len(inp), size=n, replace=False)
    reqs = []
    for i, r in enumerate(rows):
        a = max(1, round(int(inp[r]) * scale))
        b = max(1, round(int(out[r]) * scale))
        a = min(a, max_len - b)
        reqs.append(Request(i, 0.0, a, b))
    return reqs, src


def serve(runner: ModelRunner, reqs: list[Request], cfg: SchedulerConfig, one_at_a_time: bool) -> dict:
    t0 = time.perf_counter()
    seqs: list[Sequence] = []
    steps = 0
    batches = [[r] for r in reqs] if one_at_a_time else [reqs]
    for batch in batches:
        engine = Engine(runner, ContinuousBatchingScheduler(cfg, runner.num_blocks))
        seqs += engine.run_offline(batch)
        steps += len(engine.step_log)
    wall = time.perf_counter() - t0
    assert all(s.outcome == "ok" for s in seqs), [s.reason for s in seqs if s.outcome != "ok"]
    out_tokens = sum(s.num_generated for s in seqs)
    in_tokens = sum(s.req.input_tokens for s in seqs)
    return {"wall_s": wall, "steps": steps, "out_tok_s": out_tokens / wall, "total_tok_s": (in_tokens + out_tokens) / wall,
            "req_s": len(seqs) / wall, "tokens": {s.id: s.tokens[s.req.input_tokens:] for s in seqs}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default", choices=sorted(PRESETS))
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: cores in this process's affinity)")
    ap.add_argument("--batch-sizes", default="1,4,16,64")
    ap.add_argument("--context", type=int, default=256, help="tokens of context per sequence in the decode test")
    ap.add_argument("--decode-steps", type=int, default=16)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--length-scale", type=float, default=0.25, help="multiply the trace's token counts by this")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--max-batched-tokens", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="batch sizes 1,16; 16 requests; 8 decode steps")
    args = ap.parse_args()
    if args.quick:
        args.batch_sizes, args.requests, args.decode_steps = "1,16", 16, 8
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]

    t_start = time.perf_counter()
    cfg = preset(args.model)
    model = LlamaForCausalLM.from_seed(cfg, seed=args.seed)
    reqs, src = workload(args.requests, args.length_scale, cfg.max_position, args.seed)
    need = sum(-(-(r.input_tokens + r.output_tokens) // args.block_size) for r in reqs)
    need = max(need, max(batch_sizes) * -(-(args.context + args.decode_steps + _SLACK) // args.block_size))
    runner = ModelRunner(model, need + 16, args.block_size, num_threads=args.threads)
    print(f"model {args.model}: {cfg.num_params / 1e6:.1f}M params, hidden {cfg.hidden}, {cfg.layers} layers, "
          f"{cfg.heads} heads / {cfg.kv_heads} KV heads, vocab {cfg.vocab}, {cfg.dtype}")
    print(f"device {runner.device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"KV cache {runner.num_blocks} blocks x {args.block_size} tokens "
          f"({runner.num_blocks * kv_block_bytes(cfg, args.block_size) / 2**20:.0f} MiB)")
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")

    print(f"\n(1) decode through the paged runner, {args.context} tokens of context, {args.decode_steps} timed steps")
    print(f"{'batch':>6} {'ms/step':>9} {'tokens/s':>9}")
    for b in batch_sizes:
        r = decode_speed(runner, b, args.context, args.decode_steps, args.block_size)
        print(f"{r['batch']:>6} {r['ms_per_step']:>9.1f} {r['tok_s']:>9.0f}")

    ins = np.array([r.input_tokens for r in reqs])
    outs = np.array([r.output_tokens for r in reqs])
    print(f"\n(2) {len(reqs)} requests, lengths from {src} x {args.length_scale}, all at t=0: "
          f"input mean {ins.mean():.0f} (max {ins.max()}), output mean {outs.mean():.0f} (max {outs.max()})")
    sc = SchedulerConfig(block_size=args.block_size, max_num_seqs=len(reqs),
                         max_num_batched_tokens=args.max_batched_tokens, prefix_caching=False)
    batched = serve(runner, reqs, sc, one_at_a_time=False)
    single = serve(runner, reqs, sc, one_at_a_time=True)
    print(f"{'mode':<26} {'wall s':>7} {'steps':>6} {'req/s':>7} {'out tok/s':>10} {'total tok/s':>12}")
    for name, r in (("continuous batching", batched), ("one request at a time", single)):
        print(f"{name:<26} {r['wall_s']:>7.1f} {r['steps']:>6} {r['req_s']:>7.2f} {r['out_tok_s']:>10.0f} "
              f"{r['total_tok_s']:>12.0f}")
    same = sum(batched["tokens"][i] == single["tokens"][i] for i in batched["tokens"])
    print(f"throughput ratio (batched / one at a time): {single['wall_s'] / batched['wall_s']:.2f}x")
    print(f"requests with identical greedy tokens in both modes: {same}/{len(reqs)} "
          f"({cfg.dtype}: batch shape can flip a near-tied argmax)")
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
          f"benchmark took {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
