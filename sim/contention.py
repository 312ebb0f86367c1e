"""Co-located replicas: a step's duration depends on what the replicas sharing its machine run meanwhile.

Replicas that share a machine (the executor's CPU replicas share its cores, caches and memory
bandwidth) slow each other down by an amount that depends on what the neighbour runs: a stream of
small decode steps (the weights streamed from memory every few milliseconds), a decode batch, a
prefill (compute-bound), or nothing. The static alternative (`sim.calibrate.neighbour_share`: one
"neighbours busy" fit blended by an average busy share) cannot tell these apart. Here the cost is
decided step by step:

    step_time_i(f) = T(f) * (1 + sum over co-located j of (F[class(current_j)][kind(f)] - 1))

T is the profile's fit measured alone (sim.calibrate.FittedCost), kind(f) the step's kind (decode,
prefill, mixed) and class(current_j) the kind of step neighbour j has in progress when this step
starts (`NEIGHBOUR_CLASSES`: "idle" (F = 1), few-sequence decodes, decode batches, prefill or mixed
steps), read through the cluster's hook (sim.cluster: `Replica.current`; `for_replica(i, replicas)`
binds a view per replica). With one neighbour, the factor is exactly F[class][kind].

F[c][k] is the median, over the grid shapes of kind k, of the shape's time beside a neighbour running
class c's shapes over its time alone. A ratio per kind rather than a fitted model per condition: the
measured effect is a few percent, below the fits' own error, and the difference of two separately
fitted models (one chose the max of two lines, another a single line) came out up to a quarter apart
for the same decode batch, which is fit error, not contention.

The conditions are measured interleaved (`measure_interleaved`): round after round, the neighbour is
switched to each condition in a fresh random order and every grid shape is timed once under it, so
a burst of other work on the machine, or a drift in its speed, spreads over all conditions instead
of spoiling one. (Measured in blocks, one condition after the other, a neighbour's one-sequence
decodes once came out as +48 % on decode steps; interleaved, on the same machine the same hour, +2 to
+3 %. On this project's 2-core VM, with the session's priority raised, the factors are 1.02 to 1.06.)

Continuous in time (`continuous=True`, the default): a step is T(f) seconds of work at the alone pace,
done at rate 1 / factor, and the factor changes whenever a co-located neighbour starts a step or goes
idle (the simulator re-times the steps in progress then: sim.cluster, `Replica._retime`). So a prefill
of half a second that starts beside an idle neighbour, which then starts decoding, is slowed for the
part it overlaps. Sampled once at the start instead (`continuous=False`, the first version), such a
prefill kept the idle factor 1 throughout: in five recorded fidelity runs, 30-37 % of the prefill and
mixed steps that started beside an idle neighbour overlapped its work for 10 % of their time or more,
and prefill and mixed steps whose neighbour was busy for 10-90 % of their time ran 1.05-1.11 x the
alone prediction, against 1.02-1.05 x for the ones that overlapped nothing. Decode-run jumps are off
(`jump_ok = False`): each step must look at its neighbours; fine at fidelity sizes.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from sim.cost import DecodeRun, StepFeatures

VICTIM_KINDS = ("decode", "prefill", "mixed")
NEIGHBOUR_CLASSES = ("idle", "decode_small", "decode", "prefill")
SMALL_DECODE = 2  # a decode step of at most this many sequences is "decode_small": weight-streaming, many per second


def victim_kind(f: StepFeatures) -> str:
    if f.prefill_tokens == 0:
        return "decode"
    return "prefill" if f.decode_seqs == 0 else "mixed"


def neighbour_class(f: StepFeatures | None) -> str:
    if f is None:
        return "idle"
    if f.prefill_tokens > 0:
        return "prefill"
    return "decode_small" if f.decode_seqs <= SMALL_DECODE else "decode"


def _table(factor: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for c, row in factor.items():
        if c not in NEIGHBOUR_CLASSES:
            raise ValueError(f"unknown neighbour class {c!r}; valid: {', '.join(NEIGHBOUR_CLASSES)}")
        for k, v in row.items():
            if k not in VICTIM_KINDS:
                raise ValueError(f"unknown step kind {k!r}; valid: {', '.join(VICTIM_KINDS)}")
            if not (math.isfinite(float(v)) and float(v) > 0):
                raise ValueError(f"factor[{c}][{k}]={v} is out of range; allowed: finite, > 0")
        out[c] = {k: float(row.get(k, 1.0)) for k in VICTIM_KINDS}
    for c in NEIGHBOUR_CLASSES:
        out.setdefault(c, {k: 1.0 for k in VICTIM_KINDS})
    return out


class ContentionCost:
    """A cost model for replicas sharing one machine: `base` (any cost model with step_time, decode_run,
    kv_capacity_tokens; the profile's alone fit) times the factor of what each co-located replica has in
    progress (module doc): `factor[neighbour_class][kind]`, 1 for anything the table leaves out.

    Unbound (not through `for_replica`), it is `base`: no neighbour is known. `group` replicas share a
    machine (replicas i // group); None: all of them."""

    jump_ok = False

    def __init__(self, base: Any, factor: Mapping[str, Mapping[str, float]], group: int | None = None,
                 name: str | None = None, continuous: bool = True):
        if group is not None and group < 1:
            raise ValueError(f"group={group} is out of range; allowed: >= 1 or None")
        self.continuous = bool(continuous)
        self.base = base
        self.table = _table(factor)
        self.group = group
        self.name = name or f"{getattr(base, 'name', 'cost')} (co-located)"
        self.kv_capacity_tokens = base.kv_capacity_tokens
        self.step_overhead_s = getattr(base, "step_overhead_s", 0.0)
        self.wake = getattr(base, "wake", None)
        self.prefill_factor = getattr(base, "prefill_factor", 1.0)
        self.profile = getattr(base, "profile", None)
        self.uses_grouping = bool(getattr(base, "uses_grouping", False))

    # an unbound model: no neighbour known
    def step_time(self, f: StepFeatures) -> float:
        return self.base.step_time(f)

    def decode_run(self, f: StepFeatures) -> DecodeRun:
        return self.base.decode_run(f)

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.base.predict(X)

    def factor(self, f: StepFeatures, neighbours: Sequence[StepFeatures | None]) -> float:
        """The factor on the base time of a step `f` while the neighbours run `neighbours` (None: idle)."""
        k = victim_kind(f)
        t = self.table
        return 1.0 + sum(t[neighbour_class(g)][k] - 1.0 for g in neighbours)

    def for_replica(self, i: int, replicas: Sequence[Any]) -> "ReplicaContention":
        return ReplicaContention(self, i, replicas)

    def with_base(self, base: Any) -> "ContentionCost":
        return ContentionCost(base, self.table, self.group, self.name, self.continuous)

    def with_continuous(self, continuous: bool) -> "ContentionCost":
        """The same model, its factors re-read whenever a neighbour changes (True) or once per step (False)."""
        return ContentionCost(self.base, self.table, self.group, self.name, continuous)

    def with_busy_scale(self, s: float) -> "ContentionCost":
        """Every busy neighbour class's factors times `s` (idle stays 1): the co-located drift correction
        (sim.calibrate.drift_corrected)."""
        if not (math.isfinite(float(s)) and float(s) > 0):
            raise ValueError(f"busy scale={s!r} is out of range; allowed: finite, > 0")
        table = {c: {k: (v if c == "idle" else v * float(s)) for k, v in row.items()} for c, row in self.table.items()}
        return ContentionCost(self.base, table, self.group, self.name, self.continuous)

    def with_overhead(self, step_overhead_s: float) -> "ContentionCost":
        return self.with_base(self.base.with_overhead(step_overhead_s))

    def __repr__(self) -> str:
        return f"ContentionCost(name={self.name!r}, group={self.group}, continuous={self.continuous})"


class ReplicaContention:
    """Replica i's view of a ContentionCost: its co-located neighbours' `current` steps set its step times.
    `replicas` is the cluster's list (it may still be filling while the cluster is built)."""

    jump_ok = False

    def __init__(self, model: ContentionCost, i: int, replicas: Sequence[Any]):
        self.model, self.i, self.replicas = model, i, replicas
        self.base = model.base
        self.name = model.name
        self.kv_capacity_tokens = model.kv_capacity_tokens
        self.step_overhead_s = model.step_overhead_s
        self.wake = model.wake
        self.prefill_factor = model.prefill_factor
        self.uses_grouping = model.uses_grouping
        self.continuous = model.continuous  # the simulator re-times this replica's step when a neighbour changes

    def colocated(self) -> list[Any]:
        """The other replicas on this one's machine (the cluster's Replica objects)."""
        g, i = self.model.group, self.i
        return [r for j, r in enumerate(self.replicas) if j != i and (g is None or j // g == i // g)]

    def neighbours(self) -> list[StepFeatures | None]:
        return [r.current for r in self.colocated()]

    def alone_time(self, f: StepFeatures) -> float:
        """The step's work: its time with every neighbour idle."""
        return self.base.step_time(f)

    def factor_now(self, f: StepFeatures) -> float:
        """The slowdown of step `f` with the neighbours' steps in progress now."""
        return self.model.factor(f, self.neighbours())

    def step_time(self, f: StepFeatures) -> float:
        return self.alone_time(f) * self.factor_now(f)

    def decode_run(self, f: StepFeatures) -> DecodeRun:
        # Only reached with jumps on (jump_ok is False): the neighbours as they are now, for the whole run.
        r = self.base.decode_run(f)
        m = self.model.factor(f, self.neighbours())
        return DecodeRun(r.a1 * m, r.b1 * m, r.a2 * m, r.b2 * m, r.c * m)


# ---- the step log of a real run: what the model says for each real step ---------------------------

def neighbour_steps_at(steps: Mapping[str, np.ndarray], group: int | None = None) -> list[list[StepFeatures | None]]:
    """For every step of an engine step log (executor.replay.read_steps columns), what each other co-located
    replica had in progress when it started (a shape, or None: idle)."""
    start = np.asarray(steps["start"], dtype=np.float64)
    dur = np.asarray(steps["duration"], dtype=np.float64)
    rep = np.asarray(steps.get("replica", np.zeros(len(start), dtype=np.int64)))
    pt = np.asarray(steps["prefill_tokens"], dtype=np.int64)
    ds = np.asarray(steps["decode_seqs"], dtype=np.int64)
    shapes = [StepFeatures(int(p), int(d), 0.0, 0, 0) for p, d in zip(pt.tolist(), ds.tolist())]
    by_rep: dict[int, np.ndarray] = {}
    for k in np.unique(rep).tolist():
        idx = np.flatnonzero(rep == k)
        by_rep[int(k)] = idx[np.argsort(start[idx], kind="stable")]
    out: list[list[StepFeatures | None]] = []
    for n in range(len(start)):
        i = int(rep[n])
        now: list[StepFeatures | None] = []
        for j, idx in by_rep.items():
            if j == i or (group is not None and j // group != i // group):
                continue
            # the last step of j that started at or before this one, if it is still running
            p = int(np.searchsorted(start[idx], start[n], side="right")) - 1
            now.append(shapes[int(idx[p])] if p >= 0 and start[idx[p]] + dur[idx[p]] > start[n] else None)
        out.append(now)
    return out


def step_predictions(model: ContentionCost, steps: Mapping[str, np.ndarray]) -> np.ndarray:
    """The model's time for every step of a real run (an engine step log), given what the neighbours
    actually had in progress when it started."""
    from sim.calibrate import steps_features

    X, _, _ = steps_features(steps)
    pt = np.asarray(steps["prefill_tokens"], dtype=np.int64)
    ds = np.asarray(steps["decode_seqs"], dtype=np.int64)
    nb = neighbour_steps_at(steps, model.group)
    fac = np.array([model.factor(StepFeatures(int(p), int(d), 0.0, 0, 0), g)
                    for p, d, g in zip(pt.tolist(), ds.tolist(), nb)], dtype=np.float64)
    return model.base.predict(X) * fac


# ---- measuring -----------------------------------------------------------------------------------

def neighbour_groups(points: Sequence[Any]) -> dict[str, list[int]]:
    """Indices of the grid points a neighbour runs to stand for each busy class, and "grid": all of them
    (the classic busy-neighbour measurement)."""
    out: dict[str, list[int]] = {c: [] for c in NEIGHBOUR_CLASSES if c != "idle"}
    for i, p in enumerate(points):
        f = p.features()
        c = neighbour_class(f)
        if c == "decode" and f.decode_seqs > 32:
            continue  # a neighbour's decode batches in a fidelity-size run are modest
        if c == "prefill" and f.prefill_tokens > 1024:
            continue
        out[c].append(i)
    out["grid"] = list(range(len(points)))
    return out


CONDITIONS = ("idle", "decode_small", "decode", "prefill", "grid")


def condition_key(c: str) -> str:
    """The profile grid column with a shape's median beside a neighbour running condition c's shapes."""
    if c not in CONDITIONS or c in ("idle", "grid"):
        raise ValueError(f"no per-shape column for condition {c!r}; valid: decode_small, decode, prefill")
    return f"median_beside_{c}_s"


def measure_interleaved(measure_once: Callable[[Sequence[Any], int], list[float]], points: Sequence[Any],
                        switch: Callable[[str], None], rounds: int, seed: int = 0,
                        conditions: Sequence[str] = CONDITIONS,
                        progress: Callable[[int, int], None] | None = None) -> dict[str, list[list[float]]]:
    """Time every point under every condition, `rounds` times: each round visits the conditions in a fresh
    random order (`switch(c)` puts the neighbours in condition c and returns once they are in it), and under
    each times every point once (`measure_once(points, seed)` -> seconds per point, in order).
    Returns condition -> per point, its samples."""
    if rounds < 1:
        raise ValueError(f"rounds={rounds} must be >= 1")
    rng = np.random.default_rng(seed)
    out = {c: [[] for _ in points] for c in conditions}
    total, done = rounds * len(conditions), 0
    for r in range(rounds):
        for ci in rng.permutation(len(conditions)).tolist():
            c = conditions[ci]
            switch(c)
            for i, t in enumerate(measure_once(points, seed + 1000 * r + ci)):
                out[c][i].append(t)
            done += 1
            if progress:
                progress(done, total)
    switch("idle")
    return out


def fit_conditions(points: Sequence[Any], samples: Mapping[str, Sequence[Sequence[float]]]) -> dict[str, Any]:
    """The factor table from interleaved measurements (condition -> per point, its samples; "idle"
    required): F[c][k] = median over points of kind k of median_c / median_idle. Returns the profile's
    "contention" section."""
    idle = np.array([np.median(s) for s in samples["idle"]])
    kinds = np.array([victim_kind(p.features()) for p in points])
    conds: dict[str, Any] = {}
    for c in NEIGHBOUR_CLASSES:
        if c == "idle" or c not in samples:
            continue
        ratio = np.array([np.median(s) for s in samples[c]]) / idle
        fac, q = {}, {}
        for k in VICTIM_KINDS:
            r = ratio[kinds == k]
            if len(r):
                fac[k] = float(np.median(r))
                q[k] = {"shapes": int(len(r)), "p25": float(np.percentile(r, 25)), "p75": float(np.percentile(r, 75))}
        conds[c] = {"factor": fac, "quartiles": q}
    if "grid" in samples:
        ratio = np.array([np.median(s) for s in samples["grid"]]) / idle
        conds_grid = {"median_ratio": float(np.median(ratio))}
    else:
        conds_grid = {}
    return {"model": "alone fit x (1 + sum over busy neighbours of (factor[class][kind] - 1))", "reference": "alone",
            "conditions": conds, "random_grid_neighbour": conds_grid, "small_decode_max_seqs": SMALL_DECODE,
            "measured": "interleaved rounds over conditions"}


def factor_table(section: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """The factor table of a profile's "contention" section (checked)."""
    return _table({c: d["factor"] for c, d in section["conditions"].items()})
