"""Watermark-driven reclamation ("GC") of cached, evictable items.

A pure decision: given how full a pool is and how many of its items could be
evicted, say how many to evict now. Nothing happens below the high
watermark; above it, enough items go to bring usage down to the low
watermark (or every evictable item, if that is not enough). The gap between
the marks is hysteresis: after a reclaim the pool can refill to `high`
before the next one. The decision holds no state, so the caller (e.g. the KV
block manager, in LRU order) decides which items go.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

_EPS = 1e-9  # absorbs float error in used_fraction * capacity


@dataclass(frozen=True)
class WatermarkReclaimer:
    high: float = 0.9  # reclaim when the used fraction exceeds this
    low: float = 0.7  # ... down to this

    def __post_init__(self) -> None:
        if not 0.0 < self.high <= 1.0:
            raise ValueError(f"WatermarkReclaimer.high must be in (0, 1], got {self.high}")
        if not 0.0 <= self.low < self.high:
            raise ValueError(f"WatermarkReclaimer.low must be in [0, high={self.high}), got {self.low}")

    def plan(self, used_fraction: float, evictable: int, capacity: int) -> int:
        """How many items to reclaim now.

        `used_fraction` is the share of the pool in use (cached items count as
        used), `evictable` how many items could be evicted, and `capacity` how
        many items the whole pool holds (each item is 1/capacity of it). The
        answer is the fewest items that bring usage to <= low, capped at
        `evictable`; 0 while usage <= high.
        """
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1 item, got {capacity}")
        if evictable < 0:
            raise ValueError(f"evictable must be >= 0, got {evictable}")
        if used_fraction <= self.high + _EPS:
            return 0
        need = math.ceil((used_fraction - self.low) * capacity - _EPS)
        return max(0, min(evictable, need))
