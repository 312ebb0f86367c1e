"""Pure Workload -> Workload transforms: rate scaling, windows, prefixes, sampling.

None changes its input. Each keeps arrival order and appends a record of
itself to `meta["transforms"]`, so a derived workload says how it was made.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from traces.workload import Workload


def _meta(w: Workload, op: str, **args: Any) -> dict:
    return {**w.meta, "transforms": [*w.meta.get("transforms", []), {"op": op, **args}]}


def scale_rate(w: Workload, factor: float, *, scale_think_time: bool = True) -> Workload:
    """Compress time by `factor` (2 = twice the request rate): every arrival time is divided by it.

    Inter-arrival gaps are divided by `factor` too (up to float rounding; exact
    when factor is a power of two). Think times are the same time axis and are
    scaled alike unless `scale_think_time=False`.
    """
    if not factor > 0 or not np.isfinite(factor):
        raise ValueError(f"factor must be a positive finite number, got {factor}")
    think = w.think_time
    if think is not None and scale_think_time:
        think = think / factor
    return dataclasses.replace(w, arrival=w.arrival / factor, think_time=think,
                               meta=_meta(w, "scale_rate", factor=factor, scale_think_time=scale_think_time))


def rebase(w: Workload, t0: float | None = None) -> Workload:
    """Shift times so `t0` (default: the first arrival) becomes 0."""
    if t0 is None:
        t0 = float(w.arrival[0]) if len(w) else 0.0
    return dataclasses.replace(w, arrival=w.arrival - t0, meta=_meta(w, "rebase", t0=t0))


def window(w: Workload, t0: float, t1: float) -> Workload:
    """Requests arriving in [t0, t1). Times are unchanged (compose with `rebase` to start at 0)."""
    if t1 < t0:
        raise ValueError(f"window ends before it starts: t1 ({t1}) < t0 ({t0})")
    lo, hi = np.searchsorted(w.arrival, [t0, t1], side="left")
    return dataclasses.replace(w.take(np.arange(lo, hi)), meta=_meta(w, "window", t0=t0, t1=t1))


def first_n(w: Workload, n: int) -> Workload:
    """The first `n` requests (all of them if there are fewer)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return dataclasses.replace(w.take(np.arange(min(n, len(w)))), meta=_meta(w, "first_n", n=n))


def sample(w: Workload, *, fraction: float | None = None, count: int | None = None,
           seed: int | np.random.Generator = 0, by_session: bool = False) -> Workload:
    """A seeded uniform sample without replacement, in arrival order.

    Give exactly one of `fraction` (rounded to the nearest count) or `count`.
    With `by_session`, whole sessions are sampled (requests without a session
    each count as their own), so agent chains stay complete; the count then
    means sessions.
    """
    if (fraction is None) == (count is None):
        raise ValueError("give exactly one of fraction or count")
    rng = np.random.default_rng(seed)
    if by_session and w.session_id is not None:
        # Unit of sampling: the session id, or the row itself for requests without one.
        units = [s if s is not None else ("row", i) for i, s in enumerate(w.session_id)]
        keys = list(dict.fromkeys(units))
    else:
        units = None
        keys = None
    total = len(keys) if keys is not None else len(w)
    if fraction is not None:
        if not 0 <= fraction <= 1:
            raise ValueError(f"fraction must be in [0, 1], got {fraction}")
        k = int(round(fraction * total))
    else:
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count}")
        k = min(count, total)
    chosen = np.sort(rng.choice(total, size=k, replace=False))
    if keys is not None:
        picked = {keys[i] for i in chosen.tolist()}
        chosen = np.array([i for i, u in enumerate(units) if u in picked], dtype=np.int64)
    args = {"fraction": fraction, "count": count, "by_session": by_session,
            "seed": seed if isinstance(seed, int) else "generator"}
    return dataclasses.replace(w.take(chosen), meta=_meta(w, "sample", **args))
