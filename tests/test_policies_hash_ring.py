import os
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.hash_ring import DistributedCache, HashRing, HashRingConfig, primary_moved_fraction, ring_hash
from policies.result_cache import ResultCacheConfig

KEYS = [f"k{i}" for i in range(8)]


def _ring(nodes=("a", "b", "c", "d"), vnodes=8, replication=2) -> HashRing:
    return HashRing(nodes, HashRingConfig(vnodes=vnodes, replication=replication))


def _oracle(ring: HashRing, key) -> list:
    """Walk every vnode point clockwise from the key's point, by brute force."""
    h = ring_hash(repr(key))
    pts = sorted(((ring_hash(f"{n!r}#{i}") - h) % 2**64, repr(n), n)
                 for n in ring.nodes for i in range(ring.config.vnodes))
    out: list = []
    for _, _, n in pts:
        if n not in out:
            out.append(n)
    return out[:ring.config.replication]


def test_exact_placement_of_fixed_keys():
    ring = _ring()
    assert {k: ring.nodes_for(k) for k in KEYS} == {
        "k0": ["b", "d"], "k1": ["b", "d"], "k2": ["c", "b"], "k3": ["d", "b"],
        "k4": ["c", "d"], "k5": ["c", "d"], "k6": ["b", "d"], "k7": ["a", "b"]}
    assert all(ring.nodes_for(k) == _oracle(ring, k) for k in KEYS)
    ring.remove_node("b")
    assert {k: ring.nodes_for(k) for k in KEYS} == {
        "k0": ["d", "a"], "k1": ["d", "c"], "k2": ["c", "a"], "k3": ["d", "c"],
        "k4": ["c", "d"], "k5": ["c", "d"], "k6": ["d", "c"], "k7": ["a", "d"]}


def test_down_node_keeps_its_place_but_is_listed_last():
    ring = _ring()
    ring.mark_down("b")
    assert ring.replicas("k0") == ["b", "d"]
    assert ring.nodes_for("k0") == ["d", "b"]
    assert not ring.is_up("b")
    ring.mark_up("b")
    assert ring.nodes_for("k0") == ["b", "d"]


def test_fewer_nodes_than_replication_and_empty_ring():
    assert sorted(_ring(("x", "y"), replication=3).nodes_for("k")) == ["x", "y"]
    assert HashRing().nodes_for("k") == []
    assert HashRing().primary("k") is None


def test_membership_errors():
    ring = _ring()
    with pytest.raises(ValueError, match="already"):
        ring.add_node("a")
    with pytest.raises(KeyError):
        ring.mark_down("zz")
    with pytest.raises(KeyError):
        ring.remove_node("zz")
    for kw, field in (({"vnodes": 0}, "vnodes"), ({"replication": 0}, "replication")):
        with pytest.raises(ValueError, match=field):
            HashRingConfig(**kw)


def test_placement_is_stable_across_processes():
    code = ("from policies.hash_ring import HashRing, HashRingConfig; "
            "print(HashRing(['a', 'b', 'c'], HashRingConfig(vnodes=8)).nodes_for('k1'))")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    outs = {subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2")}
    assert outs == {f"{HashRing(['a', 'b', 'c'], HashRingConfig(vnodes=8)).nodes_for('k1')}\n"}


@pytest.mark.parametrize("n", [5, 10, 20])
def test_one_node_change_moves_about_one_in_n_keys(n):
    ring = HashRing(range(n), HashRingConfig(vnodes=100))
    keys = range(20_000)
    removed = ring.copy()
    removed.remove_node(0)
    added = ring.copy()
    added.add_node(n)
    assert 0.5 / n < primary_moved_fraction(ring, removed, keys) < 1.5 / n
    assert 0.5 / (n + 1) < primary_moved_fraction(ring, added, keys) < 1.5 / (n + 1)


nodes_st = st.lists(st.integers(0, 50), min_size=1, max_size=8, unique=True)
keys_st = st.lists(st.integers(0, 10**9), min_size=1, max_size=50)


@settings(max_examples=60, deadline=None)
@given(nodes=nodes_st, keys=keys_st, vnodes=st.integers(1, 20), replication=st.integers(1, 5))
def test_every_key_maps_to_distinct_nodes(nodes, keys, vnodes, replication):
    ring = HashRing(nodes, HashRingConfig(vnodes=vnodes, replication=replication))
    for k in keys:
        got = ring.nodes_for(k)
        assert len(got) == len(set(got)) == min(replication, len(nodes))
        assert set(got) <= set(nodes)
        assert got == _oracle(ring, k)


@settings(max_examples=60, deadline=None)
@given(nodes=nodes_st.filter(lambda ns: len(ns) >= 2), keys=keys_st, vnodes=st.integers(1, 20),
       replication=st.integers(1, 4), data=st.data())
def test_removal_moves_only_the_removed_nodes_keys(nodes, keys, vnodes, replication, data):
    ring = HashRing(nodes, HashRingConfig(vnodes=vnodes, replication=replication))
    gone = data.draw(st.sampled_from(nodes))
    after = ring.copy()
    after.remove_node(gone)
    for k in keys:
        assert (ring.primary(k) != after.primary(k)) == (ring.primary(k) == gone)
        if gone not in ring.replicas(k):
            assert after.replicas(k) == ring.replicas(k)


@settings(max_examples=60, deadline=None)
@given(nodes=nodes_st, keys=keys_st, vnodes=st.integers(1, 20))
def test_addition_moves_keys_only_to_the_new_node(nodes, keys, vnodes):
    ring = HashRing(nodes, HashRingConfig(vnodes=vnodes))
    after = ring.copy()
    after.add_node(99)
    for k in keys:
        assert after.primary(k) in (ring.primary(k), 99)


def test_distributed_cache_replicates_and_falls_back():
    ring = _ring(replication=2)
    dc: DistributedCache[str] = DistributedCache(ring, ResultCacheConfig(capacity=10, ttl=100.0))
    assert dc.put("k0", "v", now=0.0) == 2  # replicas b, d
    assert dc.get("k0", now=1.0).value == "v"
    ring.mark_down("b")
    assert dc.get("k0", now=2.0).value == "v"  # served by d
    assert (dc.stats.hits, dc.stats.fallback_hits) == (2, 1)
    assert dc.put("k1", "w", now=3.0) == 1  # only d is up of b, d
    ring.mark_down("d")
    assert dc.put("k1", "x", now=4.0) == 0
    assert dc.stats.failed_writes == 1
    assert dc.get("k1", now=5.0) is None
    ring.mark_up("b")
    ring.mark_up("d")
    assert dc.get("k1", now=6.0).value == "w"  # b never took it; d did


def test_distributed_cache_entries_expire_and_removed_nodes_lose_data():
    ring = _ring(replication=1)
    dc: DistributedCache[str] = DistributedCache(ring, ResultCacheConfig(capacity=10, ttl=5.0))
    dc.put("k0", "v", now=0.0)
    assert dc.get("k0", now=5.0) is None
    dc.put("k7", "v", now=10.0)  # primary a
    dc.remove_node("a")
    dc.add_node("a")
    assert dc.get("k7", now=11.0) is None


def test_numpy_integers_are_the_same_nodes_and_keys_as_ints():
    import numpy as np

    ring = HashRing([np.int64(0), np.int64(1), np.int64(2)], HashRingConfig(vnodes=8))
    plain = HashRing([0, 1, 2], HashRingConfig(vnodes=8))
    assert [plain.nodes_for(k) for k in range(20)] == [ring.nodes_for(np.int64(k)) for k in range(20)]
    ring.mark_down(1)  # an int names the numpy-int node
    assert not ring.is_up(np.int64(1))
