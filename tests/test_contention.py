"""Co-located replicas: step times that depend on what the neighbours have in progress (sim.contention)."""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import numpy as np
import pytest

from sim.calibrate import FittedCost, GridPoint, Profile, read_profile_file, save_profile_file, step_check
from sim.contention import (
    ContentionCost, fit_conditions, measure_interleaved, neighbour_class, neighbour_groups, neighbour_steps_at,
    step_predictions, victim_kind,
)
from sim.cost import StepFeatures

# the alone model: 10 ms + 1 ms per prefill token + 2 ms per decoding sequence
BASE = FittedCost([0.010, 0.001, 0.002, 0, 0, 0, 0], 100_000, name="alone")
FACTOR = {"decode_small": {"decode": 1.10, "prefill": 1.05, "mixed": 1.05},
          "decode": {"decode": 1.20, "prefill": 1.10},
          "prefill": {"decode": 1.50, "prefill": 1.25, "mixed": 1.30}}
DEC1 = StepFeatures(0, 1, 0.0, 100, 1)
DEC4 = StepFeatures(0, 4, 0.0, 400, 4)
PRE = StepFeatures(100, 0, 5050.0, 0, 1)
MIX = StepFeatures(50, 2, 1275.0, 200, 3)
T_DEC4, T_PRE = 0.010 + 4 * 0.002, 0.010 + 100 * 0.001  # 18 ms, 110 ms


def test_kinds_and_classes():
    assert [victim_kind(f) for f in (DEC1, DEC4, PRE, MIX)] == ["decode", "decode", "prefill", "mixed"]
    assert [neighbour_class(f) for f in (DEC1, DEC4, PRE, MIX, None)] == ["decode_small", "decode", "prefill",
                                                                          "prefill", "idle"]


def test_step_time_is_base_times_the_factor_of_what_the_neighbours_run():
    m = ContentionCost(BASE, FACTOR)
    idle, busy_pre, busy_dec, busy_one = (SimpleNamespace(current=c) for c in (None, PRE, DEC4, DEC1))
    me = SimpleNamespace(current=PRE)  # replica 0's own `current` must be ignored
    assert m.for_replica(0, [me, idle]).step_time(DEC4) == pytest.approx(T_DEC4)
    assert m.for_replica(0, [me, busy_pre]).step_time(DEC4) == pytest.approx(T_DEC4 * 1.5)
    assert m.for_replica(0, [me, busy_one]).step_time(DEC4) == pytest.approx(T_DEC4 * 1.1)
    assert m.for_replica(1, [busy_dec, me]).step_time(PRE) == pytest.approx(T_PRE * 1.1)
    # several neighbours: 1 + the sum of what each adds
    assert m.for_replica(0, [me, busy_pre, busy_dec, idle]).step_time(DEC4) == pytest.approx(T_DEC4 * 1.7)
    # a kind the table leaves out has factor 1: mixed step beside a decode batch
    assert m.for_replica(1, [busy_dec, me]).step_time(MIX) == pytest.approx(BASE.step_time(MIX))
    # unbound: the base model; groups: only the same machine's replicas count
    assert m.step_time(DEC4) == pytest.approx(T_DEC4)
    g = ContentionCost(BASE, FACTOR, group=2)
    assert g.for_replica(2, [busy_pre, busy_pre, me, idle]).step_time(DEC4) == pytest.approx(T_DEC4)
    assert g.for_replica(3, [busy_pre, busy_pre, busy_pre, me]).step_time(DEC4) == pytest.approx(T_DEC4 * 1.5)
    assert m.jump_ok is False and m.for_replica(0, [me]).jump_ok is False
    # the loop overhead is part of the base step, and scales with it
    o = m.with_overhead(0.001)
    assert o.for_replica(0, [me, busy_pre]).step_time(DEC4) == pytest.approx((T_DEC4 + 0.001) * 1.5)


def test_decode_run_scales_by_the_factor_now():
    view = ContentionCost(BASE, FACTOR).for_replica(0, [SimpleNamespace(current=None), SimpleNamespace(current=PRE)])
    assert view.decode_run(DEC4).elapsed(3) == pytest.approx(1.5 * BASE.decode_run(DEC4).elapsed(3))


def test_bad_tables_are_refused():
    with pytest.raises(ValueError, match="unknown neighbour class"):
        ContentionCost(BASE, {"gpu": {"decode": 1.1}})
    with pytest.raises(ValueError, match="unknown step kind"):
        ContentionCost(BASE, {"decode": {"sleep": 1.1}})
    with pytest.raises(ValueError, match="> 0"):
        ContentionCost(BASE, {"decode": {"decode": 0.0}})


def test_the_cluster_hook_times_a_step_by_the_neighbours_step_at_its_start():
    """continuous=False (the first version): a step keeps the factor of what its neighbours ran when it began."""
    from sim.cluster import simulate
    from sim.config import SimConfig
    from traces.workload import Request, Workload

    cfg = SimConfig(replicas=2, router="round_robin")
    m = ContentionCost(BASE, FACTOR, continuous=False)
    assert m.with_base(BASE).continuous is False and m.with_busy_scale(1.1).continuous is False
    # request 0: a 100-token prompt at t=0 (replica 0, round robin); request 1: the same at t=0.05 (replica 1),
    # whose prefill starts while replica 0's is in progress
    two = Workload.from_requests([Request(0, 0.0, 100, 1), Request(1, 0.05, 100, 1)], name="two")
    ft = simulate(two, cfg, cost=m).records["first_token"]
    assert ft[0] == pytest.approx(T_PRE)  # its neighbour was idle when it started
    assert ft[1] == pytest.approx(0.05 + T_PRE * 1.25)  # a prefill beside the neighbour's prefill
    assert simulate(two, cfg, cost=BASE).records["first_token"][1] == pytest.approx(0.05 + T_PRE)
    # a neighbour that finished first leaves the next step alone
    apart = Workload.from_requests([Request(0, 0.0, 100, 1), Request(1, 0.5, 100, 1)], name="apart")
    assert simulate(apart, cfg, cost=m).records["first_token"][1] == pytest.approx(0.5 + T_PRE)
    # beside a neighbour's one-sequence decodes: request 0 decodes from 0.11 on, request 1's prefill starts at 0.2
    beside = Workload.from_requests([Request(0, 0.0, 100, 50), Request(1, 0.2, 100, 1)], name="beside")
    r = simulate(beside, cfg, cost=m)
    assert r.records["first_token"][1] == pytest.approx(0.2 + T_PRE * 1.05)
    # and request 0's decode steps that start during that prefill are 1.25 x ... x 1.5 as long: the replica's
    # 50 tokens take longer than alone by the steps that overlapped it
    alone = simulate(beside, cfg, cost=BASE)
    extra = r.records["finish"][0] - alone.records["finish"][0]
    n_overlap = extra / (0.012 * 0.5)  # each overlapped one-sequence decode step: 12 ms, +50 %
    assert n_overlap == pytest.approx(round(n_overlap), abs=1e-6) and 5 <= round(n_overlap) <= 11


def test_the_cluster_re_times_a_step_whenever_a_neighbour_changes():
    """continuous=True (the default): a step is T alone-seconds of work done at rate 1 / factor, the factor
    re-read whenever a co-located replica starts a step or goes idle."""
    from sim.cluster import simulate
    from sim.config import SimConfig
    from traces.workload import Request, Workload

    cfg = SimConfig(replicas=2, router="round_robin")
    m = ContentionCost(BASE, FACTOR)
    assert m.continuous and m.with_base(BASE).continuous and m.with_continuous(False).continuous is False
    # request 0's prefill starts alone at 0; at 0.05 request 1's prefill starts beside it: both at 1.25 x from
    # then on. Request 0 (one output token) ends, its replica idles, and request 1's rest runs alone.
    two = Workload.from_requests([Request(0, 0.0, 100, 1), Request(1, 0.05, 100, 1)], name="two")
    ft = simulate(two, cfg, cost=m).records["first_token"]
    end0 = 0.05 + (T_PRE - 0.05) * 1.25
    assert ft[0] == pytest.approx(end0)
    assert ft[1] == pytest.approx(end0 + (T_PRE - (end0 - 0.05) / 1.25))
    # sampled at the start, request 0 would have kept factor 1 and request 1 kept 1.25
    assert end0 > T_PRE and ft[1] < 0.05 + T_PRE * 1.25
    # apart: nothing overlaps, nothing changes
    apart = Workload.from_requests([Request(0, 0.0, 100, 1), Request(1, 0.5, 100, 1)], name="apart")
    assert simulate(apart, cfg, cost=m).records["first_token"][1] == pytest.approx(0.5 + T_PRE)
    # request 1's prefill runs from 0.2 beside request 0's one-sequence decodes (1.05 x) throughout; request 0's
    # decode work meanwhile goes at 1 / 1.5 of its pace, the step in progress at 0.2 included, so its 50 tokens
    # finish later by exactly the prefill's length x (1 - 1 / 1.5)
    beside = Workload.from_requests([Request(0, 0.0, 100, 50), Request(1, 0.2, 100, 1)], name="beside")
    r = simulate(beside, cfg, cost=m)
    pre = T_PRE * 1.05
    assert r.records["first_token"][1] == pytest.approx(0.2 + pre)
    alone = simulate(beside, cfg, cost=BASE)
    assert r.records["finish"][0] - alone.records["finish"][0] == pytest.approx(pre * (1 - 1 / 1.5))


def test_profile_round_trips_the_contention_section(tmp_path):
    pts = [GridPoint("decode", decodes=(64,) * b) for b in (1, 2, 4)] + \
          [GridPoint("prefill", prefills=((0, n, True),)) for n in (16, 64)]
    idle = [[BASE.step_time(p.features())] * 3 for p in pts]
    samples = {"idle": idle, "decode_small": [[1.1 * x for x in s] for s in idle],
               "prefill": [[(1.5 if i < 3 else 1.25) * x for x in s] for i, s in enumerate(idle)],
               "grid": [[1.2 * x for x in s] for s in idle]}
    section = fit_conditions(pts, samples)
    assert section["conditions"]["prefill"]["factor"] == pytest.approx({"decode": 1.5, "prefill": 1.25})
    assert section["conditions"]["decode_small"]["factor"] == pytest.approx({"decode": 1.1, "prefill": 1.1})
    assert section["random_grid_neighbour"]["median_ratio"] == pytest.approx(1.2)
    prof = Profile(cost=BASE.with_overhead(0.001), kv={"num_blocks": 10, "block_size": 16}, contention=section,
                   name="p")
    for ext in ("toml", "json"):
        back = read_profile_file(save_profile_file(prof, tmp_path / f"c.{ext}"))
        m = back.contention_cost()
        assert isinstance(m, ContentionCost) and m.table["decode"]["decode"] == 1.0  # not measured: 1
        assert m.for_replica(0, [None, SimpleNamespace(current=PRE)]).step_time(DEC4) == pytest.approx(
            (T_DEC4 + 0.001) * 1.5)
    # a profile without the section (written before it existed) reads as before: no contention model
    plain = read_profile_file(save_profile_file(dataclasses.replace(prof, contention={}), tmp_path / "p.toml"))
    assert plain.contention_cost() is None and "contention" not in plain.to_dict()
    bad = prof.to_dict()
    bad["contention"] = {"conditions": {"decode": {"factor": {"decode": -1.0}}}}
    with pytest.raises(ValueError, match="contention"):
        Profile.from_dict(bad)


def test_measure_interleaved_visits_every_condition_every_round():
    pts = [GridPoint("decode", decodes=(64,)), GridPoint("prefill", prefills=((0, 32, True),))]
    state, seen = {"c": None}, []

    def switch(c):
        state["c"] = c
        seen.append(c)

    speed = {"idle": 1.0, "decode_small": 1.3, "decode": 1.1, "prefill": 1.2, "grid": 1.15}
    out = measure_interleaved(lambda ps, sd: [speed[state["c"]] * (i + 1) for i in range(len(ps))], pts, switch,
                              rounds=3, seed=0)
    assert seen[-1] == "idle" and len(seen) == 3 * 5 + 1
    rounds = [seen[5 * r:5 * r + 5] for r in range(3)]
    assert all(sorted(r) == sorted(speed) for r in rounds) and len({tuple(r) for r in rounds}) > 1  # shuffled
    for c, f in speed.items():
        assert out[c] == [[f] * 3, [2 * f] * 3]
    g = neighbour_groups(pts + [GridPoint("decode", decodes=(64,) * 8), GridPoint("decode", decodes=(64,) * 64)])
    assert g == {"decode_small": [0], "decode": [2], "prefill": [1], "grid": [0, 1, 2, 3]}


def test_a_real_step_log_gets_the_factor_of_what_the_neighbour_ran():
    # replica 0: a decode step 0..0.1 and another 0.1..0.2; replica 1: a prefill 0.05..0.15, then idle
    steps = {"start": np.array([0.0, 0.05, 0.1]), "duration": np.array([0.1, 0.1, 0.1]),
             "replica": np.array([0, 1, 0]), "prefill_tokens": np.array([0, 100, 0]),
             "decode_seqs": np.array([4, 0, 4]), "decode_context": np.array([400, 0, 400]),
             "attention_pairs": np.array([400, 5050, 400]), "sampled": np.array([4, 1, 4]),
             "decode_groups": np.array([1, 0, 1]), "decode_padded_context": np.array([448, 0, 448])}
    nb = neighbour_steps_at(steps)
    assert nb[0] == [None] and nb[1][0].decode_seqs == 4 and nb[2][0].prefill_tokens == 100
    m = ContentionCost(BASE, FACTOR)
    pred = [T_DEC4, T_PRE * 1.1, T_DEC4 * 1.5]
    assert step_predictions(m, steps).tolist() == pytest.approx(pred)
    chk = step_check(BASE, steps, contention=m)
    assert chk["busy_ratio"] == pytest.approx(0.3 / sum(pred))
    # by kind: the two decodes against their predictions, the prefill against its own; no mixed step
    assert chk["decode_only"]["steps"] == 2 and chk["prefill_only"]["steps"] == 1 and chk["mixed"]["steps"] == 0
    assert chk["decode_only"]["busy_ratio"] == pytest.approx(0.2 / (pred[0] + pred[2]))
    assert chk["prefill_only"]["busy_ratio"] == chk["with_prefill"]["busy_ratio"] == pytest.approx(0.1 / pred[1])


def test_profile_concurrent_measures_every_condition_on_the_tiny_model(tmp_path, capsys):
    pytest.importorskip("torch")
    from sim.cli import main

    out = tmp_path / "tiny2.toml"
    assert main(["profile", "--model-config", "tiny", "--quick", "--repeats", "1", "--warmup", "0",
                 "--num-blocks", "512", "--concurrent", "2", "--out", str(out), "--no-progress",
                 "--no-loop-overhead"]) == 0
    assert "beside a" in capsys.readouterr().out
    prof = read_profile_file(out)
    assert prof.neighbours == 1 and prof.busy is not None
    assert sorted(prof.contention["conditions"]) == ["decode", "decode_small", "prefill"]
    m = prof.contention_cost()
    assert isinstance(m, ContentionCost) and m.base.coefficients() == prof.cost.coefficients()
    f = StepFeatures(100, 4, 5050.0, 400, 5)
    assert all(m.for_replica(0, [None, SimpleNamespace(current=g)]).step_time(f) > 0 for g in (None, DEC1, DEC4, PRE))
    # the co-located drift check re-times the reference shapes beside the same kind of neighbour, against
    # the busy medians this profile stored
    from sim.calibrate_cli import colocated_drift, drift_probe_runner

    assert all(g["median_beside_decode_s"] > 0 and g["median_beside_prefill_s"] > 0 for g in prof.grid)
    d = colocated_drift(prof, drift_probe_runner(prof))
    assert d["neighbours"] == 1 and d["condition"] == "decode" and d["stored"] == "median_beside_decode_s"
    assert math.isfinite(d["factor"]) and d["factor"] > 0 and len(d["attempts"]) >= 2
    assert all(s["stored_s"] == prof.grid[s["row"]]["median_beside_decode_s"] for s in d["shapes"])
