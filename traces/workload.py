"""The canonical workload model: a columnar table of requests.

A Workload holds one row per request in numpy arrays (so a million-request
trace costs tens of megabytes, not gigabytes of Python objects). A `Request`
is the row view a scheduler or router sees; it is built on demand.

Times are seconds from the start of the trace. Token counts are integers.
Optional columns are None when the trace has no such field.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Iterator, NamedTuple, Sequence

import numpy as np


class TraceError(ValueError):
    """Bad input in a trace: names the file, line (1-based, None if not line-based) and field."""

    def __init__(self, path: str, line: int | None, field: str | None, message: str):
        self.path, self.line, self.field, self.message = str(path), line, field, message
        where = self.path
        if line is not None:
            where += f", line {line}"
        if field:
            where += f", field '{field}'"
        super().__init__(f"{where}: {message}")


class Request(NamedTuple):
    """One request as recorded in a trace (immutable; a named tuple because the simulator builds one per
    request on its hot path, and a tuple is built several times faster than a frozen dataclass)."""

    index: int  # row number in the workload; the id used in records
    arrival: float  # intended send time, s from trace start
    input_tokens: int
    output_tokens: int
    block_hashes: tuple[int, ...] = ()  # one id per `hash_block_size` tokens of prompt; equal ids = equal prefix
    hash_block_size: int = 0  # tokens per entry of block_hashes (0 when there are none)
    session_id: str | None = None
    step: int = 0  # position in its session (0-based)
    think_time: float = 0.0  # delay after the previous step of the session finished
    priority: int = 0  # lower value = more urgent
    slo_class: str = ""
    cache_key: int | None = None  # result-cache key (hash of the full input), when known


@dataclass(frozen=True)
class Workload:
    """A set of requests in columnar form, sorted by arrival time."""

    arrival: np.ndarray  # float64, seconds, non-decreasing
    input_tokens: np.ndarray  # int64, >= 1
    output_tokens: np.ndarray  # int64, >= 1
    block_hashes: Sequence[tuple[int, ...]] | None = None
    hash_block_size: int = 0
    session_id: Sequence[str | None] | None = None
    step: np.ndarray | None = None  # int64
    think_time: np.ndarray | None = None  # float64
    priority: np.ndarray | None = None  # int64
    slo_class: Sequence[str] | None = None
    cache_key: Sequence[int | None] | None = None
    name: str = "workload"
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.arrival)
        for col in ("input_tokens", "output_tokens", "block_hashes", "session_id", "step",
                    "think_time", "priority", "slo_class", "cache_key"):
            v = getattr(self, col)
            if v is not None and len(v) != n:
                raise ValueError(f"workload '{self.name}': column {col} has {len(v)} rows, expected {n}")
        if self.block_hashes is not None and self.hash_block_size <= 0:
            raise ValueError(f"workload '{self.name}': block_hashes given without a positive hash_block_size")
        if n and np.any(np.diff(self.arrival) < 0):
            raise ValueError(f"workload '{self.name}': arrival times must be non-decreasing")

    def __len__(self) -> int:
        return len(self.arrival)

    def request(self, i: int) -> Request:
        return self._rows(i)

    @cached_property
    def _rows(self):
        """Row i as a Request, from the columns converted to Python lists once (the hot path builds one
        Request per simulated request; indexing numpy arrays element by element costs more than the rest)."""
        n = len(self)
        arrival, inp, out = self.arrival.tolist(), self.input_tokens.tolist(), self.output_tokens.tolist()
        none, zero, zf = [None] * n, [0] * n, [0.0] * n
        hashes = list(self.block_hashes) if self.block_hashes is not None else [()] * n
        hbs = self.hash_block_size if self.block_hashes is not None else 0
        session = list(self.session_id) if self.session_id is not None else none
        step = self.step.tolist() if self.step is not None else zero
        think = self.think_time.tolist() if self.think_time is not None else zf
        prio = self.priority.tolist() if self.priority is not None else zero
        slo = list(self.slo_class) if self.slo_class is not None else [""] * n
        key = list(self.cache_key) if self.cache_key is not None else none
        new = tuple.__new__

        def row(i: int) -> Request:
            if i < 0:
                i += n
            return new(Request, (i, arrival[i], inp[i], out[i], hashes[i], hbs, session[i], step[i], think[i],
                                 prio[i], slo[i], key[i]))

        return row

    def __iter__(self) -> Iterator[Request]:
        return (self.request(i) for i in range(len(self)))

    @property
    def span(self) -> float:
        return float(self.arrival[-1] - self.arrival[0]) if len(self) else 0.0

    def take(self, idx: np.ndarray | Sequence[int], name: str | None = None) -> "Workload":
        """Rows `idx` (must keep arrival order) as a new workload."""
        idx = np.asarray(idx, dtype=np.int64)

        def pick(col):
            if col is None:
                return None
            if isinstance(col, np.ndarray):
                return col[idx]
            return [col[i] for i in idx]

        return Workload(
            arrival=self.arrival[idx], input_tokens=self.input_tokens[idx],
            output_tokens=self.output_tokens[idx], block_hashes=pick(self.block_hashes),
            hash_block_size=self.hash_block_size, session_id=pick(self.session_id),
            step=pick(self.step), think_time=pick(self.think_time), priority=pick(self.priority),
            slo_class=pick(self.slo_class), cache_key=pick(self.cache_key),
            name=name or self.name, meta=dict(self.meta),
        )

    @staticmethod
    def from_requests(requests: Sequence[Request], name: str = "workload", meta: dict | None = None) -> "Workload":
        """Build from Request rows (sorted by arrival; indices are renumbered)."""
        rs = sorted(requests, key=lambda r: r.arrival)
        has = lambda attr, default: any(getattr(r, attr) != default for r in rs)  # noqa: E731
        hbs = {r.hash_block_size for r in rs if r.block_hashes}
        if len(hbs) > 1:
            raise ValueError(f"workload '{name}': requests mix hash block sizes {sorted(hbs)}")
        return Workload(
            arrival=np.array([r.arrival for r in rs], dtype=np.float64),
            input_tokens=np.array([r.input_tokens for r in rs], dtype=np.int64),
            output_tokens=np.array([r.output_tokens for r in rs], dtype=np.int64),
            block_hashes=[r.block_hashes for r in rs] if hbs else None,
            hash_block_size=hbs.pop() if hbs else 0,
            session_id=[r.session_id for r in rs] if has("session_id", None) else None,
            step=np.array([r.step for r in rs], dtype=np.int64) if has("step", 0) else None,
            think_time=np.array([r.think_time for r in rs], dtype=np.float64) if has("think_time", 0.0) else None,
            priority=np.array([r.priority for r in rs], dtype=np.int64) if has("priority", 0) else None,
            slo_class=[r.slo_class for r in rs] if has("slo_class", "") else None,
            cache_key=[r.cache_key for r in rs] if has("cache_key", None) else None,
            name=name, meta=dict(meta or {}),
        )
