"""`twinfer tune`: Bayesian search of config parameters in the simulator, optionally validated on the executor.

    twinfer tune --space examples/tune_space.toml --limit 2000 --rate-scale 4 --calls 60 --out runs/tune1
    twinfer tune --out runs/tune1 --resume --calls 100     # continue: same space, trace and seed

Writes OUT/evaluations.csv (one row per evaluation, rewritten after every batch), OUT/best.toml
(`twinfer simulate --config OUT/best.toml` runs it), OUT/convergence.png and OUT/tune.json (the
settings, so --resume needs nothing else).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from sim import tune as T
from sim.cli import add_trace_flags, load_workload

_TRACE_KEYS = ("trace", "format", "limit", "rate_scale", "window", "rate", "arrival_cv")
_DEFAULTS: dict[str, Any] = {"calls": 50, "initial": T.DEFAULT_INITIAL, "seed": 0, "estimator": "GP",
                             "acq_func": T.DEFAULT_ACQ_FUNC, "kappa": T.DEFAULT_KAPPA, "xi": T.DEFAULT_XI,
                             "initial_generator": T.DEFAULT_INITIAL_GENERATOR}


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def register(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "tune", help="search config parameters for the best objective in the simulator (scikit-optimize)",
        description="Bayesian optimisation (scikit-optimize ask/tell, seeded) of any config keys over a trace "
                    "replayed in the simulator: maximise goodput, minimise replicas or cost under an SLO-attainment "
                    "target, minimise p99 TTFT, or a weighted mix of report metrics. Settings come from the flags, "
                    "then the space file's [tuner] table, then defaults.")
    p.add_argument("--space", help="search-space TOML: [base] config, [space.<dotted.key>] parameters, [objective] "
                                   "(see examples/tune_space.toml); with --resume, default: the recorded one")
    add_trace_flags(p)
    g = p.add_argument_group("search")
    g.add_argument("--calls", type=int, default=None, help="total evaluations, resumed ones included (default 50)")
    g.add_argument("--initial", type=int, default=None,
                   help=f"space-filling points before the surrogate model steers (default {T.DEFAULT_INITIAL})")
    g.add_argument("--initial-generator", default=None, choices=T.INITIAL_GENERATORS,
                   help=f"how the initial points are spread (default {T.DEFAULT_INITIAL_GENERATOR}: Latin hypercube)")
    g.add_argument("--parallel", type=int, default=None,
                   help=f"evaluations at a time, in a local process pool (default: the number of cores, {_cores()} "
                        f"here). The points asked depend on it: resume with the same value")
    g.add_argument("--seed", type=int, default=None, help="seed of the optimizer (default 0)")
    g.add_argument("--estimator", default=None,
                   help="surrogate: GP (Gaussian process, default) | GBRT | RF | ET | random (random search)")
    g.add_argument("--acq-func", default=None, choices=T.ACQ_FUNCS,
                   help=f"acquisition function (default {T.DEFAULT_ACQ_FUNC}: lower confidence bound, mean - kappa * "
                        f"std); on a finite space of up to {T.EXHAUSTIVE_LIMIT:,} points it is minimised over every "
                        f"point not yet evaluated")
    g.add_argument("--kappa", type=float, default=None,
                   help=f"LCB's exploration weight (default {T.DEFAULT_KAPPA:g}; larger explores more)")
    g.add_argument("--xi", type=float, default=None,
                   help=f"EI's and PI's improvement margin (default {T.DEFAULT_XI:g})")
    g.add_argument("--ray-address", default=None,
                   help="run evaluations as Ray tasks on this cluster (e.g. auto or ray://host:10001) instead of the "
                        "local pool; needs `pip install ray`")
    g.add_argument("--validate", type=int, default=0, metavar="K",
                   help="replay the workload on the real executor with the best K configs and report sim vs real")
    o = p.add_argument_group("output")
    o.add_argument("--out", default="tune-out", help="output directory (default tune-out)")
    o.add_argument("--resume", action="store_true",
                   help="continue the search recorded in OUT (evaluations.csv, tune.json) up to --calls")
    o.add_argument("--progress", dest="progress", action="store_const", const=True, default=None,
                   help="show a progress bar (default: when stderr is a terminal)")
    o.add_argument("--no-progress", dest="progress", action="store_const", const=False)
    p.set_defaults(func=cmd_tune)
    return p


def _setting(name: str, args: argparse.Namespace, prior: dict[str, Any], tuner: dict[str, Any], default: Any) -> Any:
    v = getattr(args, name, None)
    if v is not None:
        return v
    if name in prior:
        return prior[name]
    return tuner.get(name, default)


def cmd_tune(args: argparse.Namespace) -> int:
    from rich.console import Console

    console, err = Console(), Console(stderr=True)
    out = Path(args.out)
    csv_path, meta_path = out / "evaluations.csv", out / "tune.json"
    prior: dict[str, Any] = {}
    if args.resume:
        if not csv_path.exists():
            raise T.TuneError(f"{csv_path}: nothing to resume (file not found)")
        if meta_path.exists():
            prior = json.loads(meta_path.read_text())
    elif csv_path.exists():
        raise T.TuneError(f"{csv_path} exists: pass --resume to continue that search, or choose another --out")

    space_path = args.space or prior.get("space")
    if not space_path:
        raise T.TuneError("--space FILE.toml is required (the search space, base config and objective)")
    spec = T.load_space(space_path)
    settings = {k: _setting(k, args, prior, spec.tuner, d) for k, d in _DEFAULTS.items()}
    settings["parallel"] = _setting("parallel", args, prior, spec.tuner, _cores())
    settings["estimator"] = T.check_estimator(settings["estimator"], "--estimator")
    for k in ("calls", "parallel"):
        if settings[k] < 1:
            raise T.TuneError(f"--{k}={settings[k]} is out of range; allowed: >= 1")
    if settings["initial"] < 1:
        raise T.TuneError(f"--initial={settings['initial']} is out of range; allowed: >= 1")
    T.check_search_settings(settings["acq_func"], settings["kappa"], settings["xi"], settings["initial_generator"])
    for k in ("seed", "estimator", "initial", "parallel", "acq_func", "kappa", "xi", "initial_generator"):
        if prior and k in prior and prior[k] != settings[k]:
            err.print(f"[yellow]warning:[/yellow] --{k.replace('_', '-')} {settings[k]} differs from the resumed run's {prior[k]}: "
                      f"later points differ from an uninterrupted run")

    trace = {k: _setting(k, args, prior, spec.run, None) for k in _TRACE_KEYS}
    if trace["trace"]:
        trace["trace"] = str(Path(trace["trace"]).resolve())  # so --resume and best.toml work from anywhere
    run_workload = _executor() if args.validate else None
    workload = load_workload(argparse.Namespace(**{**vars(args), **trace, "config": None}))
    base_cfg = spec.base_config()
    evaluator = T.SimEvaluator(workload, spec.base, spec.objective, where=f"{space_path} (a tuned point)")
    objective = spec.objective.with_bounds(spec.params, base_cfg, evaluator.offered_rps)
    history = T.read_evaluations(csv_path, spec.params) if args.resume else []

    out.mkdir(parents=True, exist_ok=True)
    meta = {"space": str(Path(space_path).resolve()), **trace, **settings,
            "objective": objective.describe(), "workload": {"name": workload.name, "requests": len(workload),
                                                           "offered_rps": evaluator.offered_rps}}
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")

    runner = T.RayRunner(evaluator, args.ray_address) if args.ray_address else None
    show = args.progress if args.progress is not None else sys.stderr.isatty()
    where = "Ray" if args.ray_address else f"{settings['parallel']} process(es)"
    err.print(f"twinfer tune: {objective.describe()}; {len(spec.params)} parameter(s), "
              f"{settings['calls']} evaluations ({len(history)} resumed) on {where}; "
              f"{workload.name}, {len(workload):,} requests")

    def fmt(v: float) -> str:
        return "-" if v is None or not math.isfinite(v) else f"{v:.4g}"

    prog = task = None
    if show:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        prog = Progress(TextColumn("tuning"), BarColumn(), MofNCompleteColumn(), TextColumn("best {task.fields[best]}"),
                        TimeElapsedColumn(), console=err)
        best0 = T.best_of(history)
        task = prog.add_task("tune", total=settings["calls"], completed=min(len(history), settings["calls"]),
                             best=fmt(best0.value) if best0 else "-")

    def on_batch(evals: list, new: list) -> None:
        T.write_evaluations(evals, spec.params, csv_path)
        if prog is not None:
            b = T.best_of(evals)
            prog.update(task, completed=len(evals), best=fmt(b.value) if b else "-")

    if prog is not None:
        prog.start()
    try:
        result = T.tune(evaluator, spec.params, calls=settings["calls"], initial=settings["initial"],
                        parallel=settings["parallel"], seed=settings["seed"], estimator=settings["estimator"],
                        acq_func=settings["acq_func"], kappa=settings["kappa"], xi=settings["xi"],
                        init_gen=settings["initial_generator"], objective=objective, history=history, runner=runner, on_batch=on_batch)
    finally:
        if prog is not None:
            prog.stop()

    evals = result.evaluations
    T.write_evaluations(evals, spec.params, csv_path)
    written = [csv_path]
    if evals:
        written.append(T.plot_convergence(evals, objective, out / "convergence.png",
                                          title=f"{objective.describe()}\n{workload.name}, {len(workload):,} requests"))
    if result.diverged:
        err.print("[yellow]warning:[/yellow] the recorded evaluations are not what this seed/space/--parallel would "
                  "have asked; the search continued from them anyway")
    if result.exhausted:
        err.print(f"every one of the space's {T.space_size(spec.params):,} points has been evaluated")
    best = result.best
    meta["evaluations"] = len(evals)
    meta["best"] = None if best is None else {"index": best.index, "objective": best.value, "params": best.params}
    meta_path.write_text(json.dumps(meta, indent=2, default=str) + "\n")
    _print_top(console, evals, spec.params, objective)
    if best is None:
        console.print(f"[red]no feasible configuration in {len(evals)} evaluations[/red] "
                      f"({objective.describe()}); no best.toml written")
        console.print("wrote " + ", ".join(str(p) for p in written))
        return 1
    written.insert(0, _write_best(out / "best.toml", evaluator, best, objective, len(evals), trace, workload))
    console.print("wrote " + ", ".join(str(p) for p in written))
    if run_workload is not None:
        _validate(console, run_workload, args.validate, evals, evaluator, objective, spec.params, workload,
                  out / "validation.csv")
    return 0


def _print_top(console: Any, evals: list, params: Any, objective: Any, n: int = 5) -> None:
    from rich.table import Table

    top = T.ranked(evals)[:n]
    bad = {s: sum(e.status == s for e in evals) for s in ("infeasible", "failed")}
    t = Table(title=f"best of {len(evals)} evaluations ({bad['infeasible']} infeasible, {bad['failed']} failed): "
                    f"{objective.describe()}", title_justify="left")
    t.add_column("#", justify="right")
    for p in params:
        t.add_column(p.name.rsplit(".", 1)[-1], justify="right")
    for c in (objective.label, "attainment", "p99 TTFT (s)", "goodput (req/s)"):
        t.add_column(c, justify="right")
    for e in top:
        m = e.metrics
        t.add_row(str(e.index), *(_show(e.params[p.name]) for p in params), f"{e.value:.4g}",
                  _show(m.get("slo_attainment")), _show(m.get("ttft.p99")), _show(m.get("goodput_rps")))
    console.print(t)
    failed = [e for e in evals if e.status == "failed"]
    if failed:
        console.print(f"[yellow]{len(failed)} evaluation(s) failed[/yellow], e.g. #{failed[0].index}: {failed[0].reason}")


def _show(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "-" if not math.isfinite(v) else f"{v:.4g}"
    return str(v)


def _write_best(path: Path, evaluator: Any, best: Any, objective: Any, n: int, trace: dict[str, Any],
                workload: Any) -> Path:
    from sim.config import to_toml

    cfg = evaluator.config(best.params)
    flags = " ".join(f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
                     for k, v in trace.items() if v is not None and k not in ("trace", "format"))
    m = best.metrics
    lines = [f"# twinfer tune: best of {n} evaluations (#{best.index})",
             f"# {objective.describe()}: {best.value:.6g}",
             (f"# SLO attainment {_show(m.get('slo_attainment'))}, p99 TTFT {_show(m.get('ttft.p99'))} s, "
              f"goodput {_show(m.get('goodput_rps'))} req/s"),
             (f"# tuned on {workload.name}, {len(workload):,} requests"
              + (f"; replay the same slice with: twinfer simulate --config {path.name} {flags}" if flags else "")),
             "", to_toml(cfg).rstrip()]
    run = {k: trace[k] for k in ("trace", "format") if trace.get(k)}
    if run:
        lines += ["", "[run]", *(f'{k} = "{v!s}"' for k, v in run.items())]
    path.write_text("\n".join(lines) + "\n")
    return path


def _executor():
    """executor.replay.run_workload(workload, cfg) -> RunResult, or a clear error before any tuning starts."""
    try:
        from executor.replay import run_workload
    except ImportError as e:
        raise T.TuneError(f"--validate: executor not available (executor.replay.run_workload: {e})") from None
    return run_workload


def _validate(console: Any, run_workload: Any, k: int, evals: list, evaluator: Any, objective: Any,
              params: Any, workload: Any, path: Path) -> None:
    import csv

    from rich.table import Table

    from traces.report import summarize

    t = Table(title=f"validation on the executor: best {k} configs, {objective.label}", title_justify="left")
    for c in ("#", *(p.name.rsplit(".", 1)[-1] for p in params), "sim", "real", "error", "sim feasible",
              "real feasible"):
        t.add_column(c, justify="right")
    rows = []
    for e in T.ranked(evals)[:k]:
        cfg = evaluator.config(e.params)
        real = objective.measure(summarize(run_workload(workload, cfg), cfg.slo), cfg, evaluator.offered_rps)
        rel = (real.value - e.value) / abs(e.value) if e.value else math.nan
        rows.append([e.index, *(e.params[p.name] for p in params), e.value, real.value, rel, e.feasible,
                     real.feasible and not real.failed, real.metrics.get("slo_attainment"),
                     real.metrics.get("ttft.p99")])
        t.add_row(str(e.index), *(_show(e.params[p.name]) for p in params), _show(e.value), _show(real.value),
                  f"{rel:+.1%}" if math.isfinite(rel) else "-", str(e.feasible), str(real.feasible and not real.failed))
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["index", *(p.name for p in params), "sim_objective", "real_objective", "relative_error",
                    "sim_feasible", "real_feasible", "real_slo_attainment", "real_ttft_p99"])
        w.writerows(rows)
    console.print(t)
    console.print(f"wrote {path}")
