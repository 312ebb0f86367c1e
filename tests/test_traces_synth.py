"""Synthetic workloads: seeded, vectorised, with the asked-for rate and burstiness."""

from __future__ import annotations


import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from traces.synth import (
    EmpiricalLengths, FixedLengths, default_lengths, fit_lengths, gamma_arrivals, poisson_arrivals,
    resampled_arrivals, synthesize,
)
from traces.workload import Workload


def cv(a: np.ndarray) -> float:
    g = np.diff(a)
    return float(g.std() / g.mean())


def test_poisson_shape_and_rate():
    a = poisson_arrivals(200_000, 50.0, np.random.default_rng(1))
    assert a[0] == 0.0 and np.all(np.diff(a) >= 0) and a.dtype == np.float64
    assert (len(a) - 1) / a[-1] == pytest.approx(50.0, rel=0.01)
    assert cv(a) == pytest.approx(1.0, abs=0.02)


@settings(max_examples=12, deadline=None)
@given(st.floats(0.25, 4.0), st.floats(0.1, 1000.0), st.integers(0, 2 ** 32))
def test_gamma_cv_and_rate_close_to_target(target_cv, rate, seed):
    a = gamma_arrivals(300_000, rate, target_cv, np.random.default_rng(seed))
    assert cv(a) == pytest.approx(target_cv, rel=0.06)
    assert 1 / np.diff(a).mean() == pytest.approx(rate, rel=0.05)


def test_gamma_cv_zero_is_constant_rate():
    assert gamma_arrivals(4, 2.0, 0.0, np.random.default_rng(0)).tolist() == [0.0, 0.5, 1.0, 1.5]


@pytest.mark.parametrize("n, rate, c", [(-1, 1.0, 1.0), (5, 0.0, 1.0), (5, float("nan"), 1.0), (5, 1.0, -0.5)])
def test_bad_parameters(n, rate, c):
    with pytest.raises(ValueError):
        gamma_arrivals(n, rate, c, np.random.default_rng(0))


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 500), st.floats(0.01, 100.0), st.sampled_from([0.0, 0.5, 1.0, 3.0]), st.integers(0, 2 ** 32))
def test_same_seed_same_arrays(n, rate, c, seed):
    lengths = EmpiricalLengths(np.array([1, 50, 900]), np.array([7, 3, 200]))
    a = synthesize(n, rate, c, lengths=lengths, seed=seed)
    b = synthesize(n, rate, c, lengths=lengths, seed=seed)
    assert np.array_equal(a.arrival, b.arrival)
    assert np.array_equal(a.input_tokens, b.input_tokens) and np.array_equal(a.output_tokens, b.output_tokens)
    assert len(a) == n and np.all(np.diff(a.arrival) >= 0)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 300), st.lists(st.floats(0.0, 100.0), min_size=1, max_size=40),
       st.one_of(st.none(), st.floats(0.01, 50.0)), st.integers(0, 2 ** 32))
def test_resampled_arrivals_draw_only_the_given_gaps(n, gaps, cap, seed):
    """Arrivals from 0 whose every gap is one of the recorded gaps (cut to the cap), the same for the same seed."""
    a = resampled_arrivals(n, np.array(gaps), np.random.default_rng(seed), cap)
    assert len(a) == n and a.dtype == np.float64
    assert resampled_arrivals(n, np.array(gaps), np.random.default_rng(seed), cap).tolist() == a.tolist()
    if n:
        assert a[0] == 0.0
    allowed = np.array(gaps) if cap is None else np.minimum(gaps, cap)
    d = np.diff(a)
    assert np.all(d >= 0)
    assert all(np.isclose(allowed, x, rtol=1e-9, atol=1e-9 * (1 + a[-1])).any() for x in d)


def test_resampled_arrivals_keep_a_bursty_workloads_bursts():
    """A workload that arrives in bursts (many gaps near 0, a few long pauses) keeps its CV, unlike a Poisson
    process at its mean rate; a long pause is cut to the cap."""
    rng = np.random.default_rng(3)
    gaps = np.concatenate([np.full(95, 0.01), np.full(5, 20.0)])  # mean 1.01 s, CV about 4.3
    a = resampled_arrivals(200_000, gaps, rng)
    assert cv(a) == pytest.approx(gaps.std() / gaps.mean(), rel=0.05)
    assert 1 / np.diff(a).mean() == pytest.approx(1 / gaps.mean(), rel=0.05)
    cut = resampled_arrivals(2000, gaps, np.random.default_rng(3), max_gap=5.0)
    assert np.diff(cut).max() == pytest.approx(5.0) and set(np.round(np.diff(cut), 9).tolist()) == {0.01, 5.0}


@pytest.mark.parametrize("gaps, cap, match", [
    ([], None, "non-empty 1-D"), ([[0.1, 0.2]], None, "non-empty 1-D"), ([0.1, -0.5], None, "gap 1 is -0.5"),
    ([0.1, float("nan")], None, "gap 1 is nan"), ([0.1], 0.0, "max_gap must be"), ([0.1], float("inf"), "max_gap"),
])
def test_resampled_arrivals_refuse_bad_gaps(gaps, cap, match):
    with pytest.raises(ValueError, match=match):
        resampled_arrivals(5, np.array(gaps), np.random.default_rng(0), cap)
    with pytest.raises(ValueError, match="n must be >= 0"):
        resampled_arrivals(-1, np.array([0.1]), np.random.default_rng(0))


def test_different_seeds_differ_and_generator_accepted():
    a = synthesize(100, 5.0, seed=1, lengths=FixedLengths(10, 20))
    b = synthesize(100, 5.0, seed=2, lengths=FixedLengths(10, 20))
    assert not np.array_equal(a.arrival, b.arrival)
    c = synthesize(100, 5.0, seed=np.random.default_rng(1), lengths=FixedLengths(10, 20))
    assert np.array_equal(a.arrival, c.arrival)
    assert a.input_tokens.tolist() == [10] * 100 and a.output_tokens.tolist() == [20] * 100


def test_empirical_lengths_resample_joint_pairs():
    w = Workload(arrival=np.arange(3.0), input_tokens=np.array([10, 20, 30]), output_tokens=np.array([1, 2, 3]))
    s = synthesize(5000, 10.0, lengths=w, seed=3)
    pairs = set(zip(s.input_tokens.tolist(), s.output_tokens.tolist()))
    assert pairs == {(10, 1), (20, 2), (30, 3)}  # never (10, 3): pairs are kept together
    assert fit_lengths(w).source == w.name


def test_default_lengths_are_the_embedded_trace():
    d = default_lengths()
    assert len(d.input_tokens) == 19_366
    w = synthesize(1000, 2.0, seed=0)
    assert set(w.input_tokens.tolist()) <= set(d.input_tokens.tolist())
    assert w.meta["arrivals"] == {"process": "poisson", "rate": 2.0, "cv": 1.0, "seed": 0}


def test_million_requests_small():
    lengths = EmpiricalLengths(np.arange(1, 1001), np.arange(1000, 0, -1))
    w = synthesize(1_000_000, 1000.0, 2.0, lengths=lengths, seed=0)
    assert len(w) == 1_000_000
    assert w.arrival.nbytes + w.input_tokens.nbytes + w.output_tokens.nbytes == 24_000_000
