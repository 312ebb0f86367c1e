"""`twinfer run`: replay a trace in real time on the executor and report, as `twinfer simulate` does.

The workload and policy flags are the simulator's (sim.cli), so the same slice and settings run in both;
--profile and --no-jump describe the simulation and are refused here, as is --tp other than 1.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from sim.cli import _console, _progress, add_output_flags, add_sim_flags, add_trace_flags, config_from_args, load_workload

# The simulator's flags that describe simulated hardware or simulation mechanics: no meaning on the executor.
# (--tp is hidden too; a value other than 1 is refused by executor.replay.)
_SIM_ONLY = {"cfg__profile": "--profile", "cfg__jump": "--no-jump"}
_HIDDEN = {*_SIM_ONLY, "cfg__tp"}


def register(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "run", help="replay a trace in real time on the torch executor and report",
        description="Replay a trace open loop, in real time, on N executor replicas (a torch Llama-style model "
                    "per replica, CUDA when present, else the CPU) behind the shared router and scheduler, and print "
                    "the same report as `twinfer simulate`. Latencies count from each request's intended send time.")
    p.add_argument("--config", help="TOML file with the same settings (flags override it); a [run] table may "
                                    "set trace and format")
    add_trace_flags(p)
    add_sim_flags(p)
    for a in p._actions:  # the simulator's hardware flags: hidden here, refused if given
        if a.dest in _HIDDEN:
            a.help = argparse.SUPPRESS
    g = p.add_argument_group("executor")
    g.add_argument("--model", default="default",
                   help="model preset (tiny | default | llama-3.2-1b: random weights from --seed) or a local "
                        "Hugging Face directory (config.json + model.safetensors) (default: default)")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto: CUDA if present)")
    g.add_argument("--metrics-port", type=int, default=None,
                   help="serve live Prometheus metrics on 127.0.0.1:PORT during the run (0 = any free port)")
    g.add_argument("--telemetry-interval", type=float, default=0.5,
                   help="seconds between telemetry samples (default 0.5)")
    g.add_argument("--max-duration", type=float, default=None,
                   help="stop after this many wall seconds; unfinished requests are recorded as failed")
    g.add_argument("--threads", type=int, default=None,
                   help="torch threads per replica (default: cores // replicas)")
    add_output_flags(p, "directory for summary.json, records.csv, telemetry.csv and steps.csv")
    p.set_defaults(func=cmd_run)
    return p


def cmd_run(args: argparse.Namespace) -> int:
    from executor.device import DeviceUnavailableError
    from executor.replay import ReplayInterrupted, run_workload
    from sim.config import flatten
    from traces.report import render, summarize, to_json

    for dest, flag in _SIM_ONLY.items():
        if getattr(args, dest, None) is not None:
            raise ValueError(f"{flag} is the simulator's; `twinfer run` runs --model on --device")
    cfg = config_from_args(args)
    w = load_workload(args)
    show = args.progress if args.progress is not None else sys.stderr.isatty()
    prog, cb = _progress(len(w), show and not args.json, "running")
    console = _console()

    def started(info: dict[str, Any]) -> None:
        if info["metrics_url"] and not args.json:
            console.print(f"[dim]metrics at {info['metrics_url']}[/dim]")

    interrupted = False
    try:
        kw = dict(model_config=args.model, device=args.device, metrics_port=args.metrics_port,
                  telemetry_interval=args.telemetry_interval, out=args.out, progress=cb,
                  max_duration=args.max_duration, on_start=started, threads=args.threads)
        if prog:
            with prog:
                result = run_workload(w, cfg, **kw)
        else:
            result = run_workload(w, cfg, **kw)
    except DeviceUnavailableError as e:
        raise ValueError(str(e)) from None
    except ReplayInterrupted as e:
        result, interrupted = e.result, True
    summary = summarize(result, cfg.slo)
    summary["config"] = flatten(cfg)
    meta = result.meta
    if args.json:
        print(to_json(summary))
    else:
        title = (f"twinfer run (executor): {w.name}, {len(w):,} requests, {cfg.replicas} x {meta['model']} on "
                 f"{meta['device']} ({meta['threads_per_replica']} thread(s) each), router {cfg.router}")
        console.print(render(summary, title=title))
        lag = meta["send_lag_s"].get("max", 0.0) * 1e3
        console.print(f"[dim]{meta['kv_blocks_per_replica']:,} KV blocks per replica ({meta['kv_capacity']}); "
                      f"sends at most {lag:.1f} ms late; {meta['wall_s']:.1f} s wall[/dim]")
        if meta["stopped"]:
            console.print(f"[yellow]stopped early: {meta['stopped']}[/yellow]")
        if args.out:
            console.print(f"wrote summary.json, records.csv, telemetry.csv, steps.csv in {args.out}")
    return 130 if interrupted else 0
