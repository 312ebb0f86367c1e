"""Consistent hashing with virtual nodes and replication, and a cache over it.

Each node owns `vnodes` points on a 64-bit ring (blake2b of the node's
`ring_label` and the point's number, so placement is the same in every
process). A key's replica set is the first `replication` distinct nodes met walking clockwise
from the key's point; the first of them is its primary. Removing a node moves
only the keys it owned (about 1/N of them); adding one takes about 1/(N+1).

Liveness does not change a key's replica set: a node that is down stays in
the ring, `nodes_for` lists the live replicas first, and reads fall back to
them. A write succeeds if at least one replica is live.
"""

from __future__ import annotations

import bisect
import hashlib
import numbers
from dataclasses import dataclass
from typing import Generic, Hashable, Iterable, TypeVar

from policies.result_cache import CacheEntry, ResultCache, ResultCacheConfig

Node = Hashable  # usually a replica index or a host name; nodes are told apart by ring_label()
V = TypeVar("V")


def ring_hash(label: str) -> int:
    return int.from_bytes(hashlib.blake2b(label.encode(), digest_size=8).digest(), "big")


def ring_label(x: Hashable) -> str:
    """The name a node or key is hashed and told apart by: repr(), with numpy integers read as ints."""
    if isinstance(x, numbers.Integral) and not isinstance(x, bool):
        return repr(int(x))
    return repr(x)


@dataclass(frozen=True)
class HashRingConfig:
    vnodes: int = 100  # points per node: more = evener shares, slower changes
    replication: int = 3  # distinct nodes holding each key

    def __post_init__(self) -> None:
        if self.vnodes < 1:
            raise ValueError(f"HashRingConfig.vnodes must be >= 1, got {self.vnodes}")
        if self.replication < 1:
            raise ValueError(f"HashRingConfig.replication must be >= 1, got {self.replication}")


class HashRing:
    def __init__(self, nodes: Iterable[Node] = (), config: HashRingConfig | None = None) -> None:
        self.config = config or HashRingConfig()
        # Sorted (point, node label); equal points (a 2^-64 event) are ordered by label, not insertion.
        self._ring: list[tuple[int, str]] = []
        self._nodes: dict[str, Node] = {}  # ring_label -> node, in insertion order
        self._down: set[str] = set()
        for node in nodes:
            self.add_node(node)

    @property
    def nodes(self) -> list[Node]:
        return list(self._nodes.values())

    def __len__(self) -> int:
        return len(self._nodes)

    def is_up(self, node: Node) -> bool:
        label = ring_label(node)
        return label in self._nodes and label not in self._down

    def add_node(self, node: Node) -> None:
        label = ring_label(node)
        if label in self._nodes:
            raise ValueError(f"node {label} is already in the ring")
        self._nodes[label] = node
        self._ring = sorted(self._ring + [(ring_hash(f"{label}#{i}"), label) for i in range(self.config.vnodes)])

    def remove_node(self, node: Node) -> None:
        label = self._label(node)
        self._ring = [pt for pt in self._ring if pt[1] != label]
        del self._nodes[label]
        self._down.discard(label)

    def mark_down(self, node: Node) -> None:
        self._down.add(self._label(node))

    def mark_up(self, node: Node) -> None:
        self._down.discard(self._label(node))

    def replicas(self, key: Hashable) -> list[Node]:
        """The key's replica set in ring order (primary first), ignoring liveness."""
        want = min(self.config.replication, len(self._nodes))
        out: list[str] = []
        n = len(self._ring)
        start = bisect.bisect_left(self._ring, (ring_hash(ring_label(key)),))
        for k in range(n):
            if len(out) == want:
                break
            label = self._ring[(start + k) % n][1]
            if label not in out:
                out.append(label)
        return [self._nodes[label] for label in out]

    def primary(self, key: Hashable) -> Node | None:
        reps = self.replicas(key)
        return reps[0] if reps else None

    def nodes_for(self, key: Hashable) -> list[Node]:
        """The key's `replication` distinct nodes (all nodes if fewer): live ones first, each part in ring order."""
        reps = self.replicas(key)
        return [r for r in reps if self.is_up(r)] + [r for r in reps if not self.is_up(r)]

    def copy(self) -> HashRing:
        ring = HashRing(config=self.config)
        ring._ring, ring._nodes, ring._down = list(self._ring), dict(self._nodes), set(self._down)
        return ring

    def _label(self, node: Node) -> str:
        label = ring_label(node)
        if label not in self._nodes:
            raise KeyError(f"node {label} is not in the ring")
        return label


def primary_moved_fraction(before: HashRing, after: HashRing, keys: Iterable[Hashable]) -> float:
    """Share of `keys` whose primary node differs between two rings (about 1/N for one node removed of N)."""
    keys = list(keys)
    if not keys:
        return 0.0
    return sum(before.primary(k) != after.primary(k) for k in keys) / len(keys)


@dataclass
class DistributedCacheStats:
    hits: int = 0
    misses: int = 0
    fallback_hits: int = 0  # hits served by a replica other than the key's primary
    failed_writes: int = 0  # writes that found no live replica


class DistributedCache(Generic[V]):
    """One LRU/TTL ResultCache per node of a HashRing; each key lives on its replica set.

    Change membership through this object (or the ring: a node's cache is
    created on first use). A node marked down keeps its contents (a partition,
    or a restart with warm memory); they may be stale but never outlive their TTL.
    """

    def __init__(self, ring: HashRing, cache_config: ResultCacheConfig | None = None) -> None:
        self.ring = ring
        self.cache_config = cache_config or ResultCacheConfig()
        self.stats = DistributedCacheStats()
        self._caches: dict[str, ResultCache[V]] = {}

    def cache(self, node: Node) -> ResultCache[V]:
        label = ring_label(node)
        if label not in self._caches:
            self._caches[label] = ResultCache(self.cache_config)
        return self._caches[label]

    def add_node(self, node: Node) -> None:
        self.ring.add_node(node)

    def remove_node(self, node: Node) -> None:
        """Take a node out of the ring; its contents are lost."""
        self.ring.remove_node(node)
        self._caches.pop(ring_label(node), None)

    def put(self, key: Hashable, value: V, now: float) -> int:
        """Write to every live replica; returns how many took it (0 = the write failed)."""
        n = 0
        for node in self.ring.nodes_for(key):
            if self.ring.is_up(node):
                self.cache(node).put(key, value, now)
                n += 1
        if n == 0:
            self.stats.failed_writes += 1
        return n

    def get(self, key: Hashable, now: float) -> CacheEntry[V] | None:
        """Read from the first live replica, in ring order, that holds a live entry for `key`."""
        reps = self.ring.replicas(key)
        for node in reps:
            if not self.ring.is_up(node):
                continue
            entry = self.cache(node).get(key, now)
            if entry is not None:
                self.stats.hits += 1
                self.stats.fallback_hits += node != reps[0]
                return entry
        self.stats.misses += 1
        return None
