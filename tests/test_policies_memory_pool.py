import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.memory_pool import AllocFailure, FitStrategy, MemoryPool, MemoryPoolConfig


def _holey(strategy: FitStrategy) -> MemoryPool:
    """[a 0-10][free 10-30][c 30-40][free 40-80][e 80-90][free 90-100]"""
    pool = MemoryPool(MemoryPoolConfig(total=100, strategy=strategy))
    blocks = [pool.alloc(n)[0] for n in (10, 20, 10, 40, 10)]
    assert [(b.id, b.offset) for b in blocks] == [(0, 0), (1, 10), (2, 30), (3, 40), (4, 80)]
    pool.free(1)
    pool.free(3)
    assert pool.free_ranges() == [(10, 20), (40, 40), (90, 10)]
    return pool


def test_first_fit_takes_the_lowest_range_that_fits():
    pool = _holey(FitStrategy.FIRST_FIT)
    assert pool.alloc(8)[0].offset == 10
    assert pool.alloc(30)[0].offset == 40
    assert pool.alloc(12)[0].offset == 18
    assert pool.free_ranges() == [(70, 10), (90, 10)]


def test_best_fit_takes_the_smallest_range_that_fits():
    pool = _holey(FitStrategy.BEST_FIT)
    assert pool.alloc(8)[0].offset == 90
    assert pool.alloc(30)[0].offset == 40
    assert pool.alloc(12)[0].offset == 10
    assert pool.free_ranges() == [(22, 8), (70, 10), (98, 2)]


def test_failure_reasons_and_fragmentation():
    pool = _holey(FitStrategy.FIRST_FIT)
    assert (pool.used_bytes, pool.free_bytes, pool.largest_free) == (30, 70, 40)
    assert pool.fragmentation == pytest.approx(1 - 40 / 70)
    assert pool.alloc(50) == (None, AllocFailure.FRAGMENTED)
    assert pool.alloc(71) == (None, AllocFailure.OUT_OF_MEMORY)
    assert pool.used_bytes == 30


def test_free_coalesces_with_both_neighbours():
    pool = _holey(FitStrategy.FIRST_FIT)
    pool.free(2)  # joins [10, 30) and [40, 80)
    assert pool.free_ranges() == [(10, 70), (90, 10)]
    pool.free(4)
    assert pool.free_ranges() == [(10, 90)]
    pool.free(0)
    assert pool.free_ranges() == [(0, 100)]
    assert pool.fragmentation == 0.0
    with pytest.raises(KeyError, match="freed twice"):
        pool.free(0)


def test_compaction_slides_blocks_down_and_costs_bytes_over_bandwidth():
    pool = _holey(FitStrategy.FIRST_FIT)
    c = pool.compact(copy_bandwidth=10.0)
    assert c.moves == ((2, 30, 10), (4, 80, 20))
    assert (c.bytes_moved, c.seconds) == (20, 2.0)
    assert [(b.id, b.offset, b.size) for b in pool.blocks()] == [(0, 0, 10), (2, 10, 10), (4, 20, 10)]
    assert pool.free_ranges() == [(30, 70)]
    assert pool.fragmentation == 0.0
    assert pool.alloc(70)[0].offset == 30
    assert pool.compact(copy_bandwidth=1.0).bytes_moved == 0  # already packed, and now full
    assert pool.free_ranges() == []


def test_alignment_and_validation():
    pool = MemoryPool(MemoryPoolConfig(total=64, alignment=8))
    assert pool.alloc(5)[0].size == 8
    assert pool.alloc(9)[0].offset == 8
    with pytest.raises(ValueError, match="size"):
        pool.alloc(0)
    with pytest.raises(ValueError, match="copy_bandwidth"):
        pool.compact(0.0)
    for kw, field in (({"total": 0}, "total"), ({"total": 8, "alignment": 0}, "alignment"),
                      ({"total": 8, "strategy": "best_fit"}, "strategy")):
        with pytest.raises(ValueError, match=field):
            MemoryPoolConfig(**kw)


def _check_invariants(pool: MemoryPool) -> None:
    spans = sorted([(b.offset, b.size, "used") for b in pool.blocks()] + [(o, s, "free") for o, s in pool.free_ranges()])
    cursor = 0
    for (offset, size, kind), nxt in zip(spans, spans[1:] + [None]):
        assert size > 0 and offset == cursor  # no overlap, no gap: blocks and free ranges tile [0, total)
        cursor += size
        if kind == "free" and nxt is not None:
            assert nxt[2] == "used"  # free ranges are coalesced
    assert cursor == pool.total_bytes
    assert pool.used_bytes + pool.free_bytes == pool.total_bytes
    assert pool.used_bytes == sum(b.size for b in pool.blocks())
    assert 0.0 <= pool.fragmentation < 1.0


op = st.one_of(st.tuples(st.just("alloc"), st.integers(1, 300)), st.tuples(st.just("free"), st.integers(0, 10**6)),
               st.tuples(st.just("compact"), st.just(0)))


@settings(max_examples=200, deadline=None)
@given(total=st.integers(1, 1000), strategy=st.sampled_from(FitStrategy), alignment=st.sampled_from([1, 4, 16]),
       ops=st.lists(op, max_size=80))
def test_no_overlap_total_conserved_and_compaction_defragments(total, strategy, alignment, ops):
    pool = MemoryPool(MemoryPoolConfig(total=total, strategy=strategy, alignment=alignment))
    for kind, arg in ops:
        if kind == "alloc":
            free_before = pool.free_ranges()
            size = pool.aligned(arg)
            block, why = pool.alloc(arg)
            fits = [(o, s) for o, s in free_before if s >= size]
            if block is None:
                assert not fits
                assert why is (AllocFailure.OUT_OF_MEMORY if size > sum(s for _, s in free_before)
                               else AllocFailure.FRAGMENTED)
            else:
                assert why is None and block.size == size
                want = fits[0] if strategy is FitStrategy.FIRST_FIT else min(fits, key=lambda r: (r[1], r[0]))
                assert block.offset == want[0]
        elif kind == "free":
            ids = sorted(b.id for b in pool.blocks())
            if ids:
                pool.free(ids[arg % len(ids)])
        else:
            before = {b.id: b.size for b in pool.blocks()}
            c = pool.compact(copy_bandwidth=100.0)
            assert pool.fragmentation == 0.0
            assert {b.id: b.size for b in pool.blocks()} == before
            assert c.bytes_moved == sum(before[i] for i, _, _ in c.moves)
        _check_invariants(pool)
