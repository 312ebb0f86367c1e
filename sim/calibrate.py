"""Calibration: a cost model fitted to step times measured on the executor, and the sim-vs-real comparison.

    points = default_grid(...)                       # step shapes: decode batches, prefill chunks, mixes
    meas = measure_grid(runner, points, repeats=7)   # the executor's ModelRunner, median of N per shape
    fit = fit_cost(features, medians, holdout=...)   # FittedCost + its error on held-back shapes
    save_profile_file(profile, "cpu.toml")           # `twinfer profile` does these (sim/calibrate_cli.py)
    load_cost_model("cpu.toml")                      # -> FittedCost, used by the simulator as any cost model

The fitted form is

    duration = max(A . x, B . x) + C . x + overhead,
    x = (1, prefill_tokens, decode_seqs, prefill_attn, decode_ctx, logits, batched, decode_groups, decode_padded,
         decode_padded_over, decode_breaks)

where batched = 1 when the step computes two or more tokens. It is there because the data say so:
on the CPU a one-token step (one decode) runs its matrix products as matrix-vector products, and a
second token costs as much as the next dozen (measured 8.4 ms for one decode, 12.8 ms for two,
14.5 ms for four); no straight line through batch size fits both ends.

decode_groups / decode_padded are the shape of the executor's decode attention (executor.grouping): it
runs one SDPA call per group of decode rows of similar length, each row padded to its group's longest,
so a batch with spread contexts costs more than one with the same total context spread evenly
(measured on the grid: up to a fifth more at 16 to 128 rows). decode_padded is collinear with
decode_ctx for even batches; the fit shares the cost out.

decode_breaks counts the blocks of the decode rows' tables that do not follow their predecessor in the cache
(executor.grouping.decode_breaks): the attention gathers each row's blocks in table order and a break starts
a new memory stream. Measured: 8 rows at 1k tokens, 23.0 ms from scattered blocks, 18.8 ms from contiguous
tables. The grid times a subset of its shapes with both layouts (GridPoint.layout) and batches in tiers
beside uniform ones of the same total context, so the fit can tell breaks, groups and padding from context;
no row takes a new block within a decode run, so the breaks stay put over one.

decode_padded_over = max(0, decode_padded - knee) is a second, steeper slope per padded key token past a
knee (the step's gathered keys and values outgrow a cache): the straight line over-predicted one- and
two-sequence decodes at 1-3k tokens of context by 5-8 % and under-predicted the largest batches by up to
13 %. The knee is one of KNEE_CANDIDATES, chosen by cross-validation on the training shapes
(`choose_knee`), or none; it is constant over a decode run (a function of decode_padded), so runs stay
exact.

Every coefficient is >= 0, so a prediction never decreases when any feature grows and
extrapolates beyond the grid as straight lines. The plain linear model is A = B = 0; `fit_cost`
also tries a max of two lines (a "roofline": a flat, weight-bound line for small batches and a
steeper, compute-bound one for large) and keeps it only when it cuts the held-out error clearly
(on this project's 2-core CPU it has not: step time there is close to linear in every feature).
A decode-only run of such steps has exactly the `DecodeRun` form the simulator integrates in
closed form. Fits minimise relative error (rows weighted by 1/duration), since a step of 5 ms
matters as much as one of 500 ms to a latency percentile. `overhead` is the engine loop's own
time between steps, measured on a short real replay (`measure_loop_overhead`).

Replicas that share a machine slow each other down, by an amount that depends on what the neighbour
runs. A profile measured with `--concurrent N` carries a second model measured with busy neighbours
(`BusyNeighbours`, random grid shapes; `neighbour_share` blends the two by how busy the other replicas
are in simulation) and, in its optional `contention` section, the factor on the alone time per kind
of neighbour step and kind of own step, all measured interleaved; sim.contention.ContentionCost uses
those step by step (see that module).

Profiles are TOML or JSON (by extension) and carry what produced them: device, model, library
versions, KV capacity, coefficients, fit error on held-back grid points, and the grid itself.
torch is imported only by the measuring functions.
"""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from executor.grouping import decode_grouping
from sim.cost import DecodeRun, StepFeatures

MEASURED = ("intercept", "prefill_tokens", "decode_seqs", "prefill_attn", "decode_ctx", "logits", "batched",
            "decode_groups", "decode_padded", "decode_breaks")  # the columns of a feature_matrix: a step's shape
# A cost model's terms: the measured features up to decode_padded, then max(0, decode_padded - knee) for a
# model with a knee (FittedCost.padded_knee; see the module doc), 0 for one without, then decode_breaks
# (last, so coefficient lists written before it keep their positions).
FEATURES = MEASURED[:-1] + ("decode_padded_over", "decode_breaks")
# read only by models that price them (the simulator then fills them in: sim.cost.grouping_features)
GROUPING = ("decode_groups", "decode_padded", "decode_padded_over", "decode_breaks")
PROFILE_FORMAT = "twinfer-profile"
# 2: decode_groups / decode_padded; 3: decode_padded_over and its knee (absent: 0, none); 4: decode_breaks
# and grid shapes with contiguous block tables (absent: 0)
PROFILE_VERSION = 4
# Knees `fit_cost` tries for the padded-token hinge (tokens of padded decode context in one step); one is
# kept only where cross-validation on the training shapes says it predicts clearly better than none.
KNEE_CANDIDATES = (2048, 4096, 8192, 16384)
KNEE_GAIN = 0.05  # a knee must cut the cross-validated RMS relative error by this share or more
KNEE_SIDE_ROWS = 4  # ... and have this many training decode shapes on each side of it
LAYOUTS = ("scattered", "contiguous")  # where a grid shape's KV blocks lie (GridPoint.layout)


# ---- the cost model ---------------------------------------------------------------------------

def feature_row(f: StepFeatures) -> np.ndarray:
    return np.array([1.0, f.prefill_tokens, f.decode_seqs, f.prefill_attn, f.decode_ctx, f.logits,
                     1.0 if f.prefill_tokens + f.decode_seqs >= 2 else 0.0, f.decode_groups, f.decode_padded,
                     f.decode_breaks])


def feature_matrix(fs: Iterable[StepFeatures]) -> np.ndarray:
    """[n, len(MEASURED)]: a leading column of ones, then the measured features in MEASURED order."""
    rows = [feature_row(f) for f in fs]
    return np.array(rows, dtype=np.float64).reshape(-1, len(MEASURED))


def design(X: np.ndarray, knee: int | None) -> np.ndarray:
    """A feature_matrix ([n, len(MEASURED)]) with the model terms it implies: [n, len(FEATURES)] in FEATURES
    order, decode_padded_over = max(0, decode_padded - knee) (all 0 without a knee)."""
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2 or X.shape[1] != len(MEASURED):
        raise ValueError(f"expected a feature matrix [n, {len(MEASURED)}] ({', '.join(MEASURED)}), got {X.shape}")
    pad = X[:, MEASURED.index("decode_padded")]
    over = np.maximum(0.0, pad - knee) if knee is not None else np.zeros(len(X))
    return np.column_stack([X[:, :-1], over, X[:, -1]])


def _knee(knee: Any) -> int | None:
    if knee is None:
        return None
    try:
        k = int(knee)
    except (TypeError, ValueError):
        raise ValueError(f"decode_padded_knee={knee!r} must be a whole number of tokens >= 1") from None
    if k != knee or k < 1:
        raise ValueError(f"decode_padded_knee={knee!r} must be a whole number of tokens >= 1")
    return k


def _wake(w: Any) -> tuple[float, ...] | None:
    """(after_s, factor) or (after_s, factor, busy_factor) checked, or None."""
    if w is None:
        return None
    try:
        vals = tuple(float(x) for x in w)
    except (TypeError, ValueError):
        raise ValueError(f"wake={w!r} must be (idle seconds, factor[, factor beside a busy neighbour])") from None
    if len(vals) not in (2, 3):
        raise ValueError(f"wake={w!r} must be (idle seconds, factor[, factor beside a busy neighbour])")
    if not (all(math.isfinite(x) and x > 0 for x in vals)):
        raise ValueError(f"wake={w!r} is out of range; allowed: idle seconds > 0, factors > 0")
    return vals


def _coefs(v: Sequence[float] | np.ndarray | Mapping[str, float] | None) -> np.ndarray:
    if v is None:
        return np.zeros(len(FEATURES))
    if isinstance(v, Mapping):
        unknown = set(v) - set(FEATURES)
        if unknown:
            raise ValueError(f"unknown coefficient(s) {sorted(unknown)}; valid: {', '.join(FEATURES)}")
        v = [float(v.get(k, 0.0)) for k in FEATURES]
    a = np.asarray(v, dtype=np.float64)
    if a.ndim == 1 and len(a) in (len(FEATURES) - len(GROUPING), len(FEATURES) - 2, len(FEATURES) - 1):
        # as written before version 2 (no grouping terms), 3 (no knee term) or 4 (no decode_breaks): the
        # missing terms (the last ones) are 0
        a = np.concatenate([a, np.zeros(len(FEATURES) - len(a))])
    if a.shape != (len(FEATURES),):
        raise ValueError(f"expected {len(FEATURES)} coefficients ({', '.join(FEATURES)}), got shape {a.shape}")
    if not np.all(np.isfinite(a)) or np.any(a < 0):
        raise ValueError(f"coefficients must be finite and >= 0, got {a.tolist()}")
    return a


class FittedCost:
    """duration = max(A . x, B . x) + C . x + overhead over x = (1, features); all coefficients >= 0
    (see the module doc).

    `shared` is C, `line_a`/`line_b` are A and B (zero for a linear model). `step_overhead_s` is the
    engine loop's own time between one step's end and the next one's start (applying the step to the
    scheduler, reporting it), measured on a real replay: a token is stamped at the end of its forward
    pass, but the next step cannot start earlier than this after it.

    Two serving-loop terms the grid cannot show, each measured on a real replay by `twinfer profile` and
    applied by the simulator (sim.cluster.Replica) and the step check (`loop_factors`), never by
    `step_time` or `predict`, which stay the grid's fit:
    `wake` = (after_s, factor[, busy_factor]): a replica's first step after it has been idle for after_s or
    longer takes `factor` times its forward time (the overhead unchanged; `wake_replay`, `wake_from_steps`),
    or `busy_factor` times when another replica on its machine has a step in progress as it starts (measured
    with a neighbour decoding throughout: `wake_replay(busy_neighbour=True)`). None: none.
    `prefill_factor`: every step with prefill tokens takes this times its forward time, the serving loop's
    prefill steps against its decode steps, each relative to the fit (`mix_replay`, `prefill_factor_from_steps`).
    """

    def __init__(self, shared: Any, kv_capacity_tokens: int, line_a: Any = None, line_b: Any = None,
                 name: str = "fitted", step_overhead_s: float = 0.0, padded_knee: int | None = None,
                 wake: tuple[float, float] | None = None, prefill_factor: float = 1.0):
        if not (math.isfinite(step_overhead_s) and step_overhead_s >= 0):
            raise ValueError(f"step_overhead_s={step_overhead_s} is out of range; allowed: >= 0")
        self.step_overhead_s = float(step_overhead_s)
        self.wake = _wake(wake)
        try:
            self.prefill_factor = float(prefill_factor)
        except (TypeError, ValueError):
            raise ValueError(f"prefill_factor={prefill_factor!r} must be a number > 0") from None
        if not (math.isfinite(self.prefill_factor) and self.prefill_factor > 0):
            raise ValueError(f"prefill_factor={prefill_factor!r} is out of range; allowed: > 0")
        self.shared = _coefs(shared)
        self.line_a = _coefs(line_a)
        self.line_b = _coefs(line_b)
        self.padded_knee = _knee(padded_knee)
        over = FEATURES.index("decode_padded_over")
        if self.padded_knee is None and any(v[over] for v in (self.shared, self.line_a, self.line_b)):
            raise ValueError("a decode_padded_over coefficient needs its knee (decode_padded_knee)")
        if kv_capacity_tokens < 1:
            raise ValueError(f"kv_capacity_tokens={kv_capacity_tokens} is out of range; allowed: >= 1")
        self.kv_capacity_tokens = int(kv_capacity_tokens)
        self.name = name
        self._c = self.shared.tolist()
        self._a = self.line_a.tolist()
        self._b = self.line_b.tolist()
        self._max = bool(self.line_a.any() or self.line_b.any())
        g = [FEATURES.index(k) for k in GROUPING]
        # The decode attention's shape costs something: the simulator must fill in those features
        # (sim.cost.grouping_features) and cut decode runs where they change.
        self.uses_grouping = bool(any(v[i] for v in (self.shared, self.line_a, self.line_b) for i in g))

    @property
    def form(self) -> str:
        return "max" if self._max else "linear"

    def _terms(self, f: StepFeatures) -> tuple[float, ...]:
        """x of one step, in FEATURES order (a plain tuple: step_time is the simulator's hot path)."""
        k = self.padded_knee
        return (1.0, f.prefill_tokens, f.decode_seqs, f.prefill_attn, f.decode_ctx, f.logits,
                1.0 if f.prefill_tokens + f.decode_seqs >= 2 else 0.0, f.decode_groups, f.decode_padded,
                f.decode_padded - k if k is not None and f.decode_padded > k else 0.0, f.decode_breaks)

    def step_time(self, f: StepFeatures) -> float:
        x = self._terms(f)
        c, a, b = self._c, self._a, self._b
        base = sum(ci * xi for ci, xi in zip(c, x)) + self.step_overhead_s
        if not self._max:
            return base
        return max(sum(ai * xi for ai, xi in zip(a, x)), sum(bi * xi for bi, xi in zip(b, x))) + base

    def predict(self, X: np.ndarray) -> np.ndarray:
        """step_time for every row of a feature_matrix. A column of NaN (a feature the source did not record:
        `steps_features` of an old step log) is an error only where the model prices that feature."""
        X = design(X, self.padded_knee)
        unknown = np.isnan(X).any(axis=0)
        if unknown.any():
            priced = unknown & ((self.shared != 0) | (self.line_a != 0) | (self.line_b != 0))
            if priced.any():
                raise ValueError(f"no {', '.join(np.asarray(FEATURES)[priced].tolist())} for some steps (a step "
                                 f"log written before it was recorded?), and the cost model {self.name!r} prices it")
            X = np.where(np.isnan(X), 0.0, X)
        return np.maximum(X @ self.line_a, X @ self.line_b) + X @ self.shared + self.step_overhead_s

    def decode_run(self, f: StepFeatures) -> DecodeRun:
        # Step i of the run has decode_ctx + i * decode_seqs, nothing else moves (the grouping features
        # stay put: the simulator cuts runs where they would change); max(p, q) + s = max(p + s, q + s)
        # folds the shared term (which also grows with decode_ctx) into both lines. decode_padded_over is a
        # function of decode_padded, so it stays put as well.
        x = np.array(self._terms(f))
        j = FEATURES.index("decode_ctx")
        b = f.decode_seqs
        a, bb = self.line_a + self.shared, self.line_b + self.shared
        return DecodeRun(float(x @ a), float(a[j] * b), float(x @ bb), float(bb[j] * b), self.step_overhead_s)

    def with_overhead(self, step_overhead_s: float) -> "FittedCost":
        return FittedCost(self.shared, self.kv_capacity_tokens, self.line_a, self.line_b, self.name, step_overhead_s,
                          self.padded_knee, self.wake, self.prefill_factor)

    def with_wake(self, wake: tuple[float, float] | None) -> "FittedCost":
        return FittedCost(self.shared, self.kv_capacity_tokens, self.line_a, self.line_b, self.name,
                          self.step_overhead_s, self.padded_knee, wake, self.prefill_factor)

    def with_prefill_factor(self, prefill_factor: float) -> "FittedCost":
        return FittedCost(self.shared, self.kv_capacity_tokens, self.line_a, self.line_b, self.name,
                          self.step_overhead_s, self.padded_knee, self.wake, prefill_factor)

    def coefficients(self) -> dict[str, Any]:
        out: dict[str, Any] = {"step_overhead_s": self.step_overhead_s,
                               **({"decode_padded_knee": self.padded_knee} if self.padded_knee is not None else {}),
                               **({"wake_after_s": self.wake[0], "wake_factor": self.wake[1]} if self.wake else {}),
                               **({"wake_busy_factor": self.wake[2]} if self.wake and len(self.wake) > 2 else {}),
                               **({"prefill_loop_factor": self.prefill_factor} if self.prefill_factor != 1.0 else {}),
                               "shared": dict(zip(FEATURES, self.shared.tolist()))}
        if self.form == "max":
            out["line_a"] = dict(zip(FEATURES, self.line_a.tolist()))
            out["line_b"] = dict(zip(FEATURES, self.line_b.tolist()))
        return out

    def __repr__(self) -> str:
        knee = f", padded_knee={self.padded_knee}" if self.padded_knee is not None else ""
        return f"FittedCost(name={self.name!r}, form={self.form}, kv_capacity_tokens={self.kv_capacity_tokens}{knee})"


# ---- fitting ----------------------------------------------------------------------------------

def _wnnls(X: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """min ||diag(w) (X c - y)|| over c >= 0, with each column scaled to unit norm first (the features
    span ten orders of magnitude: attention pairs in the millions next to a column of ones)."""
    A = X * w[:, None]
    scale = np.linalg.norm(A, axis=0)
    live = scale > 0
    c = np.zeros(X.shape[1])
    if not live.any():
        return c
    from scipy.optimize import nnls  # fitting only: loading a profile needs no scipy

    sol, _ = nnls(A[:, live] / scale[live], y * w, maxiter=50 * X.shape[1])
    c[live] = sol / scale[live]
    return c


def rel_errors(pred: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.abs(pred - y) / y


def error_stats(pred: np.ndarray, y: np.ndarray) -> dict[str, float]:
    if not len(y):
        return {"n": 0, "median_rel_error": math.nan, "p90_rel_error": math.nan, "max_rel_error": math.nan}
    e = rel_errors(pred, y)
    return {"n": int(len(y)), "median_rel_error": float(np.median(e)), "p90_rel_error": float(np.percentile(e, 90)),
            "max_rel_error": float(e.max())}


def fit_linear(X: np.ndarray, y: np.ndarray, kv_capacity_tokens: int, name: str = "fitted",
               padded_knee: int | None = None) -> FittedCost:
    """Non-negative least squares on relative error: duration = C . x (x: `design(X, padded_knee)`)."""
    return FittedCost(_wnnls(design(X, padded_knee), y, 1.0 / y), kv_capacity_tokens, name=name,
                      padded_knee=padded_knee)


def fit_max(X: np.ndarray, y: np.ndarray, kv_capacity_tokens: int, name: str = "fitted", seed: int = 0,
            iters: int = 50, padded_knee: int | None = None) -> FittedCost | None:
    """duration = max(A . x, B . x), A, B >= 0, by alternating partitions (max-affine regression,
    Magnani & Boyd 2009): fit each line on the points where it is the larger, reassign, repeat; several
    starting splits, the best relative-error objective wins. None when no split leaves both lines
    enough points to be determined."""
    n, p = np.shape(X)
    w = 1.0 / y
    minpts = p + 1
    if n < 2 * minpts:
        return None
    X = design(X, padded_knee)
    rng = np.random.default_rng(seed)
    tokens = X[:, 1] + X[:, 2]
    starts = [tokens > np.quantile(tokens, q) for q in (0.25, 0.5, 0.75)]
    starts.append(X[:, 1] > 0)  # prefill vs pure decode
    starts += [rng.random(n) < 0.5 for _ in range(4)]
    best: tuple[float, np.ndarray, np.ndarray] | None = None
    for part in starts:
        part = part.copy()
        a = b = None
        for _ in range(iters):
            if part.sum() < minpts or (~part).sum() < minpts:
                break
            a = _wnnls(X[part], y[part], w[part])
            b = _wnnls(X[~part], y[~part], w[~part])
            new = X @ a >= X @ b
            if np.array_equal(new, part):
                break
            part = new
        if a is None or b is None:
            continue
        obj = float(np.sum(((np.maximum(X @ a, X @ b) - y) * w) ** 2))
        if best is None or obj < best[0]:
            best = (obj, a, b)
    if best is None:
        return None
    return FittedCost(None, kv_capacity_tokens, line_a=best[1], line_b=best[2], name=name, padded_knee=padded_knee)


@dataclass
class FitResult:
    model: FittedCost
    train: np.ndarray  # row indices used for the fit
    test: np.ndarray  # held-back rows
    errors: dict[str, dict[str, float]]  # "train" / "heldout" -> error_stats
    candidates: dict[str, dict[str, float]] = field(default_factory=dict)  # form -> held-out error_stats
    chosen_because: str = ""
    knee: dict[str, Any] = field(default_factory=dict)  # choose_knee's record (chosen, cv_rms_rel_error, why)

    def record(self, holdout: float, seed: int, **extra: Any) -> dict[str, Any]:
        """The profile's "fit" section for this fit."""
        return {"form": self.model.form, "why": self.chosen_because, "knee": self.knee, "holdout_share": holdout,
                "seed": seed, "heldout": self.errors["heldout"], "train": self.errors["train"],
                "candidates": self.candidates, **extra}


def holdout_split(kinds: Sequence[str], share: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Hold back about `share` of the points of each kind (at least one of any kind with >= 3 points),
    chosen by a seeded shuffle. Returns (train, test) index arrays."""
    if not 0 <= share < 1:
        raise ValueError(f"holdout share={share} is out of range; allowed: [0, 1)")
    rng = np.random.default_rng(seed)
    test: list[int] = []
    by_kind: dict[str, list[int]] = {}
    for i, k in enumerate(kinds):
        by_kind.setdefault(k, []).append(i)
    for k in sorted(by_kind):
        idx = by_kind[k]
        m = int(round(share * len(idx)))
        if share > 0 and m == 0 and len(idx) >= 3:
            m = 1
        m = min(m, len(idx) - 1)
        if m > 0:
            test += rng.permutation(idx)[:m].tolist()
    test_a = np.array(sorted(test), dtype=np.int64)
    train_a = np.setdiff1d(np.arange(len(kinds)), test_a)
    return train_a, test_a


def cv_rms(X: np.ndarray, y: np.ndarray, knee: int | None, folds: int = 5, repeats: int = 4, seed: int = 0) -> float:
    """Root-mean-square relative error of the linear fit (with this knee) on rows it was not fitted on:
    `repeats` seeded shuffles, each split into `folds` folds."""
    rng = np.random.default_rng(seed)
    n = len(y)
    errs = []
    for _ in range(repeats):
        idx = rng.permutation(n)
        for f in range(folds):
            te = idx[f::folds]
            tr = np.setdiff1d(idx, te)
            m = fit_linear(X[tr], y[tr], 1, padded_knee=knee)
            errs.append(rel_errors(m.predict(X[te]), y[te]))
    e = np.concatenate(errs)
    return float(np.sqrt(np.mean(e ** 2)))


def choose_knee(X: np.ndarray, y: np.ndarray, candidates: Sequence[int] = KNEE_CANDIDATES,
                seed: int = 0) -> dict[str, Any]:
    """Which knee (if any) the padded-token hinge gets, from the training rows alone: each candidate with at
    least KNEE_SIDE_ROWS decode shapes on each side of it is cross-validated (`cv_rms`) against no knee; the
    best is kept only if it cuts that error by KNEE_GAIN or more. Returns {"chosen", "cv_rms_rel_error"
    (candidate -> error; "none" for no knee), "why"}."""
    pad = X[:, MEASURED.index("decode_padded")]
    dec = pad > 0
    out: dict[str, Any] = {"chosen": None, "cv_rms_rel_error": {}, "why": ""}
    ok = [k for k in candidates if (dec & (pad <= k)).sum() >= KNEE_SIDE_ROWS and (pad > k).sum() >= KNEE_SIDE_ROWS]
    if len(y) < 10 or not ok:
        out["why"] = (f"no knee: too few shapes ({len(y)}) to cross-validate one" if len(y) < 10 else
                      f"no knee: no candidate ({', '.join(map(str, candidates))} padded tokens) has "
                      f"{KNEE_SIDE_ROWS} decode shapes on each side")
        return out
    base = cv_rms(X, y, None, seed=seed)
    cv = {"none": base} | {str(k): cv_rms(X, y, k, seed=seed) for k in ok}
    out["cv_rms_rel_error"] = cv
    best = min(ok, key=lambda k: cv[str(k)])
    if cv[str(best)] <= (1 - KNEE_GAIN) * base:
        out["chosen"] = int(best)
        out["why"] = (f"knee at {best} padded tokens: cross-validated RMS relative error {cv[str(best)]:.1%} vs "
                      f"{base:.1%} without")
    else:
        out["why"] = (f"no knee: the best ({best} padded tokens, {cv[str(best)]:.1%}) does not clearly beat none "
                      f"({base:.1%}) in cross-validation")
    return out


def fit_cost(X: np.ndarray, y: np.ndarray, kv_capacity_tokens: int, *, kinds: Sequence[str] | None = None,
             holdout: float = 0.25, form: str = "auto", seed: int = 0, name: str = "fitted",
             padded_knee: int | None | str = "auto") -> FitResult:
    """Fit on the training share, report errors on the held-back share; the stored model is the one
    whose held-out error is reported (it is not refitted on every point afterwards).

    form: "linear", "max", or "auto" (the max of two lines only if it cuts the held-out median relative
    error by a fifth or more without a worse maximum: a second line must earn its six parameters).
    padded_knee: the knee of the padded-token hinge, None for none, or "auto" (`choose_knee` on the
    training rows; the held-back rows play no part in it)."""
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if X.ndim != 2 or X.shape[1] != len(MEASURED) or len(X) != len(y):
        raise ValueError(f"X must be [n, {len(MEASURED)}] and y [n]; got {X.shape} and {y.shape}")
    if not len(y) or np.any(~np.isfinite(y)) or np.any(y <= 0):
        raise ValueError("durations must be finite and > 0")
    if form not in ("auto", "linear", "max"):
        raise ValueError(f"form={form!r}; allowed: auto | linear | max")
    kinds = list(kinds) if kinds is not None else ["all"] * len(y)
    train, test = holdout_split(kinds, holdout, seed)
    Xt, yt = X[train], y[train]
    if padded_knee == "auto":
        knee_d = choose_knee(Xt, yt, seed=seed)
    else:
        k = _knee(padded_knee)
        knee_d = {"chosen": k, "why": f"knee at {k} padded tokens (given)" if k is not None else "no knee (given)"}
    knee = knee_d["chosen"]
    lin = fit_linear(Xt, yt, kv_capacity_tokens, name, padded_knee=knee)
    mx = fit_max(Xt, yt, kv_capacity_tokens, name, seed, padded_knee=knee) if form in ("auto", "max") else None
    eval_idx = test if len(test) else train  # with nothing held back, compare on the training points

    def stats(m: FittedCost, idx: np.ndarray) -> dict[str, float]:
        return error_stats(m.predict(X[idx]), y[idx])

    cands = {"linear": stats(lin, eval_idx)}
    if mx is not None:
        cands["max"] = stats(mx, eval_idx)
    where = "held-out" if len(test) else "training"
    if form == "linear" or mx is None:
        model = lin
        why = "linear requested" if form == "linear" else "too few points for two lines; linear"
    elif form == "max":
        model, why = mx, "max of two lines requested"
    else:
        lm, mm = cands["linear"], cands["max"]
        if mm["median_rel_error"] <= 0.8 * lm["median_rel_error"] and mm["max_rel_error"] <= lm["max_rel_error"]:
            model = mx
            why = (f"max of two lines: {where} median error {mm['median_rel_error']:.1%} vs linear "
                   f"{lm['median_rel_error']:.1%}")
        else:
            model = lin
            why = (f"linear: the max of two lines does not clearly beat it ({where} median "
                   f"{mm['median_rel_error']:.1%} vs {lm['median_rel_error']:.1%}, max "
                   f"{mm['max_rel_error']:.1%} vs {lm['max_rel_error']:.1%})")
    errors = {"train": stats(model, train), "heldout": stats(model, test)}
    return FitResult(model, train, test, errors, cands, why, knee_d)


# ---- profile files ----------------------------------------------------------------------------

@dataclass
class Profile:
    """A fitted profile: the model plus everything needed to judge and reproduce it."""

    cost: FittedCost
    device: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)  # executor ModelConfig (config_dict)
    versions: dict[str, Any] = field(default_factory=dict)
    kv: dict[str, Any] = field(default_factory=dict)  # capacity_tokens, block_size, num_blocks
    fit: dict[str, Any] = field(default_factory=dict)  # errors, form, why, holdout share
    measure: dict[str, Any] = field(default_factory=dict)  # repeats, warmup, threads, seconds
    grid: list[dict[str, Any]] = field(default_factory=list)  # one row per shape: features, timings, heldout
    created: str = ""
    name: str = ""
    # Measured again while `neighbours` co-located replicas ran steps (`twinfer profile --concurrent N`).
    busy: FittedCost | None = None
    busy_fit: dict[str, Any] = field(default_factory=dict)
    neighbours: int = 0
    # What each kind of neighbour step does to each kind of step (sim.contention.measure_contention); optional.
    contention: dict[str, Any] = field(default_factory=dict)

    def contention_cost(self, group: int | None = None) -> Any:
        """The step-by-step co-location model (sim.contention.ContentionCost: the alone fit times what each
        kind of neighbour step does), or None when the profile has no such measurement (profiles written
        before it, or `--concurrent 1`)."""
        if not self.contention.get("conditions"):
            return None
        from sim.contention import ContentionCost, factor_table

        return ContentionCost(self.cost, factor_table(self.contention), group=group,
                              name=f"{self.cost.name} (co-located)")

    def cost_at(self, u: float) -> FittedCost:
        """The cost model of a replica whose neighbours are busy a share u of the time (0: alone, 1: always).
        Without a busy measurement, the one model there is."""
        if self.busy is None:
            return self.cost
        return blend(self.cost, self.busy, u)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": PROFILE_FORMAT, "version": PROFILE_VERSION, "name": self.name or self.cost.name,
            "created": self.created or utc_now(), "form": self.cost.form,
            "device": self.device, "model": self.model, "versions": self.versions,
            "kv": {**self.kv, "capacity_tokens": self.cost.kv_capacity_tokens},
            "coefficients": self.cost.coefficients(), "fit": self.fit, "measure": self.measure,
            **({"neighbours": {"count": self.neighbours, "form": self.busy.form,
                               "coefficients": self.busy.coefficients(), "fit": self.busy_fit}}
               if self.busy is not None else {}),
            **({"contention": self.contention} if self.contention else {}),
            "grid": self.grid,
        }

    @staticmethod
    def from_dict(d: Mapping[str, Any], where: str = "profile") -> "Profile":
        if d.get("format") != PROFILE_FORMAT:
            raise ValueError(f"{where}: not a twinfer profile (format={d.get('format')!r}, "
                             f"expected {PROFILE_FORMAT!r})")
        if int(d.get("version", 0)) > PROFILE_VERSION:
            raise ValueError(f"{where}: profile version {d.get('version')} is newer than this twinfer "
                             f"reads ({PROFILE_VERSION})")
        try:
            co = d["coefficients"]
            kv = dict(d["kv"])
            wake = ((co["wake_after_s"], co["wake_factor"], *([co["wake_busy_factor"]] if "wake_busy_factor" in co
                                                                else [])) if "wake_factor" in co else None)
            cost = FittedCost(co["shared"], int(kv["capacity_tokens"]), co.get("line_a"), co.get("line_b"),
                              name=str(d.get("name", "fitted")), step_overhead_s=float(co.get("step_overhead_s", 0.0)),
                              padded_knee=co.get("decode_padded_knee"), wake=wake,
                              prefill_factor=co.get("prefill_loop_factor", 1.0))
            nb = d.get("neighbours")
            busy = None
            if nb is not None:
                bc = nb["coefficients"]
                busy = FittedCost(bc["shared"], cost.kv_capacity_tokens, bc.get("line_a"), bc.get("line_b"),
                                  name=f"{cost.name} (neighbours busy)",
                                  step_overhead_s=float(bc.get("step_overhead_s", 0.0)),
                                  padded_knee=bc.get("decode_padded_knee"), wake=wake,
                                  prefill_factor=co.get("prefill_loop_factor", 1.0))
        except KeyError as e:
            raise ValueError(f"{where}: missing {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: {e}") from None
        return Profile(cost=cost, device=dict(d.get("device", {})), model=dict(d.get("model", {})),
                       versions=dict(d.get("versions", {})), kv=kv, fit=dict(d.get("fit", {})),
                       measure=dict(d.get("measure", {})), grid=[dict(g) for g in d.get("grid", [])],
                       created=str(d.get("created", "")), name=str(d.get("name", "")), busy=busy,
                       busy_fit=dict(nb.get("fit", {})) if nb else {}, neighbours=int(nb.get("count", 0)) if nb else 0,
                       contention=_contention_section(d.get("contention"), where))


def _contention_section(c: Any, where: str) -> dict[str, Any]:
    """The optional "contention" section, checked (its models must build)."""
    if not c:
        return {}
    from sim.contention import factor_table

    try:
        factor_table(c)
    except KeyError as e:
        raise ValueError(f"{where}: contention: missing {e.args[0]!r}") from None
    except (TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"{where}: contention: {e}") from None
    return dict(c)


def blend(alone: FittedCost, busy: FittedCost, u: float) -> FittedCost:
    """(1 - u) alone + u busy, coefficient by coefficient. Exact when at most one of them is a max of two
    lines (max(uA, uB) = u max(A, B)); for two max forms, a monotone approximation that is exact at u = 0, 1."""
    if not 0 <= u <= 1:
        raise ValueError(f"u={u} is out of range; allowed: [0, 1]")
    if alone.padded_knee != busy.padded_knee:
        raise ValueError(f"cannot blend models with different knees ({alone.padded_knee} and {busy.padded_knee} "
                         f"padded tokens)")
    w = 1.0 - u
    return FittedCost(w * alone.shared + u * busy.shared, alone.kv_capacity_tokens,
                      w * alone.line_a + u * busy.line_a, w * alone.line_b + u * busy.line_b,
                      name=alone.name if u == 0 else f"{alone.name} (neighbours busy {u:.0%})",
                      step_overhead_s=w * alone.step_overhead_s + u * busy.step_overhead_s,
                      padded_knee=alone.padded_knee, wake=alone.wake, prefill_factor=alone.prefill_factor)


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "numpy": np.__version__}
    try:
        import scipy

        out["scipy"] = scipy.__version__
    except ImportError:  # pragma: no cover
        pass
    try:
        import torch

        out["torch"] = torch.__version__
    except ImportError:
        out["torch"] = "not installed"
    return out


def save_profile_file(profile: Profile, path: str | Path) -> Path:
    """Write TOML (.toml) or JSON (anything else, conventionally .json)."""
    p = Path(path)
    d = profile.to_dict()
    if p.suffix == ".toml":
        text = to_toml(d)
    else:
        text = json.dumps(_plain(d), indent=2) + "\n"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return p


def read_profile_file(path: str | Path) -> Profile:
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{p}: profile file not found") from None
    if p.suffix == ".toml":
        import tomllib

        try:
            d = tomllib.loads(raw.decode())
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{p}: not valid TOML: {e}") from None
    else:
        try:
            d = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}: not valid JSON: {e}") from None
    return Profile.from_dict(d, where=str(p))


def load_profile_file(path: str | Path) -> FittedCost:
    """The cost model of a profile file (what sim.cost.load_cost_model returns for a .toml/.json path).
    A profile measured with co-located neighbours (`--concurrent N`) describes one of N replicas sharing a
    machine, neighbours busy: that model is returned (`twinfer validate` finds their actual share).
    The profile's other fields ride along as `cost.profile`."""
    prof = read_profile_file(path)
    cost = prof.cost_at(1.0)
    cost.profile = prof  # type: ignore[attr-defined]
    return cost


def _plain(o: Any) -> Any:
    """numpy scalars/arrays and tuples -> JSON/TOML-able Python values."""
    if isinstance(o, dict):
        return {str(k): _plain(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_plain(v) for v in o]
    if isinstance(o, np.ndarray):
        return [_plain(v) for v in o.tolist()]
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.bool_):
        return bool(o)
    return o


def _toml_key(k: str) -> str:
    if k and all(c.isalnum() or c in "_-" for c in k):
        return k
    return json.dumps(k)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        r = repr(v)
        return r if any(c in r for c in ".en") else r + ".0"
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v if x is not None) + "]"
    if isinstance(v, dict):  # inline table (only inside arrays)
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items() if x is not None) + "}"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def to_toml(d: Mapping[str, Any]) -> str:
    """A small TOML writer for profile-shaped data: scalars, lists, nested tables, arrays of tables.
    None values are left out (TOML has no null)."""
    d = _plain(d)
    lines: list[str] = []

    def is_table_array(v: Any) -> bool:
        return isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)

    def emit(table: Mapping[str, Any], path: list[str]) -> None:
        for k, v in table.items():
            if v is None or isinstance(v, dict) or is_table_array(v):
                continue
            lines.append(f"{_toml_key(k)} = {_toml_value(v)}")
        for k, v in table.items():
            if isinstance(v, dict):
                lines.append("")
                lines.append("[" + ".".join(_toml_key(x) for x in path + [k]) + "]")
                emit(v, path + [k])
        for k, v in table.items():
            if is_table_array(v):
                for row in v:
                    lines.append("")
                    lines.append("[[" + ".".join(_toml_key(x) for x in path + [k]) + "]]")
                    emit(row, path + [k])

    emit(d, [])
    return "\n".join(lines) + "\n"


# ---- the measurement grid ---------------------------------------------------------------------

@dataclass(frozen=True)
class GridPoint:
    """One step shape. prefills: (start position, tokens, completes the prompt) per chunk;
    decodes: context length (the new token included, >= 2) per decoding sequence."""

    kind: str
    prefills: tuple[tuple[int, int, bool], ...] = ()
    decodes: tuple[int, ...] = ()
    # Where the blocks lie in the cache (`_build_plan`): "scattered", no block right after its predecessor
    # (a live replica's tables once blocks have been freed and reused), or "contiguous", each table one run.
    layout: str = "scattered"

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout={self.layout!r}; valid: {', '.join(LAYOUTS)}")

    def features(self, block_size: int = 16) -> StepFeatures:
        pt = sum(n for _, n, _ in self.prefills)
        attn = sum(n * s + n * (n + 1) / 2 for s, n, _ in self.prefills)
        logits = sum(1 for *_, done in self.prefills if done) + len(self.decodes)
        breaks = sum(-(-c // block_size) - 1 for c in self.decodes) if self.layout == "scattered" else 0
        return StepFeatures(pt, len(self.decodes), attn, sum(self.decodes), logits,
                            *decode_grouping(list(self.decodes), block_size), breaks)

    @property
    def max_context(self) -> int:
        return max([s + n for s, n, _ in self.prefills] + list(self.decodes) + [0])

    def label(self) -> str:
        parts = []
        if self.prefills:
            chunks: dict[tuple[int, int, bool], int] = {}
            for c in self.prefills:
                chunks[c] = chunks.get(c, 0) + 1
            parts.append("+".join(f"{k}x{n}@{s}{'' if done else '~'}" if k > 1 else f"{n}@{s}{'' if done else '~'}"
                                  for (s, n, done), k in chunks.items()))
        if self.decodes:
            lo, hi = min(self.decodes), max(self.decodes)
            parts.append(f"dec{len(self.decodes)}@{lo}" + (f"-{hi}" if hi != lo else ""))
        if self.layout != "scattered":
            parts.append(self.layout)
        return f"{self.kind}:" + " ".join(parts)


def spread_contexts(batch: int, mean: int, rng: np.random.Generator) -> list[int]:
    """`batch` context lengths averaging about `mean`, spread as in a live batch (uniform over
    [mean/4, 7 mean/4]): sequences joined at different times and have different prompts."""
    if batch == 1:
        return [max(mean, 2)]
    lo, hi = max(mean // 4, 2), max(7 * mean // 4, 3)
    return sorted((int(x) for x in rng.integers(lo, hi, batch)), reverse=True)


def default_grid(quick: bool = False, max_tokens: int = 2048, max_context: int = 4096,
                 max_seqs: int = 128, seed: int = 0, max_kv_tokens: int | None = None) -> list[GridPoint]:
    """Step shapes covering what a continuous-batching scheduler produces: decode batches at several
    context lengths, prefill chunks from position 0 and deep in a prompt, several chunks in one step,
    chunks that do not finish their prompt, and prefill + decode mixes.

    Decode contexts are spread as in a live batch (`spread_contexts`), with a few uniform batches
    besides: the paged attention pads a group of rows to its longest and splits very uneven batches
    into several groups, so a spread batch costs more than a uniform one with the same total context
    (measured: up to a fifth more at 16 rows), and the features cannot tell them apart.
    Shapes whose sequences would not fit `max_kv_tokens` of KV cache together are left out."""
    rng = np.random.default_rng(seed)
    pts: list[GridPoint] = []

    twins: list[GridPoint] = []  # measured again with contiguous block tables

    def add(kind: str, prefills=(), decodes=(), layout: str = "scattered", twin: bool = False) -> None:
        p = GridPoint(kind, tuple(prefills), tuple(decodes), layout)
        f = p.features()
        kv = sum(st + n for st, n, _ in p.prefills) + sum(p.decodes)
        if (0 < f.tokens <= max_tokens and p.max_context <= max_context and len(p.prefills) + len(p.decodes) <= max_seqs
                and (max_kv_tokens is None or kv <= max_kv_tokens)):
            pts.append(p)
            if twin:
                twins.append(p)

    if quick:
        batches, ctxs = (1, 8, 32), (64, 512, 1536)
        small_batches: tuple[int, ...] = (3,)
        chunk_sizes = (32, 256, 1024)
        deep = ((512, 256), (1536, 512))
        multi = ((4, 128),)
        mixes = ((256, 16, 512), (64, 32, 256), (512, 4, 1024))
        uniform = ((16, 512), (4, 1024))
        tiered = (((2, 1984), (2, 64)),)
        twin_batches, twin_ctxs, twin_mixes = (8, 32), (512, 1536), ((512, 4, 1024),)
    else:
        batches, ctxs = (1, 2, 4, 8, 16, 32, 64, 128), (32, 256, 1024, 2048)
        small_batches = (3, 6, 12)
        chunk_sizes = (16, 64, 128, 256, 512, 1024, 2048)
        deep = ((256, 256), (512, 512), (1024, 256), (1024, 1024), (1536, 512), (2048, 1024), (3072, 512))
        multi = ((2, 512), (4, 64), (4, 256), (8, 128), (16, 32))
        mixes = ((64, 8, 256), (256, 8, 1024), (256, 32, 256), (512, 32, 1024), (1024, 16, 512), (128, 64, 512),
                 (512, 64, 2048), (256, 2, 512), (512, 4, 1024))
        uniform = ((8, 1024), (32, 256), (64, 512), (16, 2048), (2, 1024), (4, 1024), (2, 2048), (8, 512), (3, 1387),
                   (6, 1387), (12, 693))
        # (rows, context) tiers, longest first: a few long rows beside short ones, so the paged attention runs
        # one SDPA call per tier; with the uniform batches of the same size and total context above they
        # separate what a decode group and its padding cost from what context costs, which spread batches
        # alone move together (their extra groups come only with long, widely spread contexts).
        tiered = (((1, 1984), (1, 64)), ((1, 4032), (1, 64)), ((2, 1984), (2, 64)), ((4, 960), (4, 64)),
                  ((4, 1984), (4, 64)), ((1, 3072), (1, 1024), (1, 64)), ((2, 3072), (2, 1024), (2, 64)),
                  ((4, 1536), (4, 512), (4, 32)))
        twin_batches, twin_ctxs, twin_mixes = (1, 2, 4, 8, 16, 32), (256, 1024, 2048), ((256, 8, 1024), (512, 32, 1024))
    for b in batches:
        for c in ctxs:
            add("decode", decodes=spread_contexts(b, c, rng), twin=b in twin_batches and c in twin_ctxs)
    # Small batches between the powers of two, where a CPU step moves from matrix-vector to matrix
    # products and where light load spends most of its steps (own random stream: the shapes above stay
    # what they were in profiles made before these were added).
    rng_small = np.random.default_rng(seed + 1)
    for b in small_batches:
        for c in ctxs:
            add("decode", decodes=spread_contexts(b, c, rng_small))
    for b, c in uniform:
        add("decode", decodes=[c] * b)
    for tiers in tiered:
        add("decode", decodes=[c for n, c in tiers for _ in range(n)])
    for n in chunk_sizes:
        add("prefill", prefills=[(0, n, True)])
    for st, n in deep:
        add("prefill", prefills=[(st, n, True)])
    add("prefill", prefills=[(0, min(512, max_tokens), False)])
    add("prefill", prefills=[(1024, 512, False)])
    for k, n in multi:
        add("prefill", prefills=[(0, n, True)] * k)
    for n, b, c in mixes:
        add("mixed", prefills=[(0, n, True)], decodes=spread_contexts(b, c, rng), twin=(n, b, c) in twin_mixes)
    # Some of the shapes again with contiguous block tables (each table one run of ids, as a fresh pool hands
    # them out): against their scattered twins they measure what a break in a table costs (decode_breaks),
    # which a live replica's tables have anywhere from none of (long prompts allocated at once) to one per
    # block (sequences that grew a block at a time beside others).
    for p in twins:
        add(p.kind, p.prefills, p.decodes, "contiguous")
    return pts


@dataclass
class Measurement:
    point: GridPoint
    samples: list[float]  # seconds, after warm-up

    @property
    def median(self) -> float:
        return float(np.median(self.samples))

    def stats(self) -> dict[str, float]:
        s = np.asarray(self.samples)
        q25, q75 = np.percentile(s, [25, 75])
        med = float(np.median(s))
        return {"median_s": med, "min_s": float(s.min()), "max_s": float(s.max()),
                "iqr_rel": float((q75 - q25) / med), "n": int(len(s))}


def _build_plan(point: GridPoint, vocab: int, block_size: int, num_blocks: int, first_id: int):
    """A StepPlan of fresh Sequences in exactly the state the scheduler would leave them in.

    With point.layout "scattered", their blocks are scattered over the whole cache (a seeded permutation of
    its block ids, no block right after its predecessor), as a live replica's are once blocks have been
    freed and reused a while; "contiguous": each table one run of ids. Gathering scattered blocks is
    measurably slower (a decode step of 8 rows at 1k tokens, about a sixth, on this project's CPU): the
    grid measures both, and the features count the difference (decode_breaks)."""
    from executor.tokens import prompt_tokens
    from policies.kv_cache import BlockManager
    from policies.plan import StepPlan
    from policies.sequence import SeqStatus, Sequence
    from traces.workload import Request

    kv = BlockManager(num_blocks, block_size, enable_caching=False)
    plan = StepPlan()
    rid = first_id
    for start, n, done in point.prefills:
        prompt = start + n + (0 if done else block_size)
        req = Request(index=rid, arrival=0.0, input_tokens=prompt, output_tokens=4)
        seq = Sequence(req)
        seq.num_computed = start
        seq.tokens = prompt_tokens(req, vocab)
        seq.block_table = kv.allocate(kv.blocks_for(start + n))
        seq.status = SeqStatus.RUNNING
        plan.prefill.append(seq)
        plan.prefill_tokens.append(n)
        rid += 1
    for ctx in point.decodes:
        if ctx < 2:
            raise ValueError(f"decode context {ctx} < 2: a decoding sequence has a prompt and one generated token")
        req = Request(index=rid, arrival=0.0, input_tokens=ctx - 1, output_tokens=1_000_000)
        seq = Sequence(req)
        seq.num_generated = 1
        seq.num_computed = ctx - 1
        seq.tokens = prompt_tokens(req, vocab) + [rid % vocab]
        seq.block_table = kv.allocate(kv.blocks_for(ctx))
        seq.status = SeqStatus.RUNNING
        plan.decode.append(seq)
        rid += 1
    seqs = plan.prefill + plan.decode
    if point.layout == "contiguous":  # as allocated from a fresh pool: each table one run of ids
        return plan
    # A seeded permutation of the block ids with no block right after its predecessor in any table (so the
    # point has exactly the decode_breaks its features say): drawn again until none is.
    for attempt in range(100):
        perm = np.random.default_rng(first_id + attempt * 1_000_003).permutation(num_blocks).tolist()
        if not any(perm[b] == perm[a] + 1 for s in seqs for a, b in zip(s.block_table, s.block_table[1:])):
            break
    else:  # (about a 1 in e chance per draw of failing for a grid that fills the cache: never in practice)
        raise RuntimeError(f"no scattered block layout for {point.label()} in 100 draws")
    for seq in seqs:
        seq.block_table = [perm[b] for b in seq.block_table]
    return plan


def grid_blocks_needed(points: Sequence[GridPoint], block_size: int) -> int:
    """KV blocks the largest point needs (points reuse the same block ids: only timing matters)."""
    need = 0
    for p in points:
        n = sum(-(-(s + k) // block_size) for s, k, _ in p.prefills) + sum(-(-c // block_size) for c in p.decodes)
        need = max(need, n)
    return need


def measure_grid(runner: Any, points: Sequence[GridPoint], repeats: int = 7, warmup: int = 2, seed: int = 0,
                 progress: Callable[[int, int], None] | None = None) -> list[Measurement]:
    """Time `runner.run(plan)` (executor.runner.ModelRunner) for every point.

    Each point first runs `warmup` times (allocator and kernel set-up for its shapes), then the timed
    runs go in rounds, each round over every point in a fresh random order, so a burst of load from
    another process spreads over many points instead of spoiling one. A decode-only point runs once
    untimed right before each timed run (as in a decode run, where the same batch ran the step before).
    The sampled tokens `run` appends are removed after each call, so every run sees the same state."""
    from executor.device import timer

    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats={repeats} must be >= 1 and warmup={warmup} >= 0")
    cfg = runner.cfg
    if grid_blocks_needed(points, runner.block_size) > runner.num_blocks:
        raise ValueError(f"the grid needs {grid_blocks_needed(points, runner.block_size)} KV blocks; "
                         f"the runner has {runner.num_blocks}")
    plans = [_build_plan(p, cfg.vocab, runner.block_size, runner.num_blocks, 1000 * i) for i, p in enumerate(points)]
    total = len(points) * (warmup + repeats)
    done = 0

    def run_once(plan) -> None:
        runner.run(plan)
        for s in plan.prefill:
            if len(s.tokens) > s.num_tokens:
                s.tokens.pop()
        for s in plan.decode:
            s.tokens.pop()

    def once(plan) -> float:
        if not plan.prefill:
            # A decode step is timed right after the same batch's previous step (an untimed run), as it runs
            # inside a decode run: its KV blocks as warm as the caches keep them (measured: a one-sequence
            # decode 3 % faster than after a prefill; two or more sequences, no difference). Prefill and
            # mixed steps are timed after whatever came before, as they run.
            run_once(plan)
        with timer(runner.device) as t:
            run_once(plan)
        return t.elapsed

    samples: list[list[float]] = [[] for _ in points]
    for i, plan in enumerate(plans):
        for _ in range(warmup):
            once(plan)
            done += 1
            if progress:
                progress(done, total)
    rng = np.random.default_rng(seed)
    for _ in range(repeats):
        for i in rng.permutation(len(plans)).tolist():
            samples[i].append(once(plans[i]))
            done += 1
            if progress:
                progress(done, total)
    return [Measurement(p, s) for p, s in zip(points, samples)]


def _companion_main(model: Any, seed: int, device: str, threads: int, block_size: int, num_blocks: int,
                    points: list[GridPoint], ready: Any, stop: Any, groups: list[list[int]] | None = None,
                    mode: Any = None, ack: Any = None) -> None:
    """A busy neighbour: its own model and runner, running grid shapes in random order until told to stop.
    `model`: an executor.replay.ModelSpec (a preset's config or a weights directory), or a ModelConfig
    (weights from `seed`). With `groups` and a shared `mode`: runs shapes of groups[mode] only, or sleeps
    while mode < 0, and writes the mode it is now in (set after the step in progress ends) to `ack`."""
    from executor.replay import ModelSpec
    from executor.runner import ModelRunner

    spec = model if isinstance(model, ModelSpec) else ModelSpec(model, None, seed)
    model_cfg = spec.cfg
    runner = ModelRunner(spec.build(device), num_blocks, block_size, device=device, num_threads=threads)
    plans = [_build_plan(p, model_cfg.vocab, block_size, num_blocks, 1000 * i) for i, p in enumerate(points)]
    rng = np.random.default_rng(seed + 1)
    ready.set()
    while not stop.is_set():
        if groups is None:
            plan = plans[int(rng.integers(len(plans)))]
        else:
            m = int(mode.value)
            ack.value = m
            if m < 0 or not groups[m]:
                time.sleep(0.001)
                continue
            g = groups[m]
            plan = plans[g[int(rng.integers(len(g)))]]
        runner.run(plan)
        for s in plan.prefill + plan.decode:
            del s.tokens[s.num_tokens:]


class BusyNeighbours:
    """`with BusyNeighbours(k - 1, ...):` measure as one of k co-located replicas, the others busy.

    Replicas sharing a machine share its caches, memory bandwidth and (on a VM) possibly its physical
    cores; a step measured alone is faster than the same step while the neighbours compute. Each
    neighbour is a process with its own model, runner and thread count, running grid shapes.

    With `groups` (lists of indices into `points`), the neighbours start idle and `switch(m)` makes them
    run only groups[m]'s shapes (m < 0: idle again); it returns once every neighbour has finished the step
    it had in progress, so what is measured next is measured under the new condition."""

    def __init__(self, n: int, model: Any, points: Sequence[GridPoint], block_size: int, num_blocks: int,
                 threads: int, device: str = "cpu", seed: int = 0, timeout_s: float = 300.0,
                 groups: Sequence[Sequence[int]] | None = None):
        self.n, self.args = n, (model, seed, device, threads, block_size, num_blocks, list(points))
        self.timeout_s = timeout_s
        self.groups = [list(g) for g in groups] if groups is not None else None
        self.procs: list[Any] = []
        self.modes: list[tuple[Any, Any]] = []

    def __enter__(self) -> "BusyNeighbours":
        if self.n <= 0:
            return self
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.stop = ctx.Event()
        readies = []
        for _ in range(self.n):
            ready = ctx.Event()
            extra: tuple = ()
            if self.groups is not None:
                mode, ack = ctx.Value("i", -1, lock=False), ctx.Value("i", -2, lock=False)
                self.modes.append((mode, ack))
                extra = (self.groups, mode, ack)
            p = ctx.Process(target=_companion_main, args=(*self.args, ready, self.stop, *extra), daemon=True)
            p.start()
            self.procs.append(p)
            readies.append(ready)
        for ready, p in zip(readies, self.procs):
            if not ready.wait(self.timeout_s):
                self.__exit__(None, None, None)
                raise RuntimeError(f"a busy neighbour process did not start within {self.timeout_s} s "
                                   f"(exit code {p.exitcode})")
        if self.groups is not None:
            self.switch(-1)
        return self

    def switch(self, m: int, timeout_s: float = 60.0) -> None:
        if self.groups is None:
            raise RuntimeError("switch needs BusyNeighbours(..., groups=...)")
        for mode, _ in self.modes:
            mode.value = int(m)
        end = time.perf_counter() + timeout_s
        for (_, ack), p in zip(self.modes, self.procs):
            while ack.value != m:
                if time.perf_counter() > end or not p.is_alive():
                    raise RuntimeError(f"a busy neighbour did not switch to mode {m} (alive: {p.is_alive()})")
                time.sleep(0.0005)

    def __exit__(self, *exc: object) -> None:
        if not self.procs:
            return
        self.stop.set()
        for p in self.procs:
            p.join(30)
            if p.is_alive():
                p.terminate()
                p.join(5)
        self.procs = []
        self.modes = []


def profile_from_measurements(meas: Sequence[Measurement], kv_capacity_tokens: int, *, holdout: float = 0.25,
                              form: str = "auto", seed: int = 0, name: str = "fitted",
                              device: Mapping[str, Any] | None = None, model: Mapping[str, Any] | None = None,
                              kv: Mapping[str, Any] | None = None, measure: Mapping[str, Any] | None = None,
                              busy_meas: Sequence[Measurement] | None = None,
                              neighbours: int = 0, contention: Mapping[str, Any] | None = None,
                              knee: Any = "auto") -> tuple[Profile, FitResult]:
    """Fit the measurements (and, if given, the same grid measured with busy neighbours: same hold-out
    split) into a Profile."""
    bs = int((kv or {}).get("block_size", 16))
    feats = [m.point.features(bs) for m in meas]
    X = feature_matrix(feats)
    kinds = [m.point.kind for m in meas]

    def fit_of(ms: Sequence[Measurement], label: str, knee: Any = "auto") -> tuple[FitResult, dict[str, Any]]:
        y = np.array([m.median for m in ms])
        fit = fit_cost(X, y, kv_capacity_tokens, kinds=kinds, holdout=holdout, form=form, seed=seed, name=label,
                       padded_knee=knee)
        spreads = [m.stats()["iqr_rel"] for m in ms]
        return fit, fit.record(holdout, seed, median_iqr_rel=float(np.median(spreads)) if spreads else math.nan,
                               max_iqr_rel=float(np.max(spreads)) if spreads else math.nan)

    fit, fit_d = fit_of(meas, name, knee)
    busy_fit = busy_d = None
    if busy_meas is not None:
        if [m.point for m in busy_meas] != [m.point for m in meas]:
            raise ValueError("busy measurements must cover the same grid, in the same order")
        # the alone fit's knee: the two are blended term by term (`blend`)
        busy_fit, busy_d = fit_of(busy_meas, f"{name} (neighbours busy)", fit.model.padded_knee)
    held = set(fit.test.tolist())
    pred = fit.model.predict(X)
    bpred = busy_fit.model.predict(X) if busy_fit else None
    grid = []
    for i, (m, f) in enumerate(zip(meas, feats)):
        row = {"kind": m.point.kind, "label": m.point.label(), "prefill_tokens": f.prefill_tokens,
               "decode_seqs": f.decode_seqs, "prefill_attn": float(f.prefill_attn), "decode_ctx": f.decode_ctx,
               "logits": f.logits, "decode_groups": f.decode_groups, "decode_padded": f.decode_padded,
               "decode_breaks": f.decode_breaks,
               **m.stats(), "predicted_s": float(pred[i]), "heldout": i in held}
        if busy_meas is not None:
            b = busy_meas[i].stats()
            row.update(busy_median_s=b["median_s"], busy_iqr_rel=b["iqr_rel"], busy_predicted_s=float(bpred[i]))
        grid.append(row)
    prof = Profile(cost=fit.model, device=dict(device or {}), model=dict(model or {}), versions=library_versions(),
                   kv=dict(kv or {}), fit=fit_d, measure=dict(measure or {}), grid=grid, created=utc_now(), name=name,
                   busy=busy_fit.model if busy_fit else None, busy_fit=busy_d or {},
                   neighbours=neighbours if busy_fit else 0, contention=dict(contention or {}))
    return prof, fit


def grid_matrix(grid: Sequence[Mapping[str, Any]], where: str = "profile") -> np.ndarray:
    """The feature_matrix of a profile's stored grid rows."""
    keys = ("prefill_tokens", "decode_seqs", "prefill_attn", "decode_ctx", "logits", "decode_groups", "decode_padded",
            "decode_breaks")
    rows = []
    for i, r in enumerate(grid):
        missing = [k for k in keys if k not in r]
        if missing:
            raise ValueError(f"{where}: grid row {i + 1} ({r.get('label', '?')}) has no {', '.join(missing)}: it was "
                             f"written before those were recorded; measure a new profile")
        rows.append(feature_row(StepFeatures(int(r["prefill_tokens"]), int(r["decode_seqs"]), float(r["prefill_attn"]),
                                             int(r["decode_ctx"]), int(r["logits"]), int(r["decode_groups"]),
                                             int(r["decode_padded"]), int(r["decode_breaks"]))))
    return np.array(rows, dtype=np.float64).reshape(-1, len(MEASURED))


def refit_profile(prof: Profile, *, form: str = "auto", padded_knee: int | None | str = "auto",
                  holdout: float | None = None, seed: int | None = None, where: str = "profile") -> Profile:
    """The profile with its cost model fitted again, by this twinfer's fit, on its own stored grid medians
    (and the busy-neighbour fit on the busy medians): nothing is measured again. Everything else (device,
    measurements, contention factors, the drift check's reference medians, the engine loop's overhead and
    the serving-loop factors) is kept. The hold-out share and seed default to the profile's own, so the
    held-back shapes are the same and the errors compare."""
    if not prof.grid:
        raise ValueError(f"{where}: the profile has no grid measurements to fit again (one fitted on an engine "
                         f"step log: fit that log again with --from-steps)")
    holdout = float(prof.fit.get("holdout_share", 0.25)) if holdout is None else holdout
    seed = int(prof.fit.get("seed", 0)) if seed is None else seed
    X = grid_matrix(prof.grid, where)
    kinds = [str(r["kind"]) for r in prof.grid]
    cap = prof.cost.kv_capacity_tokens

    def fit_of(key: str, label: str, knee: Any, overhead: float) -> tuple[FitResult, dict[str, Any]]:
        y = np.array([float(r[key]) for r in prof.grid])
        fit = fit_cost(X, y, cap, kinds=kinds, holdout=holdout, form=form, seed=seed, name=label, padded_knee=knee)
        fit.model = fit.model.with_overhead(overhead).with_wake(prof.cost.wake).with_prefill_factor(
            prof.cost.prefill_factor)
        return fit, fit.record(holdout, seed, **{k: prof.fit[k] for k in ("median_iqr_rel", "max_iqr_rel") if k in prof.fit},
                               refit={"at": utc_now(), "was": {"form": prof.cost.form, "heldout": prof.fit.get("heldout", {}),
                                                               "decode_padded_knee": prof.cost.padded_knee}})

    fit, fit_d = fit_of("median_s", prof.cost.name, padded_knee, prof.cost.step_overhead_s)
    busy = busy_d = None
    if prof.busy is not None:
        if not all("busy_median_s" in r for r in prof.grid):
            raise ValueError(f"{where}: the profile has a busy-neighbour fit but its grid rows lack busy_median_s")
        bfit, busy_d = fit_of("busy_median_s", prof.busy.name, fit.model.padded_knee, prof.busy.step_overhead_s)
        busy = bfit.model
    held = set(fit.test.tolist())
    pred = fit.model.with_overhead(0.0).predict(X)
    bpred = busy.with_overhead(0.0).predict(X) if busy is not None else None
    grid = []
    for i, r in enumerate(prof.grid):
        row = {**r, "predicted_s": float(pred[i]), "heldout": i in held}
        if bpred is not None:
            row["busy_predicted_s"] = float(bpred[i])
        grid.append(row)
    return dataclasses.replace(prof, cost=fit.model, fit=fit_d, grid=grid, busy=busy,
                               busy_fit=busy_d if busy_d is not None else prof.busy_fit, versions=library_versions())


# ---- drift: the machine's speed now against when it was profiled ----------------------------------

# The reference shapes the drift check re-times: per role, the profile's grid row closest to the target
# (log distance over prefill tokens, their attention pairs, decoding sequences and context per sequence),
# each row used once: small to moderate steps of every kind a continuous-batching replay runs, about
# 0.3 s a round for the default model on a 2-core CPU.
DRIFT_ROLES: tuple[tuple[str, str, int, int, int], ...] = (
    # (role, kind, prefill tokens, decoding sequences, context per decoding sequence)
    ("one decode", "decode", 0, 1, 256),
    ("decode batch", "decode", 0, 16, 256),
    ("short prefill", "prefill", 128, 0, 0),
    ("prefill chunk", "prefill", 512, 0, 0),
    ("mixed step", "mixed", 64, 8, 256),
)
DRIFT_BUDGET_S = 1.5  # time the timed rounds of one check aim at (repeats from the stored medians)
_FEATURE_KEYS = ("prefill_tokens", "decode_seqs", "prefill_attn", "decode_ctx", "logits")


def _row_matches(point: GridPoint, row: Mapping[str, Any]) -> bool:
    """`point` has exactly the features the grid row recorded (every feature field must be there)."""
    if not all(k in row for k in _FEATURE_KEYS) or row.get("kind") != point.kind:
        return False
    f = point.features()
    if "decode_breaks" in row and int(row["decode_breaks"]) != f.decode_breaks:  # (the layout; rows since v4)
        return False
    return (int(row["prefill_tokens"]) == f.prefill_tokens and int(row["decode_seqs"]) == f.decode_seqs
            and int(row["decode_ctx"]) == f.decode_ctx and int(row["logits"]) == f.logits
            and math.isclose(float(row["prefill_attn"]), float(f.prefill_attn), rel_tol=1e-9, abs_tol=1e-6))


def _point_from_label(label: str) -> GridPoint | None:
    """The shape a grid label (GridPoint.label) names, when the label determines it: prefill chunks always;
    decodes when there are at most two or all have one context. None otherwise (a spread batch keeps
    only its smallest and largest context in the label) or when the label does not parse."""
    kind, sep, rest = label.partition(":")
    if not sep or not rest:
        return None
    prefills: list[tuple[int, int, bool]] = []
    decodes: list[int] = []
    layout = "scattered"
    try:
        for part in rest.split(" "):
            if part in LAYOUTS:
                layout = part
            elif part.startswith("dec"):
                n_s, _, ctx = part[3:].partition("@")
                n = int(n_s)
                lo_s, _, hi_s = ctx.partition("-")
                lo, hi = int(lo_s), int(hi_s or lo_s)
                if lo == hi:
                    decodes = [lo] * n
                elif n == 2:
                    decodes = [hi, lo]  # spread_contexts' order: longest first
                else:
                    return None
            else:
                for chunk in part.split("+"):
                    done = not chunk.endswith("~")
                    chunk = chunk.rstrip("~")
                    k = 1
                    if "x" in chunk:
                        k_s, chunk = chunk.split("x", 1)
                        k = int(k_s)
                    n_s, _, st_s = chunk.partition("@")
                    prefills += [(int(st_s), int(n_s), done)] * k
    except ValueError:
        return None
    return GridPoint(kind, tuple(prefills), tuple(decodes), layout)


def grid_row_points(profile: Profile) -> dict[int, GridPoint]:
    """The exact shape of every row of the profile's measured grid that can be rebuilt: from the label when
    it determines the shape, else from `default_grid` regenerated with the profile's seed (decode contexts
    are drawn before any limit filters a shape, so the limits it was built with do not matter); a rebuilt
    shape counts only when its features equal the row's. Row index -> GridPoint."""
    seed = int(profile.fit.get("seed", 0) or 0)
    quick = profile.measure.get("quick")
    regen: dict[str, list[GridPoint]] = {}
    big = 10 ** 9
    for q in ((bool(quick),) if quick is not None else (False, True)):
        for p in default_grid(quick=q, max_tokens=big, max_context=big, max_seqs=big, seed=seed):
            regen.setdefault(p.label(), []).append(p)
    out: dict[int, GridPoint] = {}
    for i, row in enumerate(profile.grid):
        label = str(row.get("label", ""))
        cands = [c for c in [_point_from_label(label)] if c is not None] + regen.get(label, [])
        for c in cands:
            if _row_matches(c, row):
                out[i] = c
                break
    return out


def drift_reference_shapes(profile: Profile) -> list[tuple[str, int, GridPoint]]:
    """The drift check's reference shapes, chosen deterministically from the profile's own measured grid
    (DRIFT_ROLES): (role, grid row index, shape). Raises ValueError when the profile has no grid
    measurements or fewer than 3 of its rows can be rebuilt."""
    where = profile.name or "profile"
    if not profile.grid:
        raise ValueError(f"{where}: the profile has no grid measurements (its 'grid' section is empty; a profile "
                         f"fitted on an engine step log has none), so there is nothing to re-time for a drift "
                         f"check: profile with a measured grid (`twinfer profile`) or turn the drift check off "
                         f"(`twinfer validate --no-drift-check`)")
    for i, row in enumerate(profile.grid):
        med = row.get("median_s")
        if not isinstance(med, (int, float)) or not (math.isfinite(med) and med > 0):
            raise ValueError(f"{where}: grid row {i} ({row.get('label', '?')}): median_s={med!r} must be a "
                             f"positive number")
    points = grid_row_points(profile)

    def dist(row: Mapping[str, Any], pt: int, ds: int, cps: int) -> float:
        nd = int(row["decode_seqs"])
        c = int(row["decode_ctx"]) / nd if nd else 0
        attn = float(row["prefill_attn"])  # the target chunks start at position 0: n (n + 1) / 2
        return (abs(math.log((int(row["prefill_tokens"]) + 1) / (pt + 1))) + abs(math.log((nd + 1) / (ds + 1)))
                + abs(math.log((c + 1) / (cps + 1))) + abs(math.log((attn + 1) / (pt * (pt + 1) / 2 + 1))))

    chosen: list[tuple[str, int, GridPoint]] = []
    used: set[int] = set()
    for role, kind, pt, ds, cps in DRIFT_ROLES:
        cands = [i for i in sorted(points) if i not in used and profile.grid[i].get("kind") == kind]
        if not cands:
            continue
        best = min(cands, key=lambda i: (dist(profile.grid[i], pt, ds, cps), i))
        used.add(best)
        chosen.append((role, best, points[best]))
    if len(chosen) < 3:
        raise ValueError(f"{where}: only {len(chosen)} of the grid's {len(profile.grid)} rows could be rebuilt as "
                         f"reference shapes for a drift check (need 3: a decode, a prefill, a mixed step); the grid "
                         f"rows need their label and features (prefill_tokens, decode_seqs, prefill_attn, "
                         f"decode_ctx, logits) as `twinfer profile` writes them; or turn the drift check off "
                         f"(`twinfer validate --no-drift-check`)")
    return chosen


def measure_drift(runner: Any, profile: Profile, repeats: int | None = None, warmup: int = 1, seed: int = 0,
                  budget_s: float = DRIFT_BUDGET_S, stored: str = "median_s") -> dict[str, Any]:
    """How fast the machine runs the executor's steps now against when the profile was measured: re-time
    the reference shapes (`drift_reference_shapes`, taken from the profile's own grid) on `runner` (an
    executor.runner.ModelRunner, as `measure_grid` takes) and compare each shape's median with the
    profile's stored median for it (`stored`, below: nothing else of this session runs meanwhile, or the
    profile's busy neighbours do).

    Returns {"factor": the median over shapes of now / stored (> 1: the machine is slower now), "shapes":
    per shape role, label, stored_s, now_s, ratio, "repeats", "warmup", "seconds"}. The median, not a
    mean, so one shape caught by a burst of other load does not move the factor. `repeats` None: as many
    rounds as fit `budget_s` by the stored medians (2 to 5). Never looks at any workload's steps.

    stored: the grid column the times compare with: "median_s" (measured alone; run the check alone) or a
    median measured beside co-located neighbours (`twinfer profile --concurrent N`: "busy_median_s" beside
    random grid shapes, "median_beside_decode_s" beside decode batches, ...; run the check beside the same
    neighbours, sim.calibrate_cli.colocated_drift)."""
    refs = drift_reference_shapes(profile)
    ref_s: list[float] = []
    for _, i, p in refs:
        v = profile.grid[i].get(stored)
        if not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0):
            raise ValueError(f"drift check: grid row {i} ({p.label()}) has {stored}={v!r}; need a positive number"
                             + (" (busy medians are measured by `twinfer profile --concurrent N`, N >= 2)"
                                if stored != "median_s" else ""))
        ref_s.append(float(v))
    if repeats is None:
        repeats = int(max(2, min(5, budget_s // max(sum(ref_s), 1e-9) - warmup)))
    if repeats < 1 or warmup < 0:
        raise ValueError(f"drift check: repeats={repeats} must be >= 1 and warmup={warmup} >= 0")
    t0 = time.perf_counter()
    meas = measure_grid(runner, [p for *_, p in refs], repeats=repeats, warmup=warmup, seed=seed)
    seconds = time.perf_counter() - t0
    shapes = []
    for (role, i, p), m, st in zip(refs, meas, ref_s):
        now = m.median
        shapes.append({"role": role, "row": i, "label": p.label(), "stored_s": st, "now_s": now, "ratio": now / st})
    factor = float(np.median([s["ratio"] for s in shapes]))
    return {"factor": factor, "shapes": shapes, "repeats": repeats, "warmup": warmup, "seconds": seconds,
            "stored": stored}


def settled_drift(runner: Any, profile: Profile, tries: int = 3, tol: float = 0.05, warmup_s: float = 0.0,
                  **kw: Any) -> dict[str, Any]:
    """`measure_drift` until two checks in a row agree within `tol` (at most `tries` checks): a burst of other
    load during one check (measured: a fresh validate's first check at 1.37 x, the next ones at 1.02-1.04 x)
    then does not set the correction. The result is the last check's, with "factor" the geometric mean of the
    agreeing pair, or the median of all `tries` checks when no two in a row agree; "attempts" lists every
    check's factor.

    warmup_s: checks are made and thrown away ("warmup_attempts") until this long after the call, before
    the `tries` count. Beside a neighbour that has just started, this VM's shapes ran 1.7 x their settled
    time for about 5 s (1.71, 1.69, 1.28, then 1.04 .. 0.98), two slow checks in a row that would
    otherwise agree."""
    if tries < 1 or not tol >= 0 or not warmup_s >= 0:
        raise ValueError(f"drift check: tries={tries} must be >= 1, tol={tol} >= 0 and warmup_s={warmup_s} >= 0")
    warm: list[float] = []
    if warmup_s > 0:
        t_end = time.perf_counter() + warmup_s
        while time.perf_counter() < t_end:
            warm.append(float(measure_drift(runner, profile, **kw)["factor"]))
    attempts: list[float] = []
    d: dict[str, Any] = {}
    agreed = False
    for _ in range(tries):
        d = measure_drift(runner, profile, **kw)
        attempts.append(float(d["factor"]))
        if len(attempts) >= 2 and abs(attempts[-1] / attempts[-2] - 1.0) <= tol:
            agreed = True
            break
    out = dict(d)
    out["attempts"] = attempts
    out["warmup_attempts"] = warm
    out["factor"] = (math.sqrt(attempts[-1] * attempts[-2]) if agreed else float(np.median(attempts)))
    out["settled"] = agreed or tries == 1
    return out


# ---- validation: simulator vs executor ----------------------------------------------------------

COMPARED = (("ttft", "TTFT"), ("tpot", "TPOT"), ("e2e", "E2E"), ("queueing", "queueing"))
COMPARED_QUANTILES = ("p50", "p90", "p99")
COMPARED_RATES = (("throughput_rps", "throughput (req/s)"), ("output_tokens_per_s", "output tokens/s"))
# Below this a latency is "zero" (an idle system admits at once): relative error is undefined there.
ZERO_S = 1e-4


def _rel(sim: float, real: float, floor: float) -> float | None:
    if not (math.isfinite(sim) and math.isfinite(real)):
        return None
    if abs(real) < floor:
        return 0.0 if abs(sim) < floor else None
    return (sim - real) / real


SAMPLING_LEVEL = 0.9  # the resampling band's confidence level


def sampling_bands(records: Mapping[str, np.ndarray], level: float = SAMPLING_LEVEL, n_resamples: int = 2000,
                   seed: int = 0) -> dict[str, tuple[float, float]]:
    """How much each compared latency percentile of one real run owes to which requests happened to be in
    it: the `level` bootstrap interval of the percentile over resamples of the run's requests
    (scipy.stats.bootstrap, percentile method, seeded). With a few dozen requests, a p50 that falls
    between two clusters of latencies (short and long prompts) moves by tens of percent when two requests
    swap sides; a simulator figure inside this band differs from the measurement by no more than the
    measurement's own sampling error. Metric key ("ttft.p50") -> (low, high); metrics with fewer than
    two finite samples are left out. A p99 of a few dozen requests is about their largest, and no resample
    exceeds that, so its band reaches up to the real figure only: read the bands of p50 and p90 first."""
    from scipy.stats import bootstrap

    from traces.report import request_metrics

    if not 0 < level < 1:
        raise ValueError(f"level={level} is out of range; allowed: 0 < level < 1")
    per = request_metrics(records)
    out: dict[str, tuple[float, float]] = {}
    for name, _ in COMPARED:
        x = np.asarray(per[name], dtype=np.float64)
        x = x[np.isfinite(x)]
        if len(x) < 2:
            continue
        flat = np.ptp(x) == 0  # every request the same: a zero-width band (the bootstrap has no spread to find)
        for q in COMPARED_QUANTILES:
            qv = float(q[1:])
            if flat:
                out[f"{name}.{q}"] = (float(x[0]), float(x[0]))
                continue
            res = bootstrap((x,), lambda a, axis: np.percentile(a, qv, axis=axis), confidence_level=level,
                            n_resamples=n_resamples, method="percentile", vectorized=True,
                            rng=np.random.default_rng(seed))
            ci = res.confidence_interval
            out[f"{name}.{q}"] = (float(ci.low), float(ci.high))
    return out


def paired_errors(sim_records: Any, real_records: Any) -> dict[str, Any]:
    """Request by request: the simulator's TTFT, TPOT and E2E of each request over the executor's for the
    same request (matched by id; requests completed on both sides, TPOT where both generated two tokens or
    more). Per metric: the median, p10 and p90 of sim / real - 1 and the count. A percentile of a few dozen
    requests can sit in the gap between two clusters of prompt lengths, where a small per-request error
    moves it far; the median per-request error is the model's bias free of that."""
    def per_request(rec: Any) -> dict[int, tuple[float, float, float]]:
        ids = np.asarray(rec["id"], dtype=np.int64)
        arr, first, fin = (np.asarray(rec[k], dtype=np.float64) for k in ("arrival", "first_token", "finish"))
        gen = np.asarray(rec["generated_tokens"], dtype=np.int64)
        ok = np.asarray([s == "ok" for s in rec["status"]], dtype=bool)
        tpot = np.where(gen >= 2, (fin - first) / np.maximum(gen - 1, 1), np.nan)
        return {int(i): (first[j] - arr[j], tpot[j], fin[j] - arr[j])
                for j, i in enumerate(ids.tolist()) if ok[j]}

    sim, real = per_request(sim_records), per_request(real_records)
    both = sorted(set(sim) & set(real))
    out: dict[str, Any] = {"requests": len(both), "sim_only": len(set(sim) - set(real)),
                           "real_only": len(set(real) - set(sim))}
    for k, name in enumerate(("ttft", "tpot", "e2e")):
        r = np.asarray([sim[i][k] / real[i][k] - 1 for i in both
                        if math.isfinite(sim[i][k]) and math.isfinite(real[i][k]) and real[i][k] > ZERO_S])
        out[name] = ({"median": float(np.median(r)), "p10": float(np.percentile(r, 10)),
                      "p90": float(np.percentile(r, 90)), "n": int(len(r))} if len(r) else
                     {"median": math.nan, "p10": math.nan, "p90": math.nan, "n": 0})
    return out


JITTER_RUNS = 9  # simulations with step jitter per prediction (seeds cfg.seed, cfg.seed + 1, ...)
JITTER_BAND = (10.0, 90.0)  # the prediction's band over them, percentiles


def jittered_prediction(w: Any, cfg: Any, cost: Any, jitter: Any, runs: int = JITTER_RUNS
                        ) -> tuple[dict[str, Any], dict[str, tuple[float, float]], Any]:
    """The simulator with step jitter (sim.jitter), `runs` times with seeds cfg.seed, cfg.seed + 1, ...: one
    run's percentile of a few dozen requests moves with its draws as a real run's does, so the prediction is
    the median over the runs of each compared figure, and the runs' JITTER_BAND percentiles of it are the
    prediction's band (what the machine's step-to-step spread alone moves it by). Returns (a summary as
    traces.report.summarize gives, its compared figures replaced by those medians; the bands by `compare`
    key; the first run's RunResult, for its records)."""
    import dataclasses

    from sim.cluster import simulate
    from traces.report import summarize

    if runs < 1:
        raise ValueError(f"jittered prediction: runs={runs} is out of range; allowed: >= 1")
    first, sums = None, []
    for k in range(runs):
        res = simulate(w, dataclasses.replace(cfg, seed=cfg.seed + k), cost=cost, jitter=jitter)
        if first is None:
            first = res
        sums.append(summarize(res, cfg.slo))
    out = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in sums[0].items()}
    bands: dict[str, tuple[float, float]] = {}

    def put(key: str, vals: list[float]) -> float:
        v = np.asarray(vals, dtype=np.float64)
        v = v[np.isfinite(v)]
        if not len(v):
            return math.nan
        bands[key] = (float(np.percentile(v, JITTER_BAND[0])), float(np.percentile(v, JITTER_BAND[1])))
        return float(np.median(v))

    for m, _ in COMPARED:
        for q in COMPARED_QUANTILES:
            out[m][q] = put(f"{m}.{q}", [s[m][q] for s in sums])
    for k, _ in COMPARED_RATES:
        out[k] = put(k, [s[k] for s in sums])
    return out, bands, first


def with_prediction_band(cmp: dict[str, Any], bands: Mapping[str, tuple[float, float]]) -> dict[str, Any]:
    """`compare`'s output with each figure's prediction band (`jittered_prediction`) and whether the real
    figure (the median over real runs) fell inside it: "prediction_band", "real_in_prediction_band";
    "in_prediction_band" counts them."""
    n = 0
    for key, row in cmp["metrics"].items():
        b = bands.get(key)
        row["prediction_band"] = list(b) if b else None
        inside = (bool(b[0] - ZERO_S <= row["real"] <= b[1] + ZERO_S) if b and math.isfinite(row["real"]) else None)
        row["real_in_prediction_band"] = inside
        n += bool(inside)
    cmp["in_prediction_band"] = n
    cmp["prediction_band_level"] = list(JITTER_BAND)
    return cmp


def compare(sim_summary: Mapping[str, Any], real_summaries: Sequence[Mapping[str, Any]],
            bands: Mapping[str, tuple[float, float]] | None = None) -> dict[str, Any]:
    """Side by side: every compared figure of the simulator's summary against the executor's runs
    (traces.report.summarize dicts). The reference is the median over real runs; with two or more runs
    their min..max is the machine's own noise, and a simulator figure inside it is marked `in_noise`.
    `bands` (`sampling_bands` of a real run): a simulator figure inside its metric's band is marked
    `in_sampling_band` (the measurement's own sampling error; None where there is no band).

    rel_error = (sim - real) / real, signed (positive: the simulator predicts more). None where
    undefined: a figure missing on either side, or a real latency of ~0 with a simulated one that is not.
    """
    if not real_summaries:
        raise ValueError("compare needs at least one real run")
    rows: dict[str, dict[str, Any]] = {}

    def row(key: str, label: str, sim: float, reals: list[float], floor: float) -> None:
        r = np.asarray(reals, dtype=np.float64)
        finite = r[np.isfinite(r)]
        ref = float(np.median(finite)) if len(finite) else math.nan
        lo = float(finite.min()) if len(finite) else math.nan
        hi = float(finite.max()) if len(finite) else math.nan
        rel = _rel(float(sim), ref, floor)
        noise = None
        if len(finite) >= 2 and math.isfinite(sim):
            noise = bool(lo - floor <= sim <= hi + floor)
        band = (bands or {}).get(key)
        rows[key] = {"label": label, "sim": float(sim), "real": ref, "real_runs": [float(x) for x in r],
                     "real_min": lo, "real_max": hi,
                     "real_spread_rel": (hi - lo) / ref if len(finite) >= 2 and abs(ref) >= floor else None,
                     "rel_error": rel, "abs_error": float(sim) - ref, "in_noise": noise,
                     "sampling_band": list(band) if band else None,
                     "in_sampling_band": (bool(band[0] - floor <= sim <= band[1] + floor)
                                          if band and math.isfinite(sim) else None)}

    for m, label in COMPARED:
        for q in COMPARED_QUANTILES:
            row(f"{m}.{q}", f"{label} {q}", sim_summary[m][q], [s[m][q] for s in real_summaries], ZERO_S)
    for k, label in COMPARED_RATES:
        row(k, label, sim_summary[k], [s[k] for s in real_summaries], 1e-12)
    errs = {k: abs(v["rel_error"]) for k, v in rows.items() if v["rel_error"] is not None}
    lat = {k: e for k, e in errs.items() if not k.startswith("queueing")}
    worst = max(errs, key=errs.get) if errs else None
    counts = {"sim": {s: sim_summary.get(s) for s in ("requests", "ok", "rejected", "timed_out", "failed")},
              "real": [{s: r.get(s) for s in ("requests", "ok", "rejected", "timed_out", "failed")}
                       for r in real_summaries]}
    return {
        "metrics": rows,
        "repeats": len(real_summaries),
        "median_abs_rel_error": float(np.median(list(lat.values()))) if lat else math.nan,
        "worst": {"metric": worst, "abs_rel_error": errs[worst]} if worst else None,
        "in_noise": sum(1 for v in rows.values() if v["in_noise"]),
        "in_sampling_band": sum(1 for v in rows.values() if v["in_sampling_band"]),
        "sampling_level": SAMPLING_LEVEL if bands else None,
        "counts": counts,
    }


def render_comparison(cmp: Mapping[str, Any], title: str = "twinfer validate: simulator vs executor"):
    """A rich table of `compare`'s output."""
    from rich.table import Table

    n = cmp["repeats"]
    t = Table(title=title, title_justify="left")
    t.add_column("metric")
    t.add_column("sim", justify="right")
    t.add_column("real" if n == 1 else f"real (median of {n})", justify="right")
    if n > 1:
        t.add_column("real min..max", justify="right")
    banded = any(r.get("sampling_band") for r in cmp["metrics"].values())
    if banded:
        t.add_column(f"real {cmp.get('sampling_level') or SAMPLING_LEVEL:.0%} resampling band", justify="right")
    t.add_column("error", justify="right")
    t.add_column("")
    for key, r in cmp["metrics"].items():
        rate = key in dict(COMPARED_RATES)
        fmt = (lambda v: "-" if not math.isfinite(v) else f"{v:,.2f}") if rate else \
              (lambda v: "-" if not math.isfinite(v) else f"{v * 1e3:,.1f} ms")
        err = "n/a" if r["rel_error"] is None else f"{r['rel_error']:+.1%}"
        cells = [r["label"], fmt(r["sim"]), fmt(r["real"])]
        if n > 1:
            cells.append(f"{fmt(r['real_min'])}..{fmt(r['real_max'])}")
        if banded:
            b = r.get("sampling_band")
            cells.append(f"{fmt(b[0])}..{fmt(b[1])}" if b else "")
        note = ", ".join(n for n, on in (("within noise", r["in_noise"]),
                                         ("inside sampling band", r.get("in_sampling_band"))) if on)
        t.add_row(*cells, err, note)
    return t


def steps_features(steps: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(feature matrix, durations, kinds) of an engine step log (executor.engine.Engine.step_table() columns,
    or executor.replay.read_steps of a run's steps.csv)."""
    missing = [k for k in ("decode_groups", "decode_padded_context") if k not in steps]
    if missing:
        raise ValueError(f"the step log has no {' / '.join(missing)} column(s): it was written before they were "
                         f"logged; rerun the replay with this twinfer to get them")
    d = np.asarray(steps["duration"], dtype=np.float64)
    dctx = np.asarray(steps["decode_context"], dtype=np.float64)
    pt = np.asarray(steps["prefill_tokens"], dtype=np.float64)
    ds = np.asarray(steps["decode_seqs"], dtype=np.float64)
    X = np.column_stack([np.ones(len(d)), pt, ds, np.asarray(steps["attention_pairs"], dtype=np.float64) - dctx,
                         dctx, np.asarray(steps["sampled"], dtype=np.float64), (pt + ds >= 2).astype(np.float64),
                         np.asarray(steps["decode_groups"], dtype=np.float64),
                         np.asarray(steps["decode_padded_context"], dtype=np.float64)])
    # decode_breaks: NaN in a log written before it was recorded (FittedCost.predict: an error only for a
    # model that prices it)
    brk = (np.asarray(steps["decode_breaks"], dtype=np.float64) if "decode_breaks" in steps
           else np.full(len(d), math.nan))
    X = np.column_stack([X, brk])
    kinds = ["decode" if p == 0 else "prefill" if q == 0 else "mixed" for p, q in zip(pt.tolist(), ds.tolist())]
    return X, d, kinds


def _step_times(cost: FittedCost, steps: Mapping[str, np.ndarray], contention: Any = None
                ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(real durations, the model's predictions, kinds) of an engine step log's steps (`step_check`)."""
    X, d, kinds = steps_features(steps)
    if not len(d):
        return d, d, kinds
    pred = cost.predict(X)
    if contention is not None:
        from sim.contention import step_predictions

        pred = step_predictions(contention, steps)
    return d, pred * loop_factors(contention if contention is not None else cost, steps), kinds


def step_ratios(cost: FittedCost, steps: Mapping[str, np.ndarray], contention: Any = None) -> dict[str, np.ndarray]:
    """Each step's real time over the model's (as `step_check` predicts it), by kind: "decode" (decode-only
    steps) and "with_prefill" (sim.jitter.KINDS): what sim.jitter.StepJitter.from_ratios reads."""
    d, pred, kinds = _step_times(cost, steps, contention)
    dec = np.array([k == "decode" for k in kinds], dtype=bool)
    r = d / pred if len(d) else d
    return {"decode": r[dec], "with_prefill": r[~dec]}


def step_check(cost: FittedCost, steps: Mapping[str, np.ndarray], contention: Any = None) -> dict[str, Any]:
    """The executor's own steps (an engine step log) against the cost model's prediction for each exact
    shape: separates step-time error (the model, or a machine busier than when profiled) from error in
    what the simulated schedule did. With `contention` (a sim.contention.ContentionCost), each step's
    prediction carries the slowdown of what the other replicas actually had in progress when it started.
    The cost model's serving-loop terms (`loop_factors`) apply as in the simulator."""
    d, pred, kinds = _step_times(cost, steps, contention)
    if not len(d):
        return {"steps": 0}
    ratio = d / pred
    dec = np.array([k == "decode" for k in kinds])
    out: dict[str, Any] = {"steps": int(len(d)), "busy_s": float(d.sum()), "predicted_busy_s": float(pred.sum()),
                           "busy_ratio": float(d.sum() / pred.sum()), "median_ratio": float(np.median(ratio)),
                           "p10_ratio": float(np.percentile(ratio, 10)), "p90_ratio": float(np.percentile(ratio, 90))}
    kind = np.asarray(kinds)
    # decode_only / with_prefill: TPOT rides on the first, TTFT on the second (a prefill's own step and the
    # steps it waits behind); a ratio near 1 over all steps can hide them moving apart.
    for name, m in (("decode_only", dec), ("with_prefill", ~dec), ("prefill_only", kind == "prefill"),
                    ("mixed", kind == "mixed")):
        out[name] = {"steps": int(m.sum()), "median_ratio": float(np.median(ratio[m])) if m.any() else math.nan,
                     "busy_ratio": float(d[m].sum() / pred[m].sum()) if m.any() else math.nan}
    out["quarter_busy_ratios"] = quarter_busy_ratios(np.asarray(steps["start"], dtype=float), d, pred)
    q = out["quarter_busy_ratios"]
    out["pace_swing"] = max(q) / min(q) if q else math.nan
    return out


def quarter_busy_ratios(start: np.ndarray, real: np.ndarray, pred: np.ndarray, parts: int = 4) -> list[float]:
    """The busy ratio (real / predicted busy time) of each `parts`-th of a step log's steps in order of their
    start, all replicas together: how the machine's pace moved during one run. One scale factor, however
    well read, cannot follow a run whose pace moved (step_check's "pace_swing", the largest over the smallest);
    [] for a log of fewer than 4 steps a part."""
    if len(real) < 4 * parts:
        return []
    order = np.argsort(start, kind="stable")
    return [float(real[i].sum() / pred[i].sum()) for i in np.array_split(order, parts)]


def scaled(cost: FittedCost, factor: float) -> FittedCost:
    """The same model with every step `factor` times as long (an attribution aid: what the simulator says
    when told the machine's actual speed; max(s p, s q) = s max(p, q), so decode runs scale exactly)."""
    if not factor > 0:
        raise ValueError(f"factor={factor} must be > 0")
    return FittedCost(cost.shared * factor, cost.kv_capacity_tokens, cost.line_a * factor, cost.line_b * factor,
                      name=f"{cost.name} x{factor:.3g}", step_overhead_s=cost.step_overhead_s * factor,
                      padded_knee=cost.padded_knee, wake=cost.wake, prefill_factor=cost.prefill_factor)


def _drift_factor(factor: Any, what: str = "drift factor") -> float:
    try:
        factor = float(factor)
    except (TypeError, ValueError):
        raise ValueError(f"{what}={factor!r} must be a finite number > 0") from None
    if not (math.isfinite(factor) and factor > 0):
        raise ValueError(f"{what}={factor!r} must be a finite number > 0")
    return factor


def drift_corrected(cost: Any, factor: float, busy_factor: float | None = None) -> Any:
    """`cost` with its forward time (the model's step time without the engine loop's gap) `factor` times as
    long: the drift check's correction for the machine's current speed (`measure_drift`). The loop's gap
    (`step_overhead_s`) stays as measured: the drift check times forward passes only. For a co-located model
    (sim.contention.ContentionCost: anything with `.base` and `with_base`) the alone fit underneath is
    scaled and the contention factors apply on top.

    busy_factor (co-located models only): the co-located drift check's factor (the reference shapes beside
    busy neighbours, now over the profile's medians beside the same; sim.calibrate_cli.colocated_drift). Every
    busy neighbour's contention factor is then multiplied by busy_factor / factor, so a step beside a busy
    neighbour is base x F x busy_factor, a step beside idle ones base x factor: a machine whose replicas
    slow each other more (or less) than when profiled, as a VM's shared cores can, is corrected where it
    shows, with both cores busy."""
    factor = _drift_factor(factor)
    if busy_factor is not None:
        busy_factor = _drift_factor(busy_factor, "co-located drift factor")
        if not (hasattr(cost, "with_base") and hasattr(cost, "with_busy_scale")):
            raise TypeError(f"a co-located drift factor needs a co-located cost model (sim.contention."
                            f"ContentionCost), got {type(cost).__name__}")
        return drift_corrected(cost, factor).with_busy_scale(busy_factor / factor)
    if hasattr(cost, "with_base") and hasattr(cost, "base"):
        return cost.with_base(drift_corrected(cost.base, factor))
    if not isinstance(cost, FittedCost):
        raise TypeError(f"drift_corrected needs a FittedCost or a model with .base and .with_base, got "
                        f"{type(cost).__name__}")
    return scaled(cost.with_overhead(0.0), factor).with_overhead(cost.step_overhead_s)


def kind_corrected(cost: Any, decode_factor: float, with_prefill_factor: float) -> Any:
    """`cost` with its decode-only steps' forward time `decode_factor` times as long and its steps with prefill
    tokens' `with_prefill_factor` times: the loop drift check read by kind (`loop_pace`'s "decode" and
    "with_prefill" ratios). Decode steps (memory-bound: the weights and the KV cache streamed every few
    milliseconds) and prefill steps (compute-bound) do not slow down alike when the machine's speed moves; on
    this project's CPU the checks' decode ratio ran up to 5 % above their prefill ratio on one day and level
    with it on another. It is `drift_corrected(cost, decode_factor)` with the serving-loop prefill factor
    (FittedCost.prefill_factor, which multiplies every step with prefill tokens) times
    with_prefill_factor / decode_factor; equal factors give `drift_corrected` exactly. Reported beside the
    single factor's prediction, not instead of it: rescored over nine full fidelity runs it was better in
    three and worse on average (experiments/FIDELITY.md, run S)."""
    d = _drift_factor(decode_factor, "decode factor")
    p = _drift_factor(with_prefill_factor, "with-prefill factor")
    out = drift_corrected(cost, d)
    if p == d:
        return out
    composite = hasattr(out, "with_base") and hasattr(out, "base")  # a co-located model over the alone fit
    base = out.base if composite else out
    if not isinstance(base, FittedCost):
        raise TypeError(f"kind_corrected needs a FittedCost underneath, got {type(base).__name__}")
    base = base.with_prefill_factor(base.prefill_factor * p / d)
    return out.with_base(base) if composite else base


def neighbour_share(workload: Any, cfg: Any, profile: Profile, iters: int = 6,
                    tol: float = 0.01) -> tuple[float, FittedCost]:
    """For replicas that slow each other down (a profile with a busy-neighbour measurement), the share u of
    its own busy time during which a replica's neighbours are busy too, found self-consistently: simulate
    with cost_at(u), read every replica's utilisation, set u to the busy-time-weighted mean utilisation of
    the other replicas, repeat until it settles. Uses average utilisation, not the overlap of busy periods
    (a first-order estimate). Returns (u, cost model); (0, alone model) for one replica, (1, ...) when
    unsure."""
    from sim.cluster import simulate

    if profile.busy is None:
        return 0.0, profile.cost
    if cfg.replicas < 2:
        return 0.0, profile.cost
    u = 1.0
    for _ in range(iters):
        r = simulate(workload, cfg, cost=profile.cost_at(u))
        dur = max(r.end - r.start, 1e-12)
        util = np.array([min(s.busy_time / dur, 1.0) for s in r.replicas])
        busy = np.array([s.busy_time for s in r.replicas])
        others = (util.sum() - util) / (len(util) - 1)
        new = float(np.average(others, weights=busy)) if busy.sum() > 0 else 0.0
        if abs(new - u) < tol:
            u = new
            break
        u = 0.5 * (u + new)  # damped: utilisation falls as steps get cheaper, so plain iteration can oscillate
    return u, profile.cost_at(u)


# ---- the engine loop's own time ------------------------------------------------------------------

BACK_TO_BACK_S = 0.05  # a longer pause between two steps of a replica means it had nothing to do


def loop_gaps(steps: Mapping[str, np.ndarray]) -> np.ndarray:
    """Seconds between one step's end and the next one's start on the same replica, for steps that ran
    back to back (gaps under BACK_TO_BACK_S; longer ones are idle time)."""
    start = np.asarray(steps["start"], dtype=np.float64)
    dur = np.asarray(steps["duration"], dtype=np.float64)
    rep = np.asarray(steps.get("replica", np.zeros(len(start), dtype=np.int64)))
    out = []
    for k in np.unique(rep):
        idx = np.flatnonzero(rep == k)
        idx = idx[np.argsort(start[idx], kind="stable")]
        g = start[idx[1:]] - (start[idx[:-1]] + dur[idx[:-1]])
        out.append(g[(g >= 0) & (g < BACK_TO_BACK_S)])
    return np.concatenate(out) if out else np.zeros(0)


def gap_stats(gaps: np.ndarray) -> dict[str, Any]:
    if not len(gaps):
        return {"gaps": 0, "mean_s": 0.0, "median_s": 0.0, "p90_s": 0.0}
    return {"gaps": int(len(gaps)), "mean_s": float(gaps.mean()), "median_s": float(np.median(gaps)),
            "p90_s": float(np.percentile(gaps, 90))}


def measure_loop_overhead(model_config: str, replicas: int, num_blocks: int, block_size: int = 16,
                          device: str = "cpu", seed: int = 0) -> dict[str, Any]:
    """Replay a small burst (every request at t=0, so each replica steps back to back) on the executor's
    real-time replay (executor.replay.run_workload) and measure the time its engine loop spends between
    steps: applying a step to the scheduler, reporting it to the router's process, taking new requests.
    The mean gap (it is time the replica cannot compute) becomes the cost model's step_overhead_s."""
    import tempfile

    from executor.replay import read_steps, run_workload
    from policies.scheduler import SchedulerConfig
    from sim.config import SimConfig
    from traces.workload import Request, Workload

    n = 6 * replicas
    reqs = [Request(i, 0.0, (48, 96, 160, 320)[i % 4], 24 + 8 * (i % 4)) for i in range(n)]
    w = Workload.from_requests(reqs, name="loop-overhead-burst")
    cfg = SimConfig(replicas=replicas, router="round_robin", num_blocks=num_blocks, seed=seed,
                    scheduler=SchedulerConfig(block_size=block_size, prefix_caching=False, max_num_batched_tokens=512))
    with tempfile.TemporaryDirectory(prefix="twinfer-loop-") as tmp:
        res = run_workload(w, cfg, model_config=model_config, device=device, out=tmp)
        steps = read_steps(Path(tmp) / "steps.csv")
    out = gap_stats(loop_gaps(steps))
    out.update(replicas=replicas, requests=n, steps=int(len(steps["start"])),
               threads_per_replica=res.meta.get("threads_per_replica"), workers=res.meta.get("workers"))
    return out


# ---- waking from idle: the first step after a pause ---------------------------------------------

WAKE_AFTER_S = 0.2  # a replica idle this long or longer before a step has "woken" (sim.cluster.Replica)
# A loop check that resamples a workload's gaps (mix_replay) cuts each to this: a replica idle that long has long
# since "woken" (WAKE_AFTER_S), so a longer pause would only make the check slower, not read the pace otherwise.
CHECK_MAX_GAP_S = 5.0


WAKE_CHUNKS = 4  # prefill steps per request of the wake replay: the first runs right after the pause
WAKE_SETTLE = 2  # steps of a burst after which a woken replica runs at its usual pace (steps 3, 4, ... of it)


WAKE_BUSY_OUTPUT = 1000  # output tokens of the busy neighbours' requests in `wake_replay(busy_neighbour=True)`


def wake_replay(model_config: Any, replicas: int, num_blocks: int, block_size: int = 16, device: str = "cpu",
                seed: int = 0, per_replica: int = 12, spacing_s: float = 0.7,
                busy_neighbour: bool = False) -> dict[str, np.ndarray]:
    """Replay requests spaced `spacing_s` apart (round robin, so each replica idles about replicas x
    spacing_s minus its work between two of them) on the executor's real-time replay, and return its step
    log. Every request is a prompt of up to 1024 tokens prefilled in WAKE_CHUNKS equal chunks: the first
    runs right after the pause and the others back to back after it, so `wake_from_steps` can set the
    first against the burst's settled steps within the same half second, whatever the machine's speed that
    minute. Two warm-up requests per replica come first (a replica's first steps also set things up).

    busy_neighbour (replicas >= 2): the last replica alone gets those requests, `per_replica` + 2 of them
    1 s apart, while the others decode throughout (a short prompt and WAKE_BUSY_OUTPUT tokens each, one
    per replica every round, so each keeps a small decode batch running): every wake happens beside
    busy neighbours, and so do the burst's settled steps it is set against."""
    import tempfile

    from executor.replay import read_steps, resolve_model, run_workload
    from policies.scheduler import SchedulerConfig
    from sim.config import SimConfig
    from traces.workload import Request, Workload

    max_pos = resolve_model(model_config).cfg.max_position
    chunk = max(1, min(1024, max_pos - 8) // WAKE_CHUNKS)
    if busy_neighbour:
        if replicas < 2:
            raise ValueError(f"wake replay beside a busy neighbour: replicas={replicas} is out of range; "
                             "allowed: >= 2")
        out = min(WAKE_BUSY_OUTPUT, max_pos - 24)
        reqs = []
        for k in range(per_replica + 2):  # round robin: request i goes to replica i % replicas
            t = k * max(spacing_s, 1.0)
            reqs += [Request(len(reqs), t + 1e-3 * j, 16, out) for j in range(replicas - 1)]
            reqs.append(Request(len(reqs), t + 0.05, chunk * WAKE_CHUNKS, 4))
        w = Workload.from_requests(reqs, name="wake-spaced-busy-neighbour")
    else:
        n = (per_replica + 2) * replicas
        reqs = [Request(i, i * spacing_s, chunk * WAKE_CHUNKS, 4) for i in range(n)]
        w = Workload.from_requests(reqs, name="wake-spaced")
    cfg = SimConfig(replicas=replicas, router="round_robin", num_blocks=num_blocks, seed=seed,
                    scheduler=SchedulerConfig(block_size=block_size, prefix_caching=False,
                                              max_num_batched_tokens=chunk))
    with tempfile.TemporaryDirectory(prefix="twinfer-wake-") as tmp:
        run_workload(w, cfg, model_config=model_config, device=device, out=tmp)
        return read_steps(Path(tmp) / "steps.csv")


def _log_and_predictions(steps: Mapping[str, np.ndarray], predicted: np.ndarray) -> tuple[np.ndarray, ...]:
    """An engine step log's start, duration, prefill tokens and replica columns, and `predicted` (one per step)."""
    start = np.asarray(steps["start"], dtype=np.float64)
    dur = np.asarray(steps["duration"], dtype=np.float64)
    pred = np.asarray(predicted, dtype=np.float64)
    if pred.shape != dur.shape:
        raise ValueError(f"{len(pred)} predictions for {len(dur)} steps")
    return (start, dur, np.asarray(steps["prefill_tokens"], dtype=np.int64),
            np.asarray(steps.get("replica", np.zeros(len(start), dtype=np.int64))), pred)


def wake_from_steps(steps: Mapping[str, np.ndarray], predicted: np.ndarray, after_s: float = WAKE_AFTER_S,
                    skip: int = 2, settle: int = WAKE_SETTLE) -> dict[str, Any]:
    """What waking costs, from an engine step log and the cost model's prediction for each of its steps
    (`predicted`, seconds, forward time only). A burst starts with a step with prefill tokens after its
    replica was idle for `after_s` or longer (each replica's first `skip` bursts left out: set-up) and goes
    on while the steps run back to back. Its figure is (real / predicted of the first step) over the median
    (real / predicted) of the burst's steps with prefill tokens from step settle + 1 on: the machine's speed
    that moment cancels, and the steps right after the first, which still run slow (measured in the
    fidelity cells: the first step after a pause x1.07-1.10 of the burst's settled steps, the second
    x1.03-1.04), are not the reference. `factor` is the median over bursts (None with fewer than 5)."""
    if settle < 1:
        raise ValueError(f"settle={settle} is out of range; allowed: >= 1")
    start, dur, pt, rep, pred = _log_and_predictions(steps, predicted)
    ratios, idle = [], []
    for k in np.unique(rep).tolist():
        idx = np.flatnonzero(rep == k)
        idx = idx[np.argsort(start[idx], kind="stable")].tolist()
        ends = [start[i] + dur[i] for i in idx]
        seen = 0
        for pos, a in enumerate(idx):
            gap = start[a] - ends[pos - 1] if pos else math.inf
            if gap < after_s or pt[a] == 0:
                continue
            seen += 1
            if seen <= skip:
                continue
            ref = []
            for q in range(pos + 1, len(idx)):  # the burst: steps back to back after the first
                if start[idx[q]] - ends[q - 1] >= BACK_TO_BACK_S:
                    break
                b = idx[q]
                if q - pos >= settle and pt[b] > 0:
                    ref.append(dur[b] / pred[b])
            if not ref:
                continue
            ratios.append((dur[a] / pred[a]) / float(np.median(ref)))
            idle.append(gap if math.isfinite(gap) else math.nan)
    r = np.asarray(ratios)
    out: dict[str, Any] = {"after_s": after_s, "settle": settle, "pairs": int(len(r)), "factor": None}
    if len(r):
        out.update(p25=float(np.percentile(r, 25)), p75=float(np.percentile(r, 75)),
                   median=float(np.median(r)), idle_s_median=float(np.nanmedian(idle)) if np.isfinite(idle).any()
                   else None)
    if len(r) >= 5:
        out["factor"] = float(np.median(r))
    return out


# ---- the serving loop's prefill steps against its decode steps ------------------------------------

def loop_factors(cost: Any, steps: Mapping[str, np.ndarray]) -> np.ndarray:
    """The serving-loop terms' multiplier on each step of an engine step log (FittedCost doc: prefill_factor on
    steps with prefill tokens, the wake factor on a replica's first step after wake[0] s idle or more, counting
    from the run's start), as the simulator applies them."""
    pt = np.asarray(steps["prefill_tokens"], dtype=np.int64)
    out = np.where(pt > 0, float(getattr(cost, "prefill_factor", 1.0)), 1.0)
    wake = getattr(cost, "wake", None)
    if wake is not None and len(pt):
        woken = idle_before(steps) >= wake[0]
        if len(wake) > 2:
            busy = neighbour_busy(steps)
            out[woken & busy] *= wake[2]
            out[woken & ~busy] *= wake[1]
        else:
            out[woken] *= wake[1]
    return out


def neighbour_busy(steps: Mapping[str, np.ndarray]) -> np.ndarray:
    """Whether another replica of the log was busy when each step started: inside a run of its steps, each
    starting within BACK_TO_BACK_S of the last one's end (the pause between two steps is its serving loop's,
    as the simulator counts a step's overhead in the step). The log's replicas share a machine, as the
    simulator's co-located replicas do."""
    start = np.asarray(steps["start"], dtype=np.float64)
    end = start + np.asarray(steps["duration"], dtype=np.float64)
    rep = np.asarray(steps.get("replica", np.zeros(len(start), dtype=np.int64)))
    out = np.zeros(len(start), dtype=bool)
    for k in np.unique(rep).tolist():  # replica k's runs of steps, against every other replica's step starts
        idx = np.flatnonzero(rep == k)
        idx = idx[np.argsort(start[idx], kind="stable")]
        s0, e0 = start[idx], np.maximum.accumulate(end[idx])
        new_run = np.r_[True, s0[1:] - e0[:-1] >= BACK_TO_BACK_S]
        last = np.r_[np.flatnonzero(new_run)[1:] - 1, len(idx) - 1]
        run_start, run_end = s0[new_run], e0[last]
        j = np.searchsorted(run_start, start, side="right") - 1  # the last run of k begun by each step's start
        out |= (rep != k) & (j >= 0) & (run_end[np.maximum(j, 0)] > start)
    return out


def idle_before(steps: Mapping[str, np.ndarray]) -> np.ndarray:
    """Seconds each step's replica had been idle before it started (since the run's start for its first)."""
    start = np.asarray(steps["start"], dtype=np.float64)
    dur = np.asarray(steps["duration"], dtype=np.float64)
    rep = np.asarray(steps.get("replica", np.zeros(len(start), dtype=np.int64)))
    gap = np.empty(len(start))
    for k in np.unique(rep).tolist():
        idx = np.flatnonzero(rep == k)
        idx = idx[np.argsort(start[idx], kind="stable")]
        ends = np.concatenate([[0.0], start[idx[:-1]] + dur[idx[:-1]]])
        gap[idx] = start[idx] - ends
    return gap


class _LogUniformLengths:
    """Prompt and output lengths log-uniform over fixed ranges: a calibration mix that borrows nothing from
    the traces a fidelity run validates on."""

    source = "log-uniform prompts 64-2048, outputs 16-128"

    def sample(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        inp = np.exp(rng.uniform(np.log(64), np.log(2048), n)).astype(np.int64)
        out = np.exp(rng.uniform(np.log(16), np.log(128), n)).astype(np.int64)
        return inp, out


def mix_replay(model_config: Any, replicas: int, num_blocks: int, cost: Any, block_size: int = 16,
               device: str = "cpu", seed: int = 0, requests: int = 80, lengths: Any = None,
               cfg: Any = None, rate: float | None = None, gaps: np.ndarray | None = None,
               max_gap_s: float = CHECK_MAX_GAP_S) -> dict[str, np.ndarray]:
    """Replay a calibration mix (Poisson arrivals, `_LogUniformLengths` or the sampler `lengths` (anything with
    `sample(n, rng) -> (inputs, outputs)`, e.g. traces.synth.fit_lengths of a workload), chunked prefill with a
    512-token budget, round robin) on the executor's real-time replay, at a rate `cost` says loads the replicas
    moderately, and return its step log: prefill, mixed and decode steps interleaved within the same seconds.
    `cfg` (a SimConfig): its scheduler, router, replicas and KV blocks instead (`replicas`, `num_blocks` and
    `block_size` are then ignored); `rate` (requests/s): that Poisson rate instead; `gaps` (s, a workload's
    inter-arrival gaps): arrivals whose gaps are drawn from those instead (traces.synth.resampled_arrivals, each
    cut to `max_gap_s`), so the replay has the workload's bursts and pauses, not only its mean rate."""
    import dataclasses
    import tempfile

    from executor.replay import read_steps, run_workload
    from policies.scheduler import SchedulerConfig
    from sim.config import SimConfig
    from traces.synth import resampled_arrivals, synthesize
    from traces.workload import Workload

    if rate is not None and not (math.isfinite(rate) and rate > 0):
        raise ValueError(f"calibration replay: rate={rate!r} is out of range; allowed: a finite rate > 0 requests/s")
    if rate is not None and gaps is not None:
        raise ValueError("calibration replay: give a Poisson rate or gaps to resample, not both")
    lengths = lengths if lengths is not None else _LogUniformLengths()
    probe = lengths.sample(2000, np.random.default_rng(seed + 7))
    p_in, p_out = float(np.mean(probe[0])), float(np.mean(probe[1]))
    per_req = (cost.step_time(StepFeatures(int(p_in), 0, p_in * (p_in + 1) / 2, 0, 1))
               + p_out * cost.step_time(StepFeatures(0, 4, 0.0, int(4 * (p_in + p_out / 2)), 4)) / 4)
    if cfg is not None:
        replicas = cfg.replicas
        cfg = dataclasses.replace(cfg, seed=seed)
    else:
        cfg = SimConfig(replicas=replicas, router="round_robin", num_blocks=num_blocks, seed=seed,
                        scheduler=SchedulerConfig(block_size=block_size, prefix_caching=False,
                                                  max_num_batched_tokens=512))
    if gaps is not None:
        rng = np.random.default_rng(seed)  # arrivals first, then lengths, as synthesize draws them
        arrival = resampled_arrivals(requests, gaps, rng, max_gap_s)
        inp, out = lengths.sample(requests, rng)
        w = Workload(arrival=arrival, input_tokens=np.asarray(inp, dtype=np.int64),
                     output_tokens=np.asarray(out, dtype=np.int64), name="loop-mix",
                     meta={"format": "synthetic", "arrivals": {"process": "resampled gaps", "max_gap_s": max_gap_s,
                                                               "seed": seed}})
    else:
        rate = rate if rate is not None else 0.6 * replicas / per_req
        w = synthesize(requests, rate, lengths=lengths, seed=seed, name="loop-mix")
    with tempfile.TemporaryDirectory(prefix="twinfer-mix-") as tmp:
        run_workload(w, cfg, model_config=model_config, device=device, out=tmp,
                     max_duration=float(w.arrival[-1]) + 60 * per_req + 60.0)
        return read_steps(Path(tmp) / "steps.csv")


def prefill_factor_from_steps(steps: Mapping[str, np.ndarray], predicted: np.ndarray, skip: int = 3,
                              after_s: float = WAKE_AFTER_S, parts: int = 4) -> dict[str, Any]:
    """How much longer, relative to the fit, the serving loop's steps with prefill tokens run than its
    decode-only steps: (real / predicted busy time of the prefill steps) / (the same of the decode steps), on
    an engine step log and the fit's prediction for each of its steps (forward time). Steps after `after_s`
    or more of idle (the wake term's) and each replica's first `skip` steps are left out. Both kinds run in
    the same seconds, so the machine's speed cancels; `parts` equal stretches of the log give its spread.
    `factor` is None with fewer than 10 steps of either kind."""
    start, d, pt, rep, pred = _log_and_predictions(steps, predicted)
    keep = idle_before(steps) < after_s
    for k in np.unique(rep).tolist():
        idx = np.flatnonzero(rep == k)
        keep[idx[np.argsort(start[idx], kind="stable")][:skip]] = False
    pre, dec = keep & (pt > 0), keep & (pt == 0)

    def ratio(m: np.ndarray) -> float:
        a, b = pre & m, dec & m
        if not a.any() or not b.any():
            return math.nan
        return float((d[a].sum() / pred[a].sum()) / (d[b].sum() / pred[b].sum()))

    out: dict[str, Any] = {"prefill_steps": int(pre.sum()), "decode_steps": int(dec.sum()), "factor": None,
                           "measured": ratio(np.ones(len(d), bool))}
    if len(d):
        edges = np.quantile(start, np.linspace(0, 1, parts + 1))
        part = [ratio((start >= lo) & (start <= hi)) for lo, hi in zip(edges[:-1], edges[1:])]
        out["parts"] = [p for p in part if math.isfinite(p)]
    if pre.sum() >= 10 and dec.sum() >= 10:
        out["factor"] = out["measured"]
    return out


# ---- the serving loop's drift check: the machine's pace now, measured where the replicas run ----------

LOOP_CHECK_REQUESTS = 24  # 10-15 s of replay on a 2-core CPU with the default model and two replicas
LOOP_CHECK_SEED = 1009  # the same calibration mix every time, so two checks differ only by the machine


def loop_pace(model_config: Any, replicas: int, num_blocks: int, forward: Any, block_size: int = 16,
              device: str = "cpu", contention: bool = False, requests: int = LOOP_CHECK_REQUESTS,
              seed: int = LOOP_CHECK_SEED, lengths: Any = None, cfg: Any = None,
              rate: float | None = None, gaps: np.ndarray | None = None) -> dict[str, Any]:
    """The serving loop's drift check: replay a short calibration mix (`mix_replay`: nothing from the traces
    being validated) on `replicas` replicas of the executor and read how long its steps took against
    `forward`'s prediction for each (the fit's forward time with its serving-loop terms; with `contention`,
    each step slowed by what the other replicas had in progress, as `step_check` does). `factor` is that
    busy-time ratio: the pace of the machine as the replicas see it (their processes, their shared cores,
    their serving loop) at the time of the check, where the reference-shape check (`measure_drift`) times
    forward passes alone in one process. `lengths`: the mix's prompt and output lengths (`mix_replay`; None:
    the log-uniform calibration mix); "mix" in the result names them. `cfg` and `rate`: the replay's
    configuration (scheduler, router, replicas) and arrival rate instead of the calibration defaults
    (`mix_replay`): the "cell" mix of `twinfer validate`, the validated run's own; `gaps` (instead of `rate`):
    arrivals that resample a workload's own inter-arrival gaps ("arrivals" in the result says which).
    "jitter": the spread of its steps' real / model ratios by kind (sim.jitter.StepJitter.to_dict), for the
    simulator's step jitter."""
    if requests < 4:
        raise ValueError(f"loop drift check: requests={requests} is out of range; allowed: >= 4")
    t0 = time.perf_counter()
    steps = mix_replay(model_config, replicas, num_blocks, forward, block_size, device, seed, requests,
                       **({"lengths": lengths} if lengths is not None else {}), cfg=cfg, rate=rate,
                       **({"gaps": gaps} if gaps is not None else {}))
    chk = step_check(forward, steps, contention=forward if contention else None)
    if not chk.get("steps"):
        raise RuntimeError(f"loop drift check: the calibration replay ({requests} requests) logged no step")
    from sim.jitter import StepJitter

    jit = StepJitter.from_ratios(step_ratios(forward, steps, contention=forward if contention else None),
                                 source="loop drift check")
    return {"factor": chk["busy_ratio"], "jitter": jit.to_dict(), "median_ratio": chk["median_ratio"],
            "steps": chk["steps"],
            "decode": chk["decode_only"]["busy_ratio"], "with_prefill": chk["with_prefill"]["busy_ratio"],
            "decode_steps": chk["decode_only"]["steps"], "with_prefill_steps": chk["with_prefill"]["steps"],
            "requests": requests, "seed": seed, "seconds": time.perf_counter() - t0,
            "mix": getattr(lengths, "source", type(lengths).__name__) if lengths is not None else "calibration",
            **({"rate": rate} if rate is not None else {}),
            "arrivals": (f"resampled gaps (each at most {CHECK_MAX_GAP_S:g} s)" if gaps is not None else "poisson"),
            **({"chunked_prefill": cfg.scheduler.chunked_prefill,
                "max_num_batched_tokens": cfg.scheduler.max_num_batched_tokens, "router": cfg.router}
               if cfg is not None else {})}


def loop_kind_factors(before: Mapping[str, Any], after: Mapping[str, Any]) -> tuple[float, float] | None:
    """The loop drift check by kind, from its two checks (`loop_pace` results, or their records): the geometric
    means of their decode-only and with-prefill ratios, for `kind_corrected`. None when either check lacks a
    finite, positive ratio of either kind (a check recorded before they were kept, or a calibration replay with
    no step of one kind): the single factor then stands."""
    out = []
    for key in ("decode", "with_prefill"):
        v = [b.get(key) if isinstance(b, Mapping) else None for b in (before, after)]
        if not all(isinstance(x, (int, float)) and math.isfinite(x) and x > 0 for x in v):
            return None
        out.append(math.sqrt(v[0] * v[1]))
    return out[0], out[1]
