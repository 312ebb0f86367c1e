"""A device memory pool: address-range allocation, coalescing and compaction.

Models one contiguous region of device memory [0, total) handed out as
ranges. Freed ranges coalesce with free neighbours. When enough memory is
free in total but no single range fits, an allocation fails as FRAGMENTED;
`compact()` then slides every allocation down to address 0 and reports the
bytes it copied and what that costs at a given copy bandwidth.

Allocations are named by id, not address: compaction moves them.
"""

from __future__ import annotations

import bisect
import enum
from dataclasses import dataclass
from typing import Iterator


class FitStrategy(enum.Enum):
    FIRST_FIT = "first_fit"  # the lowest-addressed free range that fits
    BEST_FIT = "best_fit"  # the smallest free range that fits (lowest address on ties)


class AllocFailure(enum.Enum):
    OUT_OF_MEMORY = "out_of_memory"  # less free in total than requested
    FRAGMENTED = "fragmented"  # enough free in total, but no single free range fits


@dataclass(frozen=True)
class MemoryPoolConfig:
    total: int  # bytes
    strategy: FitStrategy = FitStrategy.FIRST_FIT
    alignment: int = 1  # every size is rounded up to a multiple of this

    def __post_init__(self) -> None:
        if self.total < 1:
            raise ValueError(f"MemoryPoolConfig.total must be >= 1 byte, got {self.total}")
        if self.alignment < 1:
            raise ValueError(f"MemoryPoolConfig.alignment must be >= 1, got {self.alignment}")
        if not isinstance(self.strategy, FitStrategy):
            raise ValueError(f"MemoryPoolConfig.strategy must be one of {[s.value for s in FitStrategy]}, "
                             f"got {self.strategy!r}")


@dataclass(frozen=True, slots=True)
class Block:
    id: int
    offset: int
    size: int

    @property
    def end(self) -> int:
        return self.offset + self.size


@dataclass(frozen=True, slots=True)
class Compaction:
    bytes_moved: int
    seconds: float  # bytes_moved / copy bandwidth
    moves: tuple[tuple[int, int, int], ...]  # (block id, old offset, new offset), in copy order


class MemoryPool:
    def __init__(self, config: MemoryPoolConfig) -> None:
        self.config = config
        self._blocks: dict[int, Block] = {}
        self._free_starts: list[int] = [0]  # sorted, coalesced: no two free ranges touch
        self._free_sizes: dict[int, int] = {0: config.total}
        self._used = 0
        self._next_id = 0

    @property
    def total_bytes(self) -> int:
        return self.config.total

    @property
    def used_bytes(self) -> int:
        return self._used

    @property
    def free_bytes(self) -> int:
        return self.config.total - self._used

    @property
    def largest_free(self) -> int:
        return max(self._free_sizes.values(), default=0)

    @property
    def fragmentation(self) -> float:
        """1 - largest free range / total free; 0 when nothing is free or the free space is one range."""
        return 1.0 - self.largest_free / self.free_bytes if self.free_bytes else 0.0

    def free_ranges(self) -> list[tuple[int, int]]:
        """(offset, size) of each free range, by address."""
        return [(s, self._free_sizes[s]) for s in self._free_starts]

    def blocks(self) -> Iterator[Block]:
        """Live allocations, by address."""
        return iter(sorted(self._blocks.values(), key=lambda b: b.offset))

    def block(self, block_id: int) -> Block:
        return self._blocks[block_id]

    def aligned(self, size: int) -> int:
        a = self.config.alignment
        return -(-size // a) * a

    def alloc(self, size: int) -> tuple[Block | None, AllocFailure | None]:
        """Allocate `size` bytes (rounded up to the alignment): (block, None), or (None, why not)."""
        if size < 1:
            raise ValueError(f"allocation size must be >= 1 byte, got {size}")
        size = self.aligned(size)
        start = self._choose(size)
        if start is None:
            return None, AllocFailure.OUT_OF_MEMORY if size > self.free_bytes else AllocFailure.FRAGMENTED
        rest = self._free_sizes.pop(start) - size
        i = bisect.bisect_left(self._free_starts, start)
        if rest:
            self._free_starts[i] = start + size
            self._free_sizes[start + size] = rest
        else:
            del self._free_starts[i]
        block = Block(self._next_id, start, size)
        self._next_id += 1
        self._blocks[block.id] = block
        self._used += size
        return block, None

    def free(self, block_id: int) -> None:
        """Free an allocation and coalesce the range with its free neighbours."""
        block = self._blocks.pop(block_id, None)
        if block is None:
            raise KeyError(f"block {block_id} is not allocated (freed twice?)")
        self._used -= block.size
        start, size = block.offset, block.size
        i = bisect.bisect_left(self._free_starts, start)
        if i < len(self._free_starts) and self._free_starts[i] == block.end:  # merge the right neighbour
            size += self._free_sizes.pop(block.end)
            del self._free_starts[i]
        if i > 0 and self._free_starts[i - 1] + self._free_sizes[self._free_starts[i - 1]] == start:
            left = self._free_starts[i - 1]  # merge into the left neighbour
            self._free_sizes[left] += size
        else:
            self._free_starts.insert(i, start)
            self._free_sizes[start] = size

    def compact(self, copy_bandwidth: float) -> Compaction:
        """Slide every allocation down to be contiguous from address 0, in address order.

        Only blocks whose address changes are copied; moving down in address
        order never overwrites a block not yet moved. Cost = bytes moved /
        `copy_bandwidth` (bytes/s, e.g. device-to-device memcpy bandwidth).
        """
        if not copy_bandwidth > 0:
            raise ValueError(f"copy_bandwidth must be > 0 bytes/s, got {copy_bandwidth}")
        moves: list[tuple[int, int, int]] = []
        cursor = 0
        for block in list(self.blocks()):
            if block.offset != cursor:
                moves.append((block.id, block.offset, cursor))
                self._blocks[block.id] = Block(block.id, cursor, block.size)
            cursor += block.size
        self._free_starts = [cursor] if cursor < self.total_bytes else []
        self._free_sizes = {cursor: self.total_bytes - cursor} if cursor < self.total_bytes else {}
        moved = sum(self._blocks[bid].size for bid, _, _ in moves)
        return Compaction(moved, moved / copy_bandwidth, tuple(moves))

    def _choose(self, size: int) -> int | None:
        fits = (s for s in self._free_starts if self._free_sizes[s] >= size)
        if self.config.strategy is FitStrategy.FIRST_FIT:
            return next(fits, None)
        return min(fits, key=lambda s: (self._free_sizes[s], s), default=None)
