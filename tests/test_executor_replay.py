"""Real-time replay on the executor: the simulator's record schema, every request accounted for under overload,
deadline and Ctrl-C, several worker processes behind the shared router, telemetry and live metrics."""

from __future__ import annotations

import dataclasses
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from executor.replay import (INTERRUPTED, STEP_COLUMNS, STOPPED_AT_MAX_DURATION, PrefixMirror, ReplayInterrupted,
                             ReplicaMirror, Report, read_steps, run_workload)
from executor.telemetry import TelemetrySampler
from policies.scheduler import SchedulerConfig
from sim.cluster import simulate
from sim.config import SimConfig
from traces import transforms
from traces.loaders import load_trace
from traces.records import FIELD_NAMES, STATUSES, RunResult
from traces.report import summarize
from traces.workload import Request, Workload

CONV = Path(__file__).parent / "data" / "azure2023" / "AzureLLMInferenceTrace_conv.head300.csv"
FAST = dict(model_config="tiny", device="cpu", threads=1, telemetry_interval=0.05)


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def azure_slice(n: int = 12) -> Workload:
    """The first n real requests, lengths cut 8x to suit the tiny model on a CPU."""
    w = transforms.first_n(load_trace(str(CONV)), n)
    return dataclasses.replace(w, input_tokens=np.maximum(1, w.input_tokens // 8),
                               output_tokens=np.clip(w.output_tokens // 8, 1, 12))


def burst(n: int, input_tokens: int, output_tokens: int, at: float = 0.0) -> Workload:
    return Workload.from_requests([Request(i, at, input_tokens, output_tokens) for i in range(n)], name="burst")


def assert_complete(res: RunResult, n: int) -> None:
    rec = res.records
    assert sorted(rec["id"].tolist()) == list(range(n))
    assert set(rec["status"].tolist()) <= set(STATUSES)
    assert sum(res.status_counts().values()) == n
    ok = rec["status"] == "ok"
    assert np.all(rec["generated_tokens"][ok] == rec["output_tokens"][ok])
    assert np.all(rec["first_token"][ok] >= rec["arrival"][ok])
    assert np.all(rec["finish"][ok] >= rec["first_token"][ok])
    assert all(r for r, s in zip(rec["reason"], rec["status"]) if s != "ok")


def test_same_records_and_report_schema_as_the_simulator(tmp_path):
    w = azure_slice()
    cfg = SimConfig(replicas=1, num_blocks=256, scheduler=SchedulerConfig(block_size=16))
    real = run_workload(w, cfg, rate_scale=16, out=tmp_path, **FAST)
    sim = simulate(transforms.scale_rate(w, 16), cfg)
    assert list(real.records) == list(sim.records) == list(FIELD_NAMES)
    for k in FIELD_NAMES:
        assert real.records[k].dtype == sim.records[k].dtype, k
    assert real.records["id"].tolist() == sim.records["id"].tolist()
    np.testing.assert_allclose(real.records["arrival"], sim.records["arrival"])  # intended send times
    assert_complete(real, len(w))
    assert real.status_counts()["ok"] == len(w)
    assert set(summarize(real, cfg.slo)) == set(summarize(sim, cfg.slo))
    assert real.meta["source"] == "executor" and real.meta["workers"] == "thread"
    assert 0 <= real.meta["send_lag_s"]["max"] < 1.0
    saved = RunResult.read_csv(tmp_path / "records.csv")
    assert list(saved) == list(FIELD_NAMES) and saved["id"].tolist() == list(range(len(w)))
    steps = read_steps(tmp_path / "steps.csv")
    assert tuple(steps) == STEP_COLUMNS
    assert steps["prefill_tokens"].sum() + steps["decode_seqs"].sum() == real.replicas[0].tokens
    assert np.all(np.diff(steps["start"]) > 0)
    assert real.replicas[0].busy_time == pytest.approx(steps["duration"].sum())
    tel = TelemetrySampler.load(tmp_path / "telemetry.csv")
    for col in ("t", "proc.cpu_pct", "proc.rss_mib", "sys.cpu_pct", "sys.mem_used_mib", "replica0.waiting",
                "replica0.running", "replica0.kv_usage", "replica0.prefix_hit_rate", "replica0.outstanding"):
        assert col in tel, col
    assert len(tel["t"]) >= 2


def test_overload_rejects_with_the_admission_limit_and_loses_nothing():
    cfg = SimConfig(num_blocks=64, scheduler=SchedulerConfig(max_num_seqs=1, max_waiting=2, block_size=16))
    res = run_workload(burst(10, 32, 6), cfg, **FAST)
    assert_complete(res, 10)
    rec = res.records
    rejected = rec["status"] == "rejected"
    assert rejected.sum() >= 1 and res.status_counts()["ok"] >= 2
    assert set(rec["reason"][rejected]) == {"waiting queue full (max_waiting=2)"}
    assert np.all(np.isnan(rec["first_token"][rejected])) and np.all(rec["replica"][rejected] == 0)


def test_queue_timeout_times_out_what_waits_too_long():
    cfg = SimConfig(num_blocks=256, scheduler=SchedulerConfig(max_num_seqs=1, queue_timeout=0.05, block_size=16))
    res = run_workload(burst(4, 16, 200), cfg, **FAST)
    assert_complete(res, 4)
    rec = res.records
    assert rec["status"][0] == "ok" and "timed_out" in rec["status"].tolist()
    assert set(rec["reason"][rec["status"] == "timed_out"]) == {"not admitted within queue_timeout=0.05s"}


def test_a_crashed_replica_fails_its_requests_and_later_ones_are_rejected(monkeypatch):
    from executor.engine import Engine

    step = Engine.step

    def crash(self, now_fn=None):
        if self.scheduler.cfg.max_num_seqs == 7:  # the run's scheduler, not the warm-up's
            raise RuntimeError("boom")
        return step(self, now_fn)

    monkeypatch.setattr(Engine, "step", crash)
    reqs = [Request(0, 0.0, 16, 4), Request(1, 0.0, 16, 4), Request(2, 0.3, 16, 4)]
    cfg = SimConfig(num_blocks=64, scheduler=SchedulerConfig(max_num_seqs=7, block_size=16))
    res = run_workload(Workload.from_requests(reqs), cfg, **FAST)
    assert_complete(res, 3)
    rec = res.records
    assert rec["status"].tolist() == ["failed", "failed", "rejected"]
    assert set(rec["reason"][:2]) == {"replica 0 failed: RuntimeError: boom"}
    assert rec["reason"][2] == "no healthy replica"


def test_max_duration_fails_what_is_unfinished():
    reqs = [Request(i, 0.0, 16, 1000) for i in range(3)] + [Request(3, 30.0, 16, 4)]  # the last is never sent
    cfg = SimConfig(num_blocks=256, scheduler=SchedulerConfig(block_size=16))
    res = run_workload(Workload.from_requests(reqs), cfg, max_duration=0.3, **FAST)
    assert_complete(res, 4)
    rec = res.records
    assert res.meta["stopped"] == STOPPED_AT_MAX_DURATION
    assert rec["status"].tolist() == ["failed"] * 4
    assert set(rec["reason"]) == {STOPPED_AT_MAX_DURATION}
    assert rec["replica"][3] == -1 and rec["generated_tokens"][3] == 0
    assert np.all(rec["generated_tokens"][:3] < 1000)
    assert res.end >= 0.3 and np.isnan(rec["finish"][3])


def test_ctrl_c_stops_and_keeps_the_records_so_far(tmp_path):
    reqs = [Request(0, 0.0, 16, 2)] + [Request(i, 0.0, 16, 1000) for i in range(1, 4)]

    def progress(k: int) -> None:  # stands in for SIGINT: raised in the parent's loop, as Ctrl-C would be
        raise KeyboardInterrupt

    cfg = SimConfig(num_blocks=256, scheduler=SchedulerConfig(block_size=16))
    with pytest.raises(ReplayInterrupted) as e:
        run_workload(Workload.from_requests(reqs), cfg, progress=progress, out=tmp_path, **FAST)
    res = e.value.result
    assert_complete(res, 4)
    assert res.records["status"][0] == "ok"
    assert set(res.records["reason"][1:]) == {INTERRUPTED}
    assert res.meta["stopped"] == INTERRUPTED
    assert RunResult.read_csv(tmp_path / "records.csv")["status"].tolist() == res.records["status"].tolist()


def test_two_worker_processes_behind_round_robin(tmp_path):
    w = transforms.scale_rate(azure_slice(8), 16)
    cfg = SimConfig(replicas=2, router="round_robin", num_blocks=256, scheduler=SchedulerConfig(block_size=16))
    res = run_workload(w, cfg, out=tmp_path, **FAST)
    assert_complete(res, 8)
    assert res.meta["workers"] == "process" and res.meta["threads_per_replica"] == 1
    assert res.records["replica"].tolist() == [0, 1] * 4
    assert res.status_counts()["ok"] == 8
    assert all(r.steps > 0 for r in res.replicas)
    assert set(read_steps(tmp_path / "steps.csv")["replica"].tolist()) == {0, 1}
    tel = TelemetrySampler.load(tmp_path / "telemetry.csv")
    for k in (0, 1):
        for g in ("waiting", "running", "kv_usage", "prefix_hit_rate", "cpu_pct", "rss_mib"):
            assert f"replica{k}.{g}" in tel


def test_prefix_affinity_sends_a_shared_prefix_where_it_was_sent_before():
    # Two prompt families (64 shared tokens each, then 8 own ones), interleaved; the first of each arrive
    # together, so least-outstanding puts them on different replicas.
    reqs = [Request(i, 0.1 * max(i - 1, 0), 72, 3, block_hashes=(100 * (i % 2) + 1, 100 * (i % 2) + 2),
                    hash_block_size=32) for i in range(8)]
    cfg = SimConfig(replicas=2, router="prefix_affinity", num_blocks=128, scheduler=SchedulerConfig(block_size=16))
    res = run_workload(Workload.from_requests(reqs), cfg, in_process=True, **FAST)
    assert_complete(res, 8)
    rep = res.records["replica"].tolist()
    assert rep == [0, 1] * 4
    cached = res.records["cached_tokens"][2:].tolist()
    assert set(cached) <= {0, 64} and cached.count(64) >= 4  # 0 only if its family's first prefill was not done


def test_metrics_endpoint_serves_vllm_names_on_loopback_during_the_run():
    seen: dict[str, str] = {}

    def scrape(k: int) -> None:
        if "text" not in seen:
            with urllib.request.urlopen(seen["url"], timeout=5) as r:
                seen["text"] = r.read().decode()

    cfg = SimConfig(num_blocks=64, scheduler=SchedulerConfig(block_size=16))
    res = run_workload(burst(3, 24, 4), cfg, metrics_port=0, progress=scrape,
                       on_start=lambda info: seen.__setitem__("url", info["metrics_url"]), **FAST)
    assert seen["url"].startswith("http://127.0.0.1:") and res.meta["metrics_url"] == seen["url"]
    text = seen["text"]
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:time_to_first_token_seconds_count", "vllm:request_success_total"):
        assert name in text, name
    assert 'engine="0"' in text and 'model_name="tiny"' in text


def test_model_from_a_local_hugging_face_directory(tmp_path):
    from executor.model import LlamaForCausalLM, preset

    LlamaForCausalLM.from_seed(preset("tiny"), seed=3).save_pretrained(tmp_path / "tiny-hf")
    cfg = SimConfig(num_blocks=64, scheduler=SchedulerConfig(block_size=16))
    fast = dict(FAST, model_config=str(tmp_path / "tiny-hf"))
    res = run_workload(burst(2, 16, 3), cfg, **fast)
    assert res.status_counts()["ok"] == 2
    assert res.meta["model"] == "tiny-hf" and res.meta["model_path"] == str(tmp_path / "tiny-hf")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        run_workload(burst(1, 16, 3), cfg, **dict(FAST, model_config=str(tmp_path)))


# ---- the router's mirror of a replica (no model) --------------------------------------------------

def test_prefix_mirror_is_an_lru_of_dispatched_prefix_blocks():
    m = PrefixMirror(block_size=16, capacity=3)
    m.insert([1, 2])
    assert m.lookup([1, 2, 3]) == [1, 2] and m.lookup([3, 1]) == []
    m.insert([3, 4])  # capacity 3: the least recently sent block (1) goes
    assert m.lookup([1, 2]) == [] and m.lookup([2, 3, 4]) == [2, 3, 4]
    assert m.lookup([2]) == [2]  # lookups do not refresh
    m.insert([5])
    assert m.lookup([2]) == []


def test_replica_mirror_counts_outstanding_and_pending_tokens_not_yet_reported():
    v = ReplicaMirror(0, 16, 100)
    v.dispatched(Request(0, 0.0, 10, 5))
    v.dispatched(Request(1, 0.0, 20, 5))
    assert v.num_outstanding == 2 and v.pending_tokens() == 40 and v.num_running == 0
    rep = Report(replica=0, received=1, running=1, waiting=0, kv_usage=0.1, pending_tokens=7, prefix_queries=0,
                 prefix_hits=0, preemptions=0, evictions=0, step=None, itl=[], prompt_tokens=0, generated=0,
                 finished=[])
    v.reported(rep)  # the replica has seen the first request (7 tokens left of it), not the second
    assert v.pending_tokens() == 7 + 25 and v.num_running == 1
    assert v.gauges() == {"replica0.waiting": 0, "replica0.running": 1, "replica0.kv_usage": 0.1,
                          "replica0.prefix_hit_rate": 0.0, "replica0.outstanding": 2}


def test_warm_up_runs_every_kind_of_attention_call_the_run_will_meet(monkeypatch):
    from executor.model import LlamaForCausalLM, preset
    from executor.replay import _warm_up
    from executor.runner import ModelRunner

    runner = ModelRunner(LlamaForCausalLM.from_seed(preset("tiny"), seed=0), 64, 16, num_threads=1)
    seen = []
    orig = ModelRunner.run

    def spy(self, plan):
        seen.append(([(s.num_computed, n) for s, n in zip(plan.prefill, plan.prefill_tokens)],
                     [s.num_computed + 1 for s in plan.decode]))
        return orig(self, plan)

    monkeypatch.setattr(ModelRunner, "run", spy)
    ran = _warm_up(runner, SchedulerConfig(block_size=16, max_num_batched_tokens=128, max_num_seqs=2))
    chunks = [c for p, _ in seen for c in p]
    assert any(start == 0 for start, _ in chunks)  # from position 0 (plain causal)
    assert any(start > 0 for start, _ in chunks)  # past position 0 (the bottom-right mask)
    assert any(p and d for p, d in seen)  # a mixed step
    assert any(len(set(d)) >= 2 for _, d in seen)  # decodes of different lengths in one step
    assert runner.cache.k[0].abs().sum() > 0  # it really ran the model
    # one prefill as large as a run's can be: the model's 1024 positions and the 64-block cache allow 992
    assert ran["prefill_tokens"] == 992 and max(n for _, n in chunks) == 992
    # the gather workspace holds a full decode batch already: 2 sequences of up to 64 blocks, the cache's 64
    assert ran["workspace_blocks"] == 64 == runner.cache._ws_k.shape[0]
    assert runner.cache.reserve(10) == 64  # never shrinks
    with pytest.raises(ValueError, match="n_blocks"):
        runner.cache.reserve(-1)
