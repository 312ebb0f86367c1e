"""Two more waiting-queue disciplines: shortest job first with aging, and earliest deadline first.

Same interface as policies/queues.py: items have `.req` (a Request), `.order`
(tie-breaker) and `.t_arrival`; `push_front` is for preempted sequences,
which are served before anything else (most recent first). Ties are broken
by `.order`, so runs are reproducible. A sequence may be queued at most once.
"""

from __future__ import annotations

import heapq
from collections import deque
from typing import Any, Callable, Iterator, Mapping

from traces.workload import Request


class _KeyedQueue:
    """A min-heap on a per-item key fixed at push time, a front deque, and lazy removal."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, int, Any]] = []  # (key, order, push count, seq)
        self._live: dict[int, int] = {}  # id(seq) -> its push count, while it is in the heap
        self._front: deque[Any] = deque()
        self._pushes = 0

    def _key(self, seq: Any, now: float) -> float:
        raise NotImplementedError

    def push(self, seq: Any, now: float) -> None:
        self._check_new(seq)
        heapq.heappush(self._heap, (self._key(seq, now), seq.order, self._pushes, seq))
        self._live[id(seq)] = self._pushes
        self._pushes += 1

    def push_front(self, seq: Any) -> None:
        self._check_new(seq)
        self._front.appendleft(seq)

    def peek(self, now: float) -> Any | None:
        if self._front:
            return self._front[0]
        self._drop_removed()
        return self._heap[0][3] if self._heap else None

    def pop(self, now: float) -> Any:
        if self._front:
            return self._front.popleft()
        self._drop_removed()
        if not self._heap:
            raise IndexError("pop from an empty queue")
        seq = heapq.heappop(self._heap)[3]
        del self._live[id(seq)]
        return seq

    def remove(self, seq: Any) -> None:
        if self._live.pop(id(seq), None) is None:
            self._front.remove(seq)  # ValueError if it is not queued at all

    def __len__(self) -> int:
        return len(self._front) + len(self._live)

    def __iter__(self) -> Iterator[Any]:
        """In pop order (as of now, with no further pushes)."""
        yield from self._front
        for _, _, n, seq in sorted(self._heap, key=lambda e: e[:3]):
            if self._live.get(id(seq)) == n:
                yield seq

    def _drop_removed(self) -> None:
        h = self._heap
        while h and self._live.get(id(h[0][3])) != h[0][2]:
            heapq.heappop(h)

    def _check_new(self, seq: Any) -> None:
        if id(seq) in self._live or any(s is seq for s in self._front):
            raise ValueError(f"{seq!r} is already queued")


def _oracle_output(req: Request) -> float:
    return req.output_tokens


class SJFQueue(_KeyedQueue):
    """Shortest predicted job first, with aging so that nothing starves.

    Job size J = input_tokens + predicted output tokens (clamped at >= 0).
    The default prediction is the trace's true output length: an oracle,
    which only a simulator can have; a real deployment passes a predictor
    (e.g. a per-class mean or a learned length model) as `predict_output`.

    Aging: an item pushed at t0 has effective priority J - aging * (now - t0)
    (tokens, lower is served first; `aging` in tokens per second waited).
    Every item ages at the same rate, so the order is that of the fixed key
    J + aging * t0, and a heap on it stays correct without re-keying.

    Bound. Let J_min be the smallest size any job can have (>= 1, since
    input_tokens >= 1). An item y pushed at t_y can be served before an
    item x pushed at t_x only if J_y + aging*t_y <= J_x + aging*t_x, hence
    only if t_y <= t_x + W_x with W_x = (J_x - J_min) / aging
    (`overtake_window`). So x is popped within Q + A + 1 pops, where Q is
    the queue length when x was pushed and A the number of items pushed
    after x at times <= t_x + W_x (preempted sequences put back with
    push_front come on top of that). If the server pops at least every s seconds while the queue
    is non-empty, x waits at most s * (Q + A + 1) (`wait_bound`).
    """

    def __init__(self, aging: float = 0.0, predict_output: Callable[[Request], float] = _oracle_output) -> None:
        if not 0.0 <= aging < float("inf"):
            raise ValueError(f"SJFQueue.aging must be in [0, inf) tokens per second, got {aging}")
        super().__init__()
        self.aging = aging
        self.predict_output = predict_output

    def job_size(self, req: Request) -> float:
        return req.input_tokens + max(0.0, float(self.predict_output(req)))

    def overtake_window(self, job_size: float, min_job_size: float = 1.0) -> float:
        """Seconds after its push during which later pushes can still overtake a job of this size."""
        if self.aging == 0.0:
            return float("inf")
        return max(0.0, job_size - min_job_size) / self.aging

    @staticmethod
    def wait_bound(queue_len: int, pushes_in_window: int, pop_interval: float) -> float:
        """Longest wait of an item pushed behind `queue_len` items with `pushes_in_window` later overtakers."""
        return pop_interval * (queue_len + pushes_in_window + 1)

    def _key(self, seq: Any, now: float) -> float:
        return self.job_size(seq.req) + self.aging * now


class EDFQueue(_KeyedQueue):
    """Earliest deadline first: deadline = t_arrival + the SLO class's deadline (s).

    Classes missing from `deadlines` get `default_deadline`. Deadlines are
    fixed at push, so a late item keeps its place at the head (EDF does not
    drop or demote items that have already missed; that is admission's job).
    """

    def __init__(self, deadlines: Mapping[str, float] | None = None, default_deadline: float = 10.0) -> None:
        deadlines = dict(deadlines or {})
        for cls, d in deadlines.items():
            if not d >= 0:
                raise ValueError(f"EDFQueue.deadlines[{cls!r}] must be >= 0 s, got {d}")
        if not default_deadline >= 0:
            raise ValueError(f"EDFQueue.default_deadline must be >= 0 s, got {default_deadline}")
        super().__init__()
        self.deadlines = deadlines
        self.default_deadline = default_deadline

    def deadline(self, seq: Any) -> float:
        return seq.t_arrival + self.deadlines.get(seq.req.slo_class, self.default_deadline)

    def _key(self, seq: Any, now: float) -> float:
        return self.deadline(seq)
