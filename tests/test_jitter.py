"""Step-time jitter (sim.jitter): the table, its draws, and the simulator with it."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.scheduler import SchedulerConfig
from sim.cluster import simulate
from sim.config import SimConfig
from sim.cost import load_cost_model
from sim.jitter import KINDS, MIN_STEPS, StepJitter, describe
from traces.workload import Request, Workload


def _cost():
    return load_cost_model("llama3-8b@h100-80gb")


def _workload(n: int = 40, gap: float = 0.05) -> Workload:
    return Workload.from_requests([Request(i, gap * i, 200 + 150 * (i % 4), 8 + 4 * (i % 3)) for i in range(n)],
                                  name="w")


def _cfg(seed: int = 0, **kw) -> SimConfig:
    return SimConfig(replicas=2, seed=seed, scheduler=SchedulerConfig(prefix_caching=False), **kw)


def _inverse_cdf_mean(j: StepJitter, kind: str) -> float:
    q = j.quantiles[kind]
    return float(np.mean((q[1:] + q[:-1]) / 2))


def test_table_from_ratios_is_their_spread_at_mean_one():
    rng = np.random.default_rng(3)
    dec = rng.lognormal(0.1, 0.1, 500)  # level 1.1-ish: the table keeps the spread, not the level
    pre = np.r_[np.full(90, 1.0), np.full(10, 2.0)]  # one step in ten takes twice as long
    j = StepJitter.from_ratios({"decode": dec, "with_prefill": pre}, source="test")
    for kind in KINDS:
        assert _inverse_cdf_mean(j, kind) == pytest.approx(1.0, abs=1e-12)
    assert j.quantile("decode", 0.5) == pytest.approx(np.median(dec) / dec.mean(), rel=0.01)
    # the long tail stays: p50 below 1 (the mean), the top above it by the ratio of the two step times
    assert j.quantile("with_prefill", 0.5) < 1.0 < j.quantile("with_prefill", 0.99)
    assert j.quantile("with_prefill", 1.0) / j.quantile("with_prefill", 0.0) == pytest.approx(2.0)
    assert j.steps == {"decode": 500, "with_prefill": 100} and j.source == "test"


def test_a_kind_with_too_few_steps_gets_no_jitter():
    j = StepJitter.from_ratios({"decode": np.linspace(0.8, 1.2, 50), "with_prefill": [1.0, 1.5]})
    assert set(j.quantiles) == {"decode"} and j.steps["with_prefill"] == 2 < MIN_STEPS
    assert j.quantile("with_prefill", 0.9) == 1.0
    draw = j.sampler(0, 0)
    assert all(draw(True) == 1.0 for _ in range(100))
    assert "with prefill" not in describe(j) and describe(None) == "none"


@pytest.mark.parametrize("tables, match", [
    ({"prefill": [1.0, 2.0]}, "unknown step kind"),
    ({"decode": [1.0]}, "at least 2"),
    ({"decode": [1.0, math.nan]}, "finite and > 0"),
    ({"decode": [0.0, 1.0]}, "finite and > 0"),
    ({"decode": [1.2, 1.0]}, "must not decrease"),
])
def test_bad_tables_are_refused(tables, match):
    with pytest.raises(ValueError, match=match):
        StepJitter(tables)


def test_bad_ratios_are_refused_not_skipped():
    with pytest.raises(ValueError, match="decode: step time ratios must be finite and > 0"):
        StepJitter.from_ratios({"decode": [1.0] * 10 + [math.inf]})
    with pytest.raises(ValueError, match="n=1 is out of range"):
        StepJitter.from_ratios({"decode": [1.0] * 10}, n=1)
    with pytest.raises(ValueError, match="no 'quantiles'"):
        StepJitter.from_dict({})


def test_round_trip_and_pooling():
    a = StepJitter.from_ratios({"decode": np.linspace(0.8, 1.4, 60), "with_prefill": np.linspace(0.9, 1.5, 20)})
    b = StepJitter.from_ratios({"decode": np.linspace(0.9, 1.1, 60)})
    back = StepJitter.from_dict(a.to_dict())
    for kind in KINDS:
        assert np.array_equal(back.quantiles[kind], a.quantiles[kind])
    p = StepJitter.pooled([a, b])
    assert np.allclose(p.quantiles["decode"], (a.quantiles["decode"] + b.quantiles["decode"]) / 2)
    assert np.allclose(p.quantiles["with_prefill"], a.quantiles["with_prefill"])  # only a has it
    assert p.steps == {"decode": 120, "with_prefill": 20}


def test_draws_follow_the_table_per_replica_stream():
    j = StepJitter.from_ratios({"decode": np.r_[np.full(80, 1.0), np.full(20, 1.5)],
                                "with_prefill": np.linspace(0.7, 1.9, 41)})
    d1, d2, other = j.sampler(7, 0), j.sampler(7, 0), j.sampler(7, 1)
    xs = [d1(False) for _ in range(20000)]
    assert xs[:50] == [d2(False) for _ in range(50)]  # same seed and replica: the same draws
    assert xs[:50] != [other(False) for _ in range(50)]
    q = j.quantiles["decode"]
    assert min(xs) >= q[0] and max(xs) <= q[-1]
    assert np.mean(xs) == pytest.approx(1.0, abs=0.01)
    assert np.percentile(xs, 50) == pytest.approx(j.quantile("decode", 0.5), abs=0.02)


def test_a_table_of_ones_changes_nothing():
    """Jitter of exactly 1 gives the records of the run without jitter (decode-run jumps off with jitter, and
    jump mode gives the same records as step by step)."""
    w, cfg = _workload(), _cfg()
    ones = StepJitter({"decode": [1.0, 1.0], "with_prefill": [1.0, 1.0]})
    a = simulate(w, cfg, cost=_cost())
    b = simulate(w, cfg, cost=_cost(), jitter=ones)
    for k in ("first_token", "finish"):
        assert np.allclose(a.records[k], b.records[k], rtol=1e-12, atol=1e-12)
    assert b.meta["step_jitter"]["decode"]["p50"] == 1.0 and "step_jitter" not in a.meta


def test_jitter_spreads_step_times_and_keeps_their_level():
    """Decode-only work at one replica: with a mean-1 jitter the steps' busy time stays the model's (within the
    draws' own error) while request latencies spread."""
    w = Workload.from_requests([Request(i, 0.0, 64, 400) for i in range(4)], name="dec")
    cfg = SimConfig(replicas=1, seed=1, scheduler=SchedulerConfig(prefix_caching=False))
    j = StepJitter.from_ratios({"decode": np.r_[np.full(70, 0.9), np.full(30, 1.6)],
                                "with_prefill": np.r_[np.full(70, 0.9), np.full(30, 1.6)]})
    a = simulate(w, cfg, cost=_cost())
    b = simulate(w, cfg, cost=_cost(), jitter=j)
    assert b.replicas[0].busy_time == pytest.approx(a.replicas[0].busy_time, rel=0.03)
    assert a.replicas[0].steps == b.replicas[0].steps  # the same steps, other durations
    assert not np.allclose(a.records["finish"], b.records["finish"])


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 30), gap=st.floats(0.0, 0.2))
def test_jittered_runs_lose_no_request_and_repeat_with_the_seed(seed, n, gap):
    j = StepJitter.from_ratios({"decode": np.linspace(0.6, 2.0, 50), "with_prefill": np.linspace(0.8, 1.6, 30)})
    w, cfg = _workload(n, gap), _cfg(seed)
    a = simulate(w, cfg, cost=_cost(), jitter=j)
    b = simulate(w, cfg, cost=_cost(), jitter=j)
    assert a.n == n and a.status_counts()["ok"] == n
    for k in ("first_token", "finish", "replica"):
        assert np.array_equal(a.records[k], b.records[k])
    assert np.all(a.records["first_token"] >= a.records["arrival"])
    assert np.all(a.records["finish"] >= a.records["first_token"])


def test_another_seed_draws_other_step_times():
    j = StepJitter.from_ratios({"decode": np.linspace(0.6, 2.0, 50), "with_prefill": np.linspace(0.8, 1.6, 30)})
    w = _workload()
    a = simulate(w, _cfg(1), cost=_cost(), jitter=j)
    b = simulate(w, dataclasses.replace(_cfg(1), seed=2), cost=_cost(), jitter=j)
    assert not np.array_equal(a.records["finish"], b.records["finish"])


def test_the_jittered_prediction_is_the_median_over_seeds_with_its_band():
    from sim.calibrate import COMPARED, COMPARED_QUANTILES, jittered_prediction, with_prediction_band, compare
    from traces.report import summarize

    j = StepJitter.from_ratios({"decode": np.linspace(0.6, 2.0, 50), "with_prefill": np.linspace(0.6, 2.0, 50)})
    w, cfg = _workload(), _cfg(4)
    summ, bands, first = jittered_prediction(w, cfg, _cost(), j, runs=5)
    runs = [summarize(simulate(w, dataclasses.replace(cfg, seed=4 + k), cost=_cost(), jitter=j), cfg.slo)
            for k in range(5)]
    for m, _ in COMPARED:
        for q in COMPARED_QUANTILES:
            vals = [r[m][q] for r in runs]
            assert summ[m][q] == pytest.approx(np.median(vals))
            lo, hi = bands[f"{m}.{q}"]
            assert min(vals) <= lo <= summ[m][q] <= hi <= max(vals)
    assert np.array_equal(first.records["finish"], simulate(w, cfg, cost=_cost(), jitter=j).records["finish"])
    assert summ["requests"] == runs[0]["requests"] == len(w)
    cmp = with_prediction_band(compare(summ, [runs[0]]), bands)
    row = cmp["metrics"]["ttft.p50"]
    assert row["prediction_band"] == list(bands["ttft.p50"])
    assert row["real_in_prediction_band"] == (bands["ttft.p50"][0] <= runs[0]["ttft"]["p50"] <= bands["ttft.p50"][1])
    with pytest.raises(ValueError, match="runs=0 is out of range"):
        jittered_prediction(w, cfg, _cost(), j, runs=0)


def test_simulate_takes_a_jitter_table_or_a_validate_file(tmp_path, capsys):
    """twinfer simulate --jitter FILE: a table, or validate's JSON (its loop checks' tables pooled); the same
    seed gives the same figures, another seed others; a file that is neither is refused, naming it."""
    import json

    from sim.cli import main
    from sim.jitter import load_jitter

    table = StepJitter.from_ratios({"decode": np.linspace(0.6, 2.0, 50), "with_prefill": np.linspace(0.8, 1.6, 30)})
    tpath = tmp_path / "table.json"
    tpath.write_text(json.dumps(table.to_dict()))
    other = StepJitter.from_ratios({"decode": np.linspace(0.9, 1.1, 50)})
    vpath = tmp_path / "validate.json"
    vpath.write_text(json.dumps({"loop_drift": {"enabled": True, "before": {"factor": 1.1, "jitter": table.to_dict()},
                                                "after": {"factor": 1.2, "jitter": other.to_dict()}}}))
    pooled = load_jitter(vpath)
    assert np.allclose(pooled.quantiles["decode"], (table.quantiles["decode"] + other.quantiles["decode"]) / 2)
    assert np.allclose(pooled.quantiles["with_prefill"], table.quantiles["with_prefill"])

    def run(*extra):
        assert main(["simulate", "--limit", "150", "--replicas", "2", "--no-progress", "--json", *extra]) == 0
        return json.loads(capsys.readouterr().out)

    a, b = run("--jitter", str(tpath)), run("--jitter", str(tpath))
    c, plain = run("--jitter", str(tpath), "--seed", "1"), run()
    assert a["ttft"] == b["ttft"] and a["e2e"] == b["e2e"]
    assert a["e2e"] != c["e2e"] and a["e2e"] != plain["e2e"]
    assert a["step_jitter"]["decode"]["p90"] == pytest.approx(table.quantile("decode", 0.9))
    assert "step_jitter" not in plain and a["ok"] == plain["ok"] == 150
    bad = tmp_path / "bad.json"
    for text, match in (("{", "bad.json: not JSON"), ('{"loop_drift": {"enabled": true, "before": {}, "after": {}}}',
                                                      "bad.json: its loop drift checks recorded no step spread"),
                        ('{"x": 1}', "bad.json: neither a step-jitter table"),
                        ('{"quantiles": {"decode": [2.0, 1.0]}}', "bad.json: step jitter: decode: quantile values")):
        bad.write_text(text)
        with pytest.raises(ValueError, match=match):
            load_jitter(bad)
        assert main(["simulate", "--limit", "10", "--no-progress", "--jitter", str(bad)]) == 2
        assert "bad.json" in capsys.readouterr().err
