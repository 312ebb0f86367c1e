"""Closed-form decode runs and the compact ITL log against brute force."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sim.cost import DecodeRun, StepFeatures, load_cost_model
from traces.records import ItlLog

pos = st.floats(0.0, 1.0, allow_nan=False)
slope = st.floats(0.0, 0.01, allow_nan=False)


@settings(max_examples=200, deadline=None)
@given(pos, slope, pos, slope, st.floats(1e-6, 0.1), st.integers(1, 400))  # every step has overhead
def test_elapsed_is_the_sum_of_durations_and_step_at_inverts_it(a1, b1, a2, b2, c, k):
    run = DecodeRun(a1, b1, a2, b2, c)
    total = 0.0
    ends = []
    for i in range(k):
        total += run.duration(i)
        ends.append(total)
    for m in (1, k // 2 + 1, k):
        assert run.elapsed(m) == pytest.approx(ends[m - 1], rel=1e-9, abs=1e-12)
    for t in (0.0, ends[0] / 2, ends[k // 2], ends[-1], ends[-1] * 2):
        j = run.step_at(t, k)
        assert 0 <= j < k
        # the first step whose end is at or after t (or the last one)
        expect = next((i for i, e in enumerate(ends) if e >= t - 1e-12 * max(1.0, t)), k - 1)
        assert abs(j - expect) <= 1  # float ties at a boundary may land either side
        if j > 0:
            assert run.elapsed(j) < t or math.isclose(run.elapsed(j), t, rel_tol=1e-9)
        # step_end: the same step, and exactly the end that elapsed() gives for it (a cut run ends there)
        assert run.step_end(t, k) == (j, run.elapsed(j + 1))


def test_roofline_run_crosses_from_memory_to_compute_bound():
    c = load_cost_model("llama3-8b@h100-80gb")
    f = StepFeatures(0, 256, 0.0, 256 * 500, 256)
    run = c.decode_run(f)
    # large batches: the compute line overtakes the memory line as context grows
    assert run.b1 != run.b2
    t = 0.0
    for i in range(300):
        t += c.step_time(StepFeatures(0, 256, 0.0, 256 * (500 + i), 256))
    assert run.elapsed(300) == pytest.approx(t, rel=1e-9)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(1e-4, 0.1), st.integers(1, 5)), max_size=20),
       st.lists(st.tuples(pos, slope, pos, slope, st.floats(0, 0.01), st.integers(0, 30), st.integers(1, 30),
                          st.integers(1, 4)), max_size=8))
def test_itl_log_summaries_equal_expanded_samples(steps, runs):
    log = ItlLog()
    samples: list[float] = []
    for d, c in steps:
        log.step(d, c)
        samples += [d] * c
    for a1, b1, a2, b2, c, lo, n, w in runs:
        log.run((a1, b1, a2, b2, c), lo, lo + n, w)
        r = DecodeRun(a1, b1, a2, b2, c)
        for i in range(lo, lo + n):
            samples += [r.duration(i)] * w
    assert log.count() == len(samples)
    if not samples:
        assert math.isnan(log.mean())
        return
    assert log.mean() == pytest.approx(float(np.mean(samples)), rel=1e-9)
    np.testing.assert_allclose(log.quantiles((50, 90, 99)), np.percentile(samples, [50, 90, 99]), rtol=1e-9,
                               atol=1e-12)
