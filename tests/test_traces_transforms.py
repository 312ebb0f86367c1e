"""Workload transforms: pure, order-keeping, exact."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from traces.transforms import first_n, rebase, sample, scale_rate, window
from traces.workload import Workload


@st.composite
def workloads(draw) -> Workload:
    n = draw(st.integers(0, 40))
    # Gaps of zero or at least a nanosecond: trace clocks tick in micro- or milliseconds, and subnormal
    # gaps (1e-313 s) would only test float underflow, not the transforms.
    gaps = draw(st.lists(st.one_of(st.just(0.0), st.floats(1e-9, 100)), min_size=n, max_size=n))
    sessions = draw(st.one_of(st.none(), st.lists(st.sampled_from(["a", "b", "c", None]), min_size=n, max_size=n)))
    return Workload(arrival=np.cumsum(np.array(gaps, dtype=np.float64)),
                    input_tokens=np.arange(1, n + 1, dtype=np.int64), output_tokens=np.ones(n, dtype=np.int64),
                    session_id=sessions, think_time=np.full(n, 2.0) if sessions else None, meta={"format": "x"})


def small() -> Workload:
    return Workload(arrival=np.array([0.0, 1.0, 2.0, 4.0, 8.0]), input_tokens=np.arange(1, 6),
                    output_tokens=np.arange(11, 16), session_id=["a", "b", "a", None, "b"],
                    think_time=np.array([0.0, 0.0, 2.0, 0.0, 7.0]))


def test_exact_small_cases():
    w = small()
    s = scale_rate(w, 2.0)
    assert s.arrival.tolist() == [0.0, 0.5, 1.0, 2.0, 4.0] and s.think_time.tolist() == [0.0, 0.0, 1.0, 0.0, 3.5]
    assert scale_rate(w, 2.0, scale_think_time=False).think_time.tolist() == w.think_time.tolist()
    v = window(w, 1.0, 4.0)
    assert v.arrival.tolist() == [1.0, 2.0] and v.input_tokens.tolist() == [2, 3] and list(v.session_id) == ["b", "a"]
    assert rebase(v).arrival.tolist() == [0.0, 1.0]
    assert first_n(w, 2).input_tokens.tolist() == [1, 2] and len(first_n(w, 99)) == 5
    assert [t["op"] for t in rebase(v).meta["transforms"]] == ["window", "rebase"]
    assert w.arrival.tolist() == [0.0, 1.0, 2.0, 4.0, 8.0] and "transforms" not in w.meta  # input untouched


def test_sample_by_session_keeps_whole_sessions():
    w = small()
    for seed in range(10):
        s = sample(w, count=2, seed=seed, by_session=True)
        ids = list(s.session_id)
        for sid in ("a", "b"):
            assert ids.count(sid) in (0, 2)
        assert len({x for x in ids}) == 2  # two units: sessions a, b, or the session-less row


@pytest.mark.parametrize("kwargs", [{}, {"fraction": 0.5, "count": 2}, {"fraction": 1.5}, {"count": -1}])
def test_sample_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        sample(small(), **kwargs)


def test_bad_arguments():
    with pytest.raises(ValueError):
        scale_rate(small(), 0.0)
    with pytest.raises(ValueError):
        window(small(), 3.0, 1.0)
    with pytest.raises(ValueError):
        first_n(small(), -1)


@settings(max_examples=80, deadline=None)
@given(workloads(), st.floats(0.01, 100.0))
def test_scale_rate_divides_inter_arrivals(w, factor):
    s = scale_rate(w, factor)
    assert np.all(np.diff(s.arrival) >= 0)
    tol = 1e-12 * (w.arrival[-1] / factor if len(w) else 0.0)
    np.testing.assert_allclose(np.diff(s.arrival), np.diff(w.arrival) / factor, rtol=1e-12, atol=tol)


@settings(max_examples=40, deadline=None)
@given(workloads(), st.integers(-6, 6))
def test_scale_rate_by_power_of_two_is_exact(w, k):
    factor = 2.0 ** k
    assert np.array_equal(np.diff(scale_rate(w, factor).arrival), np.diff(w.arrival) / factor)


@settings(max_examples=80, deadline=None)
@given(workloads(), st.floats(0, 2000), st.floats(0, 2000), st.integers(0, 50), st.integers(0, 2 ** 32))
def test_transforms_keep_order_and_rows(w, t0, t1, n, seed):
    t0, t1 = min(t0, t1), max(t0, t1)
    key = lambda x: list(zip(x.arrival.tolist(), x.input_tokens.tolist()))  # noqa: E731
    rows = key(w)
    v = window(w, t0, t1)
    assert key(v) == [r for r in rows if t0 <= r[0] < t1]
    assert key(first_n(w, n)) == rows[:n]
    s = sample(w, fraction=0.5, seed=seed)
    assert len(s) == round(0.5 * len(w))
    got = key(s)
    assert got == [r for r in rows if r in got]  # a subsequence: order kept (input tokens are unique)
    assert key(sample(w, fraction=0.5, seed=seed)) == got  # seeded
    assert key(sample(w, count=n, seed=seed)) == [r for r in rows if r in key(sample(w, count=n, seed=seed))]
    assert len(sample(w, count=n, seed=seed)) == min(n, len(w))
