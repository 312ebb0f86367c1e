"""twinfer tune: space validation, reproducibility, resumption, a known optimum, the CLI end to end."""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path

import pytest

from sim.cli import main
from sim.config import config_from_toml
from sim.tune import (
    InlineRunner,
    Objective,
    Outcome,
    Param,
    TuneError,
    load_space,
    read_evaluations,
    tune,
    write_evaluations,
)

DATA = Path(__file__).parent / "data"
AZURE = DATA / "azure2023" / "AzureLLMInferenceTrace_conv.head300.csv"

PARAMS = [Param("x", "real", 0.0, 1.0), Param("n", "integer", 1, 20),
          Param("c", "categorical", values=("a", "b", "c"))]


def bowl(x: float, n: int, c: str) -> float:
    """Minimum 0 at x = 0.3, n = 7, c = "b"."""
    return (x - 0.3) ** 2 + 0.01 * (n - 7) ** 2 + {"a": 0.5, "b": 0.0, "c": 0.2}[c]


# A finite space (4 x 3 x 2 = 24 points): searched by minimising the acquisition over every unseen point.
FINITE = [Param("a", "integer", 0, 3), Param("b", "ordinal", values=(1, 10, 100)),
          Param("c", "categorical", values=("x", "y"))]


def cup(a: int, b: int, c: str) -> float:
    """Minimum 0 at a = 2, b = 10, c = "y"."""
    return (a - 2) ** 2 + {1: 1.0, 10: 0.0, 100: 2.0}[b] + {"x": 0.5, "y": 0.0}[c]


def points(res) -> list[tuple]:
    return [(e.index, tuple(e.params.values()), e.value, e.loss) for e in res.evaluations]


# --------------------------------------------------------------------------- space files

GOOD = """
[base]
replicas = 2
[base.slo]
ttft = 2.0
[space.replicas]
type = "integer"
low = 1
high = 4
[space."scheduler.max_num_seqs"]
type = "ordinal"
values = [16, 64, 256]
[objective]
kind = "min_replicas"
slo_target = 0.99
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "space.toml"
    p.write_text(text)
    return p


def test_good_space_parses(tmp_path):
    spec = load_space(write(tmp_path, GOOD))
    assert [p.name for p in spec.params] == ["replicas", "scheduler.max_num_seqs"]
    assert spec.params[1] == Param("scheduler.max_num_seqs", "ordinal", values=(16, 64, 256))
    assert spec.objective.kind == "min_replicas" and spec.objective.slo_target == 0.99


def test_nested_table_form_is_the_same_key(tmp_path):
    text = GOOD.replace('[space."scheduler.max_num_seqs"]', "[space.scheduler.max_num_seqs]")
    assert load_space(write(tmp_path, text)).params[1].name == "scheduler.max_num_seqs"


@pytest.mark.parametrize("old,new,expect", [
    ("low = 1\nhigh = 4", "low = 4\nhigh = 4", ['[space."replicas"]', "bad bounds", "low (4) must be < high (4)"]),
    ("low = 1\nhigh = 4", "low = 0\nhigh = 4\nprior = \"log-uniform\"", ['[space."replicas"]', "log-uniform", "low > 0"]),
    ("low = 1\nhigh = 4", "low = 1\nhigh = 4\nprior = \"loggy\"", ['[space."replicas"]', "unknown prior"]),
    ("low = 1\nhigh = 4", "low = 1.5\nhigh = 4", ['[space."replicas"]', "'low' must be an integer"]),
    ('[space."scheduler.max_num_seqs"]', '[space."scheduler.max_num_sequences"]',
     ["scheduler.max_num_sequences", "unknown key"]),
    ("[space.replicas]", "[space.replica]", ["'replica'", "unknown key"]),
    ("values = [16, 64, 256]", "values = [16, 0, 256]", ["scheduler.max_num_seqs", "out of range"]),
    ('kind = "min_replicas"', 'kind = "fastest"', ["unknown objective kind 'fastest'", "objective.kind"]),
    ("slo_target = 0.99", "slo_target = 1.5", ["objective.slo_target=1.5"]),
    ("slo_target = 0.99", "", ["needs objective.slo_target"]),
    ("[base.slo]\nttft = 2.0", "", ["objective.slo_target needs an SLO"]),
    ('kind = "min_replicas"', 'kind = "weighted"\nweights = { "ttft.p999" = 1.0 }',
     ["unknown metric 'objective.weights.ttft.p999'"]),
    ('type = "ordinal"', 'type = "ordinl"', ["unknown type 'ordinl'"]),
    ("[objective]", "[objectives]", ["unknown table [objectives]"]),
    ("[objective]", '[tuner]\nacq_func = "UCB"\n[objective]', ["tuner.acq_func", "unknown acquisition function 'UCB'"]),
    ("[objective]", "[tuner]\nkappa = -1\n[objective]", ["tuner.kappa=-1", "out of range"]),
])
def test_bad_space_names_file_and_key(tmp_path, old, new, expect):
    assert old in GOOD
    path = write(tmp_path, GOOD.replace(old, new, 1))
    with pytest.raises(TuneError) as e:
        load_space(path)
    msg = str(e.value)
    assert str(path) in msg
    for s in expect:
        assert s in msg, msg


def test_bad_category_value_fails_on_the_config(tmp_path):
    text = GOOD + '[space.router]\ntype = "categorical"\ncategories = ["round_robin", "fastest_first"]\n'
    with pytest.raises(TuneError) as e:
        load_space(write(tmp_path, text))
    assert "[space.\"router\"] = 'fastest_first'" in str(e.value) and "unknown router" in str(e.value)


# --------------------------------------------------------------------------- the search

def test_seeded_search_is_reproducible():
    a = tune(bowl, PARAMS, calls=9, initial=5, seed=3)
    b = tune(bowl, PARAMS, calls=9, initial=5, seed=3)
    assert points(a) == points(b)
    c = tune(bowl, PARAMS, calls=6, initial=5, seed=4)
    assert points(c)[:6] != points(a)[:6]


@pytest.mark.parametrize("parallel", [1, 3])
@pytest.mark.parametrize("space", ["continuous", "finite"])
def test_resume_continues_as_an_uninterrupted_search(tmp_path, parallel, space):
    f, params = (bowl, PARAMS) if space == "continuous" else (cup, FINITE)
    run = {"initial": 4, "seed": 7, "parallel": parallel, "runner": InlineRunner(f)}
    full = tune(f, params, calls=9, **run)
    part = tune(f, params, calls=6, **run)  # a batch boundary for both batch sizes
    csv_path = write_evaluations(part.evaluations, params, tmp_path / "evaluations.csv")
    history = read_evaluations(csv_path, params)
    assert [(e.params, e.loss, e.batch) for e in history] == [(e.params, e.loss, e.batch) for e in part.evaluations]
    resumed = tune(f, params, calls=9, history=history, **run)
    assert not resumed.diverged and resumed.resumed == 6
    assert [e.index for e in resumed.evaluations] == list(range(9))
    assert points(resumed) == points(full)


def test_resume_with_another_seed_is_flagged():
    part = tune(bowl, PARAMS, calls=6, initial=4, seed=1)
    other = tune(bowl, PARAMS, calls=7, initial=4, seed=2, history=part.evaluations)
    assert other.diverged and len(other.evaluations) == 7


def test_finds_a_known_optimum():
    res = tune(bowl, PARAMS, calls=20, initial=6, seed=0)
    best = res.best
    assert best.params["n"] == 7 and best.params["c"] == "b"
    assert abs(best.params["x"] - 0.3) < 0.03
    assert best.value < 0.001
    assert len({tuple(e.params.values()) for e in res.evaluations}) == 20  # no repeats


@pytest.mark.parametrize("parallel", [1, 4])
def test_gp_on_a_finite_space_finds_the_optimum_and_never_repeats(parallel):
    # after the initial points, the acquisition is minimised over every unseen point (constant liar in a batch):
    # no point twice, and the whole space once when the budget allows
    found = []
    for seed in range(3):
        res = tune(cup, FINITE, calls=12, seed=seed, parallel=parallel, runner=InlineRunner(cup))
        keys = [tuple(e.params.values()) for e in res.evaluations]
        assert len(set(keys)) == len(keys) == 12
        found.append(next(e.index for e in res.evaluations if e.value == 0.0))
    assert max(found) < 12, found  # the optimum within half the space, every seed
    res = tune(cup, FINITE, calls=30, seed=0, parallel=parallel, runner=InlineRunner(cup))
    assert res.exhausted and len({tuple(e.params.values()) for e in res.evaluations}) == len(res.evaluations) == 24


def test_acquisition_settings_are_checked_and_change_the_search():
    with pytest.raises(TuneError, match="unknown acquisition function 'UCB'"):
        tune(cup, FINITE, calls=3, acq_func="UCB")
    with pytest.raises(TuneError, match="unknown generator 'grid'"):
        tune(cup, FINITE, calls=3, init_gen="grid")
    lcb = tune(cup, FINITE, calls=10, seed=0)
    ei = tune(cup, FINITE, calls=10, seed=0, acq_func="EI")
    assert points(lcb)[:5] == points(ei)[:5]  # the same initial design
    assert points(lcb) != points(ei)


def test_random_search_on_a_finite_space_never_repeats_and_stops_when_exhausted():
    ps = [Param("a", "integer", 0, 3), Param("b", "ordinal", values=(1, 10))]
    res = tune(lambda a, b: a * b, ps, calls=20, estimator="random", seed=0)
    assert res.exhausted and len(res.evaluations) == 8
    assert {(e.params["a"], e.params["b"]) for e in res.evaluations} == {(a, b) for a in range(4) for b in (1, 10)}


def test_a_failing_evaluation_is_recorded_not_raised():
    def flaky(x: float, n: int, c: str) -> float:
        if c == "a":
            raise RuntimeError("replica fell over")
        return bowl(x, n, c)

    res = tune(flaky, PARAMS, calls=10, initial=10, seed=0)
    failed = [e for e in res.evaluations if e.status == "failed"]
    ok = [e for e in res.evaluations if e.status == "ok"]
    assert failed and ok and len(res.evaluations) == 10
    assert all("RuntimeError: replica fell over" in e.reason and not e.feasible for e in failed)
    assert min(e.loss for e in failed) > max(e.loss for e in ok)
    assert res.best.params["c"] != "a"


def test_infeasible_points_are_penalised_by_their_shortfall():
    obj = Objective("min_replicas", slo_target=0.99, worst=8.0, scale=1.0)
    near = obj.loss(Outcome(3.0, False, "x", shortfall=0.01), [])
    far = obj.loss(Outcome(3.0, False, "x", shortfall=0.3), [])
    assert obj.loss(Outcome(3.0), []) == 3.0 < near < far
    assert obj.loss(Outcome(1.0, False, "x", shortfall=0.5), []) > obj.loss(Outcome(8.0), []) == 8.0
    assert obj.loss(Outcome(math.nan, False, "boom", 1.0, failed=True), [2.0, far]) > far
    gp = Objective("max_goodput", worst=0.0, scale=10.0)
    assert gp.loss(Outcome(5.0), []) == -5.0 and gp.loss(Outcome(9.0, False, "x", 0.5), []) > 0


# --------------------------------------------------------------------------- CLI

CLI_SPACE = """
[base]
[base.slo]
ttft = 1.0
[space.replicas]
type = "integer"
low = 1
high = 3
[space."scheduler.max_num_seqs"]
type = "ordinal"
values = [4, 16, 64, 256]
[space.router]
type = "categorical"
categories = ["round_robin", "least_outstanding"]
[objective]
kind = "min_cost"
slo_target = 0.95
gpu_hour_price = 2.0
"""


def cli_tune(tmp_path: Path, out: str, *extra: str) -> int:
    space = tmp_path / "space.toml"
    if not space.exists():
        space.write_text(CLI_SPACE)
    return main(["tune", "--space", str(space), "--trace", str(AZURE), "--limit", "200", "--rate-scale", "2",
                 "--initial", "3", "--parallel", "2", "--seed", "5", "--no-progress", "--out", str(tmp_path / out),
                 *extra])


def rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return [{k: v for k, v in r.items() if k != "wall_s"} for r in csv.DictReader(f)]


def test_cli_end_to_end_and_resume(tmp_path, capsys):
    assert cli_tune(tmp_path, "full", "--calls", "7") == 0
    out = tmp_path / "full"
    cfg = config_from_toml(out / "best.toml")
    full = rows(out / "evaluations.csv")
    assert len(full) == 7 and [r["index"] for r in full] == [str(i) for i in range(7)]
    assert {"replicas", "scheduler.max_num_seqs", "router", "objective", "feasible", "reason", "slo_attainment",
            "ttft.p99"} <= set(full[0])
    best = min((r for r in full if r["feasible"] == "true"), key=lambda r: (float(r["loss"]), int(r["index"])))
    assert cfg.replicas == int(best["replicas"]) and cfg.scheduler.max_num_seqs == int(best["scheduler.max_num_seqs"])
    assert cfg.router == best["router"] and cfg.slo.ttft == 1.0
    assert float(best["objective"]) == cfg.replicas * cfg.tp * 2.0
    assert (out / "convergence.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # best.toml runs as a simulate config
    assert main(["simulate", "--config", str(out / "best.toml"), "--limit", "50", "--json"]) == 0

    assert cli_tune(tmp_path, "part", "--calls", "4") == 0
    capsys.readouterr()
    assert cli_tune(tmp_path, "part", "--calls", "7") == 2
    assert "pass --resume" in capsys.readouterr().err
    assert main(["tune", "--out", str(tmp_path / "part"), "--resume", "--calls", "7", "--no-progress"]) == 0
    assert rows(tmp_path / "part" / "evaluations.csv") == full
    capsys.readouterr()


def test_cli_validate_replays_the_best_on_the_executor(tmp_path, monkeypatch, capsys):
    import types

    from sim.cluster import simulate

    fake = types.ModuleType("executor.replay")
    fake.run_workload = simulate  # a stand-in "executor" that agrees with the simulator exactly
    monkeypatch.setitem(sys.modules, "executor.replay", fake)
    assert cli_tune(tmp_path, "v", "--calls", "4", "--validate", "2") == 0
    got = rows(tmp_path / "v" / "validation.csv")
    assert 1 <= len(got) <= 2
    assert all(float(r["relative_error"]) == 0.0 and r["real_feasible"] == "True" for r in got)
    assert "validation on the executor" in capsys.readouterr().out


def test_cli_errors_are_clear(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "executor.replay", None)
    assert cli_tune(tmp_path, "v", "--calls", "2", "--validate", "1") == 2
    assert "executor not available" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "ray", None)
    assert cli_tune(tmp_path, "r", "--calls", "2", "--ray-address", "auto") == 2
    assert "Ray is not installed" in capsys.readouterr().err
    assert main(["tune", "--out", str(tmp_path / "none"), "--resume"]) == 2
    assert "nothing to resume" in capsys.readouterr().err
    bad = tmp_path / "bad.toml"
    bad.write_text(CLI_SPACE.replace('kind = "min_cost"', 'kind = "cheapest"'))
    assert main(["tune", "--space", str(bad), "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "unknown objective kind 'cheapest'" in err
