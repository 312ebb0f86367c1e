import pytest
from hypothesis import given
from hypothesis import strategies as st

from policies.reclaim import WatermarkReclaimer


def test_exact_decisions():
    r = WatermarkReclaimer(high=0.9, low=0.7)
    assert r.plan(0.85, evictable=100, capacity=100) == 0  # below high: nothing
    assert r.plan(0.90, evictable=100, capacity=100) == 0  # at high: nothing
    assert r.plan(0.95, evictable=100, capacity=100) == 25  # down to exactly low
    assert r.plan(0.95, evictable=10, capacity=100) == 10  # all it can
    assert r.plan(91 / 100, evictable=100, capacity=100) == 21  # not 22 from float error
    assert r.plan(0.95, evictable=0, capacity=100) == 0
    assert r.plan(1.0, evictable=5, capacity=7) == 3  # 7 -> 4 used; 4/7 <= 0.7 < 5/7


@pytest.mark.parametrize("high, low, field", [(1.5, 0.5, "high"), (0.0, 0.0, "high"), (0.8, 0.8, "low"),
                                              (0.8, -0.1, "low")])
def test_validation_names_the_field(high, low, field):
    with pytest.raises(ValueError, match=field):
        WatermarkReclaimer(high=high, low=low)


@given(high_low=st.tuples(st.integers(1, 100), st.integers(0, 99)).filter(lambda t: t[1] < t[0]),
       capacity=st.integers(1, 2000), data=st.data())
def test_reclaims_the_fewest_items_that_reach_low(high_low, capacity, data):
    r = WatermarkReclaimer(high=high_low[0] / 100, low=high_low[1] / 100)
    used = data.draw(st.integers(0, capacity))
    evictable = data.draw(st.integers(0, used))
    n = r.plan(used / capacity, evictable, capacity)
    if used / capacity <= r.high:
        assert n == 0
        return
    need = max(0, used - (high_low[1] * capacity) // 100)  # fewest k with (used - k) / capacity <= low, exactly
    assert n == min(need, evictable)
