"""The `twinfer` command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

# (flag, dotted config key, type, help). Every flag defaults to None so that a config file's
# value is kept unless the flag is given: defaults < --config file < flags.
SIM_FLAGS: list[tuple[str, str, Any, str]] = [
    ("--replicas", "replicas", int, "number of model replicas behind the router (default 1)"),
    ("--router", "router", str, "round_robin | least_outstanding | power_of_two | prefix_affinity | "
                                "predicted_latency (default least_outstanding)"),
    ("--profile", "profile", str, "MODEL@DEVICE analytic profile (see `twinfer profiles`) or a profile file "
                                  "written by `twinfer profile` (default llama3-8b@h100-80gb)"),
    ("--tp", "tp", int, "tensor-parallel degree of each replica (default 1)"),
    ("--gpu-memory-utilization", "gpu_memory_utilization", float,
     "share of device memory for weights + KV cache, as vLLM's flag (default 0.9)"),
    ("--num-blocks", "num_blocks", int, "KV blocks per replica, overriding the profile's memory"),
    ("--scheduler", "scheduler.kind", str, "continuous (vLLM-style continuous batching) | dynamic "
                                           "(classic request batching) (default continuous)"),
    ("--max-num-seqs", "scheduler.max_num_seqs", int, "max sequences running at once per replica (default 256)"),
    ("--max-num-batched-tokens", "scheduler.max_num_batched_tokens", int,
     "token budget of one engine step (default 8192)"),
    ("--block-size", "scheduler.block_size", int, "KV cache block size in tokens (default 16)"),
    ("--queue", "scheduler.queue", str, "waiting-queue discipline: fcfs | priority | sjf (shortest job first, "
                                        "with aging) | edf (earliest deadline first) (default fcfs)"),
    ("--sjf-aging", "queue.sjf_aging", float, "sjf: tokens of priority a request gains per second waited (default 100)"),
    ("--edf-default-deadline", "queue.edf_default_deadline", float,
     "edf: deadline in s after the send time for SLO classes without one (default 10)"),
    ("--max-waiting", "scheduler.max_waiting", int, "admission limit: reject arrivals when this many wait"),
    ("--queue-timeout", "scheduler.queue_timeout", float, "s a request may wait for admission before it times out"),
    ("--max-batch-size", "scheduler.max_batch_size", int, "dynamic batching: requests per batch (default 32)"),
    ("--max-wait", "scheduler.max_wait", float, "dynamic batching: s to wait for a batch to fill (default 0.05)"),
    ("--slo-ttft", "slo.ttft", float, "TTFT SLO in seconds (for goodput and attainment)"),
    ("--slo-tpot", "slo.tpot", float, "TPOT SLO in seconds per output token"),
    ("--slo-e2e", "slo.e2e", float, "end-to-end latency SLO in seconds"),
    ("--seed", "seed", int, "seed for every random choice of the run (default 0)"),
    ("--result-cache-capacity", "result_cache.capacity", int,
     "result cache in front of the engines: entries (per cache node); 0 = off (default 0)"),
    ("--result-cache-ttl", "result_cache.ttl", float, "s a cached response lives after it was written (default 300)"),
    ("--result-cache-latency", "result_cache.latency", float,
     "s per cache lookup: a hit is answered after it, a miss reaches a replica after it (default 0.001)"),
    ("--result-cache-nodes", "result_cache.nodes", int,
     "cache nodes on a consistent-hash ring; 0 = one LRU (default 0)"),
    ("--result-cache-replication", "result_cache.replication", int, "ring: nodes holding each key (default 1)"),
    ("--result-cache-vnodes", "result_cache.vnodes", int, "ring: points per node (default 100)"),
    ("--mtbf", "faults.mtbf", float, "failure process: mean s a replica stays up (exponential, seeded); unset = off"),
    ("--mttr", "faults.mttr", float, "mean s to repair a crashed replica (default 30)"),
    ("--on-crash", "faults.on_crash", str, "in-flight requests of a crashed replica: retry (re-route, keeping "
                                           "their intended send time) | fail (default retry)"),
    ("--max-retries", "faults.max_retries", int, "times a request may be re-routed after crashes (default 3)"),
    ("--health-interval", "health.interval", float,
     "s between active health checks: a recovered replica gets traffic at the next one; 0 = at once (default 1)"),
    ("--sessions", "sessions.mode", str, "open (every request at its recorded time) | closed (agent sessions: "
                                         "step k+1 sent when step k finishes + think time) (default open)"),
    ("--think-time", "sessions.think", str,
     "closed loop think time: trace (the recorded gap) | SECONDS | exp:MEAN (default trace)"),
    ("--memory-sample", "memory.sample_interval", float,
     "s between KV-pool samples per replica (timeseries.csv with --out); 0 = off (default 0)"),
    ("--reclaim-high", "memory.reclaim_high", float,
     "evict cached KV blocks when the used share (cached included) exceeds this; unset = off"),
    ("--reclaim-low", "memory.reclaim_low", float, "... down to this share (default 0.7)"),
    ("--devices", "cluster.devices", int, "place the replicas on this many GPUs by memory; unplaced replicas "
                                          "are reported and not built (default: one GPU each)"),
    ("--device-memory-gib", "cluster.device_memory_gib", float, "memory per GPU (default: the profile's device)"),
    ("--devices-per-host", "cluster.devices_per_host", int, "GPUs per host; a TP group stays on one host "
                                                            "(default: all on one host)"),
    ("--gpu-task-rate", "gpu_tasks.rate", float,
     "independent GPU tasks (embeddings, tool-model calls) per s on a separate device pool, Poisson over the "
     "workload; 0 = off (default 0)"),
    ("--gpu-task-work", "gpu_tasks.work", float, "mean s of work per GPU task on a speed-1.0 device (default 0.05)"),
    ("--gpu-task-speeds", "gpu_tasks.speeds", lambda s: s,
     "comma list of GPU-task device speeds, one device each, e.g. 1,2 (default 1)"),
]
# Repeatable flags: (flag, dotted config key, metavar, help); the values are collected into a list.
LIST_FLAGS: list[tuple[str, str, str, str]] = [
    ("--crash", "faults.crashes", "R@T[+D]", "crash replica R at T s for D s (default --mttr); repeatable"),
    ("--cache-node-loss", "faults.cache_node_loss", "N@T[+D]",
     "result-cache node N unreachable from T s (for D s, else for good); repeatable"),
    ("--edf-deadline", "queue.edf_deadlines", "CLASS=S", "edf: deadline in s for an SLO class; repeatable"),
]
BOOL_FLAGS: list[tuple[str, str, bool, str]] = [
    ("--no-chunked-prefill", "scheduler.chunked_prefill", False, "whole prompts in prefill-only steps"),
    ("--no-prefix-caching", "scheduler.prefix_caching", False, "turn off KV prefix caching"),
    ("--no-jump", "jump", False, "simulate every decode step as its own event (slower; same records)"),
]


def _dest(key: str) -> str:
    return "cfg__" + key.replace(".", "__")


def add_sim_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("cluster and policies (override the --config file)")
    for flag, key, typ, help_ in SIM_FLAGS:
        g.add_argument(flag, dest=_dest(key), type=typ, default=None, help=help_,
                       metavar=flag.lstrip("-").split("-")[-1].upper() if typ is not str else "NAME")
    for flag, key, val, help_ in BOOL_FLAGS:
        g.add_argument(flag, dest=_dest(key), action="store_const", const=val, default=None, help=help_)
    for flag, key, metavar, help_ in LIST_FLAGS:
        g.add_argument(flag, dest=_dest(key), action="append", default=None, metavar=metavar, help=help_)


def add_trace_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("workload")
    g.add_argument("--trace", default=None,
                   help="trace file or directory (default: the bundled Azure LLM inference 2023 conversation trace)")
    g.add_argument("--format", default=None, help="trace format (default: detected from the content)")
    g.add_argument("--rate", type=float, default=None,
                   help="arrival rate (req/s) for traces without arrival times (ShareGPT lengths)")
    g.add_argument("--arrival-cv", type=float, default=None,
                   help="inter-arrival coefficient of variation for those synthetic arrivals (1 = Poisson)")
    g.add_argument("--limit", type=int, default=None, help="replay only the first N requests")
    g.add_argument("--rate-scale", type=float, default=None,
                   help="multiply the arrival rate by this factor (time compression)")
    g.add_argument("--window", type=float, nargs=2, metavar=("T0", "T1"), default=None,
                   help="replay only requests arriving in [T0, T1) seconds")


def add_output_flags(p: argparse.ArgumentParser, out_help: str) -> argparse._ArgumentGroup:
    """--out, --json, --progress/--no-progress: shared by the commands that print a run report."""
    g = p.add_argument_group("output")
    g.add_argument("--out", help=out_help)
    g.add_argument("--json", action="store_true", help="print the summary as JSON instead of tables")
    g.add_argument("--progress", dest="progress", action="store_const", const=True, default=None,
                   help="show a progress bar (default: when stderr is a terminal)")
    g.add_argument("--no-progress", dest="progress", action="store_const", const=False)
    return g


def config_from_args(args: argparse.Namespace):
    from sim.config import config_from_dict, load_toml

    data: dict[str, Any] = {}
    where = "flags"
    if getattr(args, "config", None):
        data = load_toml(args.config)
        data.pop("run", None)
        where = f"{args.config} (with flags)"
    for k, v in vars(args).items():
        if k == "cfg__queue__edf_deadlines" and v is not None:
            v = _class_deadlines(v)
        if k.startswith("cfg__") and v is not None:
            parts = k[5:].split("__")
            if len(parts) == 2:
                data.setdefault(parts[0], {})[parts[1]] = v
            else:
                data[parts[0]] = v
    return config_from_dict(data, where=where)


def _class_deadlines(items: list[str]) -> dict[str, float]:
    out: dict[str, float] = {}
    for it in items:
        cls, sep, val = it.partition("=")
        try:
            if not sep:
                raise ValueError
            out[cls] = float(val)
        except ValueError:
            raise ValueError(f"--edf-deadline={it!r}: expected CLASS=SECONDS, e.g. interactive=2") from None
    return out


def load_workload(args: argparse.Namespace):
    from traces import transforms
    from traces.loaders import default_trace_path, load_trace

    run_cfg: dict[str, Any] = {}
    if getattr(args, "config", None):
        from sim.config import load_toml

        run_cfg = load_toml(args.config).get("run", {})
    path = args.trace or run_cfg.get("trace") or str(default_trace_path())
    fmt = args.format or run_cfg.get("format")
    opts: dict[str, Any] = {}
    if getattr(args, "rate", None) is not None:
        opts["rate"] = args.rate
    if getattr(args, "arrival_cv", None) is not None:
        opts["cv"] = args.arrival_cv
    if opts:
        opts.setdefault("seed", getattr(args, "cfg__seed", None) or 0)
    w = load_trace(path, format=fmt, **opts)
    if args.window:
        w = transforms.window(w, args.window[0], args.window[1])
    if args.limit is not None:
        if args.limit < 1:
            raise ValueError(f"--limit={args.limit} is out of range; allowed: >= 1")
        w = transforms.first_n(w, args.limit)
    if args.rate_scale is not None:
        w = transforms.scale_rate(w, args.rate_scale)
    if len(w) == 0:
        raise ValueError(f"{path}: the workload is empty after the selected window/limit")
    return w


def _progress(total: int, enabled: bool, label: str):
    """A rich progress bar over `total` requests, or a no-op."""
    if not enabled:
        return None, None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    prog = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    transient=True, console=_console(stderr=True))
    task = prog.add_task(label, total=total)
    return prog, (lambda i: prog.update(task, completed=i))


def _console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr)


def cmd_simulate(args: argparse.Namespace) -> int:
    from sim.cluster import simulate
    from traces.report import render, summarize, write_outputs

    cfg = config_from_args(args)
    jitter = None
    if args.jitter:
        from sim.jitter import load_jitter

        jitter = load_jitter(args.jitter)
    w = load_workload(args)
    show = args.progress if args.progress is not None else sys.stderr.isatty()
    prog, cb = _progress(len(w), show and not args.json, "simulating")
    if prog:
        with prog:
            result = simulate(w, cfg, progress=cb, jitter=jitter)
    else:
        result = simulate(w, cfg, jitter=jitter)
    summary = summarize(result, cfg.slo)
    from sim.config import flatten

    summary["config"] = flatten(cfg)
    if jitter is not None:
        summary["step_jitter"] = {"source": jitter.source or str(args.jitter), **jitter.summary()}
    if args.json:
        from traces.report import to_json

        print(to_json(summary))
    else:
        title = (f"twinfer simulate: {w.name}, {len(w):,} requests, {len(result.replicas)} x {result.meta['cost_model']}, "
                 f"router {cfg.router}")
        _console().print(render(summary, title=title))
        sim_rate = len(w) / max(result.meta["wall_s"], 1e-9)
        _console().print(f"[dim]simulated {len(w):,} requests in {result.meta['wall_s']:.2f} s wall "
                         f"({sim_rate:,.0f} req/s)[/dim]")
        if jitter is not None:
            from sim.jitter import describe

            _console().print(f"step jitter ({jitter.source or args.jitter}): {describe(jitter)}; seed {cfg.seed} "
                             f"(another --seed draws other step times)")
    if args.out:
        paths = write_outputs(result, summary, args.out)
        if result.timeseries is not None:
            paths.append(write_timeseries(result.timeseries, Path(args.out) / "timeseries.csv"))
        if not args.json:
            _console().print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def write_timeseries(ts: dict, path: Path) -> Path:
    import csv

    names = list(ts)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(names)
        for row in zip(*(ts[n].tolist() for n in names)):
            w.writerow(row)
    return path


def cmd_profiles(args: argparse.Namespace) -> int:
    from rich.table import Table

    from sim.cost import AnalyticCost, device_names, load_device, load_model, model_names

    t = Table(title="shipped analytic profiles (MODEL@DEVICE)")
    for c in ("profile", "tp", "params (B)", "KV capacity (tokens)", "decode step, batch 1 (ms)"):
        t.add_column(c, justify="right" if c != "profile" else "left", no_wrap=c == "profile")
    from sim.cost import StepFeatures

    for m in model_names():
        for d in device_names():
            for tp in (1, 2, 4, 8):
                try:
                    c = AnalyticCost(load_model(m), load_device(d), tp=tp)
                except ValueError:
                    continue
                step = c.step_time(StepFeatures(0, 1, 0.0, 1024, 1))
                t.add_row(f"{m}@{d}", str(tp), f"{c.model.params / 1e9:.1f}", f"{c.kv_capacity_tokens:,}",
                          f"{step * 1e3:.2f}")
                break  # smallest tp that fits
    _console().print(t)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="twinfer",
        description="A digital twin for LLM and agent inference serving: replay production traces through "
                    "shared serving policies in a SimPy simulator or a real torch executor.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("simulate", help="replay a trace through a simulated cluster and report",
                       description="Replay a trace (open loop) through N simulated replicas behind a router and "
                                   "print TTFT/TPOT/ITL/E2E percentiles, throughput, goodput and cache figures.")
    s.add_argument("--config", help="TOML file with the same settings (flags override it); a [run] table may "
                                    "set trace and format")
    add_trace_flags(s)
    add_sim_flags(s)
    s.add_argument("--jitter", metavar="FILE",
                   help="draw each step's time around the cost model from a measured spread (sim.jitter): a "
                        "step-jitter table JSON, or a `twinfer validate --out` file whose loop drift checks "
                        "recorded theirs; decode-run jumps off; the same --seed, the same run")
    add_output_flags(s, "directory for summary.json and records.csv")
    s.set_defaults(func=cmd_simulate)

    pr = sub.add_parser("profiles", help="list the shipped analytic device/model profiles")
    pr.set_defaults(func=cmd_profiles)

    try:
        from traces.cli import register as register_trace
    except ImportError:
        register_trace = None
    if register_trace is not None:
        register_trace(sub)
    for mod in ("executor.cli", "sim.tune_cli", "sim.calibrate_cli"):
        try:
            m = __import__(mod, fromlist=["register"])
        except ImportError as e:
            if e.name and e.name.startswith(mod.split(".")[0] + "." + mod.split(".")[1]):
                continue
            raise
        m.register(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from sim.config import ConfigError
    from traces.workload import TraceError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (TraceError, ConfigError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
