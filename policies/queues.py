"""Waiting-queue disciplines behind one small interface, and a factory.

Items are `Sequence`-like objects with `.req`, `.order` (tie-breaker) and
`.t_arrival`. A preempted sequence goes back with `push_front` and is served
before anything else. `create_queue(name, **options)` builds one; the SJF and
EDF disciplines live in policies/disciplines.py.
"""

from __future__ import annotations

import heapq
from collections import deque
from typing import Any, Callable, Iterator, Protocol

from policies.disciplines import EDFQueue, SJFQueue


class RequestQueue(Protocol):
    def push(self, seq: Any, now: float) -> None: ...
    def push_front(self, seq: Any) -> None: ...
    def peek(self, now: float) -> Any | None: ...
    def pop(self, now: float) -> Any: ...
    def remove(self, seq: Any) -> None: ...
    def __len__(self) -> int: ...
    def __iter__(self) -> Iterator[Any]: ...


class FCFSQueue(deque):
    """First come, first served. (A deque itself, so that len(), iteration and remove() are the deque's
    own: the scheduler asks for the length several times per step.)"""

    def push(self, seq: Any, now: float) -> None:
        self.append(seq)

    def push_front(self, seq: Any) -> None:
        self.appendleft(seq)

    def peek(self, now: float) -> Any | None:
        return self[0] if self else None

    def pop(self, now: float) -> Any:  # (the queue's pop: the oldest; not deque.pop)
        return self.popleft()


class PriorityQueue:
    """Lowest `req.priority` first, then arrival order. Preempted sequences go first."""

    def __init__(self) -> None:
        self._heap: list[tuple[int, int, int, Any]] = []
        self._front: deque = deque()
        self._removed: set[int] = set()
        self._n = 0

    def push(self, seq: Any, now: float) -> None:
        heapq.heappush(self._heap, (seq.req.priority, seq.order, id(seq), seq))
        self._n += 1

    def push_front(self, seq: Any) -> None:
        self._front.appendleft(seq)
        self._n += 1

    def _clean(self) -> None:
        h, rm = self._heap, self._removed
        while h and id(h[0][3]) in rm:
            rm.discard(id(heapq.heappop(h)[3]))

    def peek(self, now: float) -> Any | None:
        if self._front:
            return self._front[0]
        self._clean()
        return self._heap[0][3] if self._heap else None

    def pop(self, now: float) -> Any:
        self._n -= 1
        if self._front:
            return self._front.popleft()
        self._clean()
        return heapq.heappop(self._heap)[3]

    def remove(self, seq: Any) -> None:
        if seq in self._front:
            self._front.remove(seq)
        else:
            self._removed.add(id(seq))
        self._n -= 1

    def __len__(self) -> int:
        return self._n

    def __iter__(self) -> Iterator[Any]:
        yield from self._front
        for _, _, i, s in sorted(self._heap):
            if i not in self._removed:
                yield s


# SJF aging default: a job gains one token of priority per 10 ms waited, so a prompt 1,000 tokens longer
# than a newcomer is overtaken for at most 10 s (see SJFQueue's bound).
SJF_AGING = 100.0  # tokens per second waited
EDF_DEFAULT_DEADLINE = 10.0  # s after the intended send time, for SLO classes without their own deadline


def _sjf(aging: float = SJF_AGING, **kwargs: Any) -> RequestQueue:
    return SJFQueue(aging=aging, **kwargs)


def _edf(deadlines: Any = None, default_deadline: float = EDF_DEFAULT_DEADLINE, **kwargs: Any) -> RequestQueue:
    return EDFQueue(deadlines=deadlines, default_deadline=default_deadline, **kwargs)


# Every factory works with no arguments (sane defaults); keyword arguments override them.
QUEUES: dict[str, Callable[..., RequestQueue]] = {
    "fcfs": FCFSQueue,
    "priority": PriorityQueue,
    "sjf": _sjf,  # shortest predicted job first, with aging (policies/disciplines.py)
    "edf": _edf,  # earliest deadline first, per SLO class (policies/disciplines.py)
}


def create_queue(name: str, **kwargs: Any) -> RequestQueue:
    try:
        factory = QUEUES[name]
    except KeyError:
        raise ValueError(f"unknown queue discipline '{name}'; valid: {', '.join(sorted(QUEUES))}") from None
    return factory(**kwargs)
