"""Routers: which replica gets a new request. Tiny classes with one method.

A router sees each replica through a small read-only view: `num_outstanding`
(waiting + running), `pending_tokens()`, `healthy`, and `kv` (its block
manager, for prefix lookups). Routers never pick an unhealthy replica; when
none is healthy they return None and the caller rejects the request.
"""

from __future__ import annotations

import random
from typing import Any, Callable, Protocol, Sequence

from policies.kv_cache import prefix_block_hashes
from traces.workload import Request


class ReplicaView(Protocol):
    healthy: bool

    @property
    def num_outstanding(self) -> int: ...
    def pending_tokens(self) -> int: ...


class Router(Protocol):
    def route(self, req: Request, replicas: Sequence[Any], now: float) -> int | None: ...


def _healthy(replicas: Sequence[Any]) -> list[int]:
    return [i for i, r in enumerate(replicas) if r.healthy]


class RoundRobin:
    def __init__(self, seed: int = 0):
        self._next = 0

    def route(self, req: Request, replicas: Sequence[Any], now: float) -> int | None:
        n = len(replicas)
        for k in range(n):
            i = (self._next + k) % n
            if replicas[i].healthy:
                self._next = i + 1
                return i
        return None


class LeastOutstanding:
    """Fewest requests waiting or running; ties to the lowest index."""

    def __init__(self, seed: int = 0):
        pass

    def route(self, req: Request, replicas: Sequence[Any], now: float) -> int | None:
        best, best_load = None, None
        for i, r in enumerate(replicas):
            if r.healthy:
                load = r.num_outstanding
                if best_load is None or load < best_load:
                    best, best_load = i, load
        return best


class PowerOfTwo:
    """Two healthy replicas drawn at random (seeded); the less loaded wins."""

    def __init__(self, seed: int = 0):
        self._rng = random.Random(seed)

    def route(self, req: Request, replicas: Sequence[Any], now: float) -> int | None:
        ok = _healthy(replicas)
        if not ok:
            return None
        if len(ok) == 1:
            return ok[0]
        a, b = self._rng.sample(ok, 2)
        return a if replicas[a].num_outstanding <= replicas[b].num_outstanding else b


class PrefixAffinity:
    """The replica holding the longest cached prefix of the prompt; when that replica is overloaded
    relative to the least loaded one (outstanding > least * imbalance + slack), the least loaded.
    With no hashes or no hit anywhere, the least loaded."""

    def __init__(self, seed: int = 0, imbalance: float = 1.5, slack: int = 4):
        if imbalance < 1:
            raise ValueError(f"router.imbalance={imbalance} is out of range; allowed: >= 1")
        if slack < 0:
            raise ValueError(f"router.slack={slack} is out of range; allowed: >= 0")
        self.imbalance, self.slack = imbalance, slack
        self._least = LeastOutstanding()
        self._hash_cache: dict[int, list[int]] = {}

    def route(self, req: Request, replicas: Sequence[Any], now: float) -> int | None:
        least = self._least.route(req, replicas, now)
        if least is None or not req.block_hashes:
            return least
        best, best_hit = least, 0
        hashes: list[int] | None = None
        for i, r in enumerate(replicas):
            if not r.healthy:
                continue
            if hashes is None or r.kv.block_size != bs:
                bs = r.kv.block_size
                hashes = prefix_block_hashes(req, bs)
            hit = len(r.kv.lookup(hashes))
            if hit > best_hit:
                best, best_hit = i, hit
        if best != least:
            low = replicas[least].num_outstanding
            if replicas[best].num_outstanding > low * self.imbalance + self.slack:
                return least
        return best


ROUTERS: dict[str, Callable[..., Router]] = {
    "round_robin": RoundRobin,
    "least_outstanding": LeastOutstanding,
    "power_of_two": PowerOfTwo,
    "prefix_affinity": PrefixAffinity,
}


def create_router(name: str, seed: int = 0, **kwargs: Any) -> Router:
    try:
        factory = ROUTERS[name]
    except KeyError:
        raise ValueError(f"unknown router '{name}'; valid: {', '.join(sorted(ROUTERS))}") from None
    return factory(seed=seed, **kwargs)
