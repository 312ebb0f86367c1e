"""Closed-loop agent sessions: step k+1 of a session is sent when step k finishes, plus a think time.

An agent does not send its next call on a clock: it waits for the answer, runs
its tool or thinks, then sends a prompt that has grown by what it learned. So
a session trace (LMCache: `session_id`, `step`, `think_time` columns) replays
closed loop: step 0 of each session at its recorded arrival, step k+1 at

    intended send time(k+1) = finish(k) + think(k+1)

with the prompt of step k+1 as recorded. A slower serving system then stretches
a session instead of piling its calls up. Rows without a session id are sent
at their recorded arrival (open loop).

Think times: `trace` takes the recorded `think_time` (LMCache: the gap between
two recorded send times, which includes the recorded call's own latency, so
it over-states the pure think time); a number is a fixed think time; `exp:MEAN`
draws each from an exponential distribution, seeded by the run's seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sim.config import parse_think
from traces.workload import Workload


@dataclass(frozen=True)
class SessionPlan:
    heads: np.ndarray  # rows sent at their recorded arrival, in arrival order: each session's first step, and
    # every row without a session
    next_row: np.ndarray  # int64 per row: the row of the same session's next step, or -1
    think: np.ndarray  # float64 per row: seconds between the previous step's finish and this row's send
    sessions: int


def plan_sessions(w: Workload, think: str = "trace", seed: int = 0) -> SessionPlan:
    if w.session_id is None:
        raise ValueError(f"closed-loop sessions need a trace with session ids (e.g. an LMCache agent trace); "
                         f"'{w.name}' has none")
    n = len(w)
    step = w.step if w.step is not None else np.zeros(n, dtype=np.int64)
    by_session: dict[str, list[int]] = {}
    heads: list[int] = []
    for i, sid in enumerate(w.session_id):
        if sid is None or sid == "":
            heads.append(i)
        else:
            by_session.setdefault(sid, []).append(i)
    next_row = np.full(n, -1, dtype=np.int64)
    for rows in by_session.values():
        rows.sort(key=lambda i: (int(step[i]), i))
        heads.append(rows[0])
        for a, b in zip(rows, rows[1:]):
            next_row[a] = b
    heads.sort(key=lambda i: (float(w.arrival[i]), i))
    kind, v = parse_think(think)
    if kind == "trace":
        t = (np.asarray(w.think_time, dtype=np.float64).copy() if w.think_time is not None
             else np.zeros(n, dtype=np.float64))
    elif kind == "fixed":
        t = np.full(n, v, dtype=np.float64)
    else:
        t = np.random.default_rng([seed, 0x5E55]).exponential(v, n)
    return SessionPlan(np.array(heads, dtype=np.int64), next_row, np.maximum(t, 0.0), len(by_session))
