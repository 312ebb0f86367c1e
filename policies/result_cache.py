"""A result cache in front of the engines: LRU with a capacity and a TTL.

A request whose full input was answered before (same cache key) is served
from the cache without touching an engine. Entries expire `ttl` seconds after
they were written (reads do not extend a lifetime); among live entries the
least recently used is evicted when the cache is full.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Generic, Hashable, TypeVar

from traces.workload import Request

V = TypeVar("V")


@dataclass(frozen=True)
class ResultCacheConfig:
    capacity: int = 10_000  # entries
    ttl: float = 300.0  # seconds an entry lives after it was written; math.inf = never expires

    def __post_init__(self) -> None:
        if self.capacity < 1:
            raise ValueError(f"ResultCacheConfig.capacity must be >= 1, got {self.capacity}")
        if not self.ttl > 0:
            raise ValueError(f"ResultCacheConfig.ttl must be in (0, inf], got {self.ttl}")


@dataclass(frozen=True, slots=True)
class CacheEntry(Generic[V]):
    value: V
    stored_at: float
    expires_at: float  # the entry is live while now < expires_at


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0  # includes reads that found only an expired entry
    evictions: int = 0  # live entries pushed out by capacity
    expirations: int = 0  # entries removed because their TTL ran out

    @property
    def hit_rate(self) -> float:
        n = self.hits + self.misses
        return self.hits / n if n else 0.0


class ResultCache(Generic[V]):
    """LRU + TTL. Time is passed in; callers are expected to pass non-decreasing `now`."""

    def __init__(self, config: ResultCacheConfig | None = None) -> None:
        self.config = config or ResultCacheConfig()
        self.stats = CacheStats()
        self._lru: OrderedDict[Hashable, CacheEntry[V]] = OrderedDict()  # least recently used first
        # With one TTL for all, write order is expiry order: expired entries sit at the front.
        self._by_write: OrderedDict[Hashable, None] = OrderedDict()

    def get(self, key: Hashable, now: float) -> CacheEntry[V] | None:
        self.expire(now)
        entry = self._lru.get(key)
        if entry is not None and now >= entry.expires_at:  # reachable only if `now` went backwards
            self._drop(key)
            self.stats.expirations += 1
            entry = None
        if entry is None:
            self.stats.misses += 1
            return None
        self._lru.move_to_end(key)
        self.stats.hits += 1
        return entry

    def put(self, key: Hashable, value: V, now: float) -> None:
        """Store (or overwrite and refresh) `key`; evicts the LRU live entry when full."""
        self.expire(now)
        if key in self._lru:
            self._drop(key)
        elif len(self._lru) >= self.config.capacity:
            victim = next(iter(self._lru))
            self._drop(victim)
            self.stats.evictions += 1
        self._lru[key] = CacheEntry(value, now, now + self.config.ttl)
        self._by_write[key] = None

    def expire(self, now: float) -> int:
        """Remove every entry whose TTL has run out by `now`; returns how many."""
        n = 0
        while self._by_write:
            key = next(iter(self._by_write))
            if now < self._lru[key].expires_at:
                break
            self._drop(key)
            n += 1
        self.stats.expirations += n
        return n

    def _drop(self, key: Hashable) -> None:
        del self._lru[key]
        del self._by_write[key]

    def __len__(self) -> int:
        return len(self._lru)

    def keys(self) -> list[Hashable]:
        """Stored keys (expired ones included until the next call that passes `now`), LRU first."""
        return list(self._lru)


def stable_hash(*parts: Any) -> int:
    """A 64-bit hash of `repr(parts)` that is the same in every process (unlike `hash()`)."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "big")


def key_for_request(req: Request) -> int | None:
    """The result-cache key of a request, or None when it cannot be cached.

    `req.cache_key` (a hash of the full input, when the trace has one) wins.
    Otherwise the key hashes (input_tokens, hash_block_size, block_hashes).
    Caveats: a trace without text or block hashes gives only a prompt length,
    and equal-length prompts would collide, so such a request is uncacheable
    (None). Block hashes cover only the full hash blocks of the prompt: two
    prompts that share every full block and the length but differ in the
    trailing partial block get the same key. Traces that need exact results
    should carry `cache_key`.
    """
    if req.cache_key is not None:
        return int(req.cache_key)
    if not req.block_hashes:
        return None
    # int(): a numpy integer's repr differs from an int's, and the hash is over repr.
    return stable_hash(int(req.input_tokens), int(req.hash_block_size), tuple(int(h) for h in req.block_hashes))

