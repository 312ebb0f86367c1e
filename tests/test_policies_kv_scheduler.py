"""KV block pool and continuous-batching scheduler: exact block ids, eviction order, preemption."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.kv_cache import BlockManager, prefix_block_hashes
from policies.routers import create_router
from policies.scheduler import ContinuousBatchingScheduler, SchedulerConfig
from policies.sequence import Sequence
from traces.workload import Request


def test_allocation_order_and_free_reuse():
    kv = BlockManager(num_blocks=6, block_size=4)
    a = kv.allocate(2)
    b = kv.allocate(3)
    assert (a, b) == ([0, 1], [2, 3, 4])
    kv.free(a)
    # freed tail first: block 1 then 0 go back; the last pushed (0) is handed out next
    assert kv.allocate(1) == [0]
    assert kv.num_free == 2
    with pytest.raises(MemoryError):
        kv.allocate(3)
    kv.check()


def test_prefix_cache_hits_and_lru_eviction_order():
    kv = BlockManager(num_blocks=4, block_size=4)
    x = kv.allocate(2)  # [0, 1]
    assert kv.register(x[0], 111) and kv.register(x[1], 222)
    y = kv.allocate(2)  # [2, 3]
    kv.register(y[0], 333)
    assert kv.lookup([111, 222, 999]) == [0, 1]
    kv.free(x)  # tail first: 1 then 0 become evictable (1 least recently freed)
    kv.free(y)  # 3 has no hash -> free list; 2 evictable after 1, 0
    assert kv.num_free == 4 and kv.num_cached == 3
    assert kv.allocate(1) == [3]  # plain free blocks go first: caching costs no capacity
    assert kv.allocate(2) == [1, 0]  # then LRU cached: 1, then 0
    assert kv.evictions == 2
    assert kv.lookup([111]) == [] and kv.lookup([333]) == [2]
    kv.acquire([2])  # a hit takes it off the evictable list
    assert kv.num_free == 0
    kv.check()


def test_shared_block_refcounts():
    kv = BlockManager(num_blocks=3, block_size=2)
    a = kv.allocate(1)
    kv.register(a[0], 7)
    kv.acquire(kv.lookup([7]))
    assert kv.ref_count(a[0]) == 2
    kv.free(a)
    assert kv.ref_count(a[0]) == 1 and kv.num_free == 2
    kv.free(a)
    assert kv.ref_count(a[0]) == 0 and kv.num_free == 3 and kv.num_cached == 1
    with pytest.raises(RuntimeError, match="freed more often"):
        kv.free(a)


def test_prefix_block_hashes_nest_trace_blocks():
    r1 = Request(0, 0.0, 1100, 1, block_hashes=(5, 6, 7), hash_block_size=512)
    r2 = Request(1, 0.0, 1100, 1, block_hashes=(5, 6, 8), hash_block_size=512)
    h1, h2 = prefix_block_hashes(r1, 16), prefix_block_hashes(r2, 16)
    assert len(h1) == 1100 // 16 == len(h2)  # the third trace block covers the partial tail
    assert h1[:64] == h2[:64] and h1[64] != h2[64]
    assert len(set(h1)) == len(h1)  # chained: equal content at another position differs
    assert prefix_block_hashes(Request(2, 0.0, 100, 1), 16) == []


def _seq(i, inp, out, t=0.0):
    return Sequence(Request(i, t, inp, out))


def test_chunked_prefill_budget_and_decode_first():
    s = ContinuousBatchingScheduler(SchedulerConfig(max_num_batched_tokens=64, block_size=16), num_blocks=100)
    a, b = _seq(0, 100, 3), _seq(1, 40, 2)
    s.add(a, 0.0)
    s.add(b, 0.0)
    p = s.schedule(0.0)
    assert [x.id for x in p.prefill] == [0] and p.prefill_tokens == [64]
    s.update(p, 0.0, 1.0)
    p = s.schedule(1.0)  # a continues its prompt (36 left), b gets the remaining 28 of the budget
    assert [x.id for x in p.prefill] == [0, 1] and p.prefill_tokens == [36, 28]
    s.update(p, 1.0, 2.0)
    assert a.num_generated == 1 and a.t_first_token == 2.0 and b.num_generated == 0
    p = s.schedule(2.0)
    assert [x.id for x in p.decode] == [0] and p.prefill_tokens == [12]


def test_preemption_recomputes_latest_admitted_first():
    s = ContinuousBatchingScheduler(SchedulerConfig(block_size=4), num_blocks=5)
    a, b = _seq(0, 8, 4), _seq(1, 8, 4)
    s.add(a, 0.0)
    s.add(b, 0.0)
    p = s.schedule(0.0)
    assert [x.id for x in p.prefill] == [0, 1]  # 2 blocks each: one block left
    s.update(p, 0.0, 1.0)
    p = s.schedule(1.0)  # position 8 needs a third block each: a gets the last one, b (admitted last) is preempted
    assert [x.id for x in p.preempted] == [1] and [x.id for x in p.decode] == [0]
    assert b.num_computed == 0 and b.block_table == [] and b.preemptions == 1 and b.num_generated == 1
    assert s.waiting.peek(1.0) is b


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 10), min_size=5, max_size=40), st.integers(0, 5))
def test_round_robin_and_power_of_two_pick_healthy_replicas(loads, seed):
    class R:
        def __init__(self, n, ok):
            self.num_outstanding, self.healthy = n, ok

    reps = [R(x, i % 3 != 0) for i, x in enumerate(loads)]
    for name in ("round_robin", "least_outstanding", "power_of_two"):
        r = create_router(name, seed=seed)
        for _ in range(10):
            i = r.route(Request(0, 0.0, 1, 1), reps, 0.0)
            assert reps[i].healthy
    lo = create_router("least_outstanding").route(Request(0, 0.0, 1, 1), reps, 0.0)
    assert reps[lo].num_outstanding == min(x.num_outstanding for x in reps if x.healthy)
    dead = [R(1, False)] * 3
    assert create_router("round_robin").route(Request(0, 0.0, 1, 1), dead, 0.0) is None


def test_unknown_names_fail_clearly():
    with pytest.raises(ValueError, match="unknown router 'fastest'; valid: least_outstanding"):
        create_router("fastest")
    with pytest.raises(ValueError, match=r"scheduler.max_num_seqs=0 is out of range"):
        SchedulerConfig(max_num_seqs=0)
    with pytest.raises(ValueError, match="scheduler.queue"):
        SchedulerConfig(queue="lifo")
