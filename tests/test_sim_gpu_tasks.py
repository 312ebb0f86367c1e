"""GPU tasks on a separate device pool (sim/gpu_tasks.py): exact dispatch, invariants, wiring into simulate."""

from __future__ import annotations

import numpy as np
import pytest
import simpy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sim.cli import build_parser, config_from_args
from sim.cluster import simulate
from sim.config import ConfigError, GpuTaskSettings, SimConfig, config_from_dict
from sim.gpu_tasks import GpuTaskStream, draw_tasks
from traces.report import render, summarize
from traces.workload import Workload


def _run(speeds, arrival, work, factor=None) -> GpuTaskStream:
    env = simpy.Environment()
    s = GpuTaskStream(env, speeds, np.array(arrival, float), np.array(work, float),
                      None if factor is None else np.array(factor, float))
    env.run()
    return s


def test_exact_dispatch_on_two_devices():
    # devices 0 (speed 1) and 1 (speed 2); tasks at 0, 0.5, 2.5 with work 2, 4, 2 (s at speed 1)
    # t=0:   dev0 -> 2, dev1 -> 1          => dev1 [0, 1]
    # t=0.5: dev0 -> 2.5, dev1 -> 1 + 2 = 3 => dev1 [1, 3]
    # t=2.5: dev0 -> 4.5, dev1 -> 3 + 1 = 4 => dev1 [3, 4]
    s = _run([1.0, 2.0], [0, 0.5, 2.5], [2, 4, 2])
    assert s.device.tolist() == [1, 1, 1]
    assert s.start.tolist() == [0.0, 1.0, 3.0]
    assert s.finish.tolist() == [1.0, 3.0, 4.0]
    assert s.predicted_finish.tolist() == [1.0, 3.0, 4.0]
    sm = s.summary(0.0)
    assert sm["count"] == 3 and sm["finish_error_s"] == 0.0
    assert sm["utilisation"] == [0.0, 1.0]  # dev1 busy 0..4 of a 4 s span


def test_late_finish_delays_the_queue_and_moves_the_choice():
    # same tasks, task 0 takes twice its prediction: dev1 [0, 2] (predicted 1)
    # t=0.5: dev1 free at 1 (predicted) -> 1 + 2 = 3 => dev1, predicted finish 3; it actually runs [2, 4]
    # t=2:   task 0 completes: dev1 predicted free at 2 + 2 = 4
    # t=2.5: dev0 -> 4.5, dev1 -> 4 + 1 = 5 => dev0 [2.5, 4.5]  (without complete(): dev1 -> 4)
    s = _run([1.0, 2.0], [0, 0.5, 2.5], [2, 4, 2], factor=[2, 1, 1])
    assert s.device.tolist() == [1, 1, 0]
    assert s.start.tolist() == [0.0, 2.0, 2.5]
    assert s.finish.tolist() == [2.0, 4.0, 4.5]
    assert s.predicted_finish.tolist() == [1.0, 3.0, 4.5]
    assert s.summary(0.0)["finish_error_s"] == pytest.approx(2 / 3)


tasks = st.integers(0, 25).flatmap(lambda n: st.tuples(
    st.lists(st.floats(0, 10, allow_nan=False), min_size=n, max_size=n),
    st.lists(st.floats(0, 3, allow_nan=False), min_size=n, max_size=n),
    st.lists(st.floats(0.2, 5, allow_nan=False), min_size=n, max_size=n)))


@settings(max_examples=150, deadline=None)
@given(speeds=st.lists(st.sampled_from([0.5, 1.0, 2.0, 3.0]), min_size=1, max_size=4), t=tasks)
def test_every_task_once_and_devices_never_overlap(speeds, t):
    arrival, work, factor = sorted(t[0]), t[1], t[2]
    s = _run(speeds, arrival, work, factor)
    n = len(arrival)
    assert np.all(np.isfinite(s.finish)) and np.all(s.device >= 0)  # every task ran to the end ...
    assert not s.sched._where  # ... and was completed exactly once (complete() pops it; twice would raise)
    assert np.all(s.start >= s.arrival - 1e-9)
    dur = np.array(work) / np.array(speeds)[s.device] * np.array(factor) if n else np.zeros(0)
    assert np.allclose(s.finish - s.start, dur)
    for d in range(len(speeds)):
        idx = np.flatnonzero(s.device == d)
        assert np.all(np.diff(idx) > 0)
        st_, fi = s.start[idx], s.finish[idx]
        assert np.all(st_[1:] >= fi[:-1] - 1e-9)  # FIFO, one task at a time
    if n and np.all(np.array(factor) == 1.0):
        assert np.allclose(s.finish, s.predicted_finish)


def _workload(n=60, span=20.0):
    return Workload(arrival=np.linspace(0, span, n), input_tokens=np.full(n, 100), output_tokens=np.full(n, 20))


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31 - 1), rate=st.floats(0.5, 20), cv=st.sampled_from([0.0, 0.5, 2.0]),
       jitter=st.sampled_from([0.0, 0.3]))
def test_simulate_with_gpu_tasks_same_seed_same_result(seed, rate, cv, jitter):
    w = _workload()
    g = GpuTaskSettings(rate=rate, work=0.3, work_cv=cv, speeds=(1.0, 2.0), jitter=jitter)
    cfg = SimConfig(seed=seed, replicas=2, gpu_tasks=g)
    a, b = simulate(w, cfg), simulate(w, cfg)
    assert a.meta["gpu_tasks"] == b.meta["gpu_tasks"]
    off = simulate(w, SimConfig(seed=seed, replicas=2))
    for k in a.records:  # the LLM replicas never see the task stream
        x, y = a.records[k], off.records[k]
        assert np.array_equal(x, y, equal_nan=x.dtype.kind == "f"), k
    arr, _, _ = draw_tasks(g, seed, 0.0, 20.0)
    gt = summarize(a)["gpu_tasks"]
    assert gt["count"] == gt["completed"] == len(arr) == sum(gt["tasks_per_device"])
    assert np.all((arr >= 0) & (arr <= 20.0))
    assert all(0 <= u <= 1 + 1e-9 for u in gt["utilisation"])


def test_off_by_default_and_summary_line():
    w = _workload()
    assert SimConfig().gpu_tasks.rate == 0
    r = simulate(w, SimConfig())
    assert "gpu_tasks" not in r.meta and "gpu_tasks" not in summarize(r)
    on = summarize(simulate(w, SimConfig(gpu_tasks=GpuTaskSettings(rate=3, work=0.1))))
    assert on["gpu_tasks"]["count"] > 0 and "gpu_tasks" not in on["meta"]
    from rich.console import Console

    c = Console(width=200, record=True)
    c.print(render(on))
    assert "GPU tasks" in c.export_text()


def test_config_and_flags():
    args = build_parser().parse_args(["simulate", "--gpu-task-rate", "4", "--gpu-task-work", "0.2",
                                      "--gpu-task-speeds", "1,2.5"])
    g = config_from_args(args).gpu_tasks
    assert (g.rate, g.work, g.speeds) == (4.0, 0.2, (1.0, 2.5))
    assert config_from_dict({"gpu_tasks": {"speeds": [1, 2], "jitter": 0.1}}).gpu_tasks.speeds == (1.0, 2.0)
    for bad, key in (({"rate": -1}, "gpu_tasks.rate"), ({"work": -0.1}, "gpu_tasks.work"),
                     ({"work_cv": -1}, "gpu_tasks.work_cv"), ({"jitter": -1}, "gpu_tasks.jitter"),
                     ({"speeds": []}, "gpu_tasks.speeds"), ({"speeds": [1, 0]}, "gpu_tasks.speeds"),
                     ({"speeds": "1,x"}, "gpu_tasks.speeds"), ({"sped": [1]}, "gpu_tasks.sped")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            config_from_dict({"gpu_tasks": bad})
