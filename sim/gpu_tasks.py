"""An independent stream of GPU tasks (embeddings, tool-model calls) on a separate pool of accelerators.

Tasks arrive Poisson at `gpu_tasks.rate` from the first to the last LLM arrival; each is submitted to
policies.placement.TaskScheduler at its arrival (earliest predicted finish), and its device runs its
tasks one at a time in submission order. A task's actual duration is its predicted one times a seeded
lognormal factor (`jitter`), so a late finish delays the tasks queued behind it; at each actual finish the
scheduler is told (`complete`), which moves its predictions for that device. The stream shares nothing
with the LLM replicas but the clock: their records are the same with it on or off.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any, Sequence

import numpy as np
import simpy

from policies.placement import GpuTask, TaskDevice, TaskScheduler
from sim.config import GpuTaskSettings

MAX_TASKS = 1_000_000  # bound on the tasks of one run
_SEED_TAG = 0x67707574  # "gput": keeps this stream's generator apart from the run's other seeded draws


def draw_tasks(cfg: GpuTaskSettings, seed: int, t0: float, t1: float
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(arrivals, works, duration factors): Poisson arrivals at cfg.rate in [t0, t1], from a generator
    of its own seeded by `seed`."""
    empty = np.zeros(0)
    if not cfg.enabled or not t1 >= t0:
        return empty, empty, empty
    rng = np.random.default_rng([seed, _SEED_TAG])
    span = t1 - t0
    expect = cfg.rate * span
    if expect > MAX_TASKS:
        raise ValueError(f"gpu_tasks.rate={cfg.rate!r} gives about {expect:,.0f} tasks over the {span:,.1f} s "
                         f"workload; at most {MAX_TASKS:,} are simulated")
    chunk = int(expect + 10 * math.sqrt(expect) + 16)
    parts, last = [], t0
    while True:
        arr = last + np.cumsum(rng.exponential(1.0 / cfg.rate, chunk))
        parts.append(arr)
        last = float(arr[-1])
        if last > t1:
            break
    arrival = np.concatenate(parts)
    arrival = arrival[arrival <= t1]
    n = len(arrival)
    if n > MAX_TASKS:
        raise ValueError(f"gpu_tasks.rate={cfg.rate!r} gives {n:,} tasks; at most {MAX_TASKS:,} are simulated")
    if cfg.work_cv > 0 and cfg.work > 0:
        k = 1.0 / cfg.work_cv ** 2
        work = rng.gamma(k, cfg.work / k, n)
    else:
        work = np.full(n, cfg.work)
    factor = rng.lognormal(0.0, cfg.jitter, n) if cfg.jitter > 0 else np.ones(n)
    return arrival, work, factor


class GpuTaskStream:
    """Runs given tasks (arrival times, work, duration factors) through a TaskScheduler over `speeds`.

    Per task (index = task id): arrival, device (index into speeds), start (actual), predicted_finish
    (at submission), finish (actual); NaN / -1 until known.
    """

    def __init__(self, env: simpy.Environment, speeds: Sequence[float], arrival: np.ndarray, work: np.ndarray,
                 factor: np.ndarray | None = None):
        self.env = env
        self.speeds = tuple(float(s) for s in speeds)
        self.sched = TaskScheduler([TaskDevice(i, s) for i, s in enumerate(self.speeds)])
        self.arrival = np.asarray(arrival, dtype=np.float64)
        n = len(self.arrival)
        self.work = np.asarray(work, dtype=np.float64)
        self.factor = np.ones(n) if factor is None else np.asarray(factor, dtype=np.float64)
        if len(self.work) != n or len(self.factor) != n:
            raise ValueError("arrival, work and factor must have the same length")
        if n and np.any(np.diff(self.arrival) < 0):
            raise ValueError("arrivals must be non-decreasing")
        self.device = np.full(n, -1, dtype=np.int64)
        self.start = np.full(n, np.nan)
        self.predicted_finish = np.full(n, np.nan)
        self.finish = np.full(n, np.nan)
        self._queue: list[deque[int]] = [deque() for _ in self.speeds]
        self._wake: list[simpy.Event | None] = [None] * len(self.speeds)
        for d in range(len(self.speeds)):
            env.process(self._device(d))
        env.process(self._arrivals())

    def __len__(self) -> int:
        return len(self.arrival)

    def _arrivals(self):
        env, sched = self.env, self.sched
        for i in range(len(self.arrival)):
            t = float(self.arrival[i])
            if t > env.now:
                yield env.timeout(t - env.now)
            a = sched.submit(GpuTask(i, float(self.work[i])), env.now)
            self.device[i] = a.device
            self.predicted_finish[i] = a.predicted_finish
            self._queue[a.device].append(i)
            w = self._wake[a.device]
            if w is not None and not w.triggered:
                w.succeed()

    def _device(self, d: int):
        env, q, speed = self.env, self._queue[d], self.speeds[d]
        while True:
            if not q:
                self._wake[d] = env.event()
                yield self._wake[d]
                self._wake[d] = None
                continue
            i = q.popleft()
            self.start[i] = env.now
            yield env.timeout(self.work[i] / speed * self.factor[i])
            self.finish[i] = env.now
            self.sched.complete(i, env.now)

    def summary(self, t0: float) -> dict[str, Any]:
        """Count, wait (start - arrival) and latency (finish - arrival) in s, mean abs error of the
        predicted finish, and per-device utilisation = busy / (last finish - t0)."""
        done = np.isfinite(self.finish)
        wait = (self.start - self.arrival)[done]
        lat = (self.finish - self.arrival)[done]
        err = np.abs(self.finish - self.predicted_finish)[done]
        span = max((float(self.finish[done].max()) if done.any() else t0) - t0, 1e-12)
        busy = np.bincount(self.device[done], weights=(self.finish - self.start)[done], minlength=len(self.speeds))

        def dist(x: np.ndarray) -> dict[str, float]:
            if not len(x):
                return {"mean": math.nan, "p50": math.nan, "p99": math.nan}
            p50, p99 = np.percentile(x, (50, 99))
            return {"mean": float(x.mean()), "p50": float(p50), "p99": float(p99)}

        return {
            "count": len(self),
            "completed": int(done.sum()),
            "wait_s": dist(wait),
            "latency_s": dist(lat),
            "finish_error_s": float(err.mean()) if len(err) else math.nan,
            "span_s": span,
            "speeds": list(self.speeds),
            "tasks_per_device": np.bincount(self.device[self.device >= 0], minlength=len(self.speeds)).tolist(),
            "utilisation": (busy / span).tolist(),
        }


def start_gpu_tasks(env: simpy.Environment, cfg: GpuTaskSettings, seed: int, t0: float, t1: float
                    ) -> GpuTaskStream | None:
    """The configured stream over [t0, t1] (first to last LLM arrival), or None when gpu_tasks.rate is 0."""
    if not cfg.enabled:
        return None
    arrival, work, factor = draw_tasks(cfg, seed, t0, t1)
    return GpuTaskStream(env, cfg.speeds, arrival, work, factor)
