"""Bayesian tuning (scikit-optimize) vs random search vs an exhaustive grid, on two real traces.

    python experiments/tune_vs_grid.py --grid-cache grid.pkl   # grids ~3 min on 2 cores; searches (3 methods
                                                               # x 80 of 30 evaluations) ~20 min on one core
    python experiments/tune_vs_grid.py --quick                 # a smoke run: fewer seeds, smaller budget

For each trace slice, every point of a small but real grid is simulated once. The searches then run
`sim.tune.tune` against a lookup of those results instead of re-simulating (a run is deterministic
for its config, so a lookup is the simulation; `--check` re-runs one search with the default
settings against the live simulator and asserts identical evaluations). That makes many seeds per
method affordable.

Question asked: does the search get within 2% of the grid's optimum within 10% of the grid's
evaluations? Printed: the best objective found after n evaluations (median and range over seeds),
and per method the number of seeds that got there. Methods: `twinfer tune`'s default (GP, lower
confidence bound minimised over every unseen grid point, 5 Latin-hypercube initial points), the
previous default (GP, skopt's sampled gp_hedge acquisition), and random search.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import pickle
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sim.config import SimConfig, config_from_dict, with_overrides
from sim.tune import (
    InlineRunner,
    Objective,
    Outcome,
    Param,
    SimEvaluator,
    best_so_far,
    tune,
)
from traces import transforms
from traces.loaders import default_trace_path, load_trace
from traces.workload import Workload

ROOT = Path(__file__).resolve().parents[1]
MOONCAKE = ROOT.parent / "shared" / "traces" / "mooncake" / "conversation_trace.jsonl"  # the shared data set
MOONCAKE_VENDORED = ROOT / "tests/data/mooncake/conversation_trace.head300.jsonl"


@dataclass(frozen=True)
class Case:
    name: str
    workload: Workload
    base: dict[str, Any]
    params: tuple[Param, ...]

    @property
    def grid(self) -> list[dict[str, Any]]:
        axes = [range(int(p.low), int(p.high) + 1) if p.type == "integer" else p.values for p in self.params]
        return [dict(zip((p.name for p in self.params), combo)) for combo in itertools.product(*axes)]

    def key(self, point: dict[str, Any]) -> tuple:
        return tuple(repr(point[p.name]) for p in self.params)

    def config(self, point: dict[str, Any]) -> SimConfig:
        return config_from_dict(with_overrides(self.base, point), where=self.name)


def make_cases() -> list[Case]:
    slo = {"ttft": 2.0, "tpot": 0.1}
    azure = transforms.scale_rate(transforms.first_n(load_trace(default_trace_path()), 1000), 16.0)
    mc_path = MOONCAKE if MOONCAKE.exists() else MOONCAKE_VENDORED
    mooncake = transforms.first_n(load_trace(mc_path), 300)
    return [
        Case(f"azure-conv: first 1,000 requests x16 rate ({len(azure) / azure.arrival[-1]:.0f} req/s)", azure,
             {"slo": slo},
             (Param("replicas", "integer", 1, 6),
              Param("scheduler.max_num_seqs", "ordinal", values=(32, 64, 128, 256)),
              Param("scheduler.max_num_batched_tokens", "ordinal", values=(1024, 2048, 4096, 8192)),
              Param("router", "categorical", values=("round_robin", "least_outstanding")))),
        Case(f"mooncake-conversation: first 300 requests ({len(mooncake) / mooncake.arrival[-1]:.1f} req/s, "
             f"p99 prompt 87k tokens)", mooncake, {"slo": {"ttft": 3.0, "tpot": 0.1}},
             (Param("replicas", "integer", 1, 6),
              Param("tp", "ordinal", values=(1, 2, 4)),
              Param("scheduler.max_num_seqs", "ordinal", values=(64, 256)),
              Param("scheduler.max_num_batched_tokens", "ordinal", values=(2048, 8192)),
              Param("router", "categorical", values=("least_outstanding", "prefix_affinity")))),
    ]


OBJECTIVES = {
    "min GPUs s.t. SLO attainment >= 0.99": Objective("min_cost", slo_target=0.99, gpu_hour_price=1.0),
    "max goodput per GPU": Objective("weighted", weights=(("goodput_per_gpu", 1.0),), maximize=True),
}

# ---------------------------------------------------------------- the grid, simulated once

_SIM: SimEvaluator | None = None
_TABLES: dict[str, dict[tuple, dict]] = {}  # case name -> point key -> summary (filled before forking)
_CASES: dict[str, Case] = {}


def _init_grid_worker(case: Case) -> None:
    global _SIM
    _SIM = SimEvaluator(case.workload, case.base, Objective())


def _simulate_point(point: dict[str, Any]) -> tuple[dict[str, Any], float]:
    from sim.cluster import simulate
    from traces.report import summarize

    assert _SIM is not None
    t0 = time.perf_counter()
    cfg = _SIM.config(point)
    s = summarize(simulate(_SIM.workload, cfg), cfg.slo)
    s.pop("replicas"), s.pop("meta"), s.pop("reasons")
    return s, time.perf_counter() - t0


def simulate_grid(case: Case, workers: int) -> tuple[dict[tuple, dict], float, float]:
    grid = case.grid
    t0 = time.perf_counter()
    with ProcessPoolExecutor(workers, initializer=_init_grid_worker, initargs=(case,)) as pool:
        results = list(pool.map(_simulate_point, grid, chunksize=4))
    table = {case.key(p): s for p, (s, _) in zip(grid, results)}
    return table, time.perf_counter() - t0, statistics.mean(w for _, w in results)


class Lookup:
    """The simulator, answered from the grid table: a function of named parameters, like SimEvaluator."""

    def __init__(self, case: Case, objective: Objective, offered_rps: float):
        self.case, self.objective, self.offered_rps = case, objective, offered_rps

    def __call__(self, **point: Any) -> Outcome:
        summary = _TABLES[self.case.name][self.case.key(point)]
        return self.objective.measure(summary, self.case.config(point), self.offered_rps)


# label -> tune() settings; the first is `twinfer tune`'s default (tune()'s own defaults)
METHODS: dict[str, dict[str, Any]] = {
    "GP-LCB (default)": {},
    "GP-hedge (before)": {"acq_func": "gp_hedge", "exhaustive": 0},
    "random": {"estimator": "random"},
}


def _search(job: tuple[str, str, str, int, int, int]) -> list[float]:
    case_name, obj_name, method, seed, budget, parallel = job
    case = _CASES[case_name]
    objective, offered = _bound(case, OBJECTIVES[obj_name])
    res = tune(Lookup(case, objective, offered), case.params, calls=budget, seed=seed, objective=objective,
               parallel=parallel, runner=InlineRunner(Lookup(case, objective, offered)), **METHODS[method])
    failed = [e for e in res.evaluations if e.status == "failed"]
    if failed:  # a grid point always simulates: a failure here is a lookup bug
        raise RuntimeError(f"{case_name}: evaluation {failed[0].index} failed: {failed[0].reason}")
    return best_so_far(res.evaluations, objective)


def _bound(case: Case, objective: Objective) -> tuple[Objective, float]:
    offered = SimEvaluator(case.workload, case.base, objective).offered_rps
    return objective.with_bounds(case.params, case.config({}), offered), offered


# ---------------------------------------------------------------- report

def _within(v: float, opt: float, maximize: bool, tol: float = 0.02) -> bool:
    if not math.isfinite(v):
        return False
    return v >= opt * (1 - tol) if maximize else v <= opt * (1 + tol)


def _evals_to_reach(curve: list[float], opt: float, maximize: bool) -> int | None:
    for i, v in enumerate(curve):
        if _within(v, opt, maximize):
            return i + 1
    return None


def _fmt(v: float) -> str:
    return "-" if not math.isfinite(v) else f"{v:.4g}"


def _cell_stats(values: list[float], maximize: bool) -> str:
    fin = [v for v in values if math.isfinite(v)]
    if not fin:
        return "none feasible"
    med = statistics.median(fin) if len(fin) == len(values) else math.nan
    lo, hi = min(fin), max(fin)
    worst, best = (lo, hi) if maximize else (hi, lo)
    miss = len(values) - len(fin)
    return f"{_fmt(med)} [{_fmt(worst)}..{_fmt(best)}]" + (f" ({miss} none)" if miss else "")


def _cell_line(cols: list[str], widths: list[int], left: int = 1) -> str:
    return "   " + "  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(cols, widths)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="5 seeds per method, budget 20, no --check")
    ap.add_argument("--seeds", type=int, default=20, help="seeds per method (default 20)")
    ap.add_argument("--methods", default=",".join(METHODS),
                    help=f"comma-separated subset of: {', '.join(METHODS)} (default all)")
    ap.add_argument("--budget", type=int, default=30, help="evaluations per search (default 30)")
    ap.add_argument("--parallel", type=int, default=1,
                    help="points asked per batch (constant liar for > 1); evaluated in turn on the lookup")
    ap.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--grid-cache", type=Path, default=None,
                    help="pickle of the simulated grids: read if present, else written (to re-run only the searches)")
    ap.add_argument("--check", action=argparse.BooleanOptionalAction, default=True,
                    help="re-run one default search on the live simulator and compare with the lookup (default on)")
    args = ap.parse_args(argv)
    if args.quick:
        args.seeds, args.budget, args.check = 5, 20, False
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in names:
        if m not in METHODS:
            ap.error(f"--methods: unknown method {m!r}; valid: {', '.join(METHODS)}")
    # (label, seeds)
    methods = [(m, args.seeds) for m in names]

    t_start = time.perf_counter()
    cases = make_cases()
    cached = pickle.loads(args.grid_cache.read_bytes()) if args.grid_cache and args.grid_cache.exists() else {}
    for case in cases:
        _CASES[case.name] = case
        hit = case.name in cached
        table, wall, per = cached[case.name] if hit else simulate_grid(case, args.workers)
        cached[case.name] = table, wall, per
        _TABLES[case.name] = table
        how = f"read from {args.grid_cache}" if hit else f"simulated in {wall:.0f} s with {args.workers} worker(s)"
        print(f"== {case.name}\n   grid: {' x '.join(str(p.size) for p in case.params)} = {len(table)} points "
              f"({', '.join(p.name for p in case.params)}); {how} ({per:.2f} s per simulation)", flush=True)
    if args.grid_cache:
        args.grid_cache.write_bytes(pickle.dumps(cached))

    jobs = [(c.name, o, m, seed, args.budget, args.parallel)
            for c in cases for o in OBJECTIVES for m, n in methods for seed in range(n)]
    t0 = time.perf_counter()
    if args.workers > 1:
        with ProcessPoolExecutor(args.workers) as pool:  # forked: the lookup tables are inherited
            curves = dict(zip(jobs, pool.map(_search, jobs)))
    else:
        curves = {j: _search(j) for j in jobs}
    search_wall = time.perf_counter() - t0

    def runs(case: Case, obj_name: str, m: str, n: int) -> list[list[float]]:
        return [curves[(case.name, obj_name, m, s, args.budget, args.parallel)] for s in range(n)]

    summary = []
    for case in cases:
        size = len(_TABLES[case.name])
        tenth = math.ceil(0.1 * size)
        short = case.name.split(":")[0]
        for obj_name, obj in OBJECTIVES.items():
            bound, offered = _bound(case, obj)
            lookup = Lookup(case, bound, offered)
            feas = [(p, o) for p, o in ((p, lookup(**p)) for p in case.grid) if o.feasible and not o.failed]
            if not feas:
                print(f"\n-- {short} / {obj_name}: no feasible grid point")
                continue
            sign = -1 if bound.maximizes else 1
            opt_p, opt_o = min(feas, key=lambda po: sign * po[1].value)
            opt = opt_o.value
            n_near = sum(1 for _, o in feas if _within(o.value, opt, bound.maximizes))
            print(f"\n-- {short} / {obj_name}\n   grid optimum {_fmt(opt)} at {opt_p}\n   {len(feas)}/{size} grid "
                  f"points feasible, {n_near} within 2% of the optimum. Best found after n evaluations, "
                  f"median [worst..best] over seeds:")
            head = ["evals", *(f"{label} ({n} seeds)" for label, n in methods)]
            lines = []
            for k in [n for n in sorted({5, 10, tenth, 20, args.budget}) if n <= args.budget]:
                lines.append([f"{k}" + (" (10%)" if k == tenth else ""),
                              *(_cell_stats([c[k - 1] for c in runs(case, obj_name, m, n)], bound.maximizes)
                                for m, n in methods)])
            lines.append([f"{size} (grid)", *([_fmt(opt)] + [""] * (len(methods) - 1))])
            widths = [max(len(r[i]) for r in [head, *lines]) for i in range(len(head))]
            for r in [head, *lines]:
                print(_cell_line(r, widths))
            row = [short, obj_name, _fmt(opt), str(size), str(tenth)]
            for m, n in methods:
                cs = runs(case, obj_name, m, n)
                hit = sum(_within(c[tenth - 1], opt, bound.maximizes) for c in cs)
                reach = sorted(r if r is not None else math.inf
                               for r in (_evals_to_reach(c, opt, bound.maximizes) for c in cs))
                med = statistics.median(reach)
                row.append(f"{hit}/{n}, {med:g}" if math.isfinite(med) else f"{hit}/{n}, >{args.budget}")
            summary.append(row)

    print("\n== Within 2% of the grid optimum by 10% of the grid's evaluations? "
          "(seeds that were; median evaluations to get there)")
    head = ["trace", "objective", "grid opt", "grid n", "10%", *(label for label, _ in methods)]
    widths = [max(len(r[i]) for r in [head, *summary]) for i in range(len(head))]
    for r in [head, *summary]:
        print(_cell_line(r, widths, left=2))

    ok = True
    if args.check:
        case = cases[0]
        obj_name = next(iter(OBJECTIVES))
        bound, offered = _bound(case, OBJECTIVES[obj_name])
        n = min(args.budget, 20)
        t0 = time.perf_counter()
        live = tune(SimEvaluator(case.workload, case.base, bound), case.params, calls=n, seed=0, objective=bound)
        wall = time.perf_counter() - t0
        looked = tune(Lookup(case, bound, offered), case.params, calls=n, seed=0, objective=bound)
        ok = [(e.params, e.value, e.loss) for e in live.evaluations] == \
            [(e.params, e.value, e.loss) for e in looked.evaluations]
        print(f"\n== check: a default search (seed 0, {n} evaluations) on the live simulator ({wall:.0f} s) makes the "
              f"same evaluations as on the lookup: {ok}")
    print(f"\n(searches {search_wall:.0f} s, total {time.perf_counter() - t_start:.0f} s)")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
