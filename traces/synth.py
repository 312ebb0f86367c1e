"""Synthetic workloads: arrival processes and length samplers, vectorised and seeded.

Every function takes an explicit `numpy.random.Generator` (or a seed for
`synthesize`); nothing reads a module-global RNG, so the same seed gives the
same arrays in any process.

Arrival processes are renewal processes that start with a request at t=0:
n requests, n - 1 independent gaps. So the mean gap is 1/rate and the
inter-arrival CV is the gaps' CV, which is exactly what `compute_stats`
measures.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from traces.workload import Workload

Seed = int | np.random.Generator


def _check(n: int, rate: float, cv: float = 1.0) -> None:
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not rate > 0 or not np.isfinite(rate):
        raise ValueError(f"rate must be a positive finite number of requests/s, got {rate}")
    if not cv >= 0 or not np.isfinite(cv):
        raise ValueError(f"cv must be a finite number >= 0, got {cv}")


def _from_gaps(gaps: np.ndarray) -> np.ndarray:
    out = np.empty(len(gaps) + 1, dtype=np.float64)
    out[0] = 0.0
    np.cumsum(gaps, out=out[1:])
    return out


def poisson_arrivals(n: int, rate: float, rng: np.random.Generator) -> np.ndarray:
    """n arrival times (s) of a Poisson process at `rate` req/s, the first at 0."""
    _check(n, rate)
    if n == 0:
        return np.empty(0, dtype=np.float64)
    return _from_gaps(rng.exponential(1.0 / rate, n - 1))


def gamma_arrivals(n: int, rate: float, cv: float, rng: np.random.Generator) -> np.ndarray:
    """n arrival times (s) with Gamma gaps of mean 1/rate and coefficient of variation `cv`.

    cv > 1 is burstier than Poisson (cv = 1 has exponential gaps, though not
    the same draws as `poisson_arrivals`); cv = 0 is a constant rate.
    """
    _check(n, rate, cv)
    if n == 0:
        return np.empty(0, dtype=np.float64)
    if cv == 0:
        return np.arange(n, dtype=np.float64) / rate
    shape = 1.0 / (cv * cv)  # Gamma(k, theta): CV = 1/sqrt(k), mean = k * theta
    return _from_gaps(rng.gamma(shape, 1.0 / (rate * shape), n - 1))


def resampled_arrivals(n: int, gaps: np.ndarray, rng: np.random.Generator, max_gap: float | None = None) -> np.ndarray:
    """n arrival times (s), the first at 0, whose n - 1 gaps are drawn uniformly with replacement from `gaps`
    (a recorded workload's own inter-arrival gaps, s): the recorded mix of bursts and pauses itself, not a
    Poisson or Gamma process fitted to it. `max_gap`: each drawn gap cut to at most this many seconds (None: as drawn)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    g = np.asarray(gaps, dtype=np.float64)
    if g.ndim != 1 or not len(g):
        raise ValueError(f"gaps must be a non-empty 1-D array of seconds, got shape {g.shape}")
    bad = np.flatnonzero(~np.isfinite(g) | (g < 0))
    if len(bad):
        raise ValueError(f"gaps must be finite and >= 0 s; gap {int(bad[0])} is {g[bad[0]]}")
    if max_gap is not None and not (np.isfinite(max_gap) and max_gap > 0):
        raise ValueError(f"max_gap must be a finite number of seconds > 0 (or None), got {max_gap}")
    if n == 0:
        return np.empty(0, dtype=np.float64)
    drawn = g[rng.integers(0, len(g), n - 1)]
    return _from_gaps(drawn if max_gap is None else np.minimum(drawn, max_gap))


def renewal_arrivals(n: int, rate: float, cv: float, rng: np.random.Generator) -> np.ndarray:
    """Poisson when cv == 1, Gamma otherwise."""
    return poisson_arrivals(n, rate, rng) if cv == 1 else gamma_arrivals(n, rate, cv, rng)


class LengthSampler(Protocol):
    def sample(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """n (input_tokens, output_tokens) pairs as int64 arrays, each >= 1."""
        ...


@dataclass(frozen=True)
class FixedLengths:
    input_tokens: int
    output_tokens: int

    def __post_init__(self) -> None:
        if self.input_tokens < 1 or self.output_tokens < 1:
            raise ValueError("token counts must be >= 1")

    def sample(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        return np.full(n, self.input_tokens, dtype=np.int64), np.full(n, self.output_tokens, dtype=np.int64)


@dataclass(frozen=True, eq=False)
class EmpiricalLengths:
    """Resamples recorded (input, output) pairs jointly, uniformly with replacement.

    Jointly keeps the correlation between prompt and answer length that
    sampling the two marginals independently would lose.
    """

    input_tokens: np.ndarray
    output_tokens: np.ndarray
    source: str = "empirical"

    def __post_init__(self) -> None:
        if len(self.input_tokens) != len(self.output_tokens) or len(self.input_tokens) == 0:
            raise ValueError("need a non-empty set of (input, output) pairs of equal length")

    @classmethod
    def from_workload(cls, w: Workload) -> EmpiricalLengths:
        return cls(w.input_tokens.copy(), w.output_tokens.copy(), source=w.name)

    def sample(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        idx = rng.integers(0, len(self.input_tokens), n)
        return self.input_tokens[idx], self.output_tokens[idx]


def fit_lengths(w: Workload) -> EmpiricalLengths:
    """The empirical joint length distribution of a loaded workload."""
    return EmpiricalLengths.from_workload(w)


def default_lengths() -> EmpiricalLengths:
    """Lengths of the embedded default trace (Azure 2023 conversation)."""
    from traces.loaders import load_default_trace  # deferred: loaders imports this module lazily too

    return fit_lengths(load_default_trace())


def synthesize(n: int, rate: float, cv: float = 1.0, lengths: LengthSampler | Workload | None = None,
               seed: Seed = 0, name: str = "synthetic") -> Workload:
    """n requests at `rate` req/s with inter-arrival CV `cv` (Poisson when 1).

    `lengths`: a sampler, a Workload to resample (input, output) pairs from,
    or None for the embedded default trace's pairs. Arrivals are drawn before
    lengths from one Generator made from `seed`.
    """
    rng = np.random.default_rng(seed)
    if lengths is None:
        lengths = default_lengths()
    elif isinstance(lengths, Workload):
        lengths = fit_lengths(lengths)
    arrival = renewal_arrivals(n, rate, cv, rng)
    inp, out = lengths.sample(n, rng)
    meta = {"format": "synthetic", "arrivals": {"process": "poisson" if cv == 1 else "gamma", "rate": rate,
                                                "cv": cv, "seed": seed if isinstance(seed, int) else "generator"},
            "lengths": getattr(lengths, "source", type(lengths).__name__)}
    return Workload(arrival=arrival, input_tokens=np.asarray(inp, dtype=np.int64),
                    output_tokens=np.asarray(out, dtype=np.int64), name=name, meta=meta)
