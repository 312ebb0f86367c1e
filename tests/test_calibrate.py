"""Calibration: the fitted cost model, profile files, the grid, and validate's comparison."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sim.calibrate import (
    FEATURES, MEASURED, FittedCost, GridPoint, Profile, _build_plan, blend, compare, default_grid, feature_matrix, fit_cost,
    choose_knee, design, holdout_split, load_profile_file, neighbour_share, read_profile_file, save_profile_file, scaled, to_toml,
)
from sim.cost import StepFeatures, grouping_features, load_cost_model, plan_features

# intercept, prefill_tokens, decode_seqs, prefill_attn, decode_ctx, logits, batched
# ... decode_groups, decode_padded, decode_breaks: the columns of a feature_matrix (MEASURED)
LINEAR_X = [0.008, 2.8e-4, 6e-4, 1.8e-7, 2.5e-6, 7e-4, 0.004, 4e-4, 6e-7, 1e-6]
LINEAR = LINEAR_X[:9] + [0.0] + LINEAR_X[9:]  # as a cost model's coefficients (FEATURES: no knee term)
LINE_A = [0.020, 1e-5, 2e-5, 0.0, 1e-6, 1e-4, 0.0, 0.0, 0.0, 0.0]  # flat: weight-bound small steps
LINE_B = [0.001, 3e-4, 5e-4, 2e-7, 2e-6, 5e-4, 0.002, 0.0, 0.0, 0.0]  # steep: compute-bound large steps


def grid_X() -> np.ndarray:
    return feature_matrix(p.features() for p in default_grid())


def kinds() -> list[str]:
    return [p.kind for p in default_grid()]


def max_cost(kv: int = 10_000) -> FittedCost:
    return FittedCost([0.0005, 0, 0, 0, 0, 0, 0], kv, line_a=LINE_A, line_b=LINE_B, name="max-test")


def knee_cost(kv: int = 10_000) -> FittedCost:
    """LINEAR plus 3 us per padded decode token past 4096 (a step whose attention outgrows a cache)."""
    return FittedCost(LINEAR_X[:9] + [3e-6] + LINEAR_X[9:], kv, name="knee-test", padded_knee=4096)


def sample_profile(cost: FittedCost) -> Profile:
    return Profile(
        cost=cost, device={"device": "cpu", "type": "cpu", "cuda": None, "name": 'AMD "EPYC"', "torch_threads": 1},
        model={"name": "default", "hidden": 384, "rope_scaling": None}, versions={"python": "3.11", "torch": "2.13"},
        kv={"num_blocks": 625, "block_size": 16},
        fit={"form": cost.form, "heldout": {"n": 3, "median_rel_error": 0.02, "max_rel_error": 0.1}, "why": "x"},
        measure={"repeats": 7, "threads": 1},
        grid=[{"kind": "decode", "label": "decode:dec8@64", "decode_seqs": 8, "median_s": 0.0165, "heldout": True},
              {"kind": "prefill", "label": "prefill:32@0", "decode_seqs": 0, "median_s": 0.022, "heldout": False}],
        created="2025-01-01T00:00:00Z", name="default@cpu")


# ---- the cost model ------------------------------------------------------------------------------

def test_linear_step_time_is_the_dot_product():
    c = FittedCost(LINEAR, 1000)
    f = StepFeatures(100, 4, 5050.0, 400, 5)
    want = LINEAR[0] + LINEAR[1] * 100 + LINEAR[2] * 4 + LINEAR[3] * 5050 + LINEAR[4] * 400 + LINEAR[5] * 5 + LINEAR[6]
    assert c.form == "linear"
    assert c.step_time(f) == pytest.approx(want, rel=1e-12)
    assert c.predict(feature_matrix([f]))[0] == pytest.approx(want, rel=1e-12)


def test_max_form_takes_the_larger_line_plus_shared():
    c = max_cost()
    small, big = StepFeatures(0, 1, 0.0, 64, 1), StepFeatures(2048, 0, 2048 * 2049 / 2, 0, 1)
    x = feature_matrix([small, big])
    a, b = x @ np.array(LINE_A), x @ np.array(LINE_B)
    assert a[0] > b[0] and b[1] > a[1]  # each line rules one end
    assert [c.step_time(small), c.step_time(big)] == pytest.approx(np.maximum(a, b) + 0.0005, rel=1e-12)


def test_coefficients_must_be_non_negative_and_complete():
    with pytest.raises(ValueError, match=">= 0"):
        FittedCost([0.01, -1e-4, 0, 0, 0, 0, 0], 100)
    with pytest.raises(ValueError, match="11 coefficients"):
        FittedCost([0.01, 1e-4], 100)
    with pytest.raises(ValueError, match="unknown coefficient"):
        FittedCost({"intercept": 0.01, "flops": 1.0}, 100)
    with pytest.raises(ValueError, match="kv_capacity_tokens"):
        FittedCost(LINEAR, 0)


@pytest.mark.parametrize("cost", [FittedCost(LINEAR, 10_000), max_cost(), knee_cost()], ids=["linear", "max", "knee"])
def test_decode_run_agrees_with_step_time(cost):
    # 7 rows padded to 7 x 1024 tokens: past the knee, and (as in the simulator) constant over the run
    f = StepFeatures(0, 7, 0.0, 7 * 300, 7, decode_groups=1, decode_padded=7 * 1024)
    run = cost.decode_run(f)
    assert run.duration(0) == pytest.approx(cost.step_time(f), rel=1e-12)
    assert run.elapsed(1) == pytest.approx(cost.step_time(f), rel=1e-12)
    total = 0.0
    for i in range(200):  # decode_ctx grows by decode_seqs per step
        fi = StepFeatures(0, 7, 0.0, 7 * 300 + 7 * i, 7, decode_groups=1, decode_padded=7 * 1024)
        assert run.duration(i) == pytest.approx(cost.step_time(fi), rel=1e-12)
        total += cost.step_time(fi)
        if i in (0, 9, 57, 199):
            assert run.elapsed(i + 1) == pytest.approx(total, rel=1e-11)


@settings(max_examples=60, deadline=None)
@given(b=st.integers(1, 256), ctx=st.integers(2, 4096), k=st.integers(1, 400),
       a=st.lists(st.floats(0, 1e-2), min_size=7, max_size=7), bb=st.lists(st.floats(0, 1e-2), min_size=7, max_size=7))
def test_decode_run_sums_step_times_for_any_max_model(b, ctx, k, a, bb):
    cost = FittedCost([1e-4] + [0.0] * 6, 1, line_a=a, line_b=bb)
    f = StepFeatures(0, b, 0.0, b * ctx, b)
    total = sum(cost.step_time(StepFeatures(0, b, 0.0, b * ctx + b * i, b)) for i in range(k))
    assert cost.decode_run(f).elapsed(k) == pytest.approx(total, rel=1e-9, abs=1e-15)


@settings(max_examples=60, deadline=None)
@given(x=st.lists(st.integers(0, 10_000), min_size=5, max_size=5), j=st.integers(0, 4), d=st.integers(1, 10_000))
def test_predictions_never_decrease_when_a_feature_grows(x, j, d):
    for cost in (FittedCost(LINEAR, 1), max_cost(), knee_cost()):
        f = StepFeatures(*x)
        y = list(x)
        y[j] += d
        assert cost.step_time(StepFeatures(*y)) >= cost.step_time(f)


# ---- fitting -------------------------------------------------------------------------------------

def test_fit_recovers_known_linear_coefficients_from_noisy_measurements():
    X = grid_X()
    rng = np.random.default_rng(1)
    y = (X @ np.array(LINEAR_X)) * rng.normal(1.0, 0.01, len(X))
    r = fit_cost(X, y, 5000, kinds=kinds(), form="linear")
    assert r.model.form == "linear" and r.model.kv_capacity_tokens == 5000
    # the well-determined coefficients come back within a few percent
    for k in ("intercept", "prefill_tokens", "decode_ctx", "batched"):
        i = FEATURES.index(k)
        assert r.model.shared[i] == pytest.approx(LINEAR[i], rel=0.05), k
    # what a break in a block table costs: the grid's contiguous twins of scattered shapes pin it down
    i = FEATURES.index("decode_breaks")
    assert r.model.shared[i] == pytest.approx(LINEAR[i], rel=0.15)
    assert r.errors["heldout"]["median_rel_error"] < 0.015
    assert r.errors["heldout"]["n"] == len(r.test) > 0 and len(r.train) + len(r.test) == len(X)
    assert not set(r.train) & set(r.test)


def test_fit_exact_data_is_exact():
    X = grid_X()
    y = X @ np.array(LINEAR_X)
    r = fit_cost(X, y, 1, kinds=kinds(), form="linear")
    assert r.model.shared == pytest.approx(LINEAR, rel=1e-6)
    assert r.model.padded_knee is None and r.model.shared[FEATURES.index("decode_padded_over")] == 0, r.knee
    assert r.errors["heldout"]["max_rel_error"] < 1e-8


def test_fit_recovers_a_max_of_two_lines_and_auto_prefers_it():
    X = grid_X()
    rng = np.random.default_rng(2)
    y = np.maximum(X @ np.array(LINE_A), X @ np.array(LINE_B)) * rng.normal(1.0, 0.01, len(X))
    auto = fit_cost(X, y, 1, kinds=kinds(), form="auto")
    lin = fit_cost(X, y, 1, kinds=kinds(), form="linear")
    assert auto.model.form == "max", auto.chosen_because
    assert auto.errors["heldout"]["median_rel_error"] < 0.03
    assert auto.errors["heldout"]["median_rel_error"] < lin.errors["heldout"]["median_rel_error"]
    # extrapolation beyond the grid: the true formula at 4x the largest step, within a few percent
    f = feature_matrix([StepFeatures(8192, 0, 8192 * 8193 / 2, 0, 1), StepFeatures(0, 512, 0.0, 512 * 4096, 512)])
    truth = np.maximum(f @ np.array(LINE_A), f @ np.array(LINE_B))
    assert auto.model.predict(f) == pytest.approx(truth, rel=0.1)


def test_auto_keeps_linear_on_linear_data():
    X = grid_X()
    y = (X @ np.array(LINEAR_X)) * np.random.default_rng(3).normal(1.0, 0.02, len(X))
    r = fit_cost(X, y, 1, kinds=kinds())
    assert r.model.form == "linear"
    # and no knee: none of the candidates clearly beats a straight line in cross-validation
    assert r.model.padded_knee is None and r.knee["chosen"] is None, r.knee["why"]
    assert set(r.knee["cv_rms_rel_error"]) >= {"none", "4096"}


def test_fit_finds_a_padded_token_knee_and_its_slope():
    X = grid_X()
    truth = knee_cost()
    y = truth.predict(X) * np.random.default_rng(4).normal(1.0, 0.01, len(X))
    r = fit_cost(X, y, 1, kinds=kinds())
    assert r.model.padded_knee == 4096, r.knee["why"]
    assert r.knee["cv_rms_rel_error"]["4096"] < 0.95 * r.knee["cv_rms_rel_error"]["none"]
    assert r.model.shared[FEATURES.index("decode_padded_over")] == pytest.approx(3e-6, rel=0.15)
    assert r.errors["heldout"]["median_rel_error"] < 0.015
    plain = fit_cost(X, y, 1, kinds=kinds(), padded_knee=None)
    assert plain.model.padded_knee is None
    assert r.errors["heldout"]["median_rel_error"] < plain.errors["heldout"]["median_rel_error"]
    # beyond the grid it goes on as a straight line: 1024 rows x 2048 tokens, within a few percent
    big = StepFeatures(0, 1024, 0.0, 1024 * 2048, 1024, decode_groups=1, decode_padded=1024 * 2048)
    assert r.model.step_time(big) == pytest.approx(truth.step_time(big), rel=0.05)


def test_knee_needs_shapes_on_both_sides():
    X = grid_X()
    pad = X[:, MEASURED.index("decode_padded")]
    small = X[pad <= 2048]  # no decode shape past any candidate but the first
    y = small @ np.array(LINEAR_X)
    d = choose_knee(small, y, candidates=(4096, 8192))
    assert d["chosen"] is None and "no candidate" in d["why"]
    assert choose_knee(X[:5], (X @ np.array(LINEAR_X))[:5])["why"].startswith("no knee: too few shapes")


def test_design_and_knee_checks():
    X = feature_matrix([StepFeatures(0, 4, 0.0, 4000, 4, decode_groups=1, decode_padded=5000),
                        StepFeatures(128, 0, 8256.0, 0, 1)])
    over = FEATURES.index("decode_padded_over")
    assert design(X, 4096)[:, over].tolist() == [904.0, 0.0]
    assert design(X, None)[:, over].tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="feature matrix"):
        design(X[:, :5], 4096)
    with pytest.raises(ValueError, match="needs its knee"):
        FittedCost(LINEAR_X[:9] + [1e-6], 1)
    with pytest.raises(ValueError, match="decode_padded_knee"):
        FittedCost(LINEAR, 1, padded_knee=0)
    with pytest.raises(ValueError, match="different knees"):
        blend(knee_cost(), FittedCost(LINEAR, 10_000), 0.5)
    c = knee_cost()
    assert c.predict(X).tolist() == pytest.approx([c.step_time(StepFeatures(0, 4, 0.0, 4000, 4, decode_groups=1,
                                                                             decode_padded=5000)),
                                                   c.step_time(StepFeatures(128, 0, 8256.0, 0, 1))], rel=1e-12)
    assert scaled(c, 2.0).padded_knee == 4096 and blend(c, scaled(c, 2.0), 0.5).padded_knee == 4096


def test_fit_rejects_bad_input():
    X = grid_X()[:5]
    with pytest.raises(ValueError, match="> 0"):
        fit_cost(X, np.array([0.01, 0.0, 0.01, 0.01, 0.01]), 1)
    with pytest.raises(ValueError, match="form"):
        fit_cost(X, np.full(5, 0.01), 1, form="cubic")


def test_holdout_split_is_stratified_and_seeded():
    ks = ["decode"] * 8 + ["prefill"] * 4 + ["mixed"] * 2
    tr, te = holdout_split(ks, 0.25, seed=0)
    assert sorted(tr.tolist() + te.tolist()) == list(range(14))
    held = [ks[i] for i in te]
    assert held.count("decode") == 2 and held.count("prefill") == 1 and held.count("mixed") == 0
    assert np.array_equal(te, holdout_split(ks, 0.25, seed=0)[1])
    assert len(holdout_split(ks, 0.0)[1]) == 0


# ---- profile files -------------------------------------------------------------------------------

@pytest.mark.parametrize("ext", ["toml", "json"])
@pytest.mark.parametrize("cost", [FittedCost(LINEAR, 10_000, name="lin"), max_cost(), knee_cost()],
                         ids=["linear", "max", "knee"])
def test_profile_round_trip(tmp_path, ext, cost):
    prof = sample_profile(cost)
    path = save_profile_file(prof, tmp_path / f"p.{ext}")
    back = read_profile_file(path)
    assert back.cost.coefficients() == cost.coefficients()
    assert back.cost.form == cost.form and back.cost.kv_capacity_tokens == cost.kv_capacity_tokens
    assert back.grid == prof.grid and back.fit == prof.fit and back.measure == prof.measure
    assert back.kv == {"num_blocks": 625, "block_size": 16, "capacity_tokens": cost.kv_capacity_tokens}
    assert back.device["name"] == 'AMD "EPYC"' and back.created == prof.created and back.name == "default@cpu"
    if ext == "json":
        assert back.device["cuda"] is None
    else:  # TOML has no null: None values are left out
        assert "cuda" not in back.device
    assert back.cost.padded_knee == cost.padded_knee
    f = StepFeatures(300, 9, 45150.0, 9 * 700, 10, decode_groups=2, decode_padded=9 * 800)
    assert load_profile_file(path).step_time(f) == cost.step_time(f)
    assert save_profile_file(back, tmp_path / f"again.{ext}").read_text() == path.read_text()


def test_busy_neighbour_model_round_trips_and_is_what_the_file_loads(tmp_path):
    alone = FittedCost(LINEAR, 10_000, name="lin")
    busy = FittedCost([2 * c for c in LINEAR], 10_000)
    prof = dataclasses.replace(sample_profile(alone), busy=busy, neighbours=1, busy_fit={"form": "linear"})
    for ext in ("toml", "json"):
        back = read_profile_file(save_profile_file(prof, tmp_path / f"b.{ext}"))
        assert back.neighbours == 1 and back.busy.coefficients()["shared"] == busy.coefficients()["shared"]
        f = StepFeatures(64, 3, 2080.0, 900, 4)
        assert back.cost_at(0.0).step_time(f) == pytest.approx(alone.step_time(f))
        assert back.cost_at(0.25).step_time(f) == pytest.approx(1.25 * alone.step_time(f))
        assert load_profile_file(tmp_path / f"b.{ext}").step_time(f) == pytest.approx(busy.step_time(f))


def test_blend_and_scaled_keep_decode_runs_exact():
    f = StepFeatures(0, 5, 0.0, 5 * 200, 5)
    for cost in (blend(FittedCost(LINEAR, 1), max_cost(), 0.3), scaled(max_cost(), 1.7)):
        total = sum(cost.step_time(StepFeatures(0, 5, 0.0, 1000 + 5 * i, 5)) for i in range(50))
        assert cost.decode_run(f).elapsed(50) == pytest.approx(total, rel=1e-10)
    assert scaled(max_cost(), 2.0).step_time(f) == pytest.approx(2 * max_cost().step_time(f))
    with pytest.raises(ValueError):
        blend(max_cost(), max_cost(), 1.5)


def test_neighbour_share_settles_on_the_other_replicas_utilisation():
    from sim.config import SimConfig
    from traces.workload import Request, Workload

    alone = FittedCost([0.01, 1e-4, 1e-3, 0, 1e-6, 0, 0], 100_000)
    prof = dataclasses.replace(sample_profile(alone), busy=scaled(alone, 2.0), neighbours=1)
    reqs = [Request(i, 0.5 * i, 200, 20) for i in range(40)]
    w = Workload.from_requests(reqs, name="steady")
    u1, c1 = neighbour_share(w, SimConfig(replicas=1), prof)
    assert u1 == 0.0 and c1 is prof.cost
    u, cost = neighbour_share(w, SimConfig(replicas=2, router="round_robin"), prof)
    assert 0.0 < u < 1.0
    from sim.cluster import simulate

    r = simulate(w, SimConfig(replicas=2, router="round_robin"), cost=cost)
    util = [s.busy_time / (r.end - r.start) for s in r.replicas]
    assert u == pytest.approx(np.mean(util), abs=0.03)  # self-consistent
    assert neighbour_share(w, SimConfig(replicas=2), dataclasses.replace(prof, busy=None))[0] == 0.0


def test_profile_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        read_profile_file(tmp_path / "none.toml")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="not a twinfer profile"):
        read_profile_file(bad)
    neg = tmp_path / "neg.toml"
    neg.write_text('format = "twinfer-profile"\nversion = 1\n[kv]\ncapacity_tokens = 10\n'
                   "[coefficients.shared]\nintercept = -1.0\n")
    with pytest.raises(ValueError, match="neg.toml.*>= 0"):
        read_profile_file(neg)
    broken = tmp_path / "broken.toml"
    broken.write_text("format = \n")
    with pytest.raises(ValueError, match="not valid TOML"):
        read_profile_file(broken)


def test_toml_writer_exact():
    text = to_toml({"a": 1, "b": 0.5, "c": "x\"y", "d": True, "e": None, "f": [1, 2.0],
                    "t": {"k": 1e-7, "inner": {"z": float("inf")}}, "rows": [{"r": 1}, {"r": 2}]})
    assert text == ('a = 1\nb = 0.5\nc = "x\\"y"\nd = true\nf = [1, 2.0]\n\n[t]\nk = 1e-07\n\n[t.inner]\nz = inf\n'
                    "\n[[rows]]\nr = 1\n\n[[rows]]\nr = 2\n")


def test_load_cost_model_file_drives_the_simulator(tmp_path):
    from sim.cluster import simulate
    from sim.config import SimConfig
    from traces.workload import Request, Workload

    path = save_profile_file(sample_profile(max_cost(kv=20_000)), tmp_path / "fit.toml")
    cost = load_cost_model(str(path))
    assert isinstance(cost, FittedCost) and cost.kv_capacity_tokens == 20_000
    assert cost.profile.model["name"] == "default"
    rng = np.random.default_rng(0)
    reqs = [Request(i, float(t), int(a), int(o)) for i, (t, a, o) in
            enumerate(zip(np.cumsum(rng.exponential(0.05, 60)), rng.integers(10, 800, 60), rng.integers(1, 120, 60)))]
    w = Workload.from_requests(reqs, name="synthetic")
    jumped = simulate(w, SimConfig(profile=str(path), replicas=2))
    stepped = simulate(w, SimConfig(profile=str(path), replicas=2, jump=False))
    assert list(jumped.records["status"]) == ["ok"] * 60
    assert jumped.meta["cost_model"] == "default@cpu"  # the profile names its model
    assert jumped.meta["kv_blocks_per_replica"] == 20_000 // 16
    for col in ("first_token", "finish"):  # the closed-form decode runs give the step-by-step times
        assert jumped.records[col] == pytest.approx(stepped.records[col], rel=1e-9)


# ---- the grid ------------------------------------------------------------------------------------

def test_grid_features_match_the_simulators_plan_features():
    for p in default_grid(quick=True) + default_grid()[::5]:
        plan = _build_plan(p, vocab=512, block_size=16, num_blocks=40_000, first_id=0)
        f = plan_features(plan)
        grouping_features(f, plan, 16)
        assert f == p.features(16), p.label()
        assert f.decode_groups >= (1 if p.decodes else 0) and f.decode_padded >= f.decode_ctx
        # never shared; scattered over the cache, as a live replica's are, no block right after the one before
        # it; or each table one run of ids
        ids = [b for s in plan.prefill + plan.decode for b in s.block_table]
        assert len(set(ids)) == len(ids)
        steps = {y - x for s in plan.prefill + plan.decode for x, y in zip(s.block_table, s.block_table[1:])}
        assert (1 not in steps) if p.layout == "scattered" else steps <= {1}, p.label()
        assert f.decode_breaks == (sum(len(s.block_table) - 1 for s in plan.decode) if p.layout == "scattered" else 0)


def test_grid_respects_limits():
    pts = default_grid(max_tokens=512, max_context=1024, max_seqs=16)
    assert pts and all(p.features().tokens <= 512 and p.max_context <= 1024 for p in pts)
    assert all(len(p.prefills) + len(p.decodes) <= 16 for p in pts)
    assert {p.kind for p in default_grid()} == {"decode", "prefill", "mixed"}
    assert len(default_grid(quick=True)) < len(default_grid())


def test_measure_grid_on_the_tiny_model():
    torch = pytest.importorskip("torch")
    from executor.model import LlamaForCausalLM, preset
    from executor.runner import ModelRunner
    from sim.calibrate import measure_grid, profile_from_measurements

    torch.manual_seed(0)
    cfg = preset("tiny")
    runner = ModelRunner(LlamaForCausalLM.from_seed(cfg, 0), 256, 16, num_threads=1)
    pts = [GridPoint("decode", decodes=(40,) * 4), GridPoint("prefill", prefills=((0, 64, True),)),
           GridPoint("prefill", prefills=((32, 32, False),)), GridPoint("mixed", ((0, 16, True),), (20, 30))]
    meas = measure_grid(runner, pts, repeats=2, warmup=1)
    assert [len(m.samples) for m in meas] == [2, 2, 2, 2] and all(m.median > 0 for m in meas)
    prof, fit = profile_from_measurements(meas, 4096, holdout=0.0, name="tiny@cpu")
    assert len(prof.grid) == 4 and prof.versions["torch"] == torch.__version__
    assert prof.fit["heldout"]["n"] == 0 and prof.fit["train"]["n"] == 4


# ---- validate's comparison ----------------------------------------------------------------------

def summary(scale: float, queue_p50: float = 0.0, rps: float = 2.0) -> dict:
    def dist(base):
        return {"n": 10, "mean": base * scale, "p50": base * scale, "p90": 2 * base * scale, "p95": 3 * base * scale,
                "p99": 4 * base * scale}

    q = dist(0.1)
    q["p50"] = queue_p50
    return {"requests": 10, "ok": 10, "rejected": 0, "timed_out": 0, "failed": 0, "ttft": dist(0.2),
            "tpot": dist(0.05), "e2e": dist(3.0), "queueing": q, "throughput_rps": rps, "output_tokens_per_s": 100 * rps}


def test_compare_relative_errors_exact():
    c = compare(summary(1.1, rps=2.2), [summary(1.0)])
    m = c["metrics"]
    assert c["repeats"] == 1
    for k in ("ttft.p50", "tpot.p90", "e2e.p99", "queueing.p99", "throughput_rps"):
        assert m[k]["rel_error"] == pytest.approx(0.1), k
    assert m["ttft.p50"]["sim"] == pytest.approx(0.22) and m["ttft.p50"]["real"] == pytest.approx(0.2)
    assert m["e2e.p99"]["abs_error"] == pytest.approx(1.2)
    assert m["queueing.p50"]["rel_error"] == 0.0  # both ~0: no error, not a division by zero
    assert m["ttft.p50"]["in_noise"] is None  # one real run: no noise band
    assert c["median_abs_rel_error"] == pytest.approx(0.1)
    assert set(m) == {f"{a}.{q}" for a in ("ttft", "tpot", "e2e", "queueing") for q in ("p50", "p90", "p99")} | {
        "throughput_rps", "output_tokens_per_s"}


def test_compare_repeats_give_the_noise_band():
    reals = [summary(0.9), summary(1.0), summary(1.3)]
    c = compare(summary(1.2), reals)
    r = c["metrics"]["e2e.p50"]
    assert r["real"] == pytest.approx(3.0) and r["real_min"] == pytest.approx(2.7) and r["real_max"] == pytest.approx(3.9)
    assert r["rel_error"] == pytest.approx(0.2)
    assert r["in_noise"] is True and r["real_spread_rel"] == pytest.approx(0.4)
    out = compare(summary(1.5), reals)["metrics"]["e2e.p50"]
    assert out["in_noise"] is False and out["rel_error"] == pytest.approx(0.5)
    assert c["worst"]["abs_rel_error"] == pytest.approx(0.2)


def test_compare_undefined_errors_are_none():
    sim = summary(1.0, queue_p50=0.5)
    real = summary(1.0, queue_p50=0.0)
    real["ttft"]["p99"] = math.nan
    m = compare(sim, [real])["metrics"]
    assert m["queueing.p50"]["rel_error"] is None  # real 0, sim 0.5 s: no relative error exists
    assert m["queueing.p50"]["abs_error"] == pytest.approx(0.5)
    assert m["ttft.p99"]["rel_error"] is None
    with pytest.raises(ValueError):
        compare(sim, [])


def _records(ttft: np.ndarray, out_tokens: int = 11, tpot: float = 0.05) -> dict[str, np.ndarray]:
    n = len(ttft)
    arrival = np.arange(n, dtype=np.float64)
    return {"arrival": arrival, "admitted": arrival, "first_token": arrival + ttft,
            "finish": arrival + ttft + (out_tokens - 1) * tpot,
            "generated_tokens": np.full(n, out_tokens), "status": np.array(["ok"] * n, dtype=object)}


def test_sampling_bands_show_how_fragile_a_percentile_of_few_requests_is():
    from sim.calibrate import sampling_bands

    # 25 short prompts (~0.15 s TTFT) and 23 long ones (~0.40 s): the p50 sits on the gap between them
    rng = np.random.default_rng(1)
    ttft = np.concatenate([0.15 + 0.005 * rng.random(25), 0.40 + 0.01 * rng.random(23)])
    b = sampling_bands(_records(ttft))
    lo, hi = b["ttft.p50"]
    assert lo < 0.16 and hi > 0.39  # resampling a few requests moves the p50 across the whole gap
    assert b == sampling_bands(_records(ttft))  # seeded
    # one cluster: a narrow band around the p50
    lo, hi = sampling_bands(_records(0.15 + 0.005 * rng.random(48)))["ttft.p50"]
    assert 0.15 <= lo < hi <= 0.155
    # every request's TPOT equal: a zero-width band, not an error
    assert sampling_bands(_records(ttft))["tpot.p99"] == (pytest.approx(0.05), pytest.approx(0.05))
    assert set(b) == {f"{a}.{q}" for a in ("ttft", "tpot", "e2e", "queueing") for q in ("p50", "p90", "p99")}
    with pytest.raises(ValueError, match="level"):
        sampling_bands(_records(ttft), level=1.0)


def test_compare_marks_figures_inside_the_sampling_band():
    bands = {"ttft.p50": (0.15, 0.25), "e2e.p50": (2.9, 3.1)}
    m = compare(summary(1.1), [summary(1.0)], bands)["metrics"]
    assert m["ttft.p50"]["in_sampling_band"] is True and m["ttft.p50"]["sampling_band"] == [0.15, 0.25]
    assert m["e2e.p50"]["in_sampling_band"] is False  # sim 3.3 s
    assert m["tpot.p50"]["in_sampling_band"] is None and m["tpot.p50"]["sampling_band"] is None
    c = compare(summary(1.1), [summary(1.0)])
    assert c["in_sampling_band"] == 0 and c["metrics"]["ttft.p50"]["in_sampling_band"] is None


def test_render_comparison_runs():
    from rich.console import Console

    from sim.calibrate import render_comparison

    con = Console(record=True, width=160)
    con.print(render_comparison(compare(summary(1.1), [summary(1.0), summary(1.2), summary(1.0)])))
    text = con.export_text()
    assert "TTFT p99" in text and "+10.0%" in text and "within noise" in text
    con = Console(record=True, width=160)
    con.print(render_comparison(compare(summary(1.1), [summary(1.0)], {"ttft.p50": (0.15, 0.25)})))
    text = con.export_text()
    assert "90% resampling band" in text and "150.0 ms..250.0 ms" in text and "inside sampling band" in text


# ---- the commands ---------------------------------------------------------------------------------

def test_profile_command_writes_a_usable_profile(tmp_path, capsys):
    pytest.importorskip("torch")
    from sim.cli import main

    out = tmp_path / "tiny.json"
    assert main(["profile", "--model-config", "tiny", "--quick", "--repeats", "1", "--warmup", "0",
                 "--num-blocks", "512", "--out", str(out), "--no-progress", "--no-loop-overhead"]) == 0
    assert "held-out error" in capsys.readouterr().out
    prof = read_profile_file(out)
    assert prof.model["name"] == "tiny" and prof.kv["capacity_tokens"] == 512 * 16
    assert prof.measure["threads"] == 1 and prof.measure["repeats"] == 1
    assert prof.grid and all(g["median_s"] > 0 for g in prof.grid) and any(g["heldout"] for g in prof.grid)
    assert prof.versions["python"] and prof.versions["torch"] and prof.versions["numpy"]
    assert load_cost_model(str(out)).step_time(StepFeatures(100, 4, 5050.0, 400, 5)) > 0


def test_profile_from_an_engine_step_log(tmp_path, capsys):
    pytest.importorskip("torch")
    from executor.replay import STEP_COLUMNS
    from sim.cli import main

    rng = np.random.default_rng(4)
    path = tmp_path / "steps.csv"
    rows = []
    for i in range(300):
        pt = int(rng.choice([0, 0, 0, rng.integers(1, 600)]))
        ds = int(rng.integers(0 if pt else 1, 24))
        dctx = int(ds * rng.integers(2, 900))
        pairs = pt * (pt + 1) // 2 + dctx
        sampled = ds + (1 if pt else 0)
        groups = int(rng.integers(1, 4)) if ds else 0
        padded = dctx + int(rng.integers(0, 16 * ds + 1)) if ds else 0
        brk = int(rng.integers(0, padded // 16 + 1)) if ds else 0
        x = np.array([1, pt, ds, pairs - dctx, dctx, sampled, float(pt + ds >= 2), groups, padded, brk], dtype=float)
        dur = float(x @ np.array(LINEAR_X))
        rec = {"replica": 0, "start": 1.0 * i, "duration": dur, "schedule_s": 1e-5, "prefill_seqs": int(pt > 0),
               "prefill_tokens": pt, "decode_seqs": ds, "prefill_context": pt, "decode_context": dctx,
               "attention_pairs": pairs, "sampled": sampled, "preempted": 0, "kv_blocks_used": 1, "running": 1,
               "waiting": 0, "decode_groups": groups, "decode_padded_context": padded, "decode_breaks": brk}
        rows.append(",".join(repr(rec[c]) if isinstance(rec.get(c), float) else str(rec.get(c, 0)) for c in STEP_COLUMNS))
    path.write_text(",".join(STEP_COLUMNS) + "\n" + "\n".join(rows) + "\n")
    out = tmp_path / "fit.toml"
    assert main(["profile", "--from-steps", str(path), "--model-config", "tiny", "--form", "linear",
                 "--out", str(out), "--no-progress"]) == 0
    prof = read_profile_file(out)
    assert prof.measure["steps"] == 300 and prof.grid == []
    assert prof.fit["heldout"]["max_rel_error"] < 1e-6
    assert prof.cost.shared == pytest.approx(LINEAR, rel=1e-4)
    assert prof.cost.step_overhead_s == 0.0 and prof.measure["loop_overhead"]["gaps"] == 0  # 1 s apart: idle


def test_loop_gaps_keep_back_to_back_steps_only():
    from sim.calibrate import gap_stats, loop_gaps

    steps = {"replica": np.array([0, 0, 0, 1, 1, 0]), "start": np.array([0.0, 0.011, 0.022, 0.0, 0.5, 1.0]),
             "duration": np.array([0.010, 0.010, 0.010, 0.010, 0.010, 0.010])}
    g = loop_gaps(steps)  # replica 0: 1 ms, 1 ms, then 0.968 s idle; replica 1: 0.49 s idle
    assert g == pytest.approx([0.001, 0.001])
    assert gap_stats(g)["mean_s"] == pytest.approx(0.001) and gap_stats(np.zeros(0))["gaps"] == 0


def test_step_overhead_is_added_to_every_step_and_run():
    cost = max_cost().with_overhead(0.002)
    f = StepFeatures(0, 3, 0.0, 300, 3)
    assert cost.step_time(f) == pytest.approx(max_cost().step_time(f) + 0.002)
    assert cost.decode_run(f).elapsed(10) == pytest.approx(max_cost().decode_run(f).elapsed(10) + 0.02)
    assert cost.coefficients()["step_overhead_s"] == 0.002
    with pytest.raises(ValueError):
        FittedCost(LINEAR, 1, step_overhead_s=-1.0)


def test_validate_command_end_to_end(tmp_path, capsys):
    pytest.importorskip("torch")
    from sim.cli import main

    prof = save_profile_file(sample_profile(FittedCost([0.002, 2e-5, 1e-4, 0, 4e-7, 0, 0], 512 * 16, name="tiny")),
                             tmp_path / "tiny.toml")
    trace = tmp_path / "t.csv"
    trace.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n" + "".join(
        f"2023-11-16 18:15:{s:02d}.0000000,{a},{o}\n" for s, a, o in ((0, 40, 6), (0, 90, 3), (1, 20, 8), (1, 5000, 2))))
    out = tmp_path / "v.json"
    # the sample profile's grid rows carry no features: no drift check possible, and it says so
    assert main(["validate", "--profile", str(prof), "--trace", str(trace), "--model-config", "tiny",
                 "--replicas", "1", "--no-progress"]) == 2
    assert "--no-drift-check" in capsys.readouterr().err
    assert main(["validate", "--profile", str(prof), "--trace", str(trace), "--model-config", "tiny",
                 "--replicas", "1", "--out", str(out), "--no-progress", "--no-drift-check",
                 "--no-loop-drift-check"]) == 0
    text = capsys.readouterr().out
    assert "TTFT p50" in text and "1 requests longer than the model's positions" in text
    assert "drift check" not in text
    d = json.loads(out.read_text())
    assert d["drift"] == {"enabled": False} and d["comparison_uncorrected"] == d["comparison"]
    assert d["requests"] == 3 and d["dropped_too_long"] == 1 and d["comparison"]["repeats"] == 1
    assert d["real"][0]["ok"] == 3 and d["sim"]["ok"] == 3
    assert d["step_check"][0]["steps"] > 0 and d["step_time_corrected"]["factor"] > 0
    assert set(d["comparison"]["metrics"]) >= {"ttft.p50", "tpot.p99", "e2e.p90", "throughput_rps"}


def _tiny_validate_setup(tmp_path):
    """A quick profile of the tiny model (no serving-loop replays) and a three-request trace: (profile,
    its path, the trace's path, a JSON output path)."""
    pytest.importorskip("torch")
    from sim.calibrate_cli import run_profile

    prof, _ = run_profile("tiny", "cpu", 1, 0, True, 0.25, "linear", 1, 512, 16, 2048, 0, loop_overhead=False)
    path = save_profile_file(prof, tmp_path / "tiny.toml")
    trace = tmp_path / "t.csv"
    trace.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n" + "".join(
        f"2023-11-16 18:15:{s:02d}.0000000,{a},{o}\n" for s, a, o in ((0, 40, 6), (0, 90, 3), (1, 20, 8))))
    return prof, path, trace, tmp_path / "v.json"


def test_validate_command_with_the_drift_check(tmp_path, capsys):
    from sim.cli import main

    prof, path, trace, out = _tiny_validate_setup(tmp_path)
    assert main(["validate", "--profile", str(path), "--trace", str(trace), "--replicas", "1", "--out", str(out),
                 "--no-progress"]) == 0  # on by default
    text = capsys.readouterr().out
    assert "drift check: the profile's" in text and "without the drift correction: median |error|" in text
    assert "with the reference-shape check's correction instead" in text
    d = json.loads(out.read_text())
    assert d["headline"] == "loop" and d["loop_drift"]["enabled"]  # the loop check too, by default on the CPU
    assert d["comparison_reference_drift"] != d["comparison_uncorrected"]
    dr = d["drift"]
    assert dr["enabled"] and dr["factor"] == pytest.approx(math.sqrt(dr["before"]["factor"] * dr["after"]["factor"]))
    assert all(s["now_s"] > 0 and s["label"] in {g["label"] for g in prof.grid} for s in dr["before"]["shapes"])
    assert d["sim"]["e2e"]["p50"] != d["sim_uncorrected"]["e2e"]["p50"]  # a measured factor is never exactly 1
    assert set(d["comparison_uncorrected"]["metrics"]) == set(d["comparison"]["metrics"])


def test_validate_command_with_the_loop_drift_check(tmp_path, capsys):
    """The loop drift check on the real executor: the workload's lengths replayed on the replica before and
    after the run, in the run's own configuration and at its rate, its steps read against the profile, and
    the prediction at that pace reported beside the headline (its arrivals drawn from the run's own gaps);
    with --loop-also workload, a second check in the calibration configuration beside it."""
    from sim.cli import main

    _, path, trace, out = _tiny_validate_setup(tmp_path)
    assert main(["validate", "--profile", str(path), "--trace", str(trace), "--replicas", "1", "--out", str(out),
                 "--no-progress", "--no-drift-check", "--loop-drift-check", "--loop-also", "workload"]) == 0
    text = capsys.readouterr().out
    assert "loop drift check (the headline, cell mix): its steps ran" in text
    assert "with a workload mix check instead (" in text
    assert "read by kind instead (decode " in text
    d = json.loads(out.read_text())
    lp = d["loop_drift"]
    assert lp["enabled"] and not lp["before_shared"]
    assert lp["factor"] == pytest.approx(math.sqrt(lp["before"]["factor"] * lp["after"]["factor"]))
    for check in (lp["before"], lp["after"]):
        assert check["requests"] == 24 and check["steps"] == check["decode_steps"] + check["with_prefill_steps"]
        assert check["decode_steps"] > 0 and check["with_prefill_steps"] > 0 and check["factor"] > 0
    assert lp["steps_real_over_corrected"][0] == pytest.approx(d["step_check"][0]["busy_ratio"] / lp["factor"])
    al = lp["also"]
    assert al["mix"] == "workload" and al["factor"] == pytest.approx(math.sqrt(al["before"]["factor"]
                                                                               * al["after"]["factor"]))
    for check in (lp["before"], lp["after"]):
        assert check["router"] == d["config"]["router"] and check["arrivals"].startswith("resampled gaps")
        assert "rate" not in check
    for check in (al["before"], al["after"]):
        assert check["steps"] > 0 and check["requests"] == 24 and "rate" not in check
        assert check["arrivals"] == "poisson"
    assert d["comparison_loop_also"]["metrics"]["e2e.p50"]["sim"] > 0
    # read by kind (beside the headline): each kind's geometric mean over the two checks
    for kind, key in (("decode", "decode_factor"), ("with_prefill", "with_prefill_factor")):
        assert lp[key] == pytest.approx(math.sqrt(lp["before"][kind] * lp["after"][kind]))
    assert d["drift"] == {"enabled": False} and d["headline"] == "loop"
    assert d["comparison_loop_drift"] == d["comparison"] != d["comparison_loop_kind"]
    assert d["comparison_reference_drift"] == d["comparison_uncorrected"]  # with the reference-shape check off
    assert d["comparison"]["metrics"]["e2e.p50"]["sim"] != d["comparison_uncorrected"]["metrics"]["e2e.p50"]["sim"]


def test_the_drift_check_defaults_on_for_the_cpu_and_off_for_cuda():
    from sim.calibrate_cli import default_drift_check

    assert default_drift_check("cpu") and default_drift_check("mps")
    assert not default_drift_check("cuda") and not default_drift_check("cuda:1")


def test_validate_needs_a_profile_file(capsys):
    from sim.cli import main

    assert main(["validate", "--profile", "llama3-8b@h100-80gb", "--limit", "3"]) == 2
    assert "validate needs --profile FILE" in capsys.readouterr().err


def test_a_profile_records_a_weights_directory_and_matches_it_back(tmp_path):
    """A model given as a local weights directory: the profile keeps the directory, the drift check's
    model reference is that directory, and only that directory (not the preset it came from) matches."""
    from executor.model import LlamaForCausalLM, preset
    from executor.replay import resolve_model
    from sim.calibrate_cli import model_record, profile_model_ref, replicas_share_device, same_model

    d = tmp_path / "tiny-weights"
    LlamaForCausalLM.from_seed(preset("tiny"), 3).save_pretrained(d)
    rec = model_record(resolve_model(str(d)))
    assert rec["path"] == str(d.resolve())
    assert rec["hidden"] == preset("tiny").hidden and rec["params"] == preset("tiny").num_params
    from_dir = Profile(cost=None, model=rec)
    assert profile_model_ref(from_dir) == str(d.resolve())
    assert same_model(from_dir, str(d)) and not same_model(from_dir, "tiny")
    other = tmp_path / "other"
    other.mkdir()
    assert not same_model(from_dir, str(other))
    from_preset = Profile(cost=None, model=model_record(resolve_model("tiny")))
    assert "path" not in from_preset.model and profile_model_ref(from_preset) == "tiny"
    assert same_model(from_preset, "tiny") and not same_model(from_preset, str(d))
    # replicas on the one CPU share it; a single replica shares nothing
    assert replicas_share_device(2, "cpu") and not replicas_share_device(1, "cpu")


def test_profile_and_validate_on_a_weights_directory(tmp_path, capsys):
    """`twinfer profile --model-config DIR` and `validate` with its default model: the profile names the
    directory, and validate's executor and drift check load the same weights from it."""
    pytest.importorskip("torch")
    from executor.model import LlamaForCausalLM, preset
    from sim.calibrate_cli import run_profile
    from sim.cli import main

    d = tmp_path / "w"
    LlamaForCausalLM.from_seed(preset("tiny"), 0).save_pretrained(d)
    prof, _ = run_profile(str(d), "cpu", 1, 0, True, 0.25, "linear", 1, 512, 16, 2048, 0, loop_overhead=False)
    assert prof.model["path"] == str(d.resolve())
    path = save_profile_file(prof, tmp_path / "w.toml")
    trace = tmp_path / "t.csv"
    trace.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n" + "".join(
        f"2023-11-16 18:15:{s:02d}.0000000,{a},{o}\n" for s, a, o in ((0, 40, 6), (1, 20, 8))))
    out = tmp_path / "v.json"
    assert main(["validate", "--profile", str(path), "--trace", str(trace), "--replicas", "1", "--out", str(out),
                 "--no-progress", "--no-loop-drift-check"]) == 0
    d_out = json.loads(out.read_text())
    assert d_out["drift"]["enabled"] and d_out["model"] == str(d.resolve())
    assert d_out["requests"] == 2


# ---- waking from idle ----------------------------------------------------------------------------

def _wake_log(factor: float, speeds: list[float], tail: float = 1.05, p1: float = 0.1, p2: float = 0.12,
              p3: float = 0.03):
    """A two-replica step log: per replica, bursts after 1 s idle (four prefill chunks back to back, then two
    decodes), each burst at its own machine speed; the first step after idle `factor` x slower, the second
    still `tail` x, the rest at the burst's speed."""
    rows = []
    for rep in (0, 1):
        t = 0.5 * rep
        for s in speeds:
            t += 1.0
            for pt, pred, f in ((256, p1, factor), (256, p2, tail), (256, p2, 1.0), (256, p1, 1.0), (0, p3, 1.0),
                                (0, p3, 1.0)):
                d = pred * s * f
                rows.append((rep, t, d, pt, pred))
                t += d + 0.0003
    rows.sort(key=lambda r: r[1])
    cols = list(zip(*rows))
    return ({"replica": np.array(cols[0]), "start": np.array(cols[1]), "duration": np.array(cols[2]),
             "prefill_tokens": np.array(cols[3])}, np.array(cols[4]))


def test_wake_from_steps_recovers_the_factor_whatever_the_machine_speed():
    from sim.calibrate import wake_from_steps

    speeds = [1.0, 1.3, 0.8, 1.45, 0.9, 1.1, 1.2, 0.85]
    steps, pred = _wake_log(1.15, speeds)
    w = wake_from_steps(steps, pred, skip=2)
    # 2 replicas x (8 bursts - 2 skipped): every burst says 1.15 although the speed moved by 1.8 x, and the
    # second step's own slowness (x1.05) is not the reference
    assert w["pairs"] == 12 and w["factor"] == pytest.approx(1.15) and w["settle"] == 2
    assert w["idle_s_median"] == pytest.approx(1.0, abs=1e-3)
    # a second step as slow as the first does not hide it (a pair with the next step alone would read 1.0)
    assert wake_from_steps(*_wake_log(1.15, speeds, tail=1.15))["factor"] == pytest.approx(1.15)
    # no slowdown: 1
    assert wake_from_steps(*_wake_log(1.0, speeds, tail=1.0))["factor"] == pytest.approx(1.0)
    # a burst cut after its second step has no settled step to compare with
    late = {k: v.copy() for k, v in steps.items()}
    order = np.lexsort((late["start"], late["replica"]))
    third = order.reshape(2, -1)[:, 2::6].ravel()  # each burst's third step, per replica in time order
    late["start"][third] += 0.2
    cut = wake_from_steps(late, pred)
    assert cut["pairs"] == 0 and cut["factor"] is None
    # too few bursts: measured, not applied
    few = wake_from_steps(*_wake_log(1.15, speeds[:4]))
    assert few["pairs"] == 4 and few["factor"] is None and few["median"] == pytest.approx(1.15)
    with pytest.raises(ValueError, match="predictions"):
        wake_from_steps(steps, pred[:-1])
    with pytest.raises(ValueError, match="settle"):
        wake_from_steps(steps, pred, settle=0)


@pytest.mark.parametrize("direct,colocated", [(True, False), (False, False), (False, True)],
                         ids=["direct-driver", "simpy-driver", "co-located-model"])
def test_the_simulator_slows_only_the_first_step_after_idle(direct, colocated):
    from sim.cluster import simulate
    from sim.config import SimConfig
    from sim.contention import ContentionCost
    from traces.workload import Request, Workload

    plain = FittedCost(LINEAR, 100_000, name="lin", step_overhead_s=0.001)
    woken = plain.with_wake((0.2, 2.0))
    assert woken.wake == (0.2, 2.0) and woken.coefficients()["wake_factor"] == 2.0
    f = StepFeatures(300, 0, 300 * 301 / 2, 0, 1)
    assert woken.step_time(f) == plain.step_time(f)  # the simulator applies it, not step_time
    # A at 1 s and B at 5 s find the replica idle; C arrives during B's prefill and runs right after it.
    reqs = [Request(0, 1.0, 300, 1), Request(1, 5.0, 300, 1), Request(2, 5.001, 300, 1)]
    w = Workload.from_requests(reqs, name="wake")
    cfg = SimConfig(replicas=1, jump=True)
    # co-located: the continuous contention model's path (no neighbour here, so every factor is 1)
    models = [ContentionCost(c, {}) for c in (plain, woken)] if colocated else [plain, woken]
    assert models[1].wake == (0.2, 2.0)
    a, b = (simulate(w, cfg, cost=c, direct=direct).records for c in models)
    ttft_a, ttft_b = a["first_token"] - a["arrival"], b["first_token"] - b["arrival"]
    fwd = plain.step_time(f) - 0.001
    assert ttft_a[0] == pytest.approx(fwd + 0.001) and ttft_b[0] == pytest.approx(2 * fwd + 0.001)
    assert ttft_b[1] == pytest.approx(2 * fwd + 0.001)
    # C's own step is back to back: not slowed; it waits longer only because B's step was
    assert ttft_b[2] - ttft_a[2] == pytest.approx(fwd)


def test_the_simulator_wakes_a_replica_slower_beside_a_busy_neighbour():
    """wake = (0.2 s, 2.0, 3.0): a replica's first step after idle takes 3 x its forward time when a co-located
    neighbour has a step in progress, 2 x when none has; a model without co-location cannot tell: 2 x."""
    from sim.cluster import simulate
    from sim.config import SimConfig
    from sim.contention import ContentionCost
    from traces.workload import Request, Workload

    plain = FittedCost(LINEAR, 100_000, name="lin", step_overhead_s=0.001)
    cfg = SimConfig(replicas=2, router="round_robin")
    long = simulate(Workload.from_requests([Request(0, 0.0, 16, 400)], name="one"), cfg, cost=plain).records
    busy_until = float(long["finish"][0])
    # round robin: the long decode to replica 0; B to replica 1 while replica 0 decodes; C to replica 0, after
    # it finished, while replica 1 is idle again
    reqs = [Request(0, 0.0, 16, 400), Request(1, busy_until / 2, 300, 1), Request(2, busy_until + 5.0, 300, 1)]
    w = Workload.from_requests(reqs, name="wake-beside")
    fwd = plain.step_time(StepFeatures(300, 0, 300 * 301 / 2, 0, 1)) - 0.001

    def ttft(cost, direct=None) -> np.ndarray:
        r = simulate(w, cfg, cost=cost, direct=direct).records
        order = np.argsort(r["id"])
        return (r["first_token"] - r["arrival"])[order]

    co = ttft(ContentionCost(plain.with_wake((0.2, 2.0, 3.0)), {}))  # (no contention factors: all 1)
    assert co[1] == pytest.approx(3 * fwd + 0.001) and co[2] == pytest.approx(2 * fwd + 0.001)
    two = ttft(ContentionCost(plain.with_wake((0.2, 2.0)), {}))
    assert two[1] == pytest.approx(2 * fwd + 0.001) and two[2] == pytest.approx(2 * fwd + 0.001)
    for direct in (True, False):  # replicas on machines of their own, either driver
        apart = ttft(plain.with_wake((0.2, 2.0, 3.0)), direct)
        assert apart[1] == pytest.approx(2 * fwd + 0.001) and apart[2] == pytest.approx(2 * fwd + 0.001)


def test_wake_replay_beside_busy_neighbours_wakes_only_the_last_replica_and_keeps_the_others_decoding():
    pytest.importorskip("torch")
    from sim.calibrate import idle_before, neighbour_busy, wake_from_steps, wake_replay

    steps = wake_replay("tiny", 2, 512, 16, "cpu", 0, per_replica=5, busy_neighbour=True)
    rep, pt = np.asarray(steps["replica"]), np.asarray(steps["prefill_tokens"])
    woken = (idle_before(steps) >= 0.2) & (pt > 0)
    # replica 1 gets the bursts (7 rounds, 4 chunks of 254 tokens each; the first, 0.05 s into the run, is
    # no wake); replica 0 short prompts with 1000 tokens to decode, one a second, so it is decoding whenever
    # a burst begins
    assert sum(woken & (rep == 1)) == 6
    assert set(pt[rep == 1]) == {0, 254} and set(pt[rep == 0]) <= {0, 16}
    first = np.flatnonzero(woken & (rep == 1))
    assert neighbour_busy(steps)[first].all()
    w = wake_from_steps(steps, np.asarray(steps["duration"]))  # (real against itself: every burst reads 1)
    assert w["pairs"] >= 3 and w["median"] == pytest.approx(1.0)  # (7 bursts, the first 2 skipped as set-up)
    with pytest.raises(ValueError, match="replicas=1"):
        wake_replay("tiny", 1, 512, busy_neighbour=True)


def _mix_log(factor: float, n: int = 400, seed: int = 0):
    """A one-replica log of back-to-back steps whose machine speed drifts 0.8 -> 1.4 x over the log; steps with
    prefill tokens (every fourth) run `factor` x longer than their prediction besides."""
    rng = np.random.default_rng(seed)
    pt = np.where(np.arange(n) % 4 == 0, rng.integers(16, 512, n), 0)
    pred = np.where(pt > 0, 0.05 + pt * 2e-4, 0.03)
    speed = np.linspace(0.8, 1.4, n)
    d = pred * speed * np.where(pt > 0, factor, 1.0)
    start = np.concatenate([[0.01], 0.01 + np.cumsum(d[:-1] + 0.0005)])
    return {"replica": np.zeros(n, np.int64), "start": start, "duration": d, "prefill_tokens": pt}, pred


def test_prefill_factor_from_steps_recovers_the_factor_while_the_machine_drifts():
    from sim.calibrate import prefill_factor_from_steps

    steps, pred = _mix_log(1.12)
    pf = prefill_factor_from_steps(steps, pred, parts=4)
    assert pf["factor"] == pytest.approx(1.12, rel=0.01)  # speed moved 1.75 x, and cancels
    assert pf["prefill_steps"] == 99 and pf["decode_steps"] == 298  # the first 3 steps (set-up) left out
    assert len(pf["parts"]) == 4 and all(p == pytest.approx(1.12, rel=0.01) for p in pf["parts"])
    assert prefill_factor_from_steps(*_mix_log(1.0))["factor"] == pytest.approx(1.0, rel=0.01)
    few = prefill_factor_from_steps(*_mix_log(1.12, n=30))
    assert few["factor"] is None and few["measured"] == pytest.approx(1.12, rel=0.02)
    with pytest.raises(ValueError, match="predictions"):
        prefill_factor_from_steps(steps, pred[1:])


@pytest.mark.parametrize("direct", [True, False], ids=["direct-driver", "simpy-driver"])
def test_the_simulator_stretches_prefill_steps_by_the_loop_factor_and_not_decodes(direct):
    from sim.cluster import simulate
    from sim.config import SimConfig
    from traces.workload import Request, Workload

    plain = FittedCost(LINEAR, 100_000, name="lin", step_overhead_s=0.001)
    slow = plain.with_prefill_factor(1.5)
    w = Workload.from_requests([Request(0, 0.0, 300, 40)], name="one")
    a, b = (simulate(w, SimConfig(replicas=1, jump=True), cost=c, direct=direct).records for c in (plain, slow))
    fwd = plain.step_time(StepFeatures(300, 0, 300 * 301 / 2, 0, 1)) - 0.001
    assert b["first_token"][0] - a["first_token"][0] == pytest.approx(0.5 * fwd)  # the prefill step
    # the 39 decode steps after it are untouched: the same time from first token to finish
    assert b["finish"][0] - b["first_token"][0] == pytest.approx(a["finish"][0] - a["first_token"][0])


def test_the_step_check_applies_the_loop_terms_as_the_simulator_does():
    from sim.calibrate import idle_before, loop_factors, neighbour_busy, step_check

    steps = {"replica": np.array([0, 0, 0, 1]), "start": np.array([0.5, 0.61, 2.0, 0.05]),
             "duration": np.array([0.1, 0.1, 0.1, 0.1]), "prefill_tokens": np.array([100, 0, 50, 0]),
             "decode_seqs": np.array([0, 1, 1, 2]), "decode_context": np.array([0, 101, 160, 500]),
             "attention_pairs": np.array([5050, 101, 5000, 500]), "sampled": np.array([1, 1, 2, 2]),
             "decode_groups": np.array([0, 1, 1, 1]), "decode_padded_context": np.array([0, 112, 160, 512]),
             "decode_breaks": np.array([0, 6, 3, 30])}
    assert idle_before(steps) == pytest.approx([0.5, 0.01, 1.29, 0.05])
    cost = FittedCost(LINEAR, 10_000).with_prefill_factor(1.2).with_wake((0.2, 1.5))
    assert loop_factors(cost, steps) == pytest.approx([1.2 * 1.5, 1.0, 1.2 * 1.5, 1.0])
    # beside a busy neighbour: replica 1's step (0.05..0.15) is not running when replica 0 wakes at 0.5 or 2.0
    assert neighbour_busy(steps).tolist() == [False, False, False, False]
    late = {**steps, "start": np.array([0.5, 0.61, 2.0, 1.95])}  # now it is, at 2.0
    assert neighbour_busy(late).tolist() == [False, False, True, False]
    # (replica 1's step, now after 1.95 s idle, wakes it too: beside an idle neighbour)
    assert loop_factors(cost.with_wake((0.2, 1.5, 2.0)), late) == pytest.approx([1.2 * 1.5, 1.0, 1.2 * 2.0, 1.5])
    plain = step_check(FittedCost(LINEAR, 10_000), steps)
    both = step_check(cost, steps)
    assert both["decode_only"]["busy_ratio"] == pytest.approx(plain["decode_only"]["busy_ratio"])
    assert both["with_prefill"]["busy_ratio"] == pytest.approx(plain["with_prefill"]["busy_ratio"] / 1.8)


def test_the_step_check_reads_how_the_machines_pace_moved_within_a_run():
    from sim.calibrate import quarter_busy_ratios, step_check

    n = 20  # one replica's decode steps of one shape, 0.2 s apart; the machine 1.3 x slower in the third quarter
    pace = np.repeat([1.0, 1.0, 1.3, 1.1], n // 4)
    shape = {"prefill_tokens": 0, "decode_seqs": 4, "decode_context": 2000, "attention_pairs": 2000, "sampled": 4,
             "decode_groups": 1, "decode_padded_context": 2048, "decode_breaks": 8}
    cost = FittedCost(LINEAR, 10_000)
    one = {"replica": np.zeros(1, int), "start": np.zeros(1), "duration": np.ones(1),
           **{k: np.array([v]) for k, v in shape.items()}}
    model = 1.0 / step_check(cost, one)["busy_ratio"]  # the model's time for the shape
    order = np.random.default_rng(0).permutation(n)  # a log's rows need not be in time order
    steps = {"replica": np.zeros(n, int), "start": (np.arange(n) * 0.2)[order],
             "duration": (model * 0.95 * pace)[order], **{k: np.full(n, v) for k, v in shape.items()}}
    chk = step_check(cost, steps)
    assert chk["quarter_busy_ratios"] == pytest.approx([0.95, 0.95, 0.95 * 1.3, 0.95 * 1.1])
    assert chk["pace_swing"] == pytest.approx(1.3)
    assert chk["busy_ratio"] == pytest.approx(0.95 * pace.mean())
    # a steady machine does not swing; too short a log says nothing
    assert step_check(cost, {**steps, "duration": np.full(n, model)})["pace_swing"] == pytest.approx(1.0)
    short = {k: v[:12] for k, v in steps.items()}
    assert quarter_busy_ratios(short["start"], short["duration"], short["duration"]) == []
    assert math.isnan(step_check(cost, short)["pace_swing"])


def test_wake_round_trips_survives_refit_and_drift_correction_and_is_checked(tmp_path):
    from sim.calibrate import drift_corrected, refit_profile

    cost = FittedCost(LINEAR, 10_000, name="lin", step_overhead_s=0.001, wake=(0.2, 1.08), prefill_factor=1.06)
    prof = sample_profile(cost)
    back = read_profile_file(save_profile_file(prof, tmp_path / "w.toml"))
    assert back.cost.wake == (0.2, 1.08) and back.cost.prefill_factor == 1.06
    assert scaled(back.cost, 0.9).prefill_factor == 1.06
    assert blend(back.cost, FittedCost(LINEAR, 10_000), 0.5).prefill_factor == 1.06
    assert back.cost.with_overhead(0.0).prefill_factor == 1.06 and back.cost.with_wake(None).prefill_factor == 1.06
    assert drift_corrected(back.cost, 1.2).wake == (0.2, 1.08) and scaled(back.cost, 0.9).wake == (0.2, 1.08)
    assert blend(back.cost, FittedCost(LINEAR, 10_000), 0.5).wake == (0.2, 1.08)
    grid = [{"kind": p.kind, "label": p.label(), "median_s": cost.step_time(p.features()) - 0.001,
             **dict(zip(MEASURED, feature_matrix([p.features()])[0].tolist()))} for p in default_grid()]
    refit = refit_profile(dataclasses.replace(prof, grid=grid), form="linear", padded_knee=None).cost
    assert refit.wake == (0.2, 1.08) and refit.prefill_factor == 1.06
    for bad in (0.0, -1.0, math.inf, "x"):
        with pytest.raises(ValueError, match="prefill_factor"):
            FittedCost(LINEAR, 10_000, prefill_factor=bad)
    plain = save_profile_file(sample_profile(FittedCost(LINEAR, 10_000)), tmp_path / "n.toml")
    assert read_profile_file(plain).cost.wake is None
    for bad in ((0.0, 1.1), (0.2, -1.0), (0.2, math.nan), (0.2,), (0.2, 1.1, 0.0), (0.2, 1.1, 1.2, 1.3)):
        with pytest.raises(ValueError, match="wake"):
            FittedCost(LINEAR, 10_000, wake=bad)
    # the factor beside a busy neighbour rides along: saved, read back, kept by every copy
    three = sample_profile(cost.with_wake((0.2, 1.08, 1.15)))
    back3 = read_profile_file(save_profile_file(three, tmp_path / "w3.toml"))
    assert back3.cost.wake == (0.2, 1.08, 1.15) and back3.cost.coefficients()["wake_busy_factor"] == 1.15
    assert drift_corrected(back3.cost, 1.2).wake == (0.2, 1.08, 1.15)
    assert "wake_busy_factor" not in back.cost.coefficients()
    d = json.loads(json.dumps(prof.to_dict()))
    d["coefficients"]["wake_factor"] = 0.0
    with pytest.raises(ValueError, match="w.json.*wake"):
        Profile.from_dict(d, where="w.json")


def test_profile_measures_the_serving_loop_terms_on_real_replays(tmp_path, capsys):
    pytest.importorskip("torch")
    from sim.cli import main

    out = tmp_path / "tiny.toml"
    assert main(["profile", "--model-config", "tiny", "--quick", "--repeats", "1", "--warmup", "0",
                 "--num-blocks", "512", "--out", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "waking from idle" in text and "serving-loop prefill steps" in text
    prof = read_profile_file(out)
    wk = prof.measure["wake"]
    # 14 requests 0.7 s apart on one replica: every one wakes it; the first 2 are set-up; each of the other
    # 12 sets its first chunk (after idle) against its third and fourth (back to back; another process taking
    # the core between them can spoil one or two). The factor is this machine's. One replica: no neighbour.
    assert 10 <= wk["pairs"] <= 12 and wk["idle_s_median"] > 0.5
    # (the value is this machine's: 1.36 and 3.39 on two runs of the tiny model, whose 2-5 ms steps make any
    # fixed cost of waking a large share)
    assert prof.cost.wake == (0.2, wk["factor"]) and math.isfinite(wk["factor"]) and wk["factor"] > 0
    assert "wake_busy" not in prof.measure
    assert prof.measure["loop_overhead"]["gaps"] > 0
    # the calibration mix: prefill and decode steps of a real replay, the factor applied
    pf = prof.measure["prefill_loop"]
    assert pf["prefill_steps"] >= 10 and pf["decode_steps"] >= 10 and len(pf["parts"]) >= 2
    assert prof.cost.prefill_factor == pytest.approx(pf["factor"]) and math.isfinite(pf["factor"]) and pf["factor"] > 0


def test_paired_errors_match_requests_by_id_and_leave_out_what_did_not_complete_on_both_sides():
    from sim.calibrate import paired_errors

    n = 10
    arrival = np.arange(n, dtype=float)
    real = {"id": np.arange(n), "arrival": arrival, "first_token": arrival + 0.2, "finish": arrival + 1.2,
            "generated_tokens": np.full(n, 11), "status": np.array(["ok"] * n, dtype=object)}
    # the simulator: TTFT 10 % short for every request, TPOT 20 % long, its rows in another order
    order = np.arange(n)[::-1]
    sim = {"id": order, "arrival": arrival[order], "first_token": arrival[order] + 0.18,
           "finish": arrival[order] + 0.18 + 1.2, "generated_tokens": np.full(n, 11),
           "status": np.array(["ok"] * n, dtype=object)}
    got = paired_errors(sim, real)
    assert got["requests"] == n and got["sim_only"] == got["real_only"] == 0
    assert got["ttft"]["median"] == pytest.approx(-0.1) and got["ttft"]["p10"] == pytest.approx(-0.1)
    assert got["tpot"]["median"] == pytest.approx(0.2) and got["tpot"]["n"] == n
    assert got["e2e"]["median"] == pytest.approx(1.38 / 1.2 - 1)
    # a request rejected by the simulator and one that generated a single token: out of the pairs / of TPOT
    sim["status"][0] = "rejected"  # row 0 is request 9
    real["generated_tokens"][3] = 1
    got = paired_errors(sim, real)
    assert got["requests"] == n - 1 and got["real_only"] == 1 and got["tpot"]["n"] == n - 2
    assert got["ttft"]["n"] == n - 1
    # one request much slower in the simulator moves the median of ten not at all
    sim["first_token"][5] += 5.0
    assert paired_errors(sim, real)["ttft"]["median"] == pytest.approx(-0.1)
    none = paired_errors({**sim, "status": np.array(["failed"] * n, dtype=object)}, real)
    assert none["requests"] == 0 and math.isnan(none["ttft"]["median"]) and none["ttft"]["n"] == 0
