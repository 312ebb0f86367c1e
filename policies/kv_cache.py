"""KV-cache block pool with prefix caching. No policy in it.

The pool only allocates, frees, caches and evicts. Admission and preemption
decisions stay in the scheduler.

- Fixed-size blocks with reference counts.
- A full block of prompt tokens can be registered under a chained prefix hash
  `hash((parent_hash, block_content_ids))`; a later request whose prompt has
  the same hash chain reuses it (prefix caching).
- An unreferenced block that carries a hash stays cached and evictable, in
  LRU order; unhashed free blocks are handed out first, so caching never
  costs capacity.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence as Seq

from traces.workload import Request


def prefix_block_hashes(req: Request, block_size: int) -> list[int]:
    """Chained hashes of the request's full KV blocks that its trace hashes cover.

    The trace gives one id per `req.hash_block_size` prompt tokens (Mooncake:
    512); KV blocks are `block_size` tokens. KV block j's identity is the
    chain of trace ids up to the one covering it plus its offset inside that
    trace block, so equal trace prefixes give equal KV hash chains at any block
    size. Only blocks that lie entirely inside the prompt and the covered range
    count.
    """
    hb, ids = req.hash_block_size, req.block_hashes
    if not ids or hb <= 0:
        return []
    covered = min(req.input_tokens, len(ids) * hb)
    n = covered // block_size
    if n == 0:
        return []
    if hb % block_size == 0:
        # Chain once per trace block, then name its KV blocks by offset: per-block cost is arithmetic.
        per = hb // block_size
        out: list[int] = []
        parent = 0
        for k in range(-(-n // per)):
            parent = hash((parent, ids[k]))
            base = parent * per
            out.extend(range(base, base + min(per, n - k * per)))
        return out
    out = []
    parent = 0
    for j in range(n):  # block sizes not nested: name the block by every trace id it touches
        start = j * block_size
        key = (tuple(ids[start // hb:(start + block_size - 1) // hb + 1]), start % hb)
        parent = hash((parent, key))
        out.append(parent)
    return out


class BlockManager:
    """A pool of `num_blocks` KV blocks of `block_size` tokens each.

    Reference counts are kept for blocks that carry a prefix hash (only those
    can be shared). A block without a hash has exactly one owner while it is
    allocated, so handing it out and taking it back are plain list operations:
    the pool's cost does not grow with prompt length when nothing is shared.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.shared_ref: dict[int, int] = {}  # hashed block -> reference count (0: evictable)
        self.block_hash: list[int | None] = [None] * num_blocks
        self.cached: dict[int, int] = {}  # hash -> block id
        # Free blocks without a hash, as a stack: the end is handed out next (ids 0, 1, 2, ... at first).
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        # Unreferenced blocks that carry a hash: evictable, least recently freed first.
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self.evictions = 0
        self.queries = 0  # prompt tokens looked up in the prefix cache
        self.hits = 0  # of those, found

    # ---- capacity -------------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Blocks an allocation can get now: free plus evictable cached ones."""
        return len(self._free) + len(self._evictable)

    @property
    def num_evictable(self) -> int:
        """Cached blocks no sequence holds: reusable by a prefix hit, or evictable."""
        return len(self._evictable)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    @property
    def num_cached(self) -> int:
        return len(self.cached)

    @property
    def usage(self) -> float:
        return self.num_used / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def ref_count(self, block_id: int) -> int:
        r = self.shared_ref.get(block_id)
        if r is not None:
            return r
        return 0 if block_id in self._free_set() else 1

    def _free_set(self) -> set[int]:
        return set(self._free)

    # ---- prefix cache ---------------------------------------------------------
    def lookup(self, hashes: Seq[int]) -> list[int]:
        """Block ids of the longest cached prefix of `hashes`. No side effects."""
        out: list[int] = []
        if not self.enable_caching:
            return out
        cached = self.cached
        for h in hashes:
            b = cached.get(h)
            if b is None:
                break
            out.append(b)
        return out

    def count_query(self, queried: int, hit: int) -> None:
        self.queries += queried
        self.hits += hit

    def evictable_among(self, block_ids: Seq[int]) -> int:
        """How many of these (cached) blocks are unreferenced, i.e. counted in num_free."""
        ev = self._evictable
        return sum(1 for b in block_ids if b in ev)

    def acquire(self, block_ids: Seq[int]) -> None:
        """Take a reference on cached blocks (a prefix hit)."""
        ref, ev = self.shared_ref, self._evictable
        for b in block_ids:
            r = ref[b]
            if r == 0:
                del ev[b]
            ref[b] = r + 1

    def register(self, block_id: int, h: int) -> bool:
        """Name a full, computed, allocated block by its prefix hash. False if the hash is already cached
        under another block (this one then stays private)."""
        if not self.enable_caching or h in self.cached or self.block_hash[block_id] is not None:
            return False
        self.cached[h] = block_id
        self.block_hash[block_id] = h
        self.shared_ref[block_id] = 1
        return True

    def register_range(self, block_table: Seq[int], hashes: Seq[int], start: int, stop: int) -> None:
        """register(block_table[k], hashes[k]) for k in [start, stop)."""
        if not self.enable_caching:
            return
        if stop > min(len(block_table), len(hashes)):
            raise ValueError(f"register_range: blocks [{start}, {stop}) beyond the table ({len(block_table)}) "
                             f"or the hashes ({len(hashes)})")
        cached, bh, ref = self.cached, self.block_hash, self.shared_ref
        for h, b in zip(hashes[start:stop], block_table[start:stop]):
            if h not in cached:
                if bh[b] is None:
                    cached[h] = b
                    bh[b] = h
                    ref[b] = 1

    # ---- allocate / free ------------------------------------------------------
    def allocate(self, n: int) -> list[int]:
        """n new private blocks. Free blocks first, then the least recently used cached ones."""
        if n <= 0:
            return []
        free = self._free
        if n <= len(free):
            out = free[-n:]
            del free[-n:]
            out.reverse()
            return out
        if n > len(free) + len(self._evictable):
            raise MemoryError(f"asked for {n} KV blocks, {self.num_free} free")
        out = free[::-1]
        free.clear()
        ev, bh, cached, ref = self._evictable, self.block_hash, self.cached, self.shared_ref
        k = n - len(out)
        pop, append = ev.popitem, out.append
        for _ in range(k):
            b, _ = pop(False)  # (positional: the oldest; faster than the keyword)
            del cached[bh[b]]
            del ref[b]
            bh[b] = None
            append(b)
        self.evictions += k
        return out

    def free(self, block_ids: Seq[int], num_leading: int | None = None) -> None:
        """Drop one reference on each block, tail first (so a sequence's last blocks are evicted first).

        Only the first `num_leading` blocks may carry a hash (a sequence knows how many of its
        leading blocks it registered or reused); the rest go straight back to the free list.
        None means any block may.
        """
        free = self._free
        if num_leading == 0:  # (the common case: no leading hashed blocks, all straight back)
            free.extend(block_ids[::-1])
            return
        n = len(block_ids) if num_leading is None else min(num_leading, len(block_ids))
        if n < len(block_ids):
            free.extend(block_ids[:n - len(block_ids) - 1:-1] if n else block_ids[::-1])
        if n:
            ref, ev = self.shared_ref, self._evictable
            get = ref.get
            for b in reversed(block_ids[:n]):
                r = get(b)
                if r is None:
                    free.append(b)
                elif r > 1:
                    ref[b] = r - 1
                elif r == 1:
                    ref[b] = 0
                    ev[b] = None
                else:
                    raise RuntimeError(f"KV block {b} freed more often than referenced")

    def evict_cached(self, n: int) -> int:
        """Reclaim up to n evictable cached blocks (LRU first) into the plain free list."""
        ev, bh, cached, free, ref = self._evictable, self.block_hash, self.cached, self._free, self.shared_ref
        k = 0
        while ev and k < n:
            b, _ = ev.popitem(False)  # the oldest
            del cached[bh[b]]
            del ref[b]
            bh[b] = None
            free.append(b)
            k += 1
        self.evictions += k
        return k

    def check(self) -> None:
        """Assert internal consistency (tests)."""
        free = self._free
        fs = set(free)
        ev = set(self._evictable)
        assert len(fs) == len(free), "a block is on the free list twice"
        assert not fs & ev
        for b in fs:
            assert self.block_hash[b] is None and b not in self.shared_ref
        for b in ev:
            assert self.block_hash[b] is not None and self.shared_ref[b] == 0
        for b, r in self.shared_ref.items():
            assert r >= 0 and self.block_hash[b] is not None
        for h, b in self.cached.items():
            assert self.block_hash[b] == h
