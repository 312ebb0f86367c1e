"""Results out: one record per request, the same schema from the simulator and the executor.

Times are seconds on the run's clock (trace time for the simulator; seconds
since the replay started for the executor), with `arrival` the intended send
time. Missing times (a rejected request has no first token) are NaN.
"""

from __future__ import annotations

import csv
from array import array
import math
from dataclasses import dataclass, field
from pathlib import Path

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
    ("result_cache_hit", "i8"),  # 1: answered by the result cache in front of the engines (replica -1)
)
FIELD_NAMES = tuple(n for n, _ in RECORD_FIELDS)


_RECORD_FLUSH = 4096  # RecordTable: rows buffered before they go into the columns
ITL_FLUSH = 8 * 4096  # ItlLog: run values buffered before they go into the array (the scheduler reads it)


class RecordTable:
    """Columnar per-request records, preallocated for n requests and filled by id.

    `put` appends a row to a small buffer; the buffer goes into the numpy columns in bulk (element-wise
    numpy stores cost more than the rest of recording), so read `cols` (which flushes) for the columns."""

    _FLUSH = _RECORD_FLUSH

    def __init__(self, n: int):
        self.n = n
        self._cols: dict[str, np.ndarray] = {}
        for name, dt in RECORD_FIELDS:
            if dt == "f8":
                self._cols[name] = np.full(n, np.nan)
            elif dt == "i8":
                self._cols[name] = np.full(n, -1 if name in ("replica",) else 0, dtype=np.int64)
            else:
                self._cols[name] = np.full(n, "", dtype=object)
        self._cols["id"][:] = np.arange(n)
        self._filled = bytearray(n)
        self._buf: list[tuple] = []

    def put(self, seq, result_cache_hit: bool = False) -> None:
        """Write a terminal Sequence (policies.sequence.Sequence)."""
        r = seq.req
        i = r.index
        if self._filled[i]:
            raise RuntimeError(f"request {i} recorded twice")
        self._filled[i] = 1
        nan = math.nan
        t = seq.t_admitted
        f = seq.t_first_token
        e = seq.t_finish
        self._buf.append((i, seq.t_arrival, nan if t is None else t, nan if f is None else f, nan if e is None else e,
                          r.input_tokens, r.output_tokens, seq.num_generated, seq.num_cached_tokens, seq.preemptions,
                          seq.replica, seq.outcome, seq.reason, r.session_id or "", r.step, 1 if result_cache_hit else 0))
        if len(self._buf) >= _RECORD_FLUSH:  # (a global: faster to read than a class attribute)
            self._flush()

    _BUF_FIELDS = FIELD_NAMES[1:]  # the order of a buffered row after its id (put() writes them so)

    def _flush(self) -> None:
        buf = self._buf
        if not buf:
            return
        cols = list(zip(*buf))
        idx = np.fromiter(cols[0], dtype=np.int64, count=len(buf))
        c = self._cols
        for name, vals in zip(self._BUF_FIELDS, cols[1:]):
            col = c[name]
            if col.dtype == object:
                col[idx] = np.array(vals, dtype=object)
            else:
                col[idx] = vals
        buf.clear()

    @property
    def cols(self) -> dict[str, np.ndarray]:
        self._flush()
        return self._cols

    @property
    def filled(self) -> np.ndarray:
        return np.frombuffer(self._filled, dtype=np.uint8).astype(bool)

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
    itl: ItlLog  # exact inter-token latency samples, compactly stored
    start: float  # first intended send time
    end: float  # last finish
    replicas: list[ReplicaStats] = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    # Optional per-replica samples over time (simulator: KV usage, cached blocks, evictions), one array per column.
    timeseries: dict[str, np.ndarray] | None = None

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


class ItlLog:
    """Inter-token latency samples, stored compactly and summarised exactly.

    Three kinds of entries: `step(d, c)` = c samples of value d (one engine step in which c sequences
    each produced their next token d seconds after their previous one); `single(g)` = one sample;
    `run(params, lo, hi, w)` = for every i in [lo, hi), w samples of d(i) = max(a1 + b1*i, a2 + b2*i) + c
    with params = (a1, b1, a2, b2, c) and b1, b2 >= 0 (a run of decode steps predicted in closed form).
    Memory is O(entries), not O(tokens); percentiles are found by bisection on the value with an exact
    count of samples below it, so they are the exact sample percentiles up to float precision.
    """

    _FLUSH = ITL_FLUSH

    def __init__(self) -> None:
        self.step_d = array("d")
        self.step_w = array("d")
        self._runs = array("d")  # a1, b1, a2, b2, c, lo, hi, w per run
        self._buf: list[float] = []  # runs not yet in _runs (a list takes them ~5x faster than an array)

    def step(self, d: float, c: int) -> None:
        self.step_d.append(d)
        self.step_w.append(c)

    def single(self, g: float) -> None:
        self.step_d.append(g)
        self.step_w.append(1)

    def run(self, params: tuple[float, float, float, float, float], lo: int, hi: int, w: int) -> None:
        if hi > lo:
            buf = self._buf
            buf += params
            buf += (lo, hi, w)
            if len(buf) >= ITL_FLUSH:
                self._flush()

    def _flush(self) -> None:
        buf = self._buf
        # (np.fromiter converts a list of floats and ints ~2.5x faster than array.extend does)
        self._runs.frombytes(np.fromiter(buf, np.float64, len(buf)).tobytes())
        buf.clear()

    @property
    def runs(self) -> array:
        if self._buf:
            self._flush()
        return self._runs

    def extend(self, other: "ItlLog") -> None:
        self.step_d.extend(other.step_d)
        self.step_w.extend(other.step_w)
        self.runs.extend(other.runs)

    def _arrays(self):
        sd = np.frombuffer(self.step_d, dtype=np.float64) if len(self.step_d) else np.zeros(0)
        sw = np.frombuffer(self.step_w, dtype=np.float64) if len(self.step_w) else np.zeros(0)
        r = np.frombuffer(self.runs, dtype=np.float64).reshape(-1, 8) if len(self.runs) else np.zeros((0, 8))
        return sd, sw, r

    def count(self) -> int:
        sd, sw, r = self._arrays()
        return int(sw.sum() + ((r[:, 6] - r[:, 5]) * r[:, 7]).sum())

    def mean(self) -> float:
        sd, sw, r = self._arrays()
        n = sw.sum() + ((r[:, 6] - r[:, 5]) * r[:, 7]).sum()
        if n == 0:
            return math.nan
        tot = (sd * sw).sum()
        if len(r):
            tot += ((_run_sum(r, r[:, 6]) - _run_sum(r, r[:, 5])) * r[:, 7]).sum()
        return float(tot / n)

    def _count_le(self, x: float, sd, sw, r) -> float:
        n = sw[sd <= x].sum()
        if len(r):
            a1, b1, a2, b2, c, lo, hi, w = r.T
            y = x - c
            with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
                i1 = np.where(b1 > 0, np.floor((y - a1) / b1), np.where(a1 <= y, np.inf, -np.inf))
                i2 = np.where(b2 > 0, np.floor((y - a2) / b2), np.where(a2 <= y, np.inf, -np.inf))
            last = np.minimum(i1, i2)  # largest i with d(i) <= x
            k = np.clip(last - lo + 1, 0, hi - lo)
            n += (k * w).sum()
        return float(n)

    def quantiles(self, qs=(50, 90, 95, 99)) -> list[float]:
        """Percentiles with linear interpolation between order statistics (numpy's default method)."""
        sd, sw, r = self._arrays()
        n = self.count()
        if n == 0:
            return [math.nan] * len(qs)
        vals = [sd] if len(sd) else []
        if len(r):
            a1, b1, a2, b2, c, lo, hi, _ = r.T
            vals += [np.maximum(a1 + b1 * lo, a2 + b2 * lo) + c, np.maximum(a1 + b1 * (hi - 1), a2 + b2 * (hi - 1)) + c]
        allv = np.concatenate(vals)
        vmin, vmax = float(allv.min()), float(allv.max())

        def order_stat(k: int) -> float:  # the k-th smallest sample (0-based)
            lo_x, hi_x = vmin, vmax
            if self._count_le(lo_x, sd, sw, r) >= k + 1:
                return lo_x
            for _ in range(200):
                mid = (lo_x + hi_x) / 2
                if mid <= lo_x or mid >= hi_x:
                    break
                if self._count_le(mid, sd, sw, r) >= k + 1:
                    hi_x = mid
                else:
                    lo_x = mid
            return hi_x

        out = []
        for q in qs:
            h = (n - 1) * q / 100.0
            lo_k = int(math.floor(h))
            a = order_stat(lo_k)
            b = order_stat(min(lo_k + 1, n - 1)) if h > lo_k else a
            out.append(a + (h - lo_k) * (b - a))
        return out


def _run_sum(r: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Vectorised sum over i in [0, m) of max(a1 + b1*i, a2 + b2*i) + c, per row of r."""
    a1, b1, a2, b2, c = r[:, 0], r[:, 1], r[:, 2], r[:, 3], r[:, 4]
    swap = (a2 > a1) | ((a2 == a1) & (b2 > b1))
    A1, B1 = np.where(swap, a2, a1), np.where(swap, b2, b1)
    A2, B2 = np.where(swap, a1, a2), np.where(swap, b1, b2)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        cross = np.where(B2 > B1, np.clip(np.ceil((A1 - A2) / (B2 - B1)), 0, None), np.inf)
    cross = np.minimum(cross, m)
    tot = cross * A1 + B1 * (cross * (cross - 1) / 2)
    n = m - cross
    tot += np.where(n > 0, n * A2 + B2 * (n * (cross + m - 1) / 2), 0.0)
    return tot + m * c
