"""Results out: one record per request, the same schema from the simulator and the executor.

Times are seconds on the run's clock (trace time for the simulator; seconds
since the replay started for the executor), with `arrival` the intended send
time. Missing times (a rejected request has no first token) are NaN.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np

STATUSES = ("ok", "rejected", "timed_out", "failed")

# name, numpy dtype ("O" = Python object column)
RECORD_FIELDS: tuple[tuple[str, str], ...] = (
    ("id", "i8"),
    ("arrival", "f8"),
    ("admitted", "f8"),
    ("first_token", "f8"),
    ("finish", "f8"),
    ("input_tokens", "i8"),
    ("output_tokens", "i8"),  # as requested by the trace
    ("generated_tokens", "i8"),  # actually produced
    ("cached_tokens", "i8"),  # prompt tokens served from the prefix cache
    ("preemptions", "i8"),
    ("replica", "i8"),  # -1: never reached a replica
    ("status", "O"),
    ("reason", "O"),
    ("session_id", "O"),
    ("step", "i8"),
)
FIELD_NAMES = tuple(n for n, _ in RECORD_FIELDS)


class RecordTable:
    """Columnar per-request records, preallocated for n requests and filled by id."""

    def __init__(self, n: int):
        self.n = n
        self.cols: dict[str, np.ndarray] = {}
        for name, dt in RECORD_FIELDS:
            if dt == "f8":
                self.cols[name] = np.full(n, np.nan)
            elif dt == "i8":
                self.cols[name] = np.full(n, -1 if name in ("replica",) else 0, dtype=np.int64)
            else:
                self.cols[name] = np.full(n, "", dtype=object)
        self.cols["id"][:] = np.arange(n)
        self.filled = np.zeros(n, dtype=bool)

    def put(self, seq) -> None:
        """Write a terminal Sequence (policies.sequence.Sequence)."""
        i = seq.req.index
        if self.filled[i]:
            raise RuntimeError(f"request {i} recorded twice")
        self.filled[i] = True
        c = self.cols
        r = seq.req
        c["arrival"][i] = seq.t_arrival
        if seq.t_admitted is not None:
            c["admitted"][i] = seq.t_admitted
        if seq.t_first_token is not None:
            c["first_token"][i] = seq.t_first_token
        if seq.t_finish is not None:
            c["finish"][i] = seq.t_finish
        c["input_tokens"][i] = r.input_tokens
        c["output_tokens"][i] = r.output_tokens
        c["generated_tokens"][i] = seq.num_generated
        c["cached_tokens"][i] = seq.num_cached_tokens
        c["preemptions"][i] = seq.preemptions
        c["replica"][i] = seq.replica
        c["status"][i] = seq.outcome
        c["reason"][i] = seq.reason
        c["session_id"][i] = r.session_id or ""
        c["step"][i] = r.step

    def missing(self) -> np.ndarray:
        return np.flatnonzero(~self.filled)


@dataclass
class ReplicaStats:
    busy_time: float = 0.0  # s spent executing steps
    steps: int = 0
    tokens: int = 0  # prefill + decode tokens computed
    preemptions: int = 0
    kv_blocks: int = 0
    prefix_queries: int = 0  # prompt tokens looked up
    prefix_hits: int = 0  # of those, served from cache
    evictions: int = 0


@dataclass
class RunResult:
    records: dict[str, np.ndarray]
    itl: tuple[np.ndarray, np.ndarray]  # (gap seconds, weight): exact ITL samples, run-length encoded
    start: float  # first intended send time
    end: float  # last finish
    replicas: list[ReplicaStats] = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.records["id"])

    def status_counts(self) -> dict[str, int]:
        st = self.records["status"]
        return {s: int(np.count_nonzero(st == s)) for s in STATUSES}

    def write_csv(self, path: str | Path) -> None:
        cols = [self.records[name] for name in FIELD_NAMES]
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(FIELD_NAMES)
            for row in zip(*cols):
                w.writerow([_fmt(v) for v in row])

    @staticmethod
    def read_csv(path: str | Path) -> dict[str, np.ndarray]:
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
        header, body = rows[0], rows[1:]
        out: dict[str, np.ndarray] = {}
        dts = dict(RECORD_FIELDS)
        for j, name in enumerate(header):
            vals = [r[j] for r in body]
            dt = dts.get(name, "O")
            if dt == "f8":
                out[name] = np.array([float(v) if v != "" else np.nan for v in vals])
            elif dt == "i8":
                out[name] = np.array([int(v) for v in vals], dtype=np.int64)
            else:
                out[name] = np.array(vals, dtype=object)
        return out


def _fmt(v) -> str:
    if isinstance(v, (float, np.floating)):
        return "" if math.isnan(v) else repr(float(v))
    return str(v)


def merge_itl(parts: Iterable[tuple[list[float] | np.ndarray, int]], singles: Iterable[float]) -> tuple[np.ndarray, np.ndarray]:
    """Flatten ITL samples: each part is (gaps, weight applying to each gap)."""
    gaps: list[np.ndarray] = []
    weights: list[np.ndarray] = []
    for g, w in parts:
        g = np.asarray(g, dtype=np.float64)
        gaps.append(g)
        weights.append(np.full(len(g), w, dtype=np.int64))
    s = np.asarray(list(singles), dtype=np.float64)
    gaps.append(s)
    weights.append(np.ones(len(s), dtype=np.int64))
    return np.concatenate(gaps), np.concatenate(weights)
