"""The simulator: exact hand-computed cases, invariants over generated workloads, jump == stepping."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policies.scheduler import SchedulerConfig
from sim.cluster import simulate
from sim.config import SLO, SimConfig
from sim.cost import DecodeRun, StepFeatures
from traces.records import STATUSES
from traces.report import summarize
from traces.workload import Request, Workload


class LinearCost:
    """step = base + per_token * tokens + per_ctx * decode_ctx (a tiny, hand-checkable cost model)."""

    name = "linear-test"

    def __init__(self, base=0.010, per_token=0.001, per_ctx=0.0, kv_tokens=1_000_000):
        self.base, self.per_token, self.per_ctx = base, per_token, per_ctx
        self.kv_capacity_tokens = kv_tokens

    def step_time(self, f: StepFeatures) -> float:
        return self.per_token * (f.prefill_tokens + f.decode_seqs) + self.per_ctx * f.decode_ctx + self.base

    def decode_run(self, f: StepFeatures) -> DecodeRun:
        a = self.per_token * (f.prefill_tokens + f.decode_seqs) + self.per_ctx * f.decode_ctx
        b = self.per_ctx * f.decode_seqs
        return DecodeRun(a, b, a, b, self.base)


def two_requests() -> Workload:
    return Workload.from_requests([
        Request(index=0, arrival=0.0, input_tokens=100, output_tokens=3),
        Request(index=1, arrival=0.05, input_tokens=50, output_tokens=2),
    ], name="two")


@pytest.mark.parametrize("jump", [True, False])
def test_two_requests_exact_times(jump):
    # t=0     A prefills 100 tokens: 0.010 + 0.100 -> first token at 0.110
    # t=0.110 A decodes, B (arrived 0.05) prefills 50: 0.010 + 0.051 -> 0.171
    # t=0.171 both decode: 0.010 + 0.002 -> 0.183, both finish
    r = simulate(two_requests(), SimConfig(jump=jump), cost=LinearCost())
    rec = r.records
    assert list(rec["status"]) == ["ok", "ok"]
    ttft = rec["first_token"] - rec["arrival"]
    e2e = rec["finish"] - rec["arrival"]
    assert ttft == pytest.approx([0.110, 0.121], abs=1e-12)
    assert e2e == pytest.approx([0.183, 0.133], abs=1e-12)
    assert rec["admitted"] == pytest.approx([0.0, 0.110], abs=1e-12)
    assert list(rec["generated_tokens"]) == [3, 2]
    s = summarize(r, SLO(ttft=0.115))
    assert s["slo_attainment"] == 0.5
    # ITL samples: A: 0.061, 0.012; B: 0.012
    assert s["itl"]["n"] == 3
    assert s["itl"]["mean"] == pytest.approx((0.061 + 0.012 + 0.012) / 3)
    assert s["tpot"]["mean"] == pytest.approx(((0.183 - 0.110) / 2 + (0.133 - 0.121)) / 2)


def test_decode_run_matches_summed_steps():
    cost = LinearCost(per_ctx=1e-6)
    f = StepFeatures(0, 3, 0.0, 300, 3)
    run = cost.decode_run(f)
    t = 0.0
    for i in range(50):
        t += cost.step_time(StepFeatures(0, 3, 0.0, 300 + 3 * i, 3))
        assert run.elapsed(i + 1) == pytest.approx(t, rel=1e-12)


def test_analytic_profiles_are_sane():
    from sim.cost import load_cost_model

    c8 = load_cost_model("llama3-8b@h100-80gb")
    # decode of one short sequence is memory bound: ~16 GB of weights at ~2.7 TB/s achieved
    one = c8.step_time(StepFeatures(0, 1, 0.0, 1000, 1))
    assert 0.005 < one < 0.012
    # a 2k-token prefill is compute bound and costs more than a decode step
    pre = c8.step_time(StepFeatures(2048, 0, 2048 * 2049 / 2, 0, 1))
    assert pre > one
    assert c8.kv_capacity_tokens > 100_000
    with pytest.raises(ValueError, match="does not fit"):
        load_cost_model("llama3-70b@a100-80gb", tp=1)
    assert load_cost_model("llama3-70b@a100-80gb", tp=4).kv_capacity_tokens > 0
    with pytest.raises(ValueError, match="unknown device"):
        load_cost_model("llama3-8b@tpu")


# ---- generated workloads -------------------------------------------------------------------------

@st.composite
def workloads(draw, max_n=25):
    n = draw(st.integers(1, max_n))
    gaps = draw(st.lists(st.floats(0.0, 0.3, allow_nan=False), min_size=n, max_size=n))
    arrival = np.cumsum(gaps)
    inp = draw(st.lists(st.integers(1, 300), min_size=n, max_size=n))
    out = draw(st.lists(st.integers(1, 60), min_size=n, max_size=n))
    shared = draw(st.booleans())
    hashes = None
    if shared:  # a few common prefixes in 32-token trace blocks
        roots = draw(st.lists(st.integers(0, 3), min_size=n, max_size=n))
        hashes = [tuple([1000 + r] * 2 + list(range(10 * i, 10 * i + max(0, x // 32 - 2))))
                  for i, (r, x) in enumerate(zip(roots, inp))]
    return Workload(arrival=arrival, input_tokens=np.array(inp), output_tokens=np.array(out),
                    block_hashes=hashes, hash_block_size=32 if shared else 0, name="gen")


@st.composite
def configs(draw):
    sched = SchedulerConfig(
        kind=draw(st.sampled_from(["continuous", "continuous", "dynamic"])),
        max_num_seqs=draw(st.integers(1, 8)),
        max_num_batched_tokens=draw(st.integers(16, 512)),
        chunked_prefill=draw(st.booleans()),
        block_size=draw(st.sampled_from([4, 16])),
        prefix_caching=draw(st.booleans()),
        queue=draw(st.sampled_from(["fcfs", "priority"])),
        max_waiting=draw(st.sampled_from([None, None, 3])),
        queue_timeout=draw(st.sampled_from([None, None, 0.5])),
        max_batch_size=draw(st.integers(1, 6)),
        max_wait=draw(st.sampled_from([0.0, 0.02])),
    )
    return SimConfig(
        replicas=draw(st.integers(1, 3)),
        router=draw(st.sampled_from(["round_robin", "least_outstanding", "power_of_two", "prefix_affinity",
                                     "predicted_latency"])),
        num_blocks=draw(st.integers(30, 200)),
        scheduler=sched,
        seed=draw(st.integers(0, 3)),
    )


FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(workloads(), configs())
def test_every_request_recorded_once_with_terminal_status(w, cfg):
    r = simulate(w, cfg, cost=LinearCost(per_ctx=1e-6), check=True)
    rec = r.records
    assert list(rec["id"]) == list(range(len(w)))
    assert set(rec["status"]) <= set(STATUSES)
    ok = rec["status"] == "ok"
    assert np.all(rec["generated_tokens"][ok] == rec["output_tokens"][ok])
    assert np.all(rec["finish"][ok] >= rec["first_token"][ok])
    assert np.all(rec["first_token"][ok] >= rec["arrival"][ok] - 1e-12)
    for st_, why in zip(rec["status"], rec["reason"]):
        assert (st_ == "ok") == (why == "")
    counts = r.status_counts()
    assert sum(counts.values()) == len(w)


def grouped_cost():
    """A fitted model that prices the executor's decode attention grouping (per SDPA call and per padded key
    token) and breaks in the block tables: the simulator must cut decode runs wherever a row crosses a KV
    block boundary."""
    from sim.calibrate import FittedCost

    return FittedCost([0.010, 1e-4, 5e-4, 0, 1e-6, 0, 0, 0.002, 3e-6, 0, 2e-5], 1_000_000, name="grouped-test")


@FAST
@given(workloads(), configs(), st.sampled_from(["linear", "grouped"]))
def test_jump_gives_the_records_of_single_steps(w, cfg, model):
    import dataclasses

    cost = LinearCost(per_ctx=1e-6) if model == "linear" else grouped_cost()
    b = simulate(w, dataclasses.replace(cfg, jump=False), cost=cost)  # SimPy, one event per step
    # jump mode under both drivers: run_direct (the default here) and SimPy
    for a in (simulate(w, cfg, cost=cost), simulate(w, cfg, cost=cost, direct=False)):
        for name in ("status", "replica", "generated_tokens", "cached_tokens", "preemptions"):
            assert list(a.records[name]) == list(b.records[name]), name
        for name in ("admitted", "first_token", "finish"):
            np.testing.assert_allclose(a.records[name], b.records[name], rtol=1e-9, atol=1e-12, equal_nan=True)
        assert a.itl.count() == b.itl.count()
        if a.itl.count():
            np.testing.assert_allclose(a.itl.quantiles(), b.itl.quantiles(), rtol=1e-7)
            assert a.itl.mean() == pytest.approx(b.itl.mean(), rel=1e-9)


@settings(max_examples=25, deadline=None)
@given(workloads(), configs())
def test_same_seed_same_records(w, cfg):
    cost = LinearCost(per_ctx=1e-6)
    a, b = simulate(w, cfg, cost=cost), simulate(w, cfg, cost=cost)
    for name in a.records:
        assert np.array_equal(a.records[name], b.records[name], equal_nan=a.records[name].dtype.kind == "f"), name


def test_overload_accounts_for_every_request():
    n = 400
    w = Workload(arrival=np.linspace(0, 1, n), input_tokens=np.full(n, 200), output_tokens=np.full(n, 50))
    cfg = SimConfig(num_blocks=200, scheduler=SchedulerConfig(max_waiting=20, queue_timeout=2.0, max_num_seqs=8))
    r = simulate(w, cfg, cost=LinearCost(), check=True)
    c = r.status_counts()
    assert c["rejected"] > 0 and c["ok"] > 0
    assert sum(c.values()) == n
    reasons = set(r.records["reason"][r.records["status"] != "ok"])
    assert any("max_waiting=20" in x for x in reasons)


def test_request_larger_than_kv_is_rejected_with_reason():
    w = Workload.from_requests([Request(0, 0.0, 5000, 10), Request(1, 0.1, 10, 5)])
    r = simulate(w, SimConfig(num_blocks=100), cost=LinearCost())
    assert list(r.records["status"]) == ["rejected", "ok"]
    assert "needs 314 KV blocks" in r.records["reason"][0]


def test_prefix_affinity_routes_shared_prefixes_together_and_hits():
    reqs = []
    for i in range(40):
        root = i % 2
        reqs.append(Request(i, i * 0.5, 512, 4, block_hashes=(100 + root, 200 + root, 300 + i),
                            hash_block_size=256))
    w = Workload.from_requests(reqs)
    base = simulate(w, SimConfig(replicas=2, router="round_robin", seed=1), cost=LinearCost())
    aff = simulate(w, SimConfig(replicas=2, router="prefix_affinity", seed=1), cost=LinearCost())
    s_base, s_aff = summarize(base), summarize(aff)
    assert s_aff["prefix_hit_rate"] > 0.4
    assert s_aff["prefix_hit_rate"] >= s_base["prefix_hit_rate"]
    # each prefix root stays on one replica under affinity (after the first of each)
    rep = aff.records["replica"]
    assert len(set(rep[2::2])) == 1 and len(set(rep[3::2])) == 1


def test_dynamic_batching_waits_for_batch_or_timeout():
    reqs = [Request(i, 0.001 * i, 10, 2) for i in range(3)]
    w = Workload.from_requests(reqs)
    cfg = SimConfig(scheduler=SchedulerConfig(kind="dynamic", max_batch_size=8, max_wait=0.1))
    r = simulate(w, cfg, cost=LinearCost())
    # nothing fills the batch: it starts at the oldest arrival + max_wait
    assert r.records["admitted"] == pytest.approx([0.1, 0.1, 0.1])
    assert math.isclose(r.records["first_token"][0], 0.1 + 0.010 + 0.030)


@pytest.mark.parametrize("jump,direct", [(True, True), (True, False), (False, False)])
def test_router_sees_pending_tokens_of_completed_steps_inside_a_decode_run(jump, direct):
    """A router reading a replica in the middle of a decode run sees what a stepping replica shows: the
    tokens of the steps completed so far are no longer pending, although the jump applies them at the end."""
    from sim.cluster import build_cluster, drive

    # prefill of request 0: 0.010 + 0.001 * 100 = 0.110 s (its first token); then decode steps of 0.011 s.
    # Requests 1-3 arrive in the middle of decode steps 1, 11 and 31 (one-token prompts, routed by a
    # recording router to replica 1, so replica 0's run is never cut).
    times = [0.0, 0.110 + 0.5 * 0.011, 0.110 + 10.5 * 0.011, 0.110 + 30.5 * 0.011]
    w = Workload.from_requests([Request(index=0, arrival=0.0, input_tokens=100, output_tokens=50)]
                               + [Request(index=i, arrival=t, input_tokens=1, output_tokens=1)
                                  for i, t in enumerate(times[1:], 1)], name="probe")
    cluster = build_cluster(w, SimConfig(jump=jump, replicas=2), cost=LinearCost(), direct=direct)
    seen = []

    class Recorder:
        def route(self, req, replicas, now):
            seen.append(replicas[0].pending_tokens())
            return 0 if req.index == 0 else 1

    cluster.frontend.router = Recorder()
    drive(cluster)
    # 100 prompt + 50 output tokens; the prefill computes 100 (and samples token 1); each completed decode
    # step one more. (The last output token's KV is never computed, so 49 decode steps finish it.)
    assert seen == [0, 50, 40, 20]


def test_grouping_features_reach_a_fitted_model_and_change_its_times():
    """With grouping coefficients, a batch of far-apart contexts (two SDPA groups, short rows not padded to
    the long one) costs what the executor's grouping says; without them the same replay ignores it."""
    from sim.calibrate import FittedCost

    w = Workload.from_requests([Request(0, 0.0, 3000, 40), Request(1, 0.0, 40, 40)], name="spread")
    cfg = SimConfig(replicas=1, scheduler=SchedulerConfig(block_size=16, max_num_batched_tokens=8192))
    plain = FittedCost([0.010, 1e-4, 5e-4, 0, 1e-6, 0, 0], 1_000_000)
    per_group = FittedCost([0.010, 1e-4, 5e-4, 0, 1e-6, 0, 0, 0.004, 0], 1_000_000)
    assert not plain.uses_grouping and per_group.uses_grouping
    a, b = simulate(w, cfg, cost=plain), simulate(w, cfg, cost=per_group)
    # 39 decode steps of both rows, two groups each (3000+ vs 40+ tokens: padding 40 to 3000 would waste
    # far more than the group rule allows), so each costs 2 x 0.004 s more; both requests finish together.
    assert b.records["finish"][0] - a.records["finish"][0] == pytest.approx(39 * 2 * 0.004, rel=1e-9)


def test_block_table_breaks_reach_a_fitted_model():
    """A model with a cost per break (a decode row's KV block not right after the one before it in the cache)
    charges nothing for one sequence, whose prompt and decode blocks come off the pool in one run, and
    charges two sequences decoding side by side, whose new blocks interleave."""
    from sim.calibrate import FittedCost

    cfg = SimConfig(replicas=1, scheduler=SchedulerConfig(block_size=16, max_num_batched_tokens=8192))
    coefs = [0.010, 1e-4, 5e-4, 0, 1e-6, 0, 0, 0, 1e-7]
    plain, per_break = FittedCost(coefs, 1_000_000), FittedCost(coefs + [0, 1e-3], 1_000_000)
    assert per_break.uses_grouping
    one = Workload.from_requests([Request(0, 0.0, 500, 200)], name="one")
    assert simulate(one, cfg, cost=plain).records["finish"][0] == pytest.approx(
        simulate(one, cfg, cost=per_break).records["finish"][0], rel=1e-12)
    two = Workload.from_requests([Request(0, 0.0, 500, 200), Request(1, 0.0, 500, 200)], name="two")
    a, b = simulate(two, cfg, cost=plain), simulate(two, cfg, cost=per_break)
    extra = b.records["finish"][0] - a.records["finish"][0]
    # each row takes ~12 new blocks over 200 tokens, alternating with the other row's: up to ~24 breaks a step
    assert 0.0 < extra < 200 * 24 * 1e-3
