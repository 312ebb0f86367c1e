"""The drift check: the machine's speed now against when the profile was measured (sim.calibrate.measure_drift),
the correction it makes (drift_corrected) and how `twinfer validate` brackets the real runs with it."""

from __future__ import annotations

import dataclasses
import math
import sys
import types
from types import SimpleNamespace

import numpy as np
import pytest

from sim.calibrate import (
    DRIFT_ROLES, FittedCost, GridPoint, Measurement, Profile, _point_from_label, default_grid, drift_corrected,
    drift_reference_shapes, grid_blocks_needed, grid_row_points, kind_corrected, loop_factors, loop_kind_factors,
    measure_drift, profile_from_measurements, save_profile_file,
)
from sim.contention import ContentionCost
from sim.cost import StepFeatures, plan_features

# intercept, prefill_tokens, decode_seqs, prefill_attn, decode_ctx, logits, batched
TRUE = FittedCost([0.006, 2.5e-4, 4e-4, 1.6e-7, 2e-6, 1e-4, 0.003], 65536, name="truth")
SEED = 3  # not the default: the shapes must be rebuilt with the profile's own seed


def synthetic_profile(quick: bool = False, seed: int = SEED, max_context: int = 4096) -> Profile:
    """A profile of the default grid whose stored medians are TRUE's step times (no torch)."""
    pts = default_grid(quick=quick, max_context=max_context, seed=seed, max_kv_tokens=65536)
    meas = [Measurement(p, [TRUE.step_time(p.features())]) for p in pts]
    prof, _ = profile_from_measurements(meas, 65536, holdout=0.25, seed=seed, name="synthetic",
                                        model={"name": "tiny"}, kv={"num_blocks": 4096, "block_size": 16},
                                        measure={"quick": quick, "threads": 1})
    return prof


def _key(f: StepFeatures) -> tuple:
    return (f.prefill_tokens, f.decode_seqs, round(float(f.prefill_attn), 6), f.decode_ctx, f.logits)


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def perf_counter(self) -> float:
        return self.t


class FakeRunner:
    """Stands in for executor.runner.ModelRunner: each run advances a fake clock by `times[shape]`."""

    def __init__(self, times: dict[tuple, float], clock: FakeClock, num_blocks: int):
        self.cfg = SimpleNamespace(vocab=512)
        self.block_size, self.num_blocks, self.device = 16, num_blocks, "cpu"
        self.times, self.clock, self.runs = times, clock, 0

    def run(self, plan) -> None:
        self.clock.t += self.times[_key(plan_features(plan))]
        self.runs += 1
        for s in plan.decode:  # as the real runner does: a sampled token appended (measure_grid removes it)
            s.tokens.append(0)


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    pytest.importorskip("torch")
    import executor.device

    c = FakeClock()
    monkeypatch.setattr(executor.device, "time", SimpleNamespace(perf_counter=c.perf_counter))
    return c


def fake_runner(prof: Profile, clock: FakeClock, scale: float, outlier: tuple[str, float] | None = None):
    refs = drift_reference_shapes(prof)
    times = {}
    for role, i, p in refs:
        f = p.features()
        assert _key(f) not in times
        times[_key(f)] = prof.grid[i]["median_s"] * scale * (outlier[1] if outlier and outlier[0] == role else 1.0)
    return FakeRunner(times, clock, grid_blocks_needed([p for *_, p in refs], 16))


# ---- the reference shapes -------------------------------------------------------------------------------

@pytest.mark.parametrize("quick", [False, True])
def test_every_grid_row_is_rebuilt_exactly(quick):
    prof = synthetic_profile(quick=quick)
    pts = default_grid(quick=quick, max_context=4096, seed=SEED, max_kv_tokens=65536)
    got = grid_row_points(prof)
    assert sorted(got) == list(range(len(pts)))
    assert all(got[i] == p for i, p in enumerate(pts))  # spread decode contexts included, not just features


def test_labels_rebuild_only_shapes_they_determine():
    assert _point_from_label("prefill:4x64@0") == GridPoint("prefill", ((0, 64, True),) * 4)
    assert _point_from_label("prefill:512@1024~") == GridPoint("prefill", ((1024, 512, False),))
    assert _point_from_label("decode:dec16@512") == GridPoint("decode", decodes=(512,) * 16)
    assert _point_from_label("mixed:256@0 dec2@314-641") == GridPoint("mixed", ((0, 256, True),), (641, 314))
    assert _point_from_label("decode:dec8@72-395") is None  # the middle six contexts are not in the label
    assert _point_from_label("nonsense") is None and _point_from_label("decode:decx@1") is None


def test_reference_shapes_span_the_kinds_and_are_deterministic():
    prof = synthetic_profile()
    refs = drift_reference_shapes(prof)
    assert [r for r, *_ in refs] == [r[0] for r in DRIFT_ROLES]
    assert [prof.grid[i]["kind"] for _, i, _ in refs] == ["decode", "decode", "prefill", "prefill", "mixed"]
    assert [prof.grid[i]["label"] for _, i, _ in refs] == [
        "decode:dec1@256", refs[1][2].label(), "prefill:128@0", "prefill:512@0", refs[4][2].label()]
    assert refs[1][2].features().decode_seqs == 16 and refs[4][2].features().prefill_tokens == 64
    assert len({i for _, i, _ in refs}) == len(refs)
    assert [(r, i) for r, i, _ in drift_reference_shapes(synthetic_profile())] == [(r, i) for r, i, _ in refs]


def test_missing_grid_is_a_clear_error():
    prof = Profile(cost=TRUE, name="steps@cpu", grid=[])
    with pytest.raises(ValueError, match="no grid measurements"):
        measure_drift(object(), prof)


def test_grid_rows_without_features_or_times_are_errors():
    prof = synthetic_profile()
    bare = Profile(cost=TRUE, name="bare", grid=[{"kind": g["kind"], "label": g["label"], "median_s": g["median_s"]}
                                                 for g in prof.grid])
    with pytest.raises(ValueError, match="only 0 of the grid's .* rows could be rebuilt"):
        drift_reference_shapes(bare)
    prof.grid[3]["median_s"] = 0.0
    with pytest.raises(ValueError, match=r"grid row 3 .*median_s=0.0"):
        drift_reference_shapes(prof)


# ---- the factor ------------------------------------------------------------------------------------------

def test_factor_is_now_over_the_profiled_medians(clock):
    prof = synthetic_profile()
    runner = fake_runner(prof, clock, 1.2)
    d = measure_drift(runner, prof, repeats=3, warmup=1)
    assert d["factor"] == pytest.approx(1.2, rel=1e-9)
    assert [s["ratio"] for s in d["shapes"]] == pytest.approx([1.2] * len(DRIFT_ROLES), rel=1e-9)
    # every shape once per warm-up and timed round; a decode shape twice (an untimed run right before, as in
    # a decode run: sim.calibrate.measure_grid)
    decodes = sum(1 for *_, p in drift_reference_shapes(prof) if not p.prefills)
    assert decodes == 2
    assert d["repeats"] == 3 and runner.runs == (len(DRIFT_ROLES) + decodes) * 4
    assert {s["label"] for s in d["shapes"]} <= {g["label"] for g in prof.grid}


def test_one_wild_shape_does_not_move_the_factor(clock):
    prof = synthetic_profile()
    d = measure_drift(fake_runner(prof, clock, 1.2, outlier=("prefill chunk", 5.0)), prof, repeats=3, warmup=1)
    ratios = [s["ratio"] for s in d["shapes"]]
    assert max(ratios) == pytest.approx(6.0) and np.mean(ratios) > 2.0  # a mean would be way off
    assert d["factor"] == pytest.approx(1.2, rel=1e-9)


def test_repeats_follow_the_time_budget(clock):
    prof = synthetic_profile()
    stored = sum(prof.grid[i]["median_s"] for _, i, _ in drift_reference_shapes(prof))
    d = measure_drift(fake_runner(prof, clock, 1.0), prof, warmup=1, budget_s=3.5 * stored)
    assert d["repeats"] == 2 and d["factor"] == pytest.approx(1.0)
    d = measure_drift(fake_runner(prof, clock, 1.0), prof, warmup=1, budget_s=100 * stored)
    assert d["repeats"] == 5


def busy_profile(busy_scale: float = 1.3) -> Profile:
    """synthetic_profile measured again beside one neighbour: busy medians `busy_scale` x the alone ones,
    and a contention section."""
    pts = default_grid(max_context=1024, seed=SEED, max_kv_tokens=65536)
    meas = [Measurement(p, [TRUE.step_time(p.features())]) for p in pts]
    busy = [Measurement(p, [busy_scale * TRUE.step_time(p.features())]) for p in pts]
    contention = {"conditions": {c: {"factor": {k: busy_scale for k in ("decode", "prefill", "mixed")}}
                                 for c in ("decode_small", "decode", "prefill")}}
    prof, _ = profile_from_measurements(meas, 65536, holdout=0.25, seed=SEED, name="synthetic-busy",
                                        model={"name": "tiny"}, kv={"num_blocks": 4096, "block_size": 16},
                                        measure={"quick": False, "threads": 1, "concurrent": 2}, busy_meas=busy,
                                        neighbours=1, contention=contention)
    return prof


def test_busy_factor_is_now_over_the_busy_medians(clock):
    prof = busy_profile(1.3)
    refs = drift_reference_shapes(prof)
    assert all(prof.grid[i]["busy_median_s"] == pytest.approx(1.3 * prof.grid[i]["median_s"]) for _, i, _ in refs)
    # the machine now runs the shapes 1.56 x their alone medians with the neighbour busy: 1.2 x the busy ones
    d = measure_drift(fake_runner(prof, clock, 1.56), prof, repeats=2, warmup=1, stored="busy_median_s")
    assert d["stored"] == "busy_median_s" and d["factor"] == pytest.approx(1.2, rel=1e-9)
    assert measure_drift(fake_runner(prof, clock, 1.56), prof, repeats=2, warmup=1)["factor"] == pytest.approx(1.56)
    with pytest.raises(ValueError, match=r"busy_median_s=None.*--concurrent"):
        measure_drift(fake_runner(synthetic_profile(), clock, 1.0), synthetic_profile(), stored="busy_median_s")


def test_busy_check_runs_beside_decode_batches_when_the_profile_kept_their_medians():
    from sim.calibrate_cli import busy_check_reference

    prof = busy_profile(1.3)
    assert busy_check_reference(prof) == ("grid", "busy_median_s")  # an older profile: random grid shapes
    for g in prof.grid:
        g["median_beside_decode_s"] = 1.2 * g["median_s"]
    assert busy_check_reference(prof) == ("decode", "median_beside_decode_s")
    with pytest.raises(ValueError, match="no busy-neighbour measurement"):
        busy_check_reference(synthetic_profile())


# ---- the correction --------------------------------------------------------------------------------------

def test_drift_corrected_scales_the_forward_time_not_the_loop_gap():
    cost = FittedCost([0.010, 1e-4, 2e-3, 0, 0, 0, 0], 10_000, name="c", step_overhead_s=0.0005)
    f = StepFeatures(100, 2, 5050.0, 300, 3)
    # forward 0.010 + 100 * 1e-4 + 2 * 2e-3 = 0.024 s; x 1.25 = 0.030; + the loop's 0.5 ms
    assert cost.step_time(f) == pytest.approx(0.0245)
    assert drift_corrected(cost, 1.25).step_time(f) == pytest.approx(0.0305)
    dec = StepFeatures(0, 4, 0.0, 400, 4)  # 0.010 + 4 * 2e-3 = 0.018 a step
    run = drift_corrected(cost, 1.25).decode_run(dec)
    assert run.elapsed(10) == pytest.approx(10 * (0.018 * 1.25 + 0.0005))
    assert drift_corrected(cost, 1.25).kv_capacity_tokens == 10_000
    for bad in (0.0, -1.0, math.nan, math.inf, "x"):
        with pytest.raises(ValueError, match="drift factor"):
            drift_corrected(cost, bad)


def test_kind_corrected_scales_decode_and_prefill_steps_each_by_their_own_factor():
    """The loop check read by kind: decode-only steps x the decode factor, steps with prefill tokens (prefill
    and mixed) x the with-prefill factor, the profile's serving-loop prefill factor kept on top; the loop's
    gap unscaled. Equal factors are drift_corrected exactly; co-located models keep their table."""
    cost = FittedCost([0.010, 1e-4, 2e-3, 0, 0, 0, 0], 10_000, name="c", step_overhead_s=0.0005,
                      prefill_factor=1.05)
    log = {"prefill_tokens": np.array([0, 100, 100]), "decode_seqs": np.array([4, 0, 2]),
           "start": np.array([0.0, 0.1, 0.2]), "duration": np.array([0.02, 0.02, 0.02]),
           "replica": np.zeros(3, np.int64)}
    got = kind_corrected(cost, 1.2, 0.9)
    dec = StepFeatures(0, 4, 0.0, 400, 4)
    assert got.step_time(dec) == pytest.approx(0.018 * 1.2 + 0.0005)  # the forward time x the decode factor
    # a step with prefill tokens: forward x 1.2 x (1.05 x 0.9 / 1.2) = forward x 1.05 x 0.9
    assert got.prefill_factor == pytest.approx(1.05 * 0.9 / 1.2)
    assert list(loop_factors(got, log) * 1.2) == pytest.approx([1.2, 1.05 * 0.9, 1.05 * 0.9])
    run = got.decode_run(dec)
    assert run.elapsed(10) == pytest.approx(10 * (0.018 * 1.2 + 0.0005))
    same = kind_corrected(cost, 1.1, 1.1)
    ref = drift_corrected(cost, 1.1)
    assert same.step_time(dec) == ref.step_time(dec) and same.prefill_factor == ref.prefill_factor == 1.05
    cc = ContentionCost(cost, {"prefill": {"decode": 1.5}})
    gc = kind_corrected(cc, 1.2, 0.9)
    assert isinstance(gc, ContentionCost) and gc.table == cc.table
    assert gc.base.step_time(dec) == got.step_time(dec) and gc.prefill_factor == pytest.approx(got.prefill_factor)
    assert cc.prefill_factor == 1.05 and cc.base.step_time(dec) == pytest.approx(0.0185)  # untouched
    for bad in (0.0, -1.0, math.nan, "x"):
        with pytest.raises(ValueError, match="decode factor"):
            kind_corrected(cost, bad, 1.0)
        with pytest.raises(ValueError, match="with-prefill factor"):
            kind_corrected(cost, 1.0, bad)


def test_loop_kind_factors_are_the_geometric_means_of_the_two_checks_by_kind():
    b = {"factor": 1.1, "decode": 1.2, "with_prefill": 1.0}
    a = {"factor": 1.3, "decode": 1.5, "with_prefill": 1.1}
    assert loop_kind_factors(b, a) == pytest.approx((math.sqrt(1.2 * 1.5), math.sqrt(1.0 * 1.1)))
    # a check recorded before the kinds were kept, or with no step of one kind: no reading by kind
    for bad in ({"factor": 1.1}, {**b, "decode": math.nan}, {**b, "with_prefill": 0.0}, {**b, "decode": None}):
        assert loop_kind_factors(bad, a) is None and loop_kind_factors(a, bad) is None


def test_drift_corrected_keeps_the_contention_factors_on_top():
    base = FittedCost([0.010, 0.001, 0.002, 0, 0, 0, 0], 100_000, name="alone", step_overhead_s=0.001)
    cc = ContentionCost(base, {"prefill": {"decode": 1.5}})
    got = drift_corrected(cc, 0.8)
    dec4, pre = StepFeatures(0, 4, 0.0, 400, 4), StepFeatures(100, 0, 5050.0, 0, 1)
    assert isinstance(got, ContentionCost) and got.table == cc.table
    assert got.base.step_time(dec4) == pytest.approx(0.018 * 0.8 + 0.001)
    assert got.factor(dec4, [pre]) == cc.factor(dec4, [pre]) == pytest.approx(1.5)
    assert cc.base.step_time(dec4) == pytest.approx(0.019)  # the original is untouched


def test_busy_factor_corrects_the_contention_factors_by_busy_over_alone():
    base = FittedCost([0.010, 0.001, 0.002, 0, 0, 0, 0], 100_000, name="alone", step_overhead_s=0.001)
    cc = ContentionCost(base, {"prefill": {"decode": 1.5}, "decode": {"decode": 1.1, "prefill": 1.2}})
    dec4, pre = StepFeatures(0, 4, 0.0, 400, 4), StepFeatures(100, 0, 5050.0, 0, 1)
    got = drift_corrected(cc, 0.9, busy_factor=1.08)  # alone: 10 % faster; beside a busy neighbour 8 % slower
    r = got.for_replica(0, [None, SimpleNamespace(current=None)])
    assert r.step_time(dec4) == pytest.approx(0.018 * 0.9 + 0.001)  # neighbour idle: the alone correction
    r = got.for_replica(0, [None, SimpleNamespace(current=pre)])
    # neighbour prefilling: the profiled slowdown 1.5, the forward time at the busy drift 1.08
    assert r.step_time(dec4) == pytest.approx((0.018 * 0.9 + 0.001) * 1.5 * (1.08 / 0.9))
    assert got.table["idle"] == cc.table["idle"] == {"decode": 1.0, "prefill": 1.0, "mixed": 1.0}
    assert got.table["decode"]["prefill"] == pytest.approx(1.2 * 1.2)
    assert got.table["decode_small"]["decode"] == pytest.approx(1.2)  # unmeasured (1) scaled as well
    assert cc.table["prefill"]["decode"] == 1.5  # the original is untouched
    assert drift_corrected(cc, 1.1, busy_factor=1.1).table == cc.table
    with pytest.raises(TypeError, match="co-located"):
        drift_corrected(base, 1.0, busy_factor=1.1)
    for bad in (0.0, -1.0, math.nan, "x"):
        with pytest.raises(ValueError, match="co-located drift factor"):
            drift_corrected(cc, 1.0, busy_factor=bad)


# ---- validate brackets the real runs ---------------------------------------------------------------------

def _validate_setup(tmp_path, monkeypatch, prof: Profile, truth_factor: float, replicas: int = 1,
                    truth: object = None, busy: tuple[float, ...] = (), loop: tuple[float, ...] = ()):
    """run_validate with a stand-in executor (the simulator with step times `truth_factor` x the profile's,
    or the cost model `truth`) and a stand-in drift check (1.1 before, 1.3 after; `busy`: the co-located
    check's factors in order; `loop`: the loop drift check's, each a factor or a whole check's record);
    returns (run, events)."""
    pytest.importorskip("torch")
    import sim.calibrate
    import sim.calibrate_cli
    from sim.cluster import simulate

    events: list[str] = []
    truth = truth if truth is not None else drift_corrected(prof.cost, truth_factor)

    def run_workload(w, cfg, **kw):
        events.append("run")
        return simulate(w, cfg, cost=truth)

    def read_steps(path):
        return {"start": np.array([0.0, 0.01]), "duration": np.array([0.02, 0.02]), "replica": np.array([0, 1]),
                "decode_context": np.array([100, 100]), "prefill_tokens": np.array([0, 0]),
                "decode_seqs": np.array([1, 1]), "attention_pairs": np.array([100, 100]),
                "sampled": np.array([1, 1]), "decode_groups": np.array([1, 1]),
                "decode_padded_context": np.array([112, 112]), "decode_breaks": np.array([6, 0])}

    factors = iter([1.1, 1.1, 1.3, 1.3])  # each check settles on its second measurement (sim.calibrate.settled_drift)

    def fake_measure(runner, p, **kw):
        events.append("probe")
        return {"factor": next(factors), "shapes": [], "repeats": 0, "warmup": 0, "seconds": 0.0}

    from executor.replay import resolve_model

    fake = types.ModuleType("executor.replay")
    fake.run_workload, fake.read_steps, fake.resolve_model = run_workload, read_steps, resolve_model
    monkeypatch.setitem(sys.modules, "executor.replay", fake)
    monkeypatch.setattr(sim.calibrate, "measure_drift", fake_measure)
    monkeypatch.setattr(sim.calibrate_cli, "drift_probe_runner", lambda *a, **k: events.append("build") or object())
    busy_it = iter(busy)

    def fake_colocated(p, runner, device=None):
        events.append("busy")
        return {"factor": next(busy_it), "shapes": [], "neighbours": p.neighbours, "attempts": []}

    monkeypatch.setattr(sim.calibrate_cli, "colocated_drift", fake_colocated)
    loop_it = iter(loop)

    def fake_loop(model_config, replicas, num_blocks, forward, block_size, device, contention=False, lengths=None,
                  cfg=None, rate=None, requests=None, gaps=None):
        events.append("loop")
        f = next(loop_it)
        return {**(f if isinstance(f, dict) else {"factor": f}), "replicas": replicas, "contention": contention,
                "lengths": lengths, "cfg": cfg, "rate": rate, "requests": requests, "gaps": gaps}

    monkeypatch.setattr(sim.calibrate, "loop_pace", fake_loop)
    path = save_profile_file(prof, tmp_path / "p.toml")

    def run(drift_check: bool, busy_drift_check: bool = True, **kw):
        kw.setdefault("loop_drift_check", False)  # None: on for the CPU
        from policies.scheduler import SchedulerConfig
        from sim.config import SimConfig
        from traces.workload import Request, Workload

        w = Workload.from_requests([Request(i, 0.04 * i, 40 + 20 * (i % 3), 12) for i in range(24)], name="w")
        cfg = SimConfig(replicas=replicas, profile=str(path), scheduler=SchedulerConfig(prefix_caching=False))
        return sim.calibrate_cli.run_validate(w, cfg, str(path), "tiny", "cpu", kw.pop("repeat", 1), 60.0,
                                              drift_check=drift_check,
                                              busy_drift_check=busy_drift_check, **kw)

    return run, events


def test_validate_scales_the_simulator_by_the_bracketing_factor(tmp_path, monkeypatch):
    level = math.sqrt(1.1 * 1.3)
    run, events = _validate_setup(tmp_path, monkeypatch, synthetic_profile(max_context=1024), level)
    out = run(True)
    assert events == ["build", "probe", "probe", "run", "probe", "probe"]
    assert out["drift"]["enabled"] and out["drift"]["factor"] == pytest.approx(level)
    assert out["drift"]["before"]["factor"] == 1.1 and out["drift"]["after"]["factor"] == 1.3
    # the stand-in executor runs exactly the corrected model: the corrected prediction has no error left
    for m in ("ttft.p50", "tpot.p50", "e2e.p50", "e2e.p99"):
        assert out["comparison"]["metrics"][m]["rel_error"] == pytest.approx(0.0, abs=1e-9)
        assert out["comparison_uncorrected"]["metrics"][m]["rel_error"] < -0.05
    assert out["sim_uncorrected"]["e2e"]["p50"] < out["sim"]["e2e"]["p50"]
    assert any("1.10 x their profiled time before the real run(s) and 1.30 x after" in n for n in out["notes"])
    # request by request, the headline (corrected) prediction is exact as well
    pe = out["paired"][0]
    assert pe["requests"] == 24 and all(pe[m]["median"] == pytest.approx(0.0, abs=1e-9) for m in ("ttft", "e2e"))


def test_validate_corrects_co_located_replicas_by_the_busy_check(tmp_path, monkeypatch):
    """Two co-located replicas: the stand-in executor's steps run at the alone drift (1.1 .. 1.3) beside an
    idle neighbour and at the busy drift (1.4 .. 1.6 x the busy medians) beside a busy one. The co-located
    check's prediction has no error left; the alone check alone predicts too fast."""
    prof = busy_profile(1.3)
    level, blevel = math.sqrt(1.1 * 1.3), math.sqrt(1.4 * 1.6)
    truth = drift_corrected(prof.contention_cost(), level, blevel)
    run, events = _validate_setup(tmp_path, monkeypatch, prof, 1.0, replicas=2, truth=truth, busy=(1.4, 1.6))
    out = run(True)
    assert events == ["build", "probe", "probe", "busy", "run", "probe", "probe", "busy"]
    cb = out["drift"]["colocated"]
    assert cb["enabled"] and cb["factor"] == pytest.approx(blevel)
    assert cb["contention_scale"] == pytest.approx(blevel / level)
    assert len(cb["steps_real_over_corrected"]) == 1
    for m in ("ttft.p50", "tpot.p50", "e2e.p50", "e2e.p99"):
        assert out["comparison"]["metrics"][m]["rel_error"] == pytest.approx(0.0, abs=1e-9)
    for m in ("tpot.p50", "e2e.p50"):
        assert out["comparison_alone_drift"]["metrics"][m]["rel_error"] < -0.01
        alone = out["comparison_alone_drift"]["metrics"][m]["rel_error"]
        assert out["comparison_uncorrected"]["metrics"][m]["rel_error"] < alone
    # turned off: the alone check only, and the comparison is its
    run, events = _validate_setup(tmp_path, monkeypatch, prof, 1.0, replicas=2, truth=truth, busy=(1.4, 1.6))
    out = run(True, busy_drift_check=False)
    assert "busy" not in events and not out["drift"]["colocated"]["enabled"]
    assert out["comparison"] is out["comparison_alone_drift"]
    # a profile measured alone has no busy medians: skipped, with a note saying why
    run, events = _validate_setup(tmp_path, monkeypatch, synthetic_profile(max_context=1024), 1.0, replicas=2)
    out = run(True)
    assert "busy" not in events and out["drift"]["colocated"]["skipped"]


def test_validate_without_the_drift_check(tmp_path, monkeypatch):
    run, events = _validate_setup(tmp_path, monkeypatch, synthetic_profile(max_context=1024), 1.0)
    out = run(False)
    assert events == ["run"] and out["drift"] == {"enabled": False}
    assert not any("drift" in n for n in out["notes"])
    assert out["comparison"] is out["comparison_uncorrected"]
    assert out["comparison"]["metrics"]["e2e.p50"]["rel_error"] == pytest.approx(0.0, abs=1e-9)


def test_validate_repeated_pairs_each_later_real_run_with_the_first(tmp_path, monkeypatch):
    """--repeat 2: both real runs between the two checks, the errors against their median, and the executor
    against itself request by request (the stand-in executor repeats itself exactly: no difference)."""
    run, events = _validate_setup(tmp_path, monkeypatch, synthetic_profile(max_context=1024), math.sqrt(1.1 * 1.3))
    out = run(True, repeat=2)
    assert events == ["build", "probe", "probe", "run", "run", "probe", "probe"]
    assert out["comparison"]["repeats"] == 2 and len(out["paired"]) == len(out["step_check"]) == 2
    (pr,) = out["paired_real"]
    assert pr["requests"] == 24 and all(pr[m]["median"] == 0.0 and pr[m]["p90"] == 0.0 for m in ("ttft", "e2e"))
    assert out["comparison"]["metrics"]["e2e.p50"]["real_runs"] == [out["real"][0]["e2e"]["p50"]] * 2
    assert run(False)["paired_real"] == []


def test_validate_brackets_the_real_run_with_the_loop_drift_check(tmp_path, monkeypatch):
    """The loop drift check runs outside the reference-shape checks, and its prediction (the forward time
    scaled by the geometric mean of its two factors) is the headline; the reference-shape check's is kept
    beside it. A check handed in as `loop_before` replaces the first one. Not asked either way, it runs on
    the CPU."""
    prof = synthetic_profile(max_context=1024)
    level = math.sqrt(1.2 * 1.5)
    run, events = _validate_setup(tmp_path, monkeypatch, prof, level, loop=(1.2, 1.5))
    out = run(True, loop_drift_check=True)
    assert events == ["loop", "build", "probe", "probe", "run", "probe", "probe", "loop"]
    lp = out["loop_drift"]
    assert lp["enabled"] and lp["factor"] == pytest.approx(level) and not lp["before_shared"]
    assert lp["before"]["factor"] == 1.2 and lp["after"]["factor"] == 1.5
    assert lp["before"]["replicas"] == 1 and not lp["before"]["contention"]
    # the stand-in executor runs at the loop check's pace: its prediction (the headline) has no error left, the
    # reference-shape check's (1.1 .. 1.3) has
    assert out["headline"] == "loop" and out["comparison"] is out["comparison_loop_drift"]
    for m in ("ttft.p50", "tpot.p50", "e2e.p50", "e2e.p99"):
        assert out["comparison"]["metrics"][m]["rel_error"] == pytest.approx(0.0, abs=1e-9)
    assert abs(out["comparison_reference_drift"]["metrics"]["e2e.p50"]["rel_error"]) > 0.02
    assert out["sim"]["e2e"]["p50"] == out["comparison"]["metrics"]["e2e.p50"]["sim"]
    assert all(out["paired"][0][m]["median"] == pytest.approx(0.0, abs=1e-9) for m in ("ttft", "e2e"))
    assert any("loop drift check (cell mix) ran 1.20 x the cost model before the real run(s) and 1.50 x after" in n
               for n in out["notes"])
    # the previous run's check serves as this one's before: one new check, after the run
    run, events = _validate_setup(tmp_path, monkeypatch, prof, level, loop=(1.5,))
    out = run(False, loop_drift_check=True, loop_before={"factor": 1.2})
    assert events == ["run", "loop"]
    assert out["loop_drift"]["before_shared"] and out["loop_drift"]["factor"] == pytest.approx(level)
    assert out["comparison_loop_drift"]["metrics"]["e2e.p50"]["rel_error"] == pytest.approx(0.0, abs=1e-9)
    # off: no replay, no comparison, the headline is the reference-shape check's (or the uncorrected one)
    run, events = _validate_setup(tmp_path, monkeypatch, prof, 1.0, loop=(1.2, 1.5))
    out = run(False)
    assert events == ["run"] and out["loop_drift"] == {"enabled": False} and out["comparison_loop_drift"] is None
    assert out["headline"] == "uncorrected" and out["comparison"] is out["comparison_reference_drift"]
    # not asked either way: on for the CPU
    run, events = _validate_setup(tmp_path, monkeypatch, prof, level, loop=(1.2, 1.5))
    out = run(False, loop_drift_check=None)
    assert events == ["loop", "run", "loop"] and out["headline"] == "loop"


def test_validate_reads_the_loop_check_by_kind(tmp_path, monkeypatch):
    """Checks that record their decode and with-prefill ratios: beside the headline (one factor for every
    step), the prediction that scales each kind of step by its own geometric mean. A stand-in executor whose
    decode steps run 1.2-1.5 x the model and its prefill steps 1.0-1.1 x is predicted exactly by it, not by
    the single factor."""
    prof = synthetic_profile(max_context=1024)
    b = {"factor": 1.15, "decode": 1.2, "with_prefill": 1.0}
    a = {"factor": 1.4, "decode": 1.5, "with_prefill": 1.1}
    fd, fw = math.sqrt(1.2 * 1.5), math.sqrt(1.0 * 1.1)
    run, events = _validate_setup(tmp_path, monkeypatch, prof, 1.0, truth=kind_corrected(prof.cost, fd, fw),
                                  loop=(b, a))
    out = run(False, loop_drift_check=True)
    lp = out["loop_drift"]
    assert out["headline"] == "loop" and out["comparison"] is out["comparison_loop_drift"]
    assert lp["decode_factor"] == pytest.approx(fd) and lp["with_prefill_factor"] == pytest.approx(fw)
    assert lp["factor"] == pytest.approx(math.sqrt(1.15 * 1.4))
    for m in ("ttft.p50", "tpot.p50", "e2e.p50", "e2e.p99"):
        assert out["comparison_loop_kind"]["metrics"][m]["rel_error"] == pytest.approx(0.0, abs=1e-9)
    # one factor (1.27) for every step: the steps with prefill tokens too slow, and with them TTFT and (most of
    # this workload's tokens come out of mixed steps) TPOT
    one = out["comparison"]["metrics"]
    assert one["ttft.p50"]["rel_error"] > 0.05 and one["tpot.p50"]["rel_error"] > 0.05
    # a check with no ratio of one kind: no reading by kind
    run, events = _validate_setup(tmp_path, monkeypatch, prof, 1.0, loop=({"factor": 1.1}, a))
    out = run(False, loop_drift_check=True)
    assert out["comparison_loop_kind"] is None and out["loop_drift"]["decode_factor"] is None


def test_validate_loop_check_on_the_workloads_own_lengths(tmp_path, monkeypatch):
    """--loop-mix workload: the check's requests draw their (prompt, output) pairs from the workload being
    validated (nothing else of it); the calibration mix borrows nothing; an unknown mix is refused up
    front."""
    prof = synthetic_profile(max_context=1024)
    run, events = _validate_setup(tmp_path, monkeypatch, prof, 1.0, loop=(1.1, 1.2))
    out = run(False, loop_drift_check=True, loop_mix="workload")
    lp = out["loop_drift"]
    assert lp["mix"] == "workload" and events == ["loop", "run", "loop"]
    pairs = {(40 + 20 * (i % 3), 12) for i in range(24)}  # the stand-in workload's
    for check in (lp["before"], lp["after"]):
        inp, outp = check["lengths"].sample(200, np.random.default_rng(0))
        assert set(zip(inp.tolist(), outp.tolist())) == pairs
    run, events = _validate_setup(tmp_path, monkeypatch, prof, 1.0, loop=(1.1, 1.2))
    out = run(False, loop_drift_check=True, loop_mix="calibration")
    assert out["loop_drift"]["mix"] == "calibration" and out["loop_drift"]["before"]["lengths"] is None
    run, events = _validate_setup(tmp_path, monkeypatch, prof, 1.0, loop=(1.1, 1.2))
    with pytest.raises(ValueError, match="--loop-mix='trace' is not one of: workload, cell, calibration"):
        run(False, loop_drift_check=True, loop_mix="trace")
    assert events == []


def test_validate_loop_check_in_the_cells_own_configuration(tmp_path, monkeypatch):
    """--loop-mix cell (the default): the check replays the workload's lengths under the validated
    configuration (scheduler, router, replicas, KV blocks), its arrivals resampled from the workload's own
    gaps (--loop-arrivals gaps, the default) or Poisson at its mean rate (poisson); the other mixes replay the
    calibration configuration (no cfg, no rate, no gaps)."""
    prof = synthetic_profile(max_context=1024)
    run, events = _validate_setup(tmp_path, monkeypatch, prof, 1.0, loop=(1.1, 1.2))
    out = run(False, loop_drift_check=True)
    lp = out["loop_drift"]
    assert lp["mix"] == "cell" and events == ["loop", "run", "loop"]
    for check in (lp["before"], lp["after"]):
        assert check["rate"] is None  # the stand-in workload: 24 requests 40 ms apart, so 23 gaps of 40 ms
        assert np.asarray(check["gaps"]) == pytest.approx(np.full(23, 0.04))
        assert check["cfg"].scheduler == out_cfg_scheduler(out) and check["cfg"].router == out["config"]["router"]
        assert check["cfg"].num_blocks == out["config"]["num_blocks"] > 0
        assert check["requests"] == 24  # 25 req/s: 24 arrive within a second
        inp, outp = check["lengths"].sample(200, np.random.default_rng(0))
        assert set(zip(inp.tolist(), outp.tolist())) == {(40 + 20 * (i % 3), 12) for i in range(24)}
    run, events = _validate_setup(tmp_path, monkeypatch, prof, 1.0, loop=(1.1, 1.2))
    lp = run(False, loop_drift_check=True, loop_arrivals="poisson")["loop_drift"]
    for check in (lp["before"], lp["after"]):
        assert check["rate"] == pytest.approx(23 / (0.04 * 23)) and check["gaps"] is None
        assert check["requests"] == 24 and check["cfg"].router == out["config"]["router"]
    run, events = _validate_setup(tmp_path, monkeypatch, prof, 1.0, loop=(1.1, 1.2))
    lp = run(False, loop_drift_check=True, loop_mix="workload")["loop_drift"]
    assert lp["before"]["cfg"] is None and lp["before"]["rate"] is None and lp["before"]["requests"] is None
    assert lp["before"]["gaps"] is None
    run, events = _validate_setup(tmp_path, monkeypatch, prof, 1.0, loop=(1.1, 1.2))
    with pytest.raises(ValueError, match="--loop-arrivals='renewal' is not one of: gaps, poisson"):
        run(False, loop_drift_check=True, loop_arrivals="renewal")
    assert events == []


def test_a_cell_check_of_a_sparse_workload_replays_fewer_requests():
    """cell_check_requests: 24 requests where they arrive within a minute at the workload's rate, fewer (down to
    8) where they would not, so the check stays about a minute long; a rate that is not positive is refused."""
    from sim.calibrate_cli import CELL_CHECK_SPAN_S, cell_check_requests

    assert cell_check_requests(25.0) == cell_check_requests(0.64) == 24  # the fidelity matrix's lightest cell
    assert cell_check_requests(0.3) == 19 and (19 - 1) / 0.3 <= CELL_CHECK_SPAN_S < 19 / 0.3
    assert cell_check_requests(0.01) == 8
    for bad in (0.0, -2.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="rate=.* is out of range"):
            cell_check_requests(bad)


def out_cfg_scheduler(out: dict):
    """The scheduler of a validate result's flattened config, as a SchedulerConfig."""
    from policies.scheduler import SchedulerConfig

    return SchedulerConfig(**{k.split(".", 1)[1]: v for k, v in out["config"].items() if k.startswith("scheduler.")})


def test_validate_loop_also_compares_a_second_mix_on_the_same_runs(tmp_path, monkeypatch):
    """--loop-also: a second check brackets the first (before it, and after it), and its prediction is kept
    beside the headline. The stand-in executor runs 1.25 x the profile: the second check, reading exactly that,
    predicts with no error left; the headline's check, reading 1.1, predicts too fast."""
    prof = synthetic_profile(max_context=1024)
    run, events = _validate_setup(tmp_path, monkeypatch, prof, 1.25, loop=(1.25, 1.1, 1.1, 1.25))
    out = run(False, loop_drift_check=True, loop_mix="workload", loop_also="cell")
    assert events == ["loop", "loop", "run", "loop", "loop"]
    lp = out["loop_drift"]
    assert lp["factor"] == pytest.approx(1.1) and lp["mix"] == "workload" and lp["before"]["cfg"] is None
    al = lp["also"]
    assert al["mix"] == "cell" and al["factor"] == pytest.approx(1.25) and al["before"]["cfg"] is not None
    for m in ("ttft.p50", "tpot.p50", "e2e.p50", "e2e.p99"):
        assert out["comparison_loop_also"]["metrics"][m]["rel_error"] == pytest.approx(0.0, abs=1e-9)
        assert out["comparison"]["metrics"][m]["rel_error"] < -0.05
    run, events = _validate_setup(tmp_path, monkeypatch, prof, 1.0, loop=(1.1, 1.2))
    out = run(False, loop_drift_check=True)
    assert out["loop_drift"]["also"] is None and out["comparison_loop_also"] is None
    run, events = _validate_setup(tmp_path, monkeypatch, prof, 1.0, loop=(1.1, 1.2))
    with pytest.raises(ValueError, match="--loop-also=cell .* needs the loop drift check on"):
        run(False, loop_drift_check=False, loop_also="cell")
    with pytest.raises(ValueError, match="--loop-also='trace' is not one of"):
        run(False, loop_drift_check=True, loop_also="trace")
    assert events == []


def test_mix_replay_runs_the_given_configuration_at_the_given_rate(monkeypatch):
    """mix_replay with cfg and rate replays under that configuration (its own seed) at that Poisson rate;
    without them, the calibration configuration (chunked 512, round robin) at 60 % of capacity; a rate that
    is not a positive number is refused before anything runs."""
    from policies.scheduler import SchedulerConfig
    from sim.calibrate import mix_replay
    from sim.config import SimConfig

    seen = []

    def run_workload(w, cfg, **kw):
        seen.append((w, cfg))

    fake = types.ModuleType("executor.replay")
    fake.run_workload, fake.read_steps = run_workload, lambda path: {"steps": str(path)}
    monkeypatch.setitem(sys.modules, "executor.replay", fake)
    cfg = SimConfig(replicas=3, router="least_outstanding", num_blocks=777, seed=5,
                    scheduler=SchedulerConfig(prefix_caching=False, chunked_prefill=False,
                                              max_num_batched_tokens=2048))
    mix_replay("tiny", 2, 512, TRUE, 16, "cpu", seed=11, requests=400, cfg=cfg, rate=4.0)
    w, got = seen[-1]
    assert got.router == "least_outstanding" and got.replicas == 3 and got.num_blocks == 777 and got.seed == 11
    assert got.scheduler == cfg.scheduler
    assert len(w) == 400 and (len(w) - 1) / w.span == pytest.approx(4.0, rel=0.15)
    mix_replay("tiny", 2, 512, TRUE, 16, "cpu", seed=11, requests=400)
    w2, got = seen[-1]
    assert got.router == "round_robin" and got.replicas == 2 and got.num_blocks == 512
    assert got.scheduler.max_num_batched_tokens == 512 and got.scheduler.chunked_prefill
    assert (len(w2) - 1) / w2.span != pytest.approx(4.0, rel=0.15)
    n = len(seen)
    for bad in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="rate=.* is out of range"):
            mix_replay("tiny", 2, 512, TRUE, 16, "cpu", cfg=cfg, rate=bad)
    assert len(seen) == n


def test_mix_replay_resamples_the_given_gaps(monkeypatch):
    """mix_replay with gaps: the replay's arrivals are drawn from those gaps (each cut to max_gap_s), the same
    ones for the same seed, under the given configuration; a rate and gaps together are refused."""
    from policies.scheduler import SchedulerConfig
    from sim.calibrate import CHECK_MAX_GAP_S, mix_replay
    from sim.config import SimConfig

    seen = []
    fake = types.ModuleType("executor.replay")
    fake.run_workload = lambda w, cfg, **kw: seen.append((w, cfg))
    fake.read_steps = lambda path: {"steps": str(path)}
    monkeypatch.setitem(sys.modules, "executor.replay", fake)
    cfg = SimConfig(replicas=2, router="least_outstanding", num_blocks=300,
                    scheduler=SchedulerConfig(prefix_caching=False))
    gaps = np.array([0.0, 0.0, 0.02, 40.0])  # a burst, then a long pause: as the code slice arrives
    mix_replay("tiny", 2, 512, TRUE, 16, "cpu", seed=4, requests=300, cfg=cfg, gaps=gaps)
    w, got = seen[-1]
    d = np.diff(w.arrival)
    assert len(w) == 300 and w.arrival[0] == 0.0 and got.router == "least_outstanding"
    assert set(np.round(d, 9).tolist()) == {0.0, 0.02, CHECK_MAX_GAP_S}
    assert w.meta["arrivals"]["process"] == "resampled gaps"
    mix_replay("tiny", 2, 512, TRUE, 16, "cpu", seed=4, requests=300, cfg=cfg, gaps=gaps)
    assert seen[-1][0].arrival.tolist() == w.arrival.tolist()
    assert seen[-1][0].input_tokens.tolist() == w.input_tokens.tolist()
    mix_replay("tiny", 2, 512, TRUE, 16, "cpu", seed=4, requests=300, cfg=cfg, gaps=gaps, max_gap_s=1.0)
    assert np.diff(seen[-1][0].arrival).max() == pytest.approx(1.0)
    n = len(seen)
    with pytest.raises(ValueError, match="not both"):
        mix_replay("tiny", 2, 512, TRUE, 16, "cpu", cfg=cfg, rate=2.0, gaps=gaps)
    with pytest.raises(ValueError, match="gap 0 is -1"):
        mix_replay("tiny", 2, 512, TRUE, 16, "cpu", cfg=cfg, gaps=np.array([-1.0]))
    assert len(seen) == n


def test_loop_pace_is_the_calibration_replays_busy_time_against_the_cost_model(monkeypatch):
    """loop_pace replays the same calibration mix every time (one seed) and returns its steps' busy time over
    the cost model's prediction, serving-loop terms and contention included, overall and by kind."""
    import sim.calibrate
    from sim.calibrate import loop_factors, loop_pace, steps_features

    cost = TRUE.with_prefill_factor(1.1).with_wake((0.2, 1.3))
    n = 40
    pt = np.where(np.arange(n) % 5 == 0, 300, 0)
    log = {"replica": np.zeros(n, np.int64), "decode_context": np.where(pt > 0, 0, 400),
           "prefill_tokens": pt, "decode_seqs": np.where(pt > 0, 0, 4), "sampled": np.where(pt > 0, 1, 4),
           "attention_pairs": np.where(pt > 0, 300 * 301 // 2, 400), "decode_groups": np.where(pt > 0, 0, 1),
           "decode_padded_context": np.where(pt > 0, 0, 400), "decode_breaks": np.where(pt > 0, 0, 20)}
    log["start"] = np.arange(n) * 0.05
    log["duration"] = np.zeros(n)
    pred = cost.predict(steps_features(log)[0]) * loop_factors(cost, log)
    assert loop_factors(cost, log)[0] == pytest.approx(1.1)  # the first step started at 0: not woken
    log["duration"] = pred * np.where(pt > 0, 1.6, 1.2)
    calls = []

    def fake_mix(model_config, replicas, num_blocks, c, block_size, device, seed, requests, cfg=None, rate=None,
                 gaps=None):
        calls.append((model_config, replicas, num_blocks, c, block_size, device, seed, requests, cfg, rate))
        gaps_seen.append(gaps)
        return log

    gaps_seen = []

    monkeypatch.setattr(sim.calibrate, "mix_replay", fake_mix)
    a = loop_pace("tiny", 2, 512, cost, 16, "cpu")
    b = loop_pace("tiny", 2, 512, cost, 16, "cpu")
    assert calls[0] == calls[1] == ("tiny", 2, 512, cost, 16, "cpu", sim.calibrate.LOOP_CHECK_SEED,
                                    sim.calibrate.LOOP_CHECK_REQUESTS, None, None)
    assert a["decode"] == pytest.approx(1.2) and a["with_prefill"] == pytest.approx(1.6)
    busy = pred * np.where(pt > 0, 1.6, 1.2)
    assert a["factor"] == pytest.approx(busy.sum() / pred.sum()) and 1.2 < a["factor"] < 1.6
    assert a["steps"] == n and a["decode_steps"] == 32 and a["with_prefill_steps"] == 8
    assert b["factor"] == a["factor"] and a["mix"] == "calibration" and a["arrivals"] == "poisson"
    c = loop_pace("tiny", 2, 512, cost, 16, "cpu", gaps=np.array([0.0, 3.0]))
    assert gaps_seen[-1].tolist() == [0.0, 3.0] and gaps_seen[0] is None and c["factor"] == a["factor"]
    assert c["arrivals"].startswith("resampled gaps")
    with pytest.raises(ValueError, match="requests=2"):
        loop_pace("tiny", 2, 512, cost, requests=2)


def test_validate_notes_a_profile_measured_with_another_host_allocator(tmp_path, monkeypatch):
    """A profile from before executor.hostmem (no host_memory in its device record) measured glibc's
    defaults; an executor that keeps freed memory runs long prefills faster, and validate says so."""
    def with_host(run_setup, prof):
        run, _ = run_setup(prof)
        fake = sys.modules["executor.replay"]
        inner = fake.run_workload

        def run_workload(w, cfg, **kw):
            res = inner(w, cfg, **kw)
            res.meta["device_info"] = {"host_memory": "retain: glibc malloc keeps freed memory"}
            return res

        monkeypatch.setattr(fake, "run_workload", run_workload)
        return run(False)["notes"]

    def setup(prof):
        return _validate_setup(tmp_path, monkeypatch, prof, 1.0)

    notes = with_host(setup, synthetic_profile(max_context=1024))
    assert [n for n in notes if "host memory" in n] == [
        "the profile was measured with host memory 'system: not recorded (profiled before twinfer set it)', the "
        "executor ran with 'retain: glibc malloc keeps freed memory': long prefills differ by about 10 % for that "
        "reason alone (executor.hostmem); profile again"]
    prof = synthetic_profile(max_context=1024)
    prof.device["host_memory"] = "retain: glibc 2.36 malloc keeps freed memory"
    assert not any("host memory" in n for n in with_host(setup, prof))


def test_validate_refuses_a_drift_check_it_cannot_make_before_running(tmp_path, monkeypatch):
    prof = synthetic_profile(max_context=1024)
    prof.grid = []
    run, events = _validate_setup(tmp_path, monkeypatch, prof, 1.0)
    with pytest.raises(ValueError, match="no grid measurements"):
        run(True)
    assert events == []
    prof = synthetic_profile(max_context=1024)
    prof.model = {"name": "default"}  # the executor runs "tiny": the grid's times are another model's
    run, events = _validate_setup(tmp_path, monkeypatch, prof, 1.0)
    with pytest.raises(ValueError, match="measured on model 'default', the executor runs 'tiny'"):
        run(True)
    assert events == []


# ---- on the real executor ---------------------------------------------------------------------------------

def test_drift_check_on_the_tiny_model():
    pytest.importorskip("torch")
    from sim.calibrate_cli import drift_probe_runner, run_profile

    prof, _ = run_profile("tiny", "cpu", 1, 0, True, 0.25, "linear", 1, 512, 16, 2048, 0, loop_overhead=False)
    runner = drift_probe_runner(prof)
    assert runner.num_threads == 1
    d = measure_drift(runner, prof, repeats=2, warmup=1)
    assert math.isfinite(d["factor"]) and d["factor"] > 0
    assert len(d["shapes"]) >= 3 and all(s["now_s"] > 0 for s in d["shapes"])
    assert {s["label"] for s in d["shapes"]} <= {g["label"] for g in prof.grid}


def test_a_burst_of_load_during_one_check_does_not_set_the_correction(monkeypatch):
    """settled_drift: checks until two in a row agree within tol; a slow first check (other load) is
    dropped; with no two in a row agreeing, the median of all checks."""
    import sim.calibrate

    def with_factors(*fs):
        it = iter(fs)
        monkeypatch.setattr(sim.calibrate, "measure_drift",
                            lambda runner, prof, **kw: {"factor": next(it), "shapes": [], "seconds": 0.0})

    with_factors(1.37, 1.02, 1.04)
    d = sim.calibrate.settled_drift(object(), None)
    assert d["attempts"] == [1.37, 1.02, 1.04] and d["settled"]
    assert d["factor"] == pytest.approx(math.sqrt(1.02 * 1.04))
    with_factors(1.00, 1.01, 9.9)  # agreed at once: the third is never measured
    d = sim.calibrate.settled_drift(object(), None)
    assert d["attempts"] == [1.00, 1.01] and d["factor"] == pytest.approx(math.sqrt(1.01))
    with_factors(1.0, 1.2, 1.5)  # never two in a row within 5 %: the median, marked unsettled
    d = sim.calibrate.settled_drift(object(), None)
    assert d["factor"] == pytest.approx(1.2) and not d["settled"]
    with pytest.raises(ValueError, match="tries"):
        sim.calibrate.settled_drift(object(), None, tries=0)


def test_a_warm_up_throws_away_the_slow_start_beside_a_new_neighbour(monkeypatch):
    """warmup_s: the slow checks right after a neighbour starts (which agree with each other) are made and
    dropped; the checks after them set the factor."""
    import sim.calibrate

    clock = FakeClock()
    monkeypatch.setattr(sim.calibrate, "time", SimpleNamespace(perf_counter=clock.perf_counter))
    it = iter([1.71, 1.69, 1.28, 1.04, 1.02, 1.015, 0.9])

    def fake_measure(runner, prof, **kw):
        clock.t += 1.5  # one check
        return {"factor": next(it), "shapes": [], "seconds": 1.5}

    monkeypatch.setattr(sim.calibrate, "measure_drift", fake_measure)
    d = sim.calibrate.settled_drift(object(), None, warmup_s=5.0)
    assert d["warmup_attempts"] == [1.71, 1.69, 1.28, 1.04] and d["attempts"] == [1.02, 1.015]
    assert d["factor"] == pytest.approx(math.sqrt(1.02 * 1.015)) and d["settled"]
    it = iter([1.71, 1.69, 1.28])
    assert sim.calibrate.settled_drift(object(), None)["factor"] == pytest.approx(math.sqrt(1.71 * 1.69))  # fooled
    with pytest.raises(ValueError, match="warmup_s"):
        sim.calibrate.settled_drift(object(), None, warmup_s=-1.0)


# ---- refitting a profile's stored grid --------------------------------------------------------------

def test_refit_finds_a_knee_in_the_stored_medians_and_keeps_the_rest(tmp_path):
    from sim.calibrate import FEATURES, read_profile_file, refit_profile
    from sim.cli import main

    prof = busy_profile(1.3)
    assert prof.cost.padded_knee is None  # TRUE is a straight line: no knee fitted
    # the stored medians as a machine whose decode attention outgrows a cache past 4096 padded tokens
    grid = []
    for r in prof.grid:
        extra = 4e-6 * max(0, r["decode_padded"] - 4096)
        grid.append({**r, "median_s": r["median_s"] + extra, "busy_median_s": r["busy_median_s"] + 1.3 * extra})
    prof = dataclasses.replace(prof, grid=grid, cost=prof.cost.with_overhead(0.0007))
    path = save_profile_file(prof, tmp_path / "old.toml")
    new = refit_profile(read_profile_file(path), form="linear")  # (noiseless: a max of two lines fits as well)
    assert new.cost.padded_knee == 4096, new.fit["knee"]["why"]
    assert new.cost.shared[FEATURES.index("decode_padded_over")] == pytest.approx(4e-6, rel=0.05)
    assert new.busy.padded_knee == 4096  # the busy fit takes the alone fit's knee (they are blended)
    # the old straight line misses the knee's shapes by up to a third; the refit has them
    assert max(abs(r["predicted_s"] / r["median_s"] - 1) for r in prof.grid) > 0.3
    assert new.fit["heldout"]["median_rel_error"] < 1e-6
    # the same held-back shapes, the same split settings; the loop overhead and the measurements kept
    assert [r["heldout"] for r in new.grid] == [r["heldout"] for r in prof.grid]
    assert new.fit["holdout_share"] == prof.fit["holdout_share"] and new.fit["seed"] == prof.fit["seed"]
    assert new.cost.step_overhead_s == 0.0007
    assert [r["median_s"] for r in new.grid] == [r["median_s"] for r in prof.grid]
    assert new.contention == prof.contention and new.fit["refit"]["was"]["decode_padded_knee"] is None
    assert drift_reference_shapes(new) == drift_reference_shapes(prof)
    for r in new.grid:
        assert r["predicted_s"] == pytest.approx(r["median_s"], rel=1e-6)
    # the command writes it
    out = tmp_path / "new.toml"
    assert main(["profile", "--refit", str(path), "--form", "linear", "--out", str(out), "--json"]) == 0
    back = read_profile_file(out)
    assert back.cost.padded_knee == 4096 and back.cost.coefficients() == new.cost.coefficients()
    # a fixed knee, or none
    assert refit_profile(prof, padded_knee=None).cost.padded_knee is None
    assert refit_profile(prof, padded_knee=8192).cost.padded_knee == 8192


def test_refit_needs_a_grid_with_the_padded_features():
    from sim.calibrate import refit_profile

    prof = busy_profile(1.3)
    with pytest.raises(ValueError, match="no grid measurements"):
        refit_profile(dataclasses.replace(prof, grid=[]))
    old = [{k: v for k, v in r.items() if k != "decode_padded"} for r in prof.grid]
    with pytest.raises(ValueError, match="grid row 1 .* has no decode_padded"):
        refit_profile(dataclasses.replace(prof, grid=old), where="p.toml")


def test_loop_pace_records_its_steps_spread_for_the_step_jitter(monkeypatch):
    """loop_pace keeps the spread of its steps' real / model ratios by kind (sim.jitter.StepJitter): decode steps
    that ran 1.1 and 1.3 x the model in turn give a table from 1.1 / 1.2 to 1.3 / 1.2 around a mean of 1; the
    eight prefill steps, all 1.6 x, give a flat one."""
    import sim.calibrate
    from sim.calibrate import loop_factors, loop_pace, step_ratios, steps_features
    from sim.jitter import StepJitter

    n = 40
    pt = np.where(np.arange(n) % 5 == 0, 300, 0)
    log = {"replica": np.zeros(n, np.int64), "decode_context": np.where(pt > 0, 0, 400),
           "prefill_tokens": pt, "decode_seqs": np.where(pt > 0, 0, 4), "sampled": np.where(pt > 0, 1, 4),
           "attention_pairs": np.where(pt > 0, 300 * 301 // 2, 400), "decode_groups": np.where(pt > 0, 0, 1),
           "decode_padded_context": np.where(pt > 0, 0, 400), "decode_breaks": np.where(pt > 0, 0, 20),
           "start": np.arange(n) * 0.05, "duration": np.zeros(n)}
    pred = TRUE.predict(steps_features(log)[0]) * loop_factors(TRUE, log)
    dec_f = np.where(np.arange(n) % 2 == 0, 1.1, 1.3)
    log["duration"] = pred * np.where(pt > 0, 1.6, dec_f)
    r = step_ratios(TRUE, log)
    assert len(r["decode"]) == 32 and len(r["with_prefill"]) == 8
    assert np.allclose(r["with_prefill"], 1.6) and np.allclose(r["decode"], dec_f[pt == 0])
    monkeypatch.setattr(sim.calibrate, "mix_replay", lambda *a, **k: log)
    j = StepJitter.from_dict(loop_pace("tiny", 2, 512, TRUE, 16, "cpu")["jitter"])
    mean = r["decode"].mean()
    assert j.quantile("decode", 0.0) == pytest.approx(1.1 / mean)
    assert j.quantile("decode", 1.0) == pytest.approx(1.3 / mean)
    assert np.allclose(j.quantiles["with_prefill"], 1.0) and j.steps == {"decode": 32, "with_prefill": 8}


def test_validate_predicts_with_the_loop_checks_step_jitter_beside_the_headline(tmp_path, monkeypatch):
    """With the loop checks' step spread recorded, validate also predicts with each step's time drawn from it
    ("comparison_loop_jitter"): a table of ones predicts exactly what the single factor does; a spread one
    predicts something else for the same requests; checks that kept no spread give no such prediction."""
    from sim.jitter import StepJitter

    prof = synthetic_profile(max_context=1024)
    ones = StepJitter({"decode": [1.0, 1.0], "with_prefill": [1.0, 1.0]}).to_dict()
    run, _ = _validate_setup(tmp_path, monkeypatch, prof, 1.2,
                             loop=({"factor": 1.2, "jitter": ones}, {"factor": 1.2, "jitter": ones}))
    out = run(False, loop_drift_check=True)
    for m in ("ttft.p50", "tpot.p50", "e2e.p50", "e2e.p99"):
        assert out["comparison_loop_jitter"]["metrics"][m]["rel_error"] == pytest.approx(
            out["comparison_loop_drift"]["metrics"][m]["rel_error"], abs=1e-9)
    assert out["loop_drift"]["jitter"]["decode"]["p50"] == 1.0
    spread = StepJitter.from_ratios({"decode": np.linspace(0.5, 2.5, 60),
                                     "with_prefill": np.linspace(0.5, 2.5, 60)}).to_dict()
    run, _ = _validate_setup(tmp_path, monkeypatch, prof, 1.2,
                             loop=({"factor": 1.2, "jitter": spread}, {"factor": 1.2, "jitter": spread}))
    out = run(False, loop_drift_check=True)
    cj, cl = out["comparison_loop_jitter"]["metrics"], out["comparison_loop_drift"]["metrics"]
    assert cj["e2e.p99"]["sim"] != pytest.approx(cl["e2e.p99"]["sim"], rel=1e-6)
    for m in ("ttft.p50", "tpot.p50", "e2e.p50", "e2e.p99"):  # the median of the seeds, inside their band
        lo, hi = cj[m]["prediction_band"]
        assert lo <= cj[m]["sim"] <= hi and lo < hi
        assert cj[m]["real_in_prediction_band"] == (lo <= cj[m]["real"] <= hi)
    assert out["comparison_loop_jitter"]["in_prediction_band"] == sum(
        bool(r["real_in_prediction_band"]) for r in cj.values())
    assert out["comparison"] is out["comparison_loop_drift"]  # the headline stays the single factor
    run, _ = _validate_setup(tmp_path, monkeypatch, prof, 1.2, loop=(1.2, 1.2))
    out = run(False, loop_drift_check=True)
    assert out["comparison_loop_jitter"] is None and out["loop_drift"]["jitter"] is None


def test_validate_keeps_the_requests_on_both_sides(tmp_path, monkeypatch):
    """keep_records (validate --records): the headline prediction's records, the prediction at the run's own
    step pace and each real run's, every request of the workload on each side, matched by id."""
    from traces.records import RunResult

    run, _ = _validate_setup(tmp_path, monkeypatch, synthetic_profile(max_context=1024), 1.2, loop=(1.2, 1.2))
    prefix = tmp_path / "rec" / "cell"
    out = run(False, loop_drift_check=True, repeat=2, keep_records=prefix)
    sides = {name: RunResult.read_csv(f"{prefix}.{name}.csv") for name in ("sim", "paced", "real.0", "real.1")}
    for rec in sides.values():
        assert sorted(rec["id"].tolist()) == list(range(24)) and set(rec["status"]) == {"ok"}
    sim_ttft = sides["sim"]["first_token"] - sides["sim"]["arrival"]
    assert np.median(sim_ttft) == pytest.approx(out["sim"]["ttft"]["p50"])
    assert np.array_equal(sides["real.0"]["finish"], sides["real.1"]["finish"])  # the stand-in runs the same twice
