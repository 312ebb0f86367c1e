"""Routers: which replica gets a new request. Tiny classes with one method.

A router sees each replica through a small read-only view: `num_outstanding`
(waiting + running), `num_running` (its batch), `pending_tokens()`, `healthy`,
and `kv` (its block manager, for prefix lookups). Routers never pick an unhealthy replica; when
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


    @property
    def num_running(self) -> int: ...


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
        bs = 0
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


class PredictedLatency:
    """The replica where the new request is predicted to finish first (a load-predicting router).

    For each healthy replica i, with the request's prompt p, output o and the replica's state:

        T_i = c_tok * (pending_i + p - cached_i) + o * (d0 + d1 * (running_i + 1))

    - pending_i = replica.pending_tokens(): prompt tokens still to compute plus output tokens still to
      generate for everything queued or running there; the replica drains them at c_tok s per token.
    - p - cached_i: the new prompt's tokens not already in replica i's prefix cache (cached_i = its
      longest cached prefix in tokens, when the request carries block hashes; 0 otherwise), at the same rate.
    - o * (d0 + d1 * (running_i + 1)): the new request's own decode, one token per step, each step as
      long as a decode step of the replica's running batch plus this request.

    The lowest T_i wins; ties go to the lowest index. A linear model, not a simulation: decode tokens
    already pending are charged at the prefill rate c_tok, which understates a small batch's decode
    time. Defaults are llama3-8b on one H100 (the analytic profile: 30 us per prefill token, 7.5 ms
    per decode step + 50 us per sequence in it); the simulator passes its own cost model's figures.
    """

    def __init__(self, seed: int = 0, c_tok: float = 3.0e-5, d0: float = 7.5e-3, d1: float = 5.0e-5):
        for name, v in (("c_tok", c_tok), ("d0", d0), ("d1", d1)):
            if not v >= 0:
                raise ValueError(f"router.{name}={v} is out of range; allowed: >= 0 (seconds)")
        self.c_tok, self.d0, self.d1 = c_tok, d0, d1

    def predict(self, req: Request, replica: Any, hashes: list[int] | None = None) -> float:
        """T_i above for one replica (seconds from now). `hashes`: the prompt's prefix block hashes at the
        replica's block size, if already computed."""
        cached = 0
        kv = getattr(replica, "kv", None)
        if req.block_hashes and kv is not None:
            if hashes is None:
                hashes = prefix_block_hashes(req, kv.block_size)
            cached = min(len(kv.lookup(hashes)) * kv.block_size, req.input_tokens - 1)
        running = getattr(replica, "num_running", replica.num_outstanding)
        work = replica.pending_tokens() + req.input_tokens - cached
        return self.c_tok * work + req.output_tokens * (self.d0 + self.d1 * (running + 1))

    def route(self, req: Request, replicas: Sequence[Any], now: float) -> int | None:
        best, best_t = None, 0.0
        hashes, bs = None, None
        for i, r in enumerate(replicas):
            if not r.healthy:
                continue
            kv = getattr(r, "kv", None)
            if req.block_hashes and kv is not None and kv.block_size != bs:
                bs = kv.block_size
                hashes = prefix_block_hashes(req, bs)
            t = self.predict(req, r, hashes)
            if best is None or t < best_t:
                best, best_t = i, t
        return best


ROUTERS: dict[str, Callable[..., Router]] = {
    "round_robin": RoundRobin,
    "least_outstanding": LeastOutstanding,
    "power_of_two": PowerOfTwo,
    "prefix_affinity": PrefixAffinity,
    "predicted_latency": PredictedLatency,
}


def create_router(name: str, seed: int = 0, **kwargs: Any) -> Router:
    try:
        factory = ROUTERS[name]
    except KeyError:
        raise ValueError(f"unknown router '{name}'; valid: {', '.join(sorted(ROUTERS))}") from None
    return factory(seed=seed, **kwargs)
