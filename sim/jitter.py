"""Step-time jitter: a real engine step does not take the cost model's time, but that time times a random
factor, and the factor's distribution has a long right tail.

The cost model is fitted to medians (sim.calibrate: the median of repeats per grid shape), and the loop drift
check scales it by the pace of a short replay's steps (a sum over a sum: a mean). Both are right for throughput
and for a percentile of many steps. They are wrong for a figure set by a few steps: a request's TTFT is one or
two prefill steps, and the p50 TTFT of a few dozen requests whose prompts fall into two clusters sits at the
edge of the shorter cluster, where the few requests whose prefill ran long decide it. On this project's 2-core
CPU a prefill step beside an idle neighbour ran 1.2-1.35 x its model time one time in ten (p90, fidelity run W
and one cell run again), its median 0.99-1.01 x; a deterministic simulator puts every such step at the mean.

`StepJitter` holds the factor's distribution per step kind ("decode": decode-only steps; "with_prefill": steps
with prefill tokens) as a quantile table (the inverse CDF at evenly spaced probabilities, linear in between),
normalised to mean 1 so the pace the loop check read stays the pace. The simulator (sim.cluster, `jitter=`)
multiplies each step's time by a draw from its kind's table, from a random stream per replica seeded by the
run's seed: the same seed gives the same run. Decode-run jumps are off with jitter (each step draws its own).

Where the table comes from: `from_ratios`, the real / model ratios of an executor's own steps
(sim.calibrate.step_ratios), e.g. of the loop drift check's replay (sim.calibrate.loop_pace), which runs on the
same replicas right before and after the measured run.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

KINDS = ("decode", "with_prefill")
N_QUANTILES = 41  # the table's probabilities: 0, 1/40, ..., 1
MIN_STEPS = 8  # fewer steps of a kind than this: that kind gets no jitter (factor 1); `steps` keeps the count


def _normalised(q: np.ndarray) -> np.ndarray:
    """Quantile values scaled so the piecewise-linear inverse CDF they define has mean exactly 1."""
    mean = float(np.mean((q[1:] + q[:-1]) / 2))  # integral of the inverse CDF over evenly spaced probabilities
    return q / mean


class StepJitter:
    """Per-kind quantile tables of a step-time factor (module doc). `quantiles[kind]`: nondecreasing, finite,
    positive values at evenly spaced probabilities 0..1 (at least 2); a kind left out has no jitter."""

    def __init__(self, quantiles: Mapping[str, Sequence[float]], source: str = "",
                 steps: Mapping[str, int] | None = None):
        unknown = sorted(set(quantiles) - set(KINDS))
        if unknown:
            raise ValueError(f"step jitter: unknown step kind(s) {unknown}; allowed: {', '.join(KINDS)}")
        self.quantiles: dict[str, np.ndarray] = {}
        for kind, vals in quantiles.items():
            q = np.asarray(vals, dtype=np.float64)
            if q.ndim != 1 or len(q) < 2:
                raise ValueError(f"step jitter: {kind}: needs at least 2 quantile values, got {q.shape}")
            if not (np.all(np.isfinite(q)) and np.all(q > 0)):
                raise ValueError(f"step jitter: {kind}: quantile values must be finite and > 0")
            if np.any(np.diff(q) < 0):
                raise ValueError(f"step jitter: {kind}: quantile values must not decrease")
            self.quantiles[kind] = _normalised(q)
        self.source = source
        self.steps = dict(steps or {})

    @classmethod
    def from_ratios(cls, ratios: Mapping[str, Sequence[float]], n: int = N_QUANTILES, min_steps: int = MIN_STEPS,
                    source: str = "") -> "StepJitter":
        """The table from steps' real / model time ratios per kind: their empirical quantiles, over their mean
        (so the level stays the model's as already corrected). A kind with fewer than `min_steps` ratios is
        left out (no jitter). A ratio that is not finite and > 0 is an error, not skipped."""
        if n < 2:
            raise ValueError(f"step jitter: n={n} is out of range; allowed: >= 2")
        out, steps = {}, {}
        for kind, vals in ratios.items():
            r = np.asarray(vals, dtype=np.float64)
            if len(r) and not (np.all(np.isfinite(r)) and np.all(r > 0)):
                raise ValueError(f"step jitter: {kind}: step time ratios must be finite and > 0")
            steps[kind] = int(len(r))
            if len(r) >= min_steps:
                out[kind] = np.percentile(r / r.mean(), np.linspace(0, 100, n))
        return cls(out, source=source, steps=steps)

    @classmethod
    def pooled(cls, tables: Sequence["StepJitter"], source: str = "") -> "StepJitter":
        """Several tables in one: per kind, the average of their quantile functions (over the tables that have
        the kind, all resampled to the same probabilities)."""
        out, steps = {}, {}
        for kind in KINDS:
            have = [t.quantiles[kind] for t in tables if kind in t.quantiles]
            steps[kind] = sum(t.steps.get(kind, 0) for t in tables)
            if have:
                n = max(len(q) for q in have)
                p = np.linspace(0, 1, n)
                out[kind] = np.mean([np.interp(p, np.linspace(0, 1, len(q)), q) for q in have], axis=0)
        return cls(out, source=source, steps=steps)

    @classmethod
    def from_checks(cls, before: Any, after: Any, source: str = "loop drift checks, before and after"
                    ) -> "StepJitter | None":
        """The two loop drift checks' tables (sim.calibrate.loop_pace's "jitter") pooled, or None where either
        check recorded none or neither has a kind with enough steps."""
        if not all(isinstance(c, Mapping) and c.get("jitter") for c in (before, after)):
            return None
        j = cls.pooled([cls.from_dict(before["jitter"]), cls.from_dict(after["jitter"])], source=source)
        return j if j.quantiles else None

    def quantile(self, kind: str, p: float) -> float:
        """The factor at probability p of `kind` (1 for a kind without a table)."""
        q = self.quantiles.get(kind)
        return 1.0 if q is None else float(np.interp(p, np.linspace(0, 1, len(q)), q))

    def sampler(self, seed: int, replica: int) -> Callable[[bool], float]:
        """A draw per call for replica `replica` of a run seeded `seed`: f(with_prefill) -> factor. Its own
        stream, so one replica's steps do not shift another's draws."""
        rng = random.Random(int(seed) * 1_000_003 + int(replica))
        tabs = tuple((q.tolist(), len(q) - 1) if q is not None else None
                     for q in (self.quantiles.get("decode"), self.quantiles.get("with_prefill")))

        def draw(with_prefill: bool) -> float:
            t = tabs[1 if with_prefill else 0]
            if t is None:
                return 1.0
            q, m = t
            x = rng.random() * m
            i = int(x)
            return q[i] + (q[i + 1] - q[i]) * (x - i)

        return draw

    def summary(self) -> dict[str, Any]:
        """p10 / p50 / p90 per kind, for reports."""
        return {k: {"p10": self.quantile(k, 0.1), "p50": self.quantile(k, 0.5), "p90": self.quantile(k, 0.9),
                    "steps": self.steps.get(k)} for k in self.quantiles}

    def to_dict(self) -> dict[str, Any]:
        return {"quantiles": {k: v.tolist() for k, v in self.quantiles.items()}, "source": self.source,
                "steps": self.steps}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "StepJitter":
        if "quantiles" not in d:
            raise ValueError("step jitter: no 'quantiles' table")
        return cls(d["quantiles"], source=str(d.get("source", "")), steps=d.get("steps"))

    def __repr__(self) -> str:
        s = ", ".join(f"{k} p10 {v['p10']:.3f} p50 {v['p50']:.3f} p90 {v['p90']:.3f}"
                      for k, v in self.summary().items())
        return f"StepJitter({s or 'none'})"


def describe(j: StepJitter | None) -> str:
    """One line for a report."""
    if j is None or not j.quantiles:
        return "none"
    return "; ".join(f"{k.replace('_', ' ')} p10 {v['p10']:.2f} p50 {v['p50']:.2f} p90 {v['p90']:.2f} x"
                     for k, v in j.summary().items())


def load_jitter(path: str | Path) -> StepJitter:
    """A step-jitter table from a JSON file: a table (`StepJitter.to_dict`), or the output of `twinfer validate
    --out` whose loop drift checks recorded theirs (pooled, `from_checks`). Anything else is an error naming
    the file."""
    p = Path(path)
    try:
        d = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: not JSON ({e.msg}, line {e.lineno}); --jitter takes a step-jitter table or a "
                         f"`twinfer validate --out` file") from None
    if isinstance(d, dict) and "quantiles" in d:
        try:
            return StepJitter.from_dict(d)
        except ValueError as e:
            raise ValueError(f"{p}: {e}") from None
    lp = d.get("loop_drift") if isinstance(d, dict) else None
    if isinstance(lp, dict) and lp.get("enabled"):
        j = StepJitter.from_checks(lp.get("before"), lp.get("after"), source=f"{p.name}: loop drift checks")
        if j is not None:
            return j
        raise ValueError(f"{p}: its loop drift checks recorded no step spread (validated before twinfer kept it, "
                         f"or too few steps of either kind); validate again")
    raise ValueError(f"{p}: neither a step-jitter table ('quantiles') nor a `twinfer validate --out` file with the "
                     f"loop drift check on ('loop_drift')")
