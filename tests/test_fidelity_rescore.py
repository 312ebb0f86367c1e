"""experiments/fidelity.py --rescore: a finished run's cells simulated again with another profile, against the
run's recorded real figures (nothing runs on the executor)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sim.calibrate import drift_corrected, kind_corrected, save_profile_file, scaled
from sim.calibrate_cli import fit_to_model
from sim.cluster import simulate
from traces.report import summarize

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_drift import busy_profile  # noqa: E402


def fidelity_module():
    spec = importlib.util.spec_from_file_location("fidelity", ROOT / "experiments" / "fidelity.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


SETTINGS = {"requests": 16, "offset": 1000, "length_scale": 1.0, "replicas": 2, "num_blocks": 4096, "model": "tiny"}


def recorded_run(fid, prof_path: str, prof, drift: float, loop: float | None = None, truth=None,
                 loop_detail: tuple[dict, dict] | None = None) -> dict:
    """A run whose "real" figures are what the profile's co-location model predicts on a machine `drift` x
    slower than profiled (or what the model `truth` predicts), with that drift recorded, one cell per trace;
    `loop`: a loop drift check's factor recorded besides, `loop_detail` its two checks' records."""
    cells = []
    cost = prof.contention_cost()
    for tr in ("azure-conv", "azure-code"):
        w0 = fid.trace_slice(tr, SETTINGS["requests"], SETTINGS["offset"], 1024, 1.0)
        cfg = fid.cell_config("chunked-512", "round_robin", 2, prof_path, SETTINGS["num_blocks"])
        sat = fid.saturation_rate(w0, cfg, cost)
        w, _ = fit_to_model(fid.at_rate(w0, fid.LOADS["70%"] * sat), 1024)
        sm = summarize(simulate(w, cfg, cost=truth if truth is not None else drift_corrected(cost, drift)), cfg.slo)
        real = {m: (sm[m] if m == "throughput_rps" else sm[m.split(".")[0]][m.split(".")[1]]) for m, _ in fid.METRICS}
        cells.append({"trace": tr, "slice": w0.name, "tokens": fid.tokens_of(w),
                      "scheduler": "chunked-512", "router": "round_robin", "load": "70%",
                      "saturation_rate": sat, "rate": (len(w) - 1) / w.span, "requests": len(w),
                      "drift": {"before": drift, "after": drift, "factor": drift, "colocated": None},
                      "real": real, "errors": {m: 0.0 for m, _ in fid.METRICS},
                      "sampling_band_rel": {m: [-0.05, 0.05] for m, _ in fid.METRICS},
                      "niced_load_during": 0.0,
                      **({"loop_drift": {"before": loop, "after": loop, "factor": loop,
                                         **({"before_detail": loop_detail[0], "after_detail": loop_detail[1]}
                                            if loop_detail else {})}} if loop else {})})
    return {"profile": prof_path, "drift_check": True, "settings": SETTINGS, "cells": cells}


def rescore_run(fid, monkeypatch, tmp_path, run: dict, profile: str) -> dict:
    """Write `run` as tmp_path/run/fidelity.json, rescore it with `profile` into tmp_path/out, return the result."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "fidelity.json").write_text(json.dumps(run))
    monkeypatch.setattr(sys, "argv", ["fidelity.py", "--rescore", str(tmp_path / "run"), "--profile", profile,
                                      "--out", str(tmp_path / "out")])
    assert fid.main() == 0
    return json.loads((tmp_path / "out" / "fidelity.json").read_text())


def test_rescore_reproduces_the_recorded_errors_and_judges_another_profile(tmp_path, monkeypatch, capsys):
    fid = fidelity_module()
    prof = busy_profile(1.2)
    path = str(save_profile_file(prof, tmp_path / "p.toml"))
    (tmp_path / "run").mkdir()
    # the loop drift check read the machine 1.1 x slower: its prediction is that much too fast
    (tmp_path / "run" / "fidelity.json").write_text(json.dumps(recorded_run(fid, path, prof, 1.25, loop=1.1)))

    def rescore(profile, out) -> dict:
        monkeypatch.setattr(sys, "argv", ["fidelity.py", "--rescore", str(tmp_path / "run"), "--profile", profile,
                                          "--out", str(out)])
        assert fid.main() == 0
        return json.loads((out / "fidelity.json").read_text())

    same = rescore(path, tmp_path / "same")
    assert same["rescored_from"].endswith("fidelity.json") and len(same["cells"]) == 2
    for c in same["cells"]:
        # the same model and the recorded drift: the recorded "real" figures exactly, inside their bands
        assert all(abs(e) < 1e-9 for e in c["errors"].values()), c["errors"]
        assert all(c["in_sampling_band"].values())
        # without the drift correction the simulator runs 1.25 x too fast (and queues less)
        assert c["errors_uncorrected"]["tpot.p50"] < -0.15 and c["errors_uncorrected"]["e2e.p50"] < -0.15
        assert -0.25 < c["errors_loop_drift"]["tpot.p50"] < -0.05
    assert same["aggregate_loop_drift"]["tpot.p50"]["median"] > 0.05
    out = capsys.readouterr().out
    assert "median p50 error <= 5%: met" in out
    assert "targets, loop drift (x1.10..x1.10): median p50 error <= 5%: MISSED" in out
    assert all(c["headline"] == "reference" for c in same["cells"])  # as recorded (a run before the loop check led)

    # the loop check's prediction leading instead: the same figures, the other way round
    monkeypatch.setattr(sys, "argv", ["fidelity.py", "--rescore", str(tmp_path / "run"), "--profile", path,
                                      "--headline", "loop", "--out", str(tmp_path / "loop")])
    assert fid.main() == 0
    led = json.loads((tmp_path / "loop" / "fidelity.json").read_text())
    for c, r in zip(led["cells"], same["cells"]):
        assert c["headline"] == "loop" and c["errors"] == r["errors_loop_drift"]
        assert all(abs(e) < 1e-9 for e in c["errors_reference_drift"].values())
    assert led["aggregate"] == same["aggregate_loop_drift"]
    out = capsys.readouterr().out
    assert "targets, loop-drift-corrected (headline): median p50 error <= 5%: MISSED" in out
    assert "targets, reference-shape check (x1.25..x1.25): median p50 error <= 5%: met" in out

    # a profile 10 % slower on every step: the latencies over, by that and what it adds to queueing
    slow = str(save_profile_file(type(prof)(**{**prof.__dict__, "cost": scaled(prof.cost, 1.1)}), tmp_path / "s.toml"))
    other = rescore(slow, tmp_path / "slow")
    for c in other["cells"]:
        assert 0.05 < c["errors"]["tpot.p50"] < 0.3 and 0.05 < c["errors"]["e2e.p50"] < 0.3
        assert not c["in_sampling_band"]["tpot.p50"]


def test_rescore_reads_the_loop_check_by_kind(tmp_path, monkeypatch, capsys):
    """A run whose loop checks recorded their decode and with-prefill ratios, on a machine whose decode steps
    ran 1.3 x the model and its prefill steps 1.0 x: by kind (the headline as recorded) the real figures
    exactly; one factor for both kinds is off, and shown beside it. A run whose checks kept no ratio by kind
    cannot lead with it."""
    fid = fidelity_module()
    prof = busy_profile(1.2)
    path = str(save_profile_file(prof, tmp_path / "p.toml"))
    detail = {"factor": 1.2, "decode": 1.3, "with_prefill": 1.0}
    run = recorded_run(fid, path, prof, 1.25, loop=1.2, truth=kind_corrected(prof.contention_cost(), 1.3, 1.0),
                       loop_detail=(detail, detail))
    for c in run["cells"]:
        c["headline"] = "loop-kind"
    res = rescore_run(fid, monkeypatch, tmp_path, run, path)
    for c in res["cells"]:
        assert c["headline"] == "loop-kind" and c["errors"] == c["errors_loop_kind"]
        assert all(abs(e) < 1e-9 for e in c["errors"].values()), c["errors"]
        assert c["loop_drift"]["decode_factor"] == pytest.approx(1.3)
        assert c["loop_drift"]["with_prefill_factor"] == pytest.approx(1.0)
        assert c["errors_loop_drift"]["ttft.p50"] > 0.02  # prefill steps read 1.2 x: too slow
    assert res["aggregate"] == res["aggregate_loop_kind"]
    out = capsys.readouterr().out
    assert "targets, loop-drift-corrected by kind (headline): median p50 error <= 5%: met" in out
    assert "targets, loop check, one factor (x1.20..x1.20): median p50 error <= 5%: MISSED" in out
    assert "targets, reference-shape check (x1.25..x1.25)" in out
    assert "by kind, median |log(pace / factor)|" not in out  # no step logs kept: no pace by kind to read
    bare = recorded_run(fid, path, prof, 1.25, loop=1.2)
    (tmp_path / "bare.json").write_text(json.dumps(bare))
    monkeypatch.setattr(sys, "argv", ["fidelity.py", "--rescore", str(tmp_path / "bare.json"), "--profile", path,
                                      "--headline", "loop-kind"])
    with pytest.raises(ValueError, match="cell 1 has no loop drift check by kind to lead with"):
        fid.main()


def test_rescore_recomputes_a_second_loop_checks_prediction(tmp_path, monkeypatch, capsys):
    """A run with --loop-also: each cell recorded a second check's factor (here the machine's true 1.25, where
    the headline's check read 1.1). The rescore simulates it again: exact, beside a headline that is not, with
    its own targets line and row in the report."""
    fid = fidelity_module()
    prof = busy_profile(1.2)
    path = str(save_profile_file(prof, tmp_path / "p.toml"))
    run = recorded_run(fid, path, prof, 1.25, loop=1.1)
    for c in run["cells"]:
        c["headline"] = "loop"
        c["loop_also"] = {"mix": "cell", "before": 1.25, "after": 1.25, "factor": 1.25}
        c["errors_loop_also"] = {m: 0.5 for m, _ in fid.METRICS}  # stale: the rescore replaces it
    res = rescore_run(fid, monkeypatch, tmp_path, run, path)
    for c in res["cells"]:
        assert all(abs(e) < 1e-9 for e in c["errors_loop_also"].values()), c["errors_loop_also"]
        assert c["errors"]["tpot.p50"] < -0.05 and c["headline"] == "loop"
    out = capsys.readouterr().out
    assert "targets, loop-drift-corrected (headline): median p50 error <= 5%: MISSED" in out
    assert "targets, loop check, cell mix (x1.25..x1.25): median p50 error <= 5%: met" in out
    assert res["loop_also"] == "cell" and res["aggregate_loop_also"]["tpot.p50"]["median"] < 1e-9


def test_rescore_recomputes_the_prediction_with_step_jitter(tmp_path, monkeypatch, capsys):
    """A run whose loop checks kept their steps' spread: the rescore predicts with it again (a table of ones:
    exactly the single factor's prediction) and reports it beside the headline; without the spread, no such
    row."""
    from sim.jitter import StepJitter

    fid = fidelity_module()
    prof = busy_profile(1.2)
    path = str(save_profile_file(prof, tmp_path / "p.toml"))
    ones = {"factor": 1.1, "jitter": StepJitter({"decode": [1.0, 1.0], "with_prefill": [1.0, 1.0]}).to_dict()}
    run = recorded_run(fid, path, prof, 1.25, loop=1.1, loop_detail=(ones, ones))
    for c in run["cells"]:
        c["headline"] = "loop"
    res = rescore_run(fid, monkeypatch, tmp_path, run, path)
    for c in res["cells"]:
        for m, _ in fid.METRICS:
            assert c["errors_loop_jitter"][m] == pytest.approx(c["errors_loop_drift"][m], abs=1e-9)
    assert res["aggregate_loop_jitter"]["tpot.p50"]["median"] == pytest.approx(res["aggregate"]["tpot.p50"]["median"])
    for c in res["cells"]:  # a table of ones: every seed the same run, a band of one point the real is not on
        assert c["in_jitter_band"]["ttft.p50"] is False
    out = capsys.readouterr().out
    assert "targets, loop check + step jitter (x1.10..x1.10): median p50 error <= 5%: MISSED" in out
    assert "inside the step-jitter prediction's p10..p90 over 9 seeds" in out and "TTFT p50 0/2" in out
    bare = recorded_run(fid, path, prof, 1.25, loop=1.1)
    for c in bare["cells"]:
        c["headline"] = "loop"
    (tmp_path / "bare").mkdir()
    res = rescore_run(fid, monkeypatch, tmp_path / "bare", bare, path)
    assert "aggregate_loop_jitter" not in res and all("errors_loop_jitter" not in c for c in res["cells"])
    assert "step jitter" not in capsys.readouterr().out


def test_rescore_refuses_a_different_workload(tmp_path, monkeypatch):
    fid = fidelity_module()
    prof = busy_profile(1.2)
    path = str(save_profile_file(prof, tmp_path / "p.toml"))
    run = recorded_run(fid, path, prof, 1.0)
    run["cells"][0]["requests"] += 1  # not the run these settings rebuild
    (tmp_path / "fidelity.json").write_text(json.dumps(run))
    monkeypatch.setattr(sys, "argv", ["fidelity.py", "--rescore", str(tmp_path / "fidelity.json"), "--profile", path])
    with pytest.raises(ValueError, match="cell 1: the rebuilt workload .* is not the one that ran"):
        fid.main()
    # the same count and rate of other requests (another trace file): told apart by the recorded slice and tokens
    run = recorded_run(fid, path, prof, 1.0)
    (tmp_path / "fidelity.json").write_text(json.dumps(run))
    assert fid.main() == 0  # recorded as rebuilt: accepted
    run["cells"][1]["tokens"] = [t + 1 for t in run["cells"][1]["tokens"]]
    (tmp_path / "fidelity.json").write_text(json.dumps(run))
    with pytest.raises(ValueError, match=r"cell 2: the rebuilt workload .* prompt and output tokens\) is not the one"):
        fid.main()
    run["cells"][1]["slice"] = "azure-code[0:16]"
    (tmp_path / "fidelity.json").write_text(json.dumps(run))
    with pytest.raises(ValueError, match=r"cell 2: the run replayed azure-code\[0:16\], these settings rebuild "):
        fid.main()


# ---- the executor against itself (--repeat N) --------------------------------------------------------------

def test_run_to_run_is_the_mean_pairwise_error_of_one_real_run_predicting_another():
    fid = fidelity_module()
    assert fid.run_to_run([1.0, 1.1]) == pytest.approx((0.1 + (1 - 1 / 1.1)) / 2)
    assert fid.run_to_run([2.0, 2.0, 2.0]) == 0.0
    assert fid.run_to_run([1.0, 1.2, 0.8]) == pytest.approx(
        sum(abs(a / b - 1) for a in (1.0, 1.2, 0.8) for b in (1.0, 1.2, 0.8) if a != b) / 6)
    # one usable run is no comparison
    for runs in ([1.0], [], [1.0, float("nan")], [0.0, 1.0], [None, 1.0]):
        assert fid.run_to_run(runs) is None


def test_rescore_of_a_repeated_run_reports_the_executor_against_itself(tmp_path, monkeypatch, capsys):
    """Two real runs per cell, 5 % either side of the model's figure: the simulator (the same model, the
    recorded drift) sits at their median, inside their min..max, and against one run it is off by about
    5 %, half of what one run predicting the other is off (about 10 %)."""
    fid = fidelity_module()
    prof = busy_profile(1.2)
    path = str(save_profile_file(prof, tmp_path / "p.toml"))
    run = recorded_run(fid, path, prof, 1.1)
    for c in run["cells"]:
        c["real_runs"] = {m: [v * 0.95, v * 1.05] for m, v in c["real"].items()}
        c["paired_real"] = {"ttft": 0.1, "tpot": -0.02, "e2e": 0.03}
    res = rescore_run(fid, monkeypatch, tmp_path, run, path)
    for c in res["cells"]:
        assert all(abs(e) < 1e-9 for e in c["errors"].values())
        assert c["errors_each_run"]["e2e.p50"] == pytest.approx([1 / 0.95 - 1, 1 / 1.05 - 1])
        assert all(c["in_noise"].values())
    noise = res["aggregate_noise"]
    for m, _ in fid.METRICS:
        assert noise[m]["run_to_run"] == pytest.approx((1.05 / 0.95 - 1 + 1 - 0.95 / 1.05) / 2)
        assert noise[m]["sim_vs_one_run"] == pytest.approx((1 / 0.95 - 1 + 1 - 1 / 1.05) / 2)
        assert noise[m]["in_noise"] == noise[m]["cells"] == 2
    out = capsys.readouterr().out
    assert "the executor against itself (2 real runs per cell)" in out
    assert "targets, one real run predicting another: median p50 error <= 5%: MISSED" in out
    assert "request by request, run 2 over run 1" in out and "TTFT +10.0% (10.0%)" in out
    # cells that ran once have no such section
    one = recorded_run(fid, path, prof, 1.1)
    assert fid.noise_aggregate(one["cells"]) is None


def test_median_check_takes_each_ratio_over_the_real_runs():
    fid = fidelity_module()
    a = {"steps": 10, "busy_ratio": 1.0, "median_ratio": 0.9, "decode_only": {"busy_ratio": 1.1},
         "with_prefill": {"busy_ratio": 0.8}}
    b = {"steps": 30, "busy_ratio": 1.2, "median_ratio": 1.1, "decode_only": {"busy_ratio": 1.3},
         "with_prefill": {"busy_ratio": 1.0}}
    assert fid.median_check([a]) is a and fid.median_check([{"steps": 0}, a]) is a
    m = fid.median_check([a, b])
    assert m["steps"] == 40 and m["busy_ratio"] == pytest.approx(1.1) and m["median_ratio"] == pytest.approx(1.0)
    assert fid.kind_ratios(m) == {"decode": pytest.approx(1.2), "with_prefill": pytest.approx(0.9)}


# ---- per-trace summaries ------------------------------------------------------------------------------------

def test_per_trace_medians_and_the_width_of_the_real_figures_resampling_band():
    fid = fidelity_module()

    def cell(tr: str, err: float, band: tuple[float, float] | None) -> dict:
        return {"trace": tr, "errors": {m: err for m, _ in fid.METRICS},
                "sampling_band_rel": {m: list(band) if band else None for m, _ in fid.METRICS}}

    rows = [cell("azure-conv", -0.20, (-0.1, 1.2)), cell("azure-conv", 0.10, (-0.3, 0.5)),
            cell("azure-conv", 0.04, (-0.2, 0.6)), cell("azure-code", 0.02, (-0.02, 0.03)),
            cell("azure-code", None, None)]
    rows[-1]["errors"] = {m: None for m, _ in fid.METRICS}
    errs = fid.by_trace(rows, lambda r, m: None if r["errors"][m] is None else abs(r["errors"][m]))
    assert list(errs) == ["azure-conv", "azure-code"]
    assert "throughput_rps" not in errs["azure-conv"]
    assert errs["azure-conv"]["ttft.p50"] == pytest.approx(0.10)  # median of 0.20, 0.10, 0.04
    assert errs["azure-code"]["e2e.p99"] == pytest.approx(0.02)  # the cell without figures left out
    widths = fid.by_trace(rows, fid.band_width)
    assert widths["azure-conv"]["tpot.p50"] == pytest.approx(0.8)  # median of 1.3, 0.8, 0.8
    assert widths["azure-code"]["tpot.p50"] == pytest.approx(0.05)
    assert math.isnan(fid.by_trace([cell("azure-code", None, None)], fid.band_width)["azure-code"]["ttft.p50"])


def test_rescore_reports_errors_and_band_widths_by_trace(tmp_path, monkeypatch, capsys):
    fid = fidelity_module()
    prof = busy_profile(1.2)
    path = str(save_profile_file(prof, tmp_path / "p.toml"))
    res = rescore_run(fid, monkeypatch, tmp_path, recorded_run(fid, path, prof, 1.1), path)
    # the recorded run's bands are -5 %..+5 % everywhere and the same model gives no error
    for tr in ("azure-conv", "azure-code"):
        assert all(v == pytest.approx(0.10) for v in res["sampling_band_width"][tr].values())
        assert all(v < 1e-9 for v in res["aggregate_by_trace"][tr].values())
    out = capsys.readouterr().out
    assert "median width of its 90% resampling band, relative to it: azure-conv TTFT p50 10%" in out
    assert "median |error| by trace (headline): azure-conv TTFT p50 0.0%" in out


def test_a_missing_full_trace_falls_back_to_the_vendored_head_and_says_so(tmp_path, monkeypatch, capsys):
    fid = fidelity_module()
    monkeypatch.setattr(fid, "SHARED", tmp_path / "no-shared")
    w = fid.trace_slice("azure-conv", 12, 1000, 4096, 1.0)
    assert w.name == "azure-conv[0:12]" and len(w) == 12
    err = capsys.readouterr().err
    assert "not found" in err and "--offset 1000" in err and "head300.csv" in err
    fid.trace_slice("azure-conv", 12, 0, 4096, 1.0)  # offset 0 is the head itself: nothing to say
    assert capsys.readouterr().err == ""


def test_the_pace_swing_summary_sets_the_cells_that_moved_against_the_others():
    fid = fidelity_module()

    def cell(swing, at_pace, err):
        return {"step_pace_swing": swing, "corrected_median_abs_rel_error": at_pace,
                "errors": {m: (err if m != "tpot.p50" else -err) for m, _ in fid.METRICS}}

    rows = [cell(1.02, 0.02, 0.01), cell(1.05, 0.03, 0.03), cell(1.31, 0.19, 0.20), cell(1.12, 0.07, 0.10),
            cell(math.nan, 0.50, 0.5)]  # no step log: left out
    line = fid.pace_swing_summary(rows)
    assert "median x1.08" in line and "worst x1.31" in line
    assert "2/4 cells moved by 10% or more: |error| at real pace median 13.0% there against 2.5%" in line
    assert "p50 TTFT / TPOT / E2E 15.0% / 15.0% / 15.0% against 2.0% / 2.0% / 2.0%" in line
    assert fid.pace_swing_summary([{"corrected_median_abs_rel_error": 0.1}]) is None


def grid(traces, scheds, routers, loads) -> list[tuple]:
    return [(tr, sc, ro, ld, object()) for tr in traces for sc in scheds for ro in routers for ld in loads]


def test_interleaved_cells_cover_traces_loads_and_settings_early():
    fid = fidelity_module()
    cells = grid(list(fid.TRACES), list(fid.SCHEDULERS), list(fid.ROUTERS), list(fid.LOADS))
    order = fid.interleaved(cells)
    assert sorted(map(id, order)) == sorted(map(id, cells))  # the same cells, each once
    assert [c[0] for c in order[:4]] == ["azure-conv", "azure-code"] * 2  # the traces take turns
    first6 = order[:6]
    assert {(c[0], c[3]) for c in first6} == {(tr, ld) for tr in fid.TRACES for ld in fid.LOADS}
    first12 = order[:12]  # two scheduler x router settings per trace, which share neither
    for tr in fid.TRACES:
        settings = {(c[1], c[2]) for c in first12 if c[0] == tr}
        assert len(settings) == 2
        assert {s for s, _ in settings} == set(fid.SCHEDULERS) and {r for _, r in settings} == set(fid.ROUTERS)


FID = fidelity_module()  # one load for the property test's examples (it reads no module state)


@given(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3), st.integers(1, 4))
def test_interleaved_is_a_permutation_with_alternating_traces(n_tr, n_s, n_r, n_l):
    cells = grid([f"t{i}" for i in range(n_tr)], [f"s{i}" for i in range(n_s)], [f"r{i}" for i in range(n_r)],
                 [f"l{i}" for i in range(n_l)])
    order = FID.interleaved(cells)
    assert sorted(map(id, order)) == sorted(map(id, cells))
    assert [c[0] for c in order] == [f"t{k % n_tr}" for k in range(len(cells))]
    per = n_s * n_r * n_l  # within a trace, each setting runs through its loads in a row
    for tr in range(n_tr):
        mine = [c for c in order if c[0] == f"t{tr}"]
        assert len(mine) == per
        for k in range(0, per, n_l):
            assert len({(c[1], c[2]) for c in mine[k:k + n_l]}) == 1
            assert [c[3] for c in mine[k:k + n_l]] == [f"l{i}" for i in range(n_l)]


def test_the_budget_runs_the_first_cell_then_extrapolates_the_cells_own_pace():
    fid = fidelity_module()
    fits, est = fid.next_cell_fits(elapsed_s=9999.0, budget_s=60.0, predicted_s=100.0, done=[])
    assert fits and math.isnan(est)  # one cell at least, whatever the budget
    # two cells took 3 x and 5 x their predicted replay: the next, predicted 20 s, is taken as 4 x 20 s
    done = [(30.0, 10.0), (100.0, 20.0)]
    fits, est = fid.next_cell_fits(100.0, 180.0, 20.0, done)
    assert est == pytest.approx(80.0) and fits
    fits, _ = fid.next_cell_fits(100.1, 180.0, 20.0, done)
    assert not fits
    with pytest.raises(ValueError, match="--budget"):
        fid.next_cell_fits(0.0, 0.0, 1.0, done)


def test_rescoring_a_partial_run_keeps_its_cells_left_out_in_the_report_and_json(tmp_path, monkeypatch, capsys):
    fid = fidelity_module()
    prof = busy_profile(1.2)
    path = str(save_profile_file(prof, tmp_path / "p.toml"))
    run = recorded_run(fid, path, prof, 1.1)
    left_out = ["azure-conv prefill-first round_robin light", "azure-code prefill-first round_robin light"]
    run.update(fid.budget_record(5.0, 4, left_out))
    res = rescore_run(fid, monkeypatch, tmp_path, run, path)
    assert res["cells_skipped"] == left_out and res["cells_planned"] == 4 and res["budget_min"] == 5.0
    assert len(res["cells"]) == 2
    out = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    assert "PARTIAL: the budget ran 2 of 4 cells" in out and left_out[1] in out
    assert "median p99 error <= 10%: met (PARTIAL: 2 of 4 cells)" in out  # and every target line says so
    assert fid.budget_record(None, 4, []) == {}  # a run without a budget records none
