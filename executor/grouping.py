"""How the executor's paged attention groups a step's decode rows (pure Python: no torch, no numpy).

`PagedAttention` (executor/paged.py) runs one SDPA call per group of decode rows with similar context
lengths, each row padded to its group's longest (in whole KV blocks). On a CPU a step's decode attention
therefore costs per group and per padded key token, not only per useful context token. The simulator's
fitted cost models read the same two numbers (`decode_grouping`), so the rule lives here, importable
without torch, and both sides use this one copy.

The grouping depends only on each row's number of KV blocks, so it cannot change while no row crosses
a block boundary: `steps_same_grouping` says for how many decode steps that holds.
"""

from __future__ import annotations

from collections.abc import Sequence

# A decode group keeps absorbing rows while its padded size stays within this factor of the
# useful size, or within this many padded tokens per row: one SDPA call per group.
GROUP_WASTE = 1.25
GROUP_SLACK_TOKENS = 256


def group_rows(blocks: Sequence[int], block_size: int) -> list[tuple[int, int]]:
    """Split rows (their KV block counts, in batch order) into consecutive runs [lo, hi) whose padding to
    the run's longest row stays small."""
    out: list[tuple[int, int]] = []
    lo, longest, useful = 0, 0, 0
    for i, nb in enumerate(blocks):
        m, u, rows = max(longest, nb), useful + nb, i - lo + 1
        padded = m * rows
        if i > lo and padded > GROUP_WASTE * u and (padded - u) * block_size > GROUP_SLACK_TOKENS * rows:
            out.append((lo, i))
            lo, m, u = i, nb, nb
        longest, useful = m, u
    if blocks:
        out.append((lo, len(blocks)))
    return out


def decode_grouping(contexts: Sequence[int], block_size: int) -> tuple[int, int]:
    """(SDPA calls, padded key tokens) of decode rows with these context lengths (the new token included),
    grouped as PagedAttention groups them when they come longest first (ModelRunner's order)."""
    if not contexts:
        return 0, 0
    blocks = sorted((-(-c // block_size) for c in contexts), reverse=True)
    groups = group_rows(blocks, block_size)
    # Rows come longest first, so a group's longest row is its first.
    return len(groups), sum((hi - lo) * blocks[lo] for lo, hi in groups) * block_size


def steps_same_grouping(contexts: Sequence[int], block_size: int) -> int:
    """How many consecutive decode steps, starting with one at these contexts (each growing by one token
    per step), keep every row's KV block count, and so the grouping and the padded size, unchanged
    (>= 1; a row at an exact block multiple crosses into a new block at the next step)."""
    return min((-c) % block_size for c in contexts) + 1 if contexts else 1 << 62


def table_breaks(table: Sequence[int], n: int, start: int = 1, count: int = 0) -> int:
    """Breaks among the first n blocks of a block table: blocks not stored right after their predecessor
    (table[i] != table[i - 1] + 1). The attention gathers a row's blocks in table order, and a break starts
    a new memory stream (another TLB entry, no prefetch from the block before): on this project's 2-core
    CPU a decode step gathering 8 rows of 1k tokens from scattered blocks took about a sixth longer than
    from contiguous ones. Counting continues from table[start] with `count` breaks already found before it."""
    if n <= start:
        return count
    prev = table[start - 1]
    for b in table[start:n]:
        if b != prev + 1:
            count += 1
        prev = b
    return count


def decode_breaks(seqs: Sequence, block_size: int) -> int:
    """Breaks (`table_breaks`) over the KV blocks a step's decode rows attend to: each row's first
    ceil(context / block_size) blocks, its context num_computed + 1 (the new token included).

    Each sequence caches its count (Sequence.kv_breaks: (table, blocks counted, breaks)): a table only grows
    in place or is replaced by a new list, so a decode run of a long sequence costs one comparison per new
    block, not one per block per step."""
    total = 0
    for s in seqs:
        t = s.block_table
        n = (s.num_computed + block_size) // block_size
        c = s.kv_breaks
        if c is not None and c[0] is t and c[1] <= n:
            if c[1] == n:
                total += c[2]
                continue
            k = table_breaks(t, n, max(c[1], 1), c[2])
        else:
            k = table_breaks(t, n)
        s.kv_breaks = (t, n, k)
        total += k
    return total
