import math
import os
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.result_cache import ResultCache, ResultCacheConfig, key_for_request
from traces.workload import Request


def test_exact_hit_miss_evict_expire_sequence():
    c: ResultCache[str] = ResultCache(ResultCacheConfig(capacity=2, ttl=10.0))
    c.put("a", "A", now=0.0)
    c.put("b", "B", now=1.0)
    assert c.get("a", now=2.0).value == "A"  # a becomes most recent
    c.put("c", "C", now=3.0)  # full: evicts b, the least recently used
    assert c.keys() == ["a", "c"]
    assert c.get("b", now=4.0) is None
    assert c.get("a", now=9.99).value == "A"
    assert c.get("a", now=10.0) is None  # written at 0, ttl 10: gone at 10 (reads do not extend it)
    entry = c.get("c", now=12.0)
    assert (entry.value, entry.stored_at, entry.expires_at) == ("C", 3.0, 13.0)
    assert c.get("c", now=13.0) is None
    s = c.stats
    assert (s.hits, s.misses, s.evictions, s.expirations) == (3, 3, 1, 2)
    assert len(c) == 0


def test_expired_entries_go_before_a_live_one_is_evicted():
    c: ResultCache[int] = ResultCache(ResultCacheConfig(capacity=2, ttl=5.0))
    c.put("a", 1, now=0.0)
    c.put("b", 2, now=3.0)
    c.put("c", 3, now=6.0)  # a expired at 5: no eviction needed
    assert c.keys() == ["b", "c"]
    assert (c.stats.evictions, c.stats.expirations) == (0, 1)


def test_overwrite_refreshes_ttl_and_recency_without_evicting():
    c: ResultCache[int] = ResultCache(ResultCacheConfig(capacity=2, ttl=5.0))
    c.put("a", 1, now=0.0)
    c.put("b", 2, now=1.0)
    c.put("a", 10, now=4.0)
    assert c.keys() == ["b", "a"]
    assert c.get("a", now=8.0).value == 10
    assert c.get("b", now=8.0) is None
    assert c.stats.evictions == 0


def test_infinite_ttl_never_expires():
    c: ResultCache[int] = ResultCache(ResultCacheConfig(capacity=1, ttl=math.inf))
    c.put("a", 1, now=0.0)
    assert c.get("a", now=1e12).value == 1


@pytest.mark.parametrize("kwargs, field", [({"capacity": 0}, "capacity"), ({"ttl": 0.0}, "ttl"),
                                           ({"ttl": -1.0}, "ttl")])
def test_config_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ResultCacheConfig(**kwargs)


def _req(**kw) -> Request:
    base = dict(index=0, arrival=0.0, input_tokens=1000, output_tokens=10)
    return Request(**{**base, **kw})


def test_key_for_request():
    assert key_for_request(_req(cache_key=42, block_hashes=(1, 2), hash_block_size=512)) == 42
    assert key_for_request(_req()) is None  # only a length: equal-length prompts would collide
    k = key_for_request(_req(block_hashes=(1, 2), hash_block_size=512))
    assert k == key_for_request(_req(index=7, arrival=3.0, block_hashes=(1, 2), hash_block_size=512))
    assert k != key_for_request(_req(block_hashes=(1, 3), hash_block_size=512))
    assert k != key_for_request(_req(input_tokens=1001, block_hashes=(1, 2), hash_block_size=512))
    assert 0 <= k < 2**64


def test_key_is_stable_across_processes():
    code = ("from policies.result_cache import key_for_request; from traces.workload import Request; "
            "print(key_for_request(Request(0, 0.0, 1000, 10, block_hashes=(1, 2), hash_block_size=512)))")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    keys = {subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2")}
    assert keys == {f"{key_for_request(_req(block_hashes=(1, 2), hash_block_size=512))}\n"}


class _Reference:
    """The obvious O(n) model of LRU + TTL."""

    def __init__(self, capacity: int, ttl: float):
        self.capacity, self.ttl = capacity, ttl
        self.d: dict[int, tuple[int, float, int]] = {}  # key -> (value, stored_at, last use)
        self.clock = 0
        self.stats = [0, 0, 0, 0]  # hits, misses, evictions, expirations

    def _expire(self, now):
        for k in [k for k, (_, t, _) in self.d.items() if now >= t + self.ttl]:
            del self.d[k]
            self.stats[3] += 1

    def get(self, key, now):
        self._expire(now)
        self.clock += 1
        if key not in self.d:
            self.stats[1] += 1
            return None
        v, t, _ = self.d[key]
        self.d[key] = (v, t, self.clock)
        self.stats[0] += 1
        return v

    def put(self, key, value, now):
        self._expire(now)
        self.clock += 1
        if key not in self.d and len(self.d) >= self.capacity:
            del self.d[min(self.d, key=lambda k: self.d[k][2])]
            self.stats[2] += 1
        self.d[key] = (value, now, self.clock)


ops = st.lists(st.tuples(st.booleans(), st.integers(0, 8), st.floats(0, 3, allow_nan=False)), max_size=200)


@settings(max_examples=200, deadline=None)
@given(capacity=st.integers(1, 5), ttl=st.floats(0.5, 10), ops=ops)
def test_matches_reference_never_over_capacity_never_expired(capacity, ttl, ops):
    c: ResultCache[int] = ResultCache(ResultCacheConfig(capacity=capacity, ttl=ttl))
    ref = _Reference(capacity, ttl)
    now = 0.0
    for i, (is_put, key, dt) in enumerate(ops):
        now += dt
        if is_put:
            c.put(key, i, now)
            ref.put(key, i, now)
        else:
            entry = c.get(key, now)
            assert (entry.value if entry else None) == ref.get(key, now)
            assert entry is None or now < entry.expires_at
        assert len(c) <= capacity
    s = c.stats
    assert [s.hits, s.misses, s.evictions, s.expirations] == ref.stats


def test_numpy_fields_give_the_same_key():
    import numpy as np

    plain = _req(block_hashes=(1, 2), hash_block_size=512)
    npy = _req(input_tokens=np.int64(1000), block_hashes=(np.int64(1), np.int64(2)), hash_block_size=512)
    assert key_for_request(npy) == key_for_request(plain)
