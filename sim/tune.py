"""Bayesian tuning of any dotted config key against an objective over the simulation report.

The tuner sees a function of named parameters (STYLE.md item 9): `evaluate(**params)` returns a
float (minimised) or an `Outcome`. `SimEvaluator` is that function for the simulator; tests pass
plain Python functions.

scikit-optimize's `Optimizer` is driven in batches: ask k points (k = parallel workers; constant
liar for k > 1), evaluate them, tell the k results in index order. Resuming replays the recorded
batches (the same asks, the recorded results told), so the optimizer's state and every later point
are what an uninterrupted run with the same seed, space and batch size would have produced.

Base estimator: a Gaussian process by default. Spaces here are small (a handful of integer,
ordinal and categorical knobs) and evaluations cost a simulation each, so the GP's sample
efficiency wins; its fit cost (~0.1 s per step at 100 points, single-threaded BLAS) is noise
next to a simulation. GBRT (and RF/ET) are offered for rougher, larger spaces; "random" is
random search without repeats, the baseline.

Search settings (the DEFAULT_* constants): GP, acquisition LCB (mean - 1.96 std), 5 Latin-hypercube
initial points, and on a finite space (every dimension integer, ordinal or categorical; up to
EXHAUSTIVE_LIMIT points) the acquisition minimised over every point not evaluated yet, in place of
skopt's 10,000 random candidates, which may include evaluated points: a repeat would teach the
model nothing and has to be swapped for a random point. Batches (k > 1) take the k best picks by
constant liar (each pick told the best loss so far, the model refitted, the next one picked).
Chosen on experiments/tune_vs_grid.py: 2 traces x 2 objectives (min GPUs s.t. SLO attainment, max
goodput per GPU; grids of 192 and 144 points), seeds 0-19 each, looked up on the simulated grid;
a hit = within 2% of the grid optimum within 10% of the grid's evaluations (20 and 15). Hits of
80 (per case: azure min-GPUs, azure goodput/GPU, mooncake min-GPUs, mooncake goodput/GPU):
  GP, LCB kappa 1.96, exhaustive, LHS, 5 initial (default)   66  [19 20 13 14]
  GP, LCB kappa 1.96, skopt-sampled                           65  [20 20 11 14]
  GP, gp_hedge, skopt-sampled, 5 initial (previous default)   60  [17 20 13 10]
  GP, EI xi 0.01 / PI, exhaustive                             63 / 57
  GP, LCB kappa 1.0 / 3.0                                     53 / 62
  GP, LCB, 3 initial points                                   57
  GP, EI, Sobol / Halton initial design (LHS: 63)             59 / 55
  GP, LCB, fixed noise 1e-6 instead of a fitted one           60
  ET (extra trees), EI                                        36
  random search                                               25  [ 8  5  6  6]
  default, 4 points a batch (constant liar, min lie; max: 52) 56  [19 18 11  8]
By 30 evaluations (16-21% of the grids) the default is at the optimum in all 80 searches; the
previous default still misses on mooncake min-GPUs (its worst seed at 20 GPUs); random: 39/80.
A count's seed noise is ~3.5 hits (binomial, 80 trials): LCB vs EI (66/63) and exhaustive vs
sampled LCB (66/65) are ties; exhaustive is kept because it never repeats a point and scores a
few hundred candidates instead of 10,000 a step. Clearly worse: kappa 1, 3 initial points (and
10, in an earlier 5-seed run: 12/20 vs 14/20), PI, Halton, trees. Penalty variants for infeasible
points (every one told more than any feasible point, with EI; a price growing as sqrt(shortfall),
with LCB) helped the mooncake min-GPUs case and hurt the azure one by more (21/40 vs 30/40 and
28/40 vs 32/40 on the two min-GPUs cases), so the linear penalty stays. What is left is budget:
mooncake's optimum is the corner of a diagonal ridge (goodput per GPU peaks where replicas x tp
~ 4) or a 4-in-144 feasible needle (min GPUs), and 15 evaluations find it in ~2 of 3 seeds.
"""

from __future__ import annotations

import csv
import itertools
import math
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from itertools import groupby
from pathlib import Path
from typing import Any

import numpy as np

from sim.config import (
    ConfigError,
    SimConfig,
    config_from_dict,
    load_toml,
    with_overrides,
)

PARAM_TYPES = ("real", "integer", "categorical", "ordinal")
PRIORS = ("uniform", "log-uniform")
OBJECTIVES = ("max_goodput", "min_replicas", "min_cost", "min_p99_ttft", "weighted")
ESTIMATORS = ("GP", "GBRT", "RF", "ET", "random")
ACQ_FUNCS = ("LCB", "EI", "PI", "gp_hedge")
INITIAL_GENERATORS = ("lhs", "sobol", "halton", "random")
# The defaults, chosen on experiments/tune_vs_grid.py (see the module docstring).
DEFAULT_INITIAL = 5
DEFAULT_ACQ_FUNC = "LCB"
DEFAULT_KAPPA = 1.96
DEFAULT_XI = 0.01
DEFAULT_INITIAL_GENERATOR = "lhs"
EXHAUSTIVE_LIMIT = 20_000  # finite spaces up to this many points: the acquisition is minimised over all unseen points

# Metrics an objective can weigh, and the ones every evaluations.csv row carries.
_DISTS = ("ttft", "tpot", "e2e", "queueing", "itl")
_STATS = ("mean", "p50", "p90", "p95", "p99")
_SCALARS = ("goodput_rps", "slo_attainment", "throughput_rps", "output_tokens_per_s", "ok", "rejected", "timed_out",
            "failed", "preemptions", "prefix_hit_rate", "duration_s")
_DERIVED = ("replicas", "tp", "gpus", "cost_per_hour", "goodput_per_gpu", "offered_rps")
METRIC_NAMES = (*_SCALARS, *(f"{d}.{s}" for d in _DISTS for s in _STATS), *_DERIVED)
KEY_METRICS = ("goodput_rps", "slo_attainment", "throughput_rps", "ttft.p50", "ttft.p99", "tpot.p99", "e2e.p99",
               "rejected", "timed_out", "gpus", "cost_per_hour")


class TuneError(ConfigError):
    """A bad search space, objective or tuning setting: names the file and the key."""


# --------------------------------------------------------------------------- search space

@dataclass(frozen=True)
class Param:
    """One tuned config key. `values` are the categories (categorical) or the ordered values (ordinal)."""

    name: str
    type: str
    low: float | None = None
    high: float | None = None
    prior: str = "uniform"
    values: tuple[Any, ...] = ()

    def dimension(self):
        from skopt.space import Categorical, Integer, Real

        if self.type == "real":
            return Real(self.low, self.high, prior=self.prior, name=self.name)
        if self.type == "integer":
            return Integer(int(self.low), int(self.high), prior=self.prior, name=self.name)
        if self.type == "categorical":
            return Categorical(list(self.values), name=self.name)
        return Integer(0, len(self.values) - 1, name=self.name)  # ordinal: the GP sees the rank

    def decode(self, x: Any) -> Any:
        """Optimizer value -> config value, as a plain Python object."""
        if self.type == "real":
            return float(x)
        if self.type == "integer":
            return int(x)
        if self.type == "ordinal":
            return self.values[int(x)]
        for c in self.values:
            if c == x:
                return c
        raise ValueError(f"{self.name}: {x!r} is not one of {list(self.values)}")

    def encode(self, v: Any) -> Any:
        """Config value -> optimizer value."""
        if self.type == "ordinal":
            for i, c in enumerate(self.values):
                if c == v:
                    return i
            raise ValueError(f"{self.name}: {v!r} is not one of {list(self.values)}")
        return self.decode(v)

    def parse(self, text: str) -> Any:
        """A CSV cell -> config value."""
        if self.type == "real":
            return float(text)
        if self.type == "integer":
            return int(float(text))
        for c in self.values:
            if _cell(c) == text:
                return c
        raise ValueError(f"{self.name}: {text!r} is not one of {list(self.values)}")

    def candidates(self) -> list[Any]:
        """Values that must each build a valid config: the bounds, or every category."""
        if self.type == "real":
            return [float(self.low), float(self.high)]
        if self.type == "integer":
            return [int(self.low), int(self.high)]
        return list(self.values)

    @property
    def size(self) -> int | None:
        if self.type == "real":
            return None
        if self.type == "integer":
            return int(self.high) - int(self.low) + 1
        return len(self.values)


def space_size(params: Sequence[Param]) -> int | None:
    """Number of distinct points, or None when a dimension is continuous."""
    n = 1
    for p in params:
        if p.size is None:
            return None
        n *= p.size
    return n


# --------------------------------------------------------------------------- objective

@dataclass(frozen=True)
class Outcome:
    """What one evaluation gave. `value` is in the objective's natural units (req/s, replicas, $/h, s)."""

    value: float
    feasible: bool = True
    reason: str = ""
    shortfall: float = 0.0  # (target - attainment) / target for an infeasible point, in (0, 1]
    metrics: dict[str, float] = field(default_factory=dict)
    failed: bool = False


@dataclass(frozen=True)
class Objective:
    """What to optimise. kind "value": a plain function's return, minimised (or maximised).

    An infeasible point is told its own loss plus a price per unit of shortfall (a penalty method):
    `loss + 2 * (|worst| + scale) * shortfall`, where `worst` is the worst loss a feasible point can
    have (known from the space for min_replicas, min_cost and max_goodput; else the point's own
    loss). So the told surface slopes down towards the feasibility boundary, where constrained
    optima sit, instead of dropping off a cliff there that a smooth surrogate cannot fit. Where
    `worst` is known, a point that misses by half the target is told more than any feasible point.
    Only feasible points can be reported best. A failed evaluation is told the worst loss of those
    that did not fail, plus 3 * scale.
    """

    kind: str = "value"
    slo_target: float | None = None
    gpu_hour_price: float = 1.0
    weights: tuple[tuple[str, float], ...] = ()
    maximize: bool = False  # for kind "weighted" and "value"
    worst: float | None = None  # the worst loss a feasible point can have, where known
    scale: float = 1.0  # the loss unit penalties are measured in

    @property
    def maximizes(self) -> bool:
        return self.kind == "max_goodput" or (self.kind in ("weighted", "value") and self.maximize)

    @property
    def label(self) -> str:
        return {"max_goodput": "goodput (req/s)", "min_replicas": "replicas", "min_cost": "cost ($/h)",
                "min_p99_ttft": "p99 TTFT (s)", "weighted": "weighted objective",
                "value": "objective"}[self.kind]

    def describe(self) -> str:
        s = f"{'maximise' if self.maximizes else 'minimise'} {self.label}"
        if self.kind == "weighted":
            s += " = " + " + ".join(f"{w:g} x {m}" for m, w in self.weights)
        if self.slo_target is not None:
            s += f" subject to SLO attainment >= {self.slo_target:g}"
        return s

    def metric_names(self) -> list[str]:
        return list(dict.fromkeys([*KEY_METRICS, *(m for m, _ in self.weights)]))

    def measure(self, summary: Mapping[str, Any], cfg: SimConfig, offered_rps: float) -> Outcome:
        """A simulation report -> Outcome."""
        m = report_metrics(summary, cfg, offered_rps, self.gpu_hour_price)
        if self.kind == "max_goodput":
            value = m["goodput_rps"]
        elif self.kind == "min_replicas":
            value = m["replicas"]
        elif self.kind == "min_cost":
            value = m["cost_per_hour"]
        elif self.kind == "min_p99_ttft":
            value = m["ttft.p99"]
        elif self.kind == "weighted":
            value = sum(w * m[k] for k, w in self.weights)
        else:
            raise TuneError(f"objective kind '{self.kind}' needs a function, not a simulation report")
        keep = {k: float(m[k]) for k in self.metric_names()}
        if self.slo_target is not None:
            att = m["slo_attainment"]
            if not att >= self.slo_target:
                short = (self.slo_target - att) / self.slo_target if math.isfinite(att) else 1.0
                return Outcome(value, False, f"SLO attainment {att:.4f} < target {self.slo_target:g}",
                               min(max(short, 1e-9), 1.0), keep)
        if not math.isfinite(value):
            return Outcome(value, False, f"{self.label} is undefined (no request completed)", 1.0, keep, failed=True)
        return Outcome(value, True, "", 0.0, keep)

    def loss(self, out: Outcome, told: Sequence[float]) -> float:
        """The number told to the optimizer (smaller is better); `told`: the losses of earlier evaluations
        that did not fail."""
        raw = -out.value if self.maximizes else out.value
        if out.failed or not math.isfinite(raw):
            bound = [t for t in told if math.isfinite(t)] + ([self.worst] if self.worst is not None else [])
            return (max(bound) if bound else 0.0) + 3 * self.scale
        if out.feasible:
            return float(raw)
        price = 2 * (abs(self.worst if self.worst is not None else raw) + self.scale)
        return float(raw + price * out.shortfall)

    def with_bounds(self, params: Sequence[Param], base: SimConfig, offered_rps: float) -> Objective:
        """Fill `worst` and `scale` from the space (largest replicas/tp) and the workload's rate."""
        def top(key: str) -> float:
            for p in params:
                if p.name == key:
                    return float(max(p.candidates()))
            return float(getattr(base, key))

        if self.kind == "min_replicas":
            return replace(self, worst=top("replicas"), scale=1.0)
        if self.kind == "min_cost":
            return replace(self, worst=top("replicas") * top("tp") * self.gpu_hour_price, scale=self.gpu_hour_price)
        if self.kind == "max_goodput":
            return replace(self, worst=0.0, scale=max(offered_rps, 1e-9))
        if self.kind == "min_p99_ttft":
            return replace(self, scale=base.slo.ttft or 1.0)
        return self


def report_metrics(summary: Mapping[str, Any], cfg: SimConfig, offered_rps: float,
                   gpu_hour_price: float = 1.0) -> dict[str, float]:
    """The flat metric vocabulary (METRIC_NAMES) of one simulation report."""
    def num(v: Any) -> float:
        return math.nan if v is None else float(v)

    m: dict[str, float] = {k: num(summary.get(k)) for k in _SCALARS}
    for d in _DISTS:
        for s in _STATS:
            m[f"{d}.{s}"] = num(summary.get(d, {}).get(s))
    gpus = cfg.replicas * cfg.tp
    m.update(replicas=float(cfg.replicas), tp=float(cfg.tp), gpus=float(gpus),
             cost_per_hour=gpus * gpu_hour_price, goodput_per_gpu=m["goodput_rps"] / gpus,
             offered_rps=float(offered_rps))
    return m


# --------------------------------------------------------------------------- space files

@dataclass(frozen=True)
class SpaceSpec:
    """A parsed search-space file."""

    base: dict[str, Any]
    params: tuple[Param, ...]
    objective: Objective
    tuner: dict[str, Any] = field(default_factory=dict)  # estimator, initial, calls, parallel, seed
    run: dict[str, Any] = field(default_factory=dict)  # trace flags: trace, format, limit, rate_scale, ...
    where: str = "space"

    def base_config(self) -> SimConfig:
        return config_from_dict(self.base, where=f"{self.where} [base]")


_TABLES = ("base", "space", "objective", "tuner", "run")
_PARAM_KEYS = {"real": ("type", "low", "high", "prior"), "integer": ("type", "low", "high", "prior"),
               "categorical": ("type", "categories"), "ordinal": ("type", "values")}
_OBJECTIVE_KEYS = ("kind", "slo_target", "gpu_hour_price", "weights", "direction")
_TUNER_KEYS = {"estimator": (str,), "initial": (int,), "calls": (int,), "parallel": (int,), "seed": (int,),
               "acq_func": (str,), "kappa": (int, float), "xi": (int, float), "initial_generator": (str,)}
_RUN_KEYS = ("trace", "format", "limit", "rate_scale", "window", "rate", "arrival_cv")


def load_space(path: str | Path) -> SpaceSpec:
    return parse_space(load_toml(path), where=str(path))


def parse_space(data: Mapping[str, Any], where: str = "space") -> SpaceSpec:
    """A search-space file's tables -> SpaceSpec; every error names the file and the key."""
    for k in data:
        if k not in _TABLES:
            raise TuneError(f"{where}: unknown table [{k}]; valid: {', '.join(f'[{t}]' for t in _TABLES)}")
    for k in _TABLES:
        if k in data and not isinstance(data[k], dict):
            raise TuneError(f"{where}: '{k}' must be a table ([{k}])")
    base = dict(data.get("base", {}))
    base_cfg = _config(base, f"{where} [base]")
    params = tuple(_params(data.get("space", {}), where))
    if not params:
        raise TuneError(f"{where}: no parameters to tune; add [space.<key>] tables, e.g. [space.replicas] "
                        f"type = \"integer\", low = 1, high = 8")
    for p in params:
        for v in p.candidates():
            _config(with_overrides(base, {p.name: v}), f"{where} [space.\"{p.name}\"] = {v!r}")
    objective = _objective(data.get("objective"), where, base_cfg, params)
    tuner = dict(data.get("tuner", {}))
    for k, v in tuner.items():
        if k not in _TUNER_KEYS:
            raise TuneError(f"{where}: unknown key 'tuner.{k}'; valid: {', '.join('tuner.' + t for t in _TUNER_KEYS)}")
        if not isinstance(v, _TUNER_KEYS[k]) or isinstance(v, bool):
            raise TuneError(f"{where}: 'tuner.{k}' must be {' or '.join(t.__name__ for t in _TUNER_KEYS[k])}, "
                            f"got {v!r}")
    if "estimator" in tuner:
        tuner["estimator"] = check_estimator(tuner["estimator"], f"{where}: tuner.estimator")
    check_search_settings(tuner.get("acq_func", DEFAULT_ACQ_FUNC), tuner.get("kappa", DEFAULT_KAPPA),
                          tuner.get("xi", DEFAULT_XI), tuner.get("initial_generator", DEFAULT_INITIAL_GENERATOR),
                          where=f"{where}: tuner.")
    run = dict(data.get("run", {}))
    for k in run:
        if k not in _RUN_KEYS:
            raise TuneError(f"{where}: unknown key 'run.{k}'; valid: {', '.join('run.' + t for t in _RUN_KEYS)}")
    return SpaceSpec(base, params, objective, tuner, run, where)


def _config(data: dict[str, Any], where: str) -> SimConfig:
    try:
        return config_from_dict(data, where=where)
    except ConfigError as e:
        raise TuneError(str(e)) from None


def check_estimator(name: str, where: str) -> str:
    for e in ESTIMATORS:
        if e.lower() == str(name).lower():
            return e
    raise TuneError(f"{where}: unknown estimator {name!r}; valid: {' | '.join(ESTIMATORS)}")


def check_search_settings(acq_func: str, kappa: float, xi: float, init_gen: str, where: str = "--") -> None:
    """The acquisition and initial-design settings; `where` prefixes the key in the message."""
    flag = where == "--"
    if acq_func not in ACQ_FUNCS:
        raise TuneError(f"{where}{'acq-func' if flag else 'acq_func'}: unknown acquisition function {acq_func!r}; "
                        f"valid: {' | '.join(ACQ_FUNCS)}")
    if init_gen not in INITIAL_GENERATORS:
        raise TuneError(f"{where}{'initial-generator' if flag else 'initial_generator'}: unknown generator "
                        f"{init_gen!r}; valid: {' | '.join(INITIAL_GENERATORS)}")
    for k, v in (("kappa", kappa), ("xi", xi)):
        if not (math.isfinite(v) and v >= 0):
            raise TuneError(f"{where}{k}={v!r} is out of range; allowed: >= 0")


def _params(table: Mapping[str, Any], where: str, prefix: str = "") -> Iterable[Param]:
    # [space."scheduler.max_num_seqs"] and [space.scheduler.max_num_seqs] (nested tables) both work
    for k, v in table.items():
        name = prefix + k
        if not isinstance(v, dict):
            raise TuneError(f"{where}: 'space.{name}' must be a table with a type, e.g. [space.\"{name}\"]")
        if "type" in v and not isinstance(v["type"], dict):
            yield _param(name, v, where)
        else:
            yield from _params(v, where, prefix=name + ".")


def _param(name: str, t: Mapping[str, Any], where: str) -> Param:
    at = f"{where}: [space.\"{name}\"]"
    kind = t["type"]
    if kind not in PARAM_TYPES:
        raise TuneError(f"{at}: unknown type {kind!r}; valid: {' | '.join(PARAM_TYPES)}")
    for k in t:
        if k not in _PARAM_KEYS[kind]:
            raise TuneError(f"{at}: unknown key '{k}' for type {kind!r}; valid: {', '.join(_PARAM_KEYS[kind])}")
    if kind in ("categorical", "ordinal"):
        key = "categories" if kind == "categorical" else "values"
        vals = t.get(key)
        if not isinstance(vals, list) or len(vals) < 2:
            raise TuneError(f"{at}: '{key}' must list at least 2 values (a fixed value belongs in [base])")
        if len({_cell(v) for v in vals}) != len(vals):
            raise TuneError(f"{at}: '{key}' has repeated values: {vals}")
        return Param(name, kind, values=tuple(vals))
    for k in ("low", "high"):
        if k not in t:
            raise TuneError(f"{at}: missing '{k}'")
        v = t[k]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise TuneError(f"{at}: '{k}' must be a number, got {v!r}")
        if kind == "integer" and not float(v).is_integer():
            raise TuneError(f"{at}: '{k}' must be an integer for type \"integer\", got {v!r}")
    low, high = t["low"], t["high"]
    prior = t.get("prior", "uniform")
    if prior not in PRIORS:
        raise TuneError(f"{at}: unknown prior {prior!r}; valid: {' | '.join(PRIORS)}")
    if not low < high:
        raise TuneError(f"{at}: bad bounds: low ({low}) must be < high ({high})")
    if prior == "log-uniform" and not low > 0:
        raise TuneError(f"{at}: bad bounds: a log-uniform prior needs low > 0, got low = {low}")
    if kind == "integer":
        low, high = int(low), int(high)
    return Param(name, kind, low, high, prior)


def _objective(t: Any, where: str, base: SimConfig, params: Sequence[Param]) -> Objective:
    if t is None:
        raise TuneError(f"{where}: missing [objective] table, e.g. kind = \"min_replicas\", slo_target = 0.99")
    for k in t:
        if k not in _OBJECTIVE_KEYS:
            raise TuneError(f"{where}: unknown key 'objective.{k}'; valid: "
                            f"{', '.join('objective.' + o for o in _OBJECTIVE_KEYS)}")
    kind = t.get("kind")
    if kind not in OBJECTIVES:
        raise TuneError(f"{where}: unknown objective kind {kind!r} (objective.kind); valid: {' | '.join(OBJECTIVES)}")
    target = t.get("slo_target")
    if target is not None:
        if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0 < target <= 1:
            raise TuneError(f"{where}: objective.slo_target={target!r} is out of range; allowed: 0 < target <= 1")
        has_slo = any(getattr(base.slo, k) is not None for k in ("ttft", "tpot", "e2e")) or \
            any(p.name.startswith("slo.") for p in params)
        if not has_slo:
            raise TuneError(f"{where}: objective.slo_target needs an SLO: set [base.slo] ttft, tpot or e2e (seconds)")
    elif kind in ("min_replicas", "min_cost"):
        raise TuneError(f"{where}: objective.kind = \"{kind}\" needs objective.slo_target (e.g. 0.99); without a "
                        f"constraint the answer is always the smallest cluster")
    price = t.get("gpu_hour_price", 1.0)
    if isinstance(price, bool) or not isinstance(price, (int, float)) or not price > 0:
        raise TuneError(f"{where}: objective.gpu_hour_price={price!r} is out of range; allowed: > 0")
    weights = t.get("weights", {})
    if kind == "weighted":
        if not isinstance(weights, dict) or not weights:
            raise TuneError(f"{where}: objective.kind = \"weighted\" needs objective.weights, e.g. "
                            f"weights = {{ \"ttft.p99\" = 1.0, goodput_rps = -0.1 }}")
        for m, w in weights.items():
            if m not in METRIC_NAMES:
                raise TuneError(f"{where}: unknown metric 'objective.weights.{m}'; valid: {', '.join(METRIC_NAMES)}")
            if isinstance(w, bool) or not isinstance(w, (int, float)):
                raise TuneError(f"{where}: objective.weights.{m} must be a number, got {w!r}")
    elif "weights" in t:
        raise TuneError(f"{where}: objective.weights applies only to kind = \"weighted\"")
    direction = t.get("direction", "min")
    if direction not in ("min", "max"):
        raise TuneError(f"{where}: objective.direction={direction!r}; valid: min | max")
    if "direction" in t and kind != "weighted":
        raise TuneError(f"{where}: objective.direction applies only to kind = \"weighted\"")
    return Objective(kind, None if target is None else float(target), float(price),
                     tuple((m, float(w)) for m, w in weights.items()), direction == "max")


# --------------------------------------------------------------------------- evaluation

class SimEvaluator:
    """The simulator as a function of named parameters: overrides -> config -> simulate -> Outcome."""

    def __init__(self, workload, base: Mapping[str, Any], objective: Objective, where: str = "tune"):
        self.workload, self.base, self.objective, self.where = workload, dict(base), objective, where
        arr = workload.arrival
        span = float(arr[-1] - arr[0]) if len(arr) > 1 else 0.0
        self.offered_rps = len(arr) / span if span > 0 else float(len(arr))

    def config(self, params: Mapping[str, Any]) -> SimConfig:
        return config_from_dict(with_overrides(self.base, dict(params)), where=self.where)

    def __call__(self, **params: Any) -> Outcome:
        from sim.cluster import simulate
        from traces.report import summarize

        cfg = self.config(params)
        summary = summarize(simulate(self.workload, cfg), cfg.slo)
        return self.objective.measure(summary, cfg, self.offered_rps)


def timed_call(evaluate: Callable[..., Any], params: Mapping[str, Any]) -> tuple[Outcome, float]:
    """evaluate(**params) -> (Outcome, wall s). An exception becomes a failed Outcome, never a crash."""
    t0 = time.perf_counter()
    try:
        out = evaluate(**params)
        if not isinstance(out, Outcome):
            out = Outcome(float(out))
    except Exception as e:  # noqa: BLE001 - a bad point must not end the search
        msg = " ".join(f"{type(e).__name__}: {e}".split())
        out = Outcome(math.nan, False, f"error: {msg[:400]}", 1.0, failed=True)
    return out, time.perf_counter() - t0


class InlineRunner:
    def __init__(self, evaluate: Callable[..., Any]):
        self.evaluate = evaluate

    def map(self, points: Sequence[Mapping[str, Any]]) -> list[tuple[Outcome, float]]:
        return [timed_call(self.evaluate, p) for p in points]

    def close(self) -> None:
        pass


_WORKER_EVALUATE: Callable[..., Any] | None = None


def _init_worker(evaluate: Callable[..., Any]) -> None:
    global _WORKER_EVALUATE
    _WORKER_EVALUATE = evaluate


def _run_in_worker(params: Mapping[str, Any]) -> tuple[Outcome, float]:
    assert _WORKER_EVALUATE is not None
    return timed_call(_WORKER_EVALUATE, params)


class PoolRunner:
    """A local process pool; the evaluator (with its workload) goes to each worker once, at start."""

    def __init__(self, evaluate: Callable[..., Any], workers: int):
        self.evaluate, self.workers = evaluate, max(1, workers)
        self._pool: ProcessPoolExecutor | None = None

    def map(self, points: Sequence[Mapping[str, Any]]) -> list[tuple[Outcome, float]]:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(self.workers, initializer=_init_worker, initargs=(self.evaluate,))
        futures = [self._pool.submit(_run_in_worker, dict(p)) for p in points]
        out, broken = [], False
        for f in futures:
            try:
                out.append(f.result())
            except Exception as e:  # noqa: BLE001 - a worker that died (OOM, crash) fails its points only
                broken = True
                out.append((Outcome(math.nan, False, f"error: worker failed: {type(e).__name__}: {e}"[:400], 1.0,
                                    failed=True), 0.0))
        if broken:
            self.close()
        return out

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None


class RayRunner:
    """Evaluations as Ray tasks on an existing cluster; the evaluator goes to the object store once."""

    def __init__(self, evaluate: Callable[..., Any], address: str):
        try:
            import ray
        except ImportError:
            raise TuneError("--ray-address: Ray is not installed; pip install 'ray[default]', or leave out "
                            "--ray-address to use the local process pool") from None
        self._ray = ray
        ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
        self._ref = ray.put(evaluate)
        self._task = ray.remote(timed_call)

    def map(self, points: Sequence[Mapping[str, Any]]) -> list[tuple[Outcome, float]]:
        refs = [self._task.remote(self._ref, dict(p)) for p in points]
        out = []
        for r in refs:
            try:
                out.append(self._ray.get(r))
            except Exception as e:  # noqa: BLE001
                out.append((Outcome(math.nan, False, f"error: ray task failed: {e}"[:400], 1.0, failed=True), 0.0))
        return out

    def close(self) -> None:
        pass


# --------------------------------------------------------------------------- the search

@dataclass(frozen=True)
class Evaluation:
    index: int
    batch: int
    params: dict[str, Any]
    value: float  # the objective in natural units (NaN when the evaluation failed)
    loss: float  # what the optimizer was told
    feasible: bool
    status: str  # ok | infeasible | failed
    reason: str
    metrics: dict[str, float]
    wall_s: float


@dataclass
class TuneResult:
    evaluations: list[Evaluation]
    objective: Objective
    resumed: int = 0  # evaluations read back from a previous run
    diverged: bool = False  # the recorded history is not what this seed/space/batch size would ask
    exhausted: bool = False  # every point of a finite space was evaluated

    @property
    def best(self) -> Evaluation | None:
        return best_of(self.evaluations)


def best_of(evals: Iterable[Evaluation]) -> Evaluation | None:
    """Lowest loss among feasible evaluations (earliest on ties)."""
    ok = [e for e in evals if e.feasible]
    return min(ok, key=lambda e: (e.loss, e.index)) if ok else None


def ranked(evals: Iterable[Evaluation]) -> list[Evaluation]:
    """Feasible evaluations, best first, one per distinct point."""
    seen, out = set(), []
    for e in sorted((e for e in evals if e.feasible), key=lambda e: (e.loss, e.index)):
        key = tuple(sorted((k, _cell(v)) for k, v in e.params.items()))
        if key not in seen:
            seen.add(key)
            out.append(e)
    return out


def _gbrt(seed: int):
    """skopt 0.10's GBRT surrogate, patched for scikit-learn >= 1.6 (estimator tags) and NumPy 2 (no np.in1d)."""
    from sklearn.ensemble import GradientBoostingRegressor
    from skopt.learning import GradientBoostingQuantileRegressor

    class GBRT(GradientBoostingQuantileRegressor):
        def __sklearn_tags__(self):
            tags = super().__sklearn_tags__()
            tags.estimator_type = "regressor"
            return tags

        def predict(self, X, return_std=False, return_quantiles=False):
            if return_std and not return_quantiles:
                q = list(self.quantiles)
                low, mid, high = (self.regressors_[q.index(v)].predict(X) for v in (0.16, 0.5, 0.84))
                return mid, (high - low) / 2.0
            return super().predict(X, return_std=return_std, return_quantiles=return_quantiles)

    return GBRT(base_estimator=GradientBoostingRegressor(n_estimators=30, loss="quantile"), random_state=seed)


def make_optimizer(params: Sequence[Param], estimator: str = "GP", initial: int = DEFAULT_INITIAL, seed: int = 0, *,
                   acq_func: str = DEFAULT_ACQ_FUNC, xi: float = DEFAULT_XI, kappa: float = DEFAULT_KAPPA,
                   init_gen: str = DEFAULT_INITIAL_GENERATOR, n_points: int = 10000):
    """A seeded skopt Optimizer; `n_points`: the random candidates skopt scores its acquisition on."""
    from skopt import Optimizer

    check_search_settings(acq_func, kappa, xi, init_gen, where="")
    estimator = check_estimator(estimator, "estimator")
    dims = [p.dimension() for p in params]
    if estimator == "random":
        # skopt's "dummy" estimator trips scikit-learn >= 1.6; an endless initial phase is the same thing
        return Optimizer(dims, base_estimator="GP", n_initial_points=2**62, initial_point_generator="random",
                         random_state=seed)
    base = _gbrt(seed) if estimator == "GBRT" else estimator
    return Optimizer(dims, base_estimator=base, n_initial_points=max(initial, 1), initial_point_generator=init_gen,
                     acq_func=acq_func, acq_func_kwargs={"xi": xi, "kappa": kappa}, acq_optimizer="sampling",
                     acq_optimizer_kwargs={"n_points": n_points}, random_state=seed)


def _key(params: Sequence[Param], x: Sequence[Any]) -> tuple:
    return tuple(_cell(p.decode(v)) for p, v in zip(params, x))


def _ask(opt, params: Sequence[Param], k: int, seen: set[tuple], seed: int, first_index: int,
         pool: list[list[Any]] | None = None, acq_func: str = DEFAULT_ACQ_FUNC) -> list[list[Any]]:
    """k points from the optimizer; a repeat of an evaluated (or batch-mate) point is swapped for a random
    unseen one, drawn from an RNG keyed by (seed, index) so that replays draw the same.

    With `pool` (every point of a finite space) and a fitted model, the acquisition function is
    minimised over the unseen points of the pool instead (exactly, no repeats possible)."""
    if pool is not None and opt.models and opt._n_initial_points <= 0:
        return _ask_exhaustive(opt, params, k, seen, pool, acq_func)
    xs = [opt.ask()] if k == 1 else opt.ask(n_points=k)
    rng = np.random.default_rng([seed, first_index])
    taken = set(seen)
    out = []
    for x in xs:
        x = [p.encode(p.decode(v)) for p, v in zip(params, x)]
        for _ in range(256):
            if _key(params, x) not in taken:
                break
            x = [p.encode(p.decode(v)) for p, v in
                 zip(params, opt.space.rvs(n_samples=1, random_state=int(rng.integers(2**31 - 1)))[0])]
        taken.add(_key(params, x))
        out.append(x)
    return out


def _ask_exhaustive(opt, params: Sequence[Param], k: int, seen: set[tuple], pool: list[list[Any]],
                    acq_func: str) -> list[list[Any]]:
    """The k unseen pool points of best acquisition; for k > 1 by constant liar (each pick is told the
    best loss so far and the model refitted before the next pick)."""
    from sklearn.base import clone
    from skopt.acquisition import _gaussian_acquisition

    cand = [x for x in pool if _key(params, x) not in seen]
    if not cand:
        return []
    Xt = opt.space.transform(cand)
    model, X, y = opt.models[-1], list(opt.Xi), list(opt.yi)
    out = []
    for i in range(min(k, len(cand))):
        vals = _gaussian_acquisition(Xt, model, y_opt=float(np.min(y)), acq_func=acq_func,
                                     acq_func_kwargs=opt.acq_func_kwargs)
        j = int(np.argmin(vals))
        out.append(cand.pop(j))
        Xt = np.delete(Xt, j, axis=0)
        if i < k - 1 and cand:
            X.append(out[-1])
            y.append(float(np.min(y)))  # cl_min; a max lie hit 52/80 at 4 a batch vs 56 (tune_vs_grid)
            model = clone(opt.base_estimator_)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model.fit(opt.space.transform(X), y)
    return out


def _pool(params: Sequence[Param], limit: int) -> list[list[Any]] | None:
    """Every point of a finite space (in optimizer values), or None when it is continuous or over `limit`."""
    size = space_size(params)
    if size is None or size > limit:
        return None
    axes = [[p.encode(v) for v in (range(int(p.low), int(p.high) + 1) if p.type == "integer" else p.values)]
            for p in params]
    return [list(x) for x in itertools.product(*axes)]


def tune(evaluate: Callable[..., Any], params: Sequence[Param], *, calls: int, initial: int = DEFAULT_INITIAL,
         parallel: int = 1, seed: int = 0, estimator: str = "GP", objective: Objective | None = None,
         acq_func: str = DEFAULT_ACQ_FUNC, xi: float = DEFAULT_XI, kappa: float = DEFAULT_KAPPA,
         init_gen: str = DEFAULT_INITIAL_GENERATOR, exhaustive: int = EXHAUSTIVE_LIMIT,
         history: Sequence[Evaluation] = (), runner: Any = None,
         on_batch: Callable[[list[Evaluation], list[Evaluation]], None] | None = None) -> TuneResult:
    """Search `params` for the best `evaluate(**point)` in `calls` evaluations (history included).

    `history` (from a previous run's evaluations.csv) is replayed first; numbering continues after it.
    `on_batch(all, new)` runs after every batch (write files, move a progress bar).
    `exhaustive`: on a finite space of at most this many points, once the model is fitted, minimise the
    acquisition over every point not yet evaluated (0: skopt's own sampled minimisation, where a repeat
    is swapped for a random unseen point). Not for "gp_hedge", whose portfolio lives inside skopt.
    """
    import skopt  # noqa: F401 - load its BLAS before limiting threads: threadpoolctl sees loaded libraries only
    from threadpoolctl import threadpool_limits

    if calls < 1:
        raise TuneError(f"calls={calls} is out of range; allowed: >= 1")
    if parallel < 1:
        raise TuneError(f"parallel={parallel} is out of range; allowed: >= 1")
    objective = objective or Objective()
    params = list(params)
    size = space_size(params)
    evals = sorted(history, key=lambda e: e.index)
    result = TuneResult(evals, objective, resumed=len(evals))
    own = runner is None
    runner = runner or (InlineRunner(evaluate) if parallel == 1 else PoolRunner(evaluate, parallel))
    # A GP fit is tiny: BLAS threads only contend with each other (and the workers) here.
    with threadpool_limits(limits=1), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # skopt: "The objective has been evaluated at point..."
        warnings.filterwarnings("ignore", category=RuntimeWarning, module="skopt")  # log-prior overflow in sampling
        pool = _pool(params, exhaustive) if estimator != "random" and acq_func != "gp_hedge" and exhaustive else None
        # with a pool, skopt's own acquisition step is unused: let it score one random point, not 10,000
        opt = make_optimizer(params, estimator, initial, seed, acq_func=acq_func, xi=xi, kappa=kappa,
                             init_gen=init_gen, n_points=10000 if pool is None else 1)
        ex_acq = acq_func
        seen: set[tuple] = set()
        for b, group in groupby(evals, key=lambda e: e.batch):
            done = list(group)
            try:
                xs = [[p.encode(e.params[p.name]) for p in params] for e in done]
                asked = _ask(opt, params, len(done), seen, seed, done[0].index, pool, ex_acq)
                opt.tell(xs, [e.loss for e in done])
            except (KeyError, ValueError) as e:
                raise TuneError(f"resume: evaluation {done[0].index} does not fit this space: {e}") from None
            result.diverged |= asked != xs
            seen.update(_key(params, x) for x in xs)
        try:
            while len(evals) < calls:
                k = min(parallel, calls - len(evals))
                if size is not None:
                    if len(seen) >= size:
                        result.exhausted = True
                        break
                    k = min(k, size - len(seen))
                first = evals[-1].index + 1 if evals else 0
                batch = evals[-1].batch + 1 if evals else 0
                xs = _ask(opt, params, k, seen, seed, first, pool, ex_acq)
                points = [{p.name: p.decode(v) for p, v in zip(params, x)} for x in xs]
                outs = runner.map(points)
                new = []
                for i, (pt, (out, wall)) in enumerate(zip(points, outs)):
                    loss = objective.loss(out, [e.loss for e in (*evals, *new) if e.status != "failed"])
                    status = "failed" if out.failed else "ok" if out.feasible else "infeasible"
                    new.append(Evaluation(first + i, batch, pt, float(out.value), float(loss), out.feasible and not
                                          out.failed, status, out.reason, dict(out.metrics), wall))
                opt.tell(xs, [e.loss for e in new])
                seen.update(_key(params, x) for x in xs)
                evals.extend(new)
                if on_batch is not None:
                    on_batch(evals, new)
        finally:
            if own:
                runner.close()
    return result


# --------------------------------------------------------------------------- files

_FIXED = ("index", "batch")
_OUTCOME_COLS = ("objective", "loss", "feasible", "status", "reason")


def _cell(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v)
    return str(v)


def write_evaluations(evals: Sequence[Evaluation], params: Sequence[Param], path: str | Path) -> Path:
    """evaluations.csv, rewritten whole (atomically) so a crash never leaves half a row."""
    path = Path(path)
    names = {p.name for p in params}
    metrics = [m for m in dict.fromkeys(k for e in evals for k in e.metrics) if m not in names]
    cols = [*_FIXED, *(p.name for p in params), *_OUTCOME_COLS, *metrics, "wall_s"]
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".evaluations.", suffix=".csv")
    with os.fdopen(fd, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for e in sorted(evals, key=lambda e: e.index):
            w.writerow([e.index, e.batch, *(_cell(e.params[p.name]) for p in params), _cell(e.value), _cell(e.loss),
                        _cell(e.feasible), e.status, e.reason,
                        *(_cell(e.metrics[m]) if m in e.metrics else "" for m in metrics), f"{e.wall_s:.4f}"])
    os.replace(tmp, path)
    return path


def read_evaluations(path: str | Path, params: Sequence[Param]) -> list[Evaluation]:
    """Evaluations written by `write_evaluations`; the file's parameter columns must be this space's."""
    path = Path(path)
    try:
        with open(path, newline="") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            rows = list(reader)
    except FileNotFoundError:
        raise TuneError(f"{path}: nothing to resume (file not found)") from None
    if header is None or header[:2] != list(_FIXED) or "objective" not in header or "wall_s" not in header:
        raise TuneError(f"{path}: not an evaluations.csv written by twinfer tune")
    names = header[2:header.index("objective")]
    if sorted(names) != sorted(p.name for p in params):
        raise TuneError(f"{path}: its parameters ({', '.join(names)}) are not this space's "
                        f"({', '.join(p.name for p in params)}); resume with the same space")
    metrics = header[header.index("reason") + 1:header.index("wall_s")]
    out = []
    for n, cells in enumerate(rows, start=2):
        try:
            r = dict(zip(header, cells, strict=True))
            pt = {p.name: p.parse(r[p.name]) for p in params}
            out.append(Evaluation(int(r["index"]), int(r["batch"]), pt, float(r["objective"]), float(r["loss"]),
                                  r["feasible"] == "true", r["status"], r["reason"],
                                  {m: float(r[m]) for m in metrics if r[m] != ""}, float(r["wall_s"])))
        except (KeyError, ValueError, TypeError) as e:
            raise TuneError(f"{path}:{n}: unreadable evaluation row: {e}") from None
    return sorted(out, key=lambda e: e.index)


def best_so_far(evals: Sequence[Evaluation], objective: Objective) -> list[float]:
    """Best feasible objective (natural units) after each evaluation; NaN until one is feasible."""
    out, best = [], None
    for e in sorted(evals, key=lambda e: e.index):
        if e.feasible and (best is None or e.loss < best.loss):
            best = e
        out.append(best.value if best is not None else math.nan)
    return out


def plot_convergence(evals: Sequence[Evaluation], objective: Objective, path: str | Path, title: str = "") -> Path:
    """convergence.png: every evaluation's objective and the best so far, without touching pyplot state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    evals = sorted(evals, key=lambda e: e.index)
    fig = Figure(figsize=(7, 4.2), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    x = [e.index + 1 for e in evals]
    ok = [(e.index + 1, e.value) for e in evals if e.feasible]
    bad = [(e.index + 1, e.value) for e in evals if e.status == "infeasible" and math.isfinite(e.value)]
    if ok:
        ax.scatter(*zip(*ok), s=14, color="tab:blue", alpha=0.6, label="feasible")
    if bad:
        ax.scatter(*zip(*bad), s=14, marker="x", color="tab:gray", alpha=0.6, label="infeasible")
    ax.step(x, best_so_far(evals, objective), where="post", color="tab:red", lw=2, label="best so far")
    ax.set_xlabel("evaluation")
    ax.set_ylabel(objective.label)
    ax.set_title(title or objective.describe(), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)
