"""Issue-3 policies wired into the simulator: exact small cases.

Result cache hit/miss/expiry with exact latencies, closed-loop sessions with exact send times, a crash with
retry and with fail, SJF/EDF queues, the load-predicting router, GPU placement, KV sampling and reclaim,
config files and flags. Invariants over generated runs are in test_sim_policies_props.py.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from policies.queues import QUEUES, create_queue
from policies.routers import PredictedLatency, create_router
from policies.scheduler import SchedulerConfig
from sim.cli import main
from sim.cluster import simulate
from sim.config import (ConfigError, FaultSettings, MemorySettings, QueueSettings, ResultCacheSettings,
                        SessionSettings, SimConfig, ClusterSettings, config_from_dict, config_from_toml, to_toml)
from traces.records import RunResult
from traces.report import summarize
from traces.workload import Request, Workload
from tests.test_sim_cluster import LinearCost

DATA = "tests/data"


def approx(x):
    return pytest.approx(x, abs=1e-12)


# ---- result cache --------------------------------------------------------------------------------

def three_same_prompts() -> Workload:
    return Workload.from_requests([
        Request(0, 0.0, 100, 2, cache_key=7),
        Request(1, 0.5, 100, 2, cache_key=7),
        Request(2, 1.2, 100, 2, cache_key=7),
    ], name="three")


@pytest.mark.parametrize("jump", [True, False])
def test_result_cache_miss_hit_expired_exact(jump):
    # latency 0.002, ttl 1.0
    # A  t=0    miss; reaches the replica at 0.002; prefill 100: 0.010 + 0.100 -> first token 0.112;
    #           one decode 0.011 -> finish 0.123; the response is cached at 0.123 until 1.123
    # B  t=0.5  hit: answered at 0.502, no replica
    # C  t=1.2  the entry expired at 1.123: miss; 1.202 + 0.110 = 1.312, + 0.011 = 1.323
    cfg = SimConfig(jump=jump, result_cache=ResultCacheSettings(capacity=10, ttl=1.0, latency=0.002))
    r = simulate(three_same_prompts(), cfg, cost=LinearCost(), check=True)
    rec = r.records
    assert list(rec["status"]) == ["ok"] * 3
    assert list(rec["result_cache_hit"]) == [0, 1, 0]
    assert list(rec["replica"]) == [0, -1, 0]
    assert rec["first_token"] - rec["arrival"] == approx([0.112, 0.002, 0.112])
    assert rec["finish"] - rec["arrival"] == approx([0.123, 0.002, 0.123])
    assert list(rec["generated_tokens"]) == [2, 2, 2]
    s = summarize(r)
    assert s["result_cache_hits"] == 1 and s["result_cache_hit_rate"] == pytest.approx(1 / 3)
    m = r.meta["result_cache"]
    assert (m["lookups"], m["hits"], m["misses"], m["expirations"]) == (3, 1, 2, 1)
    assert m["writes_acked"] == {"1": 2}


def test_result_cache_off_and_uncacheable_requests_bypass_it():
    w = Workload.from_requests([Request(0, 0.0, 100, 2), Request(1, 0.5, 100, 2)])  # no key, no hashes
    r = simulate(w, SimConfig(result_cache=ResultCacheSettings(capacity=10, latency=0.002)), cost=LinearCost())
    assert list(r.records["result_cache_hit"]) == [0, 0]
    assert r.records["first_token"] - r.records["arrival"] == approx([0.110, 0.110])  # no lookup latency
    assert r.meta["result_cache"]["uncacheable"] == 2
    off = simulate(three_same_prompts(), SimConfig(), cost=LinearCost())
    assert off.records["result_cache_hit"].sum() == 0 and "result_cache" not in off.meta


def test_distributed_cache_node_loss_falls_back_to_replicas():
    # Ten distinct prompts, each asked twice; 3 cache nodes, every key on 2 of them. Node 0 is lost between
    # the two rounds: every second ask still hits, from the other replica where node 0 was the primary.
    reqs = [Request(i, 0.01 * i, 50, 1, cache_key=1000 + i) for i in range(10)]
    reqs += [Request(10 + i, 5.0 + 0.01 * i, 50, 1, cache_key=1000 + i) for i in range(10)]
    w = Workload.from_requests(reqs)
    rc = ResultCacheSettings(capacity=100, ttl=100.0, latency=0.001, nodes=3, replication=2, vnodes=50)
    cfg = SimConfig(result_cache=rc, faults=FaultSettings(cache_node_loss=("0@3.0",)))
    r = simulate(w, cfg, cost=LinearCost(), check=True)
    assert list(r.records["result_cache_hit"]) == [0] * 10 + [1] * 10
    m = r.meta["result_cache"]
    assert m["writes_acked"] == {"2": 10}  # both replicas took every write (all before the loss)
    assert m["fallback_hits"] > 0
    assert r.meta["faults"]["cache_node_events"][0][:3] == [3.0, "cache_node_down", 0]
    # with one copy per key, the keys whose only node was lost miss again
    one = SimConfig(result_cache=ResultCacheSettings(capacity=100, ttl=100.0, latency=0.001, nodes=3, vnodes=50),
                    faults=FaultSettings(cache_node_loss=("0@3.0",)))
    r1 = simulate(w, one, cost=LinearCost())
    lost = 10 - int(r1.records["result_cache_hit"].sum())
    assert 0 < lost < 10
    # the re-served misses cannot write back: their only node is down (0 replicas acknowledged)
    assert r1.meta["result_cache"]["writes_acked"] == {"0": lost, "1": 10}
    assert r1.meta["result_cache"]["failed_writes"] == lost


# ---- closed-loop sessions ------------------------------------------------------------------------

def one_session(recorded_think=(0.0, 0.5, 0.25), inputs=(100, 150, 200), outputs=(2, 1, 3)) -> Workload:
    n = len(inputs)
    return Workload(arrival=np.array([0.0, 0.3, 0.6][:n]), input_tokens=np.array(inputs),
                    output_tokens=np.array(outputs), session_id=["s"] * n, step=np.arange(n),
                    think_time=np.array(recorded_think[:n]), name="session")


@pytest.mark.parametrize("jump", [True, False])
def test_closed_loop_session_exact_send_times(jump):
    # step 0: sent 0;     prefill 100: 0.110, decode 0.011 -> finish 0.121
    # step 1: sent 0.121 + 0.5 = 0.621;  prefill 150: 0.160 -> first token = finish 0.781
    # step 2: sent 0.781 + 0.25 = 1.031; prefill 200: 0.210 -> 1.241, two decodes -> 1.263
    cfg = SimConfig(jump=jump, sessions=SessionSettings(mode="closed"))
    r = simulate(one_session(), cfg, cost=LinearCost(), check=True)
    rec = r.records
    assert list(rec["status"]) == ["ok"] * 3
    assert rec["arrival"] == approx([0.0, 0.621, 1.031])
    assert rec["finish"] == approx([0.121, 0.781, 1.263])
    open_loop = simulate(one_session(), SimConfig(jump=jump), cost=LinearCost())
    assert open_loop.records["arrival"] == approx([0.0, 0.3, 0.6])  # as recorded
    s = summarize(r)["sessions"]
    assert s["sessions"] == 1 and s["completed"] == 1
    assert s["task_completion_s"]["p50"] == pytest.approx(1.263)
    assert s["calls_per_session"]["mean"] == 3


def test_closed_loop_fixed_and_exponential_think_times():
    r = simulate(one_session(), SimConfig(sessions=SessionSettings(mode="closed", think="1.0")), cost=LinearCost())
    assert r.records["arrival"] == approx([0.0, 1.121, 1.121 + 0.160 + 1.0])
    a = simulate(one_session(), SimConfig(seed=3, sessions=SessionSettings(mode="closed", think="exp:2")),
                 cost=LinearCost())
    b = simulate(one_session(), SimConfig(seed=3, sessions=SessionSettings(mode="closed", think="exp:2")),
                 cost=LinearCost())
    assert np.array_equal(a.records["arrival"], b.records["arrival"])
    assert np.all(np.diff(a.records["arrival"]) > 0)


def test_failed_step_aborts_the_rest_of_the_session():
    # step 1 needs more KV blocks than the replica has: rejected; step 2 is never sent
    w = one_session(inputs=(100, 5000, 200))
    r = simulate(w, SimConfig(num_blocks=100, sessions=SessionSettings(mode="closed")), cost=LinearCost())
    rec = r.records
    assert list(rec["status"]) == ["ok", "rejected", "failed"]
    assert rec["reason"][2] == "session aborted after step 1 failed"
    assert rec["arrival"][2] == rec["finish"][2] == rec["finish"][1]
    assert summarize(r)["sessions"]["incomplete"] == 1


def test_closed_loop_needs_session_ids():
    w = Workload.from_requests([Request(0, 0.0, 10, 2)])
    with pytest.raises(ValueError, match="closed-loop sessions need a trace with session ids"):
        simulate(w, SimConfig(sessions=SessionSettings(mode="closed")), cost=LinearCost())


def test_lmcache_slice_replays_closed_loop_with_prefix_reuse():
    from traces.loaders import load_trace

    w = load_trace(f"{DATA}/lmcache-taubench")
    cfg = SimConfig(replicas=2, router="prefix_affinity", sessions=SessionSettings(mode="closed"))
    r = simulate(w, cfg, check=True)
    rec = r.records
    assert np.all(rec["status"] == "ok")
    s = summarize(r)["sessions"]
    assert s["sessions"] == w.meta["sessions"] and s["completed"] == s["sessions"]
    assert s["cache_reuse_overall"] > 0.2  # prompts grow: each step reuses the previous one's prefix
    for sid in set(w.session_id):  # closed loop: step k+1 is sent after step k finished
        idx = sorted((i for i in range(len(w)) if w.session_id[i] == sid), key=lambda i: w.step[i])
        for a, b in zip(idx, idx[1:]):
            assert rec["arrival"][b] >= rec["finish"][a] + w.think_time[b] - 1e-9


# ---- crashes -------------------------------------------------------------------------------------

@pytest.mark.parametrize("jump", [True, False])
def test_crash_retry_keeps_the_intended_send_time(jump):
    # Two replicas; A (t=0) goes to replica 0 and is prefilling when replica 0 crashes at 0.05: it is
    # re-routed to replica 1 at 0.05 and prefills there: first token 0.05 + 0.110, TTFT counted from 0.
    # B (t=0.06) finds replica 0 down: replica 1 too.
    w = Workload.from_requests([Request(0, 0.0, 100, 2), Request(1, 0.06, 10, 1)])
    cfg = SimConfig(replicas=2, jump=jump, faults=FaultSettings(crashes=("0@0.05+1",)))
    r = simulate(w, cfg, cost=LinearCost(), check=True)
    rec = r.records
    assert list(rec["status"]) == ["ok", "ok"] and list(rec["replica"]) == [1, 1]
    assert rec["arrival"][0] == 0.0
    assert rec["first_token"][0] == approx(0.160)
    f = r.meta["faults"]
    assert f["crashes"] == [1, 0] and f["requests_retried"] == 1 and f["failed_by_crash"] == 0
    assert f["downtime_s"][0] == pytest.approx(1.0)


def test_crash_fail_policy_and_no_healthy_replica():
    w = Workload.from_requests([Request(0, 0.0, 100, 2), Request(1, 0.5, 10, 1), Request(2, 2.5, 10, 1)])
    cfg = SimConfig(faults=FaultSettings(crashes=("0@0.05+1.5",), on_crash="fail"))
    r = simulate(w, cfg, cost=LinearCost(), check=True)
    rec = r.records
    assert list(rec["status"]) == ["failed", "rejected", "ok"]
    assert rec["reason"][0] == "replica 0 crashed" and rec["finish"][0] == approx(0.05)
    assert rec["reason"][1] == "no healthy replica"
    # recovered at 1.55; the next health check (every 1 s) at 2.0 lets traffic in again
    w2 = Workload.from_requests([Request(0, 0.0, 100, 2), Request(1, 1.8, 10, 1), Request(2, 2.0, 10, 1)])
    r2 = simulate(w2, cfg, cost=LinearCost())
    assert list(r2.records["status"]) == ["failed", "rejected", "ok"]


def test_crash_during_a_decode_run_keeps_the_completed_steps():
    # A long decode: steps of 0.011 s after a 0.110 s prefill. A crash at 0.2 lets a step-by-step replica
    # finish 8 decode steps (0.110 + 8 * 0.011 = 0.198); the jump must agree (here: the partial ITL count).
    w = Workload.from_requests([Request(0, 0.0, 100, 50)])
    cfg = SimConfig(replicas=2, faults=FaultSettings(crashes=("0@0.2+5",)))
    a = simulate(w, cfg, cost=LinearCost(), check=True)
    import dataclasses

    b = simulate(w, dataclasses.replace(cfg, jump=False), cost=LinearCost(), check=True)
    assert a.itl.count() == b.itl.count() == 8 + 49
    assert a.records["finish"][0] == approx(b.records["finish"][0])
    assert a.records["first_token"][0] == approx(0.2 + 0.110)


# ---- queue disciplines and routers -------------------------------------------------------------

def test_sjf_and_edf_are_registered_with_defaults():
    assert {"fcfs", "priority", "sjf", "edf"} <= set(QUEUES)
    assert SchedulerConfig(queue="sjf").queue == "sjf" and SchedulerConfig(queue="edf").queue == "edf"
    assert create_queue("sjf").aging == 100.0
    assert create_queue("edf", deadlines={"chat": 2.0}).deadline(
        type("S", (), {"t_arrival": 1.0, "req": Request(0, 1.0, 1, 1, slo_class="chat")})()) == 3.0


@pytest.mark.parametrize("queue,order", [("fcfs", [0, 1, 2]), ("sjf", [0, 2, 1])])
def test_sjf_serves_the_short_job_first_in_the_simulator(queue, order):
    # one sequence at a time: A runs; B (long) and C (short) wait; SJF admits C before B
    w = Workload.from_requests([Request(0, 0.0, 100, 5), Request(1, 0.01, 400, 5), Request(2, 0.02, 20, 5)])
    cfg = SimConfig(scheduler=SchedulerConfig(max_num_seqs=1, queue=queue))
    r = simulate(w, cfg, cost=LinearCost())
    assert list(np.argsort(r.records["admitted"], kind="stable")) == order


def test_edf_uses_per_class_deadlines_from_config():
    w = Workload(arrival=np.array([0.0, 0.01, 0.02]), input_tokens=np.array([100, 100, 100]),
                 output_tokens=np.array([5, 5, 5]), slo_class=["batch", "batch", "chat"])
    q = QueueSettings(edf_deadlines={"chat": 0.5, "batch": 30.0})
    cfg = SimConfig(scheduler=SchedulerConfig(max_num_seqs=1, queue="edf"), queue=q)
    r = simulate(w, cfg, cost=LinearCost())
    assert list(np.argsort(r.records["admitted"], kind="stable")) == [0, 2, 1]


class FakeReplica:
    def __init__(self, pending, running, healthy=True, kv=None):
        self._p, self.num_running, self.healthy, self.kv = pending, running, healthy, kv
        self.num_outstanding = running

    def pending_tokens(self):
        return self._p


def test_predicted_latency_formula_and_choice():
    r = PredictedLatency(c_tok=1e-4, d0=0.01, d1=0.001)
    req = Request(0, 0.0, 200, 10)
    a, b, c = FakeReplica(1000, 2), FakeReplica(0, 30), FakeReplica(0, 0, healthy=False)
    # a: 1e-4 * (1000 + 200) + 10 * (0.01 + 0.001 * 3) = 0.12 + 0.13 = 0.25
    # b: 1e-4 * 200 + 10 * (0.01 + 0.001 * 31) = 0.02 + 0.41 = 0.43
    assert r.predict(req, a) == pytest.approx(0.25) and r.predict(req, b) == pytest.approx(0.43)
    assert r.route(req, [a, b, c], 0.0) == 0
    assert r.route(Request(1, 0.0, 200, 1), [a, b, c], 0.0) == 1  # a one-token answer: the batch hardly matters
    assert r.route(req, [c], 0.0) is None
    assert create_router("predicted_latency").c_tok > 0


def test_predicted_latency_prefers_the_replica_with_the_prefix():
    # idle replicas (one request at a time): the one holding the prompt's prefix predicts the shorter prefill
    reqs = [Request(i, i * 3.0, 1024, 4, block_hashes=(100 + i % 2, 200 + i % 2, 300 + i), hash_block_size=256)
            for i in range(20)]
    r = simulate(Workload.from_requests(reqs), SimConfig(replicas=2, router="predicted_latency"), cost=LinearCost())
    rep = r.records["replica"]
    assert len(set(rep[2::2])) == 1 and len(set(rep[3::2])) == 1
    assert summarize(r)["prefix_hit_rate"] > 0.4


# ---- placement and memory -------------------------------------------------------------------------

def test_placement_builds_the_replicas_that_fit_and_reports_the_rest():
    w = Workload.from_requests([Request(i, 0.1 * i, 100, 5) for i in range(8)])
    cfg = SimConfig(replicas=4, cluster=ClusterSettings(devices=3))
    r = simulate(w, cfg)
    p = r.meta["placement"]
    assert len(r.replicas) == 3 and set(r.records["replica"]) <= {0, 1, 2}
    assert [u["replica"] for u in p["unplaced"]] == ["replica3"] and p["unplaced"][0]["reason"] == "out_of_memory"
    # 70B needs tp=2 on 80 GB devices; three devices per host: one replica per host, and the two devices
    # left over are on different hosts (fragmented)
    cfg70 = SimConfig(replicas=3, profile="llama3-70b@h100-80gb", tp=2,
                      cluster=ClusterSettings(devices=6, devices_per_host=3))
    p70 = simulate(w, cfg70).meta["placement"]
    assert p70["placed"] == {"replica0": ["gpu0", "gpu1"], "replica1": ["gpu3", "gpu4"]}
    assert p70["unplaced"][0]["reason"] == "fragmented"
    small = SimConfig(replicas=2, cluster=ClusterSettings(devices=2, device_memory_gib=10))
    with pytest.raises(ValueError, match="no replica fits"):
        simulate(w, small)


def test_kv_samples_and_watermark_reclaim():
    reqs = [Request(i, 0.05 * i, 256, 20, block_hashes=(i, 10_000 + i), hash_block_size=128) for i in range(60)]
    w = Workload.from_requests(reqs)
    base = SimConfig(num_blocks=400, memory=MemorySettings(sample_interval=1e-9))
    plain = simulate(w, base, cost=LinearCost(), check=True)
    ts = plain.timeseries
    assert ts is not None and len(ts["time"]) > 10 and np.all(np.diff(ts["time"]) >= 0)
    assert ts["kv_evictable_blocks"].max() > 0.5 * 400  # finished prompts stay cached
    rc = SimConfig(num_blocks=400, memory=MemorySettings(sample_interval=1e-9, reclaim_high=0.5, reclaim_low=0.3))
    r = simulate(w, rc, cost=LinearCost(), check=True)
    ts = r.timeseries
    held = ts["kv_used_blocks"] + ts["kv_evictable_blocks"]
    assert np.all((held <= 0.5 * 400) | (ts["kv_evictable_blocks"] == 0))  # after every step
    assert sum(r.meta["memory"]["reclaimed_blocks"]) > 0
    assert np.array_equal(r.records["status"], plain.records["status"])


# ---- configuration --------------------------------------------------------------------------------

def full_config() -> SimConfig:
    return SimConfig(
        replicas=3, router="predicted_latency", scheduler=SchedulerConfig(queue="edf"),
        queue=QueueSettings(sjf_aging=5.0, edf_deadlines={"chat": 2.0}),
        result_cache=ResultCacheSettings(capacity=50, ttl=float("inf"), nodes=3, replication=2),
        faults=FaultSettings(crashes=("1@10+5", [2, 20.0]), mtbf=500.0, on_crash="fail",
                             cache_node_loss=("0@3",)),
        sessions=SessionSettings(mode="closed", think="exp:1.5"),
        memory=MemorySettings(sample_interval=0.5, reclaim_high=0.9),
        cluster=ClusterSettings(devices=4, device_memory_gib=80.0))


def test_config_round_trips_through_toml(tmp_path):
    cfg = full_config()
    assert cfg.faults.crashes == ("1@10.0+5.0", "2@20.0")
    p = tmp_path / "c.toml"
    p.write_text(to_toml(cfg))
    assert config_from_toml(p) == cfg


@pytest.mark.parametrize("data,msg", [
    ({"faults": {"crashes": ["x@1"]}}, "is not an event"),
    ({"faults": {"crashes": ["5@1"]}}, "replica index < replicas=1"),
    ({"faults": {"on_crash": "pray"}}, "faults.on_crash='pray' is out of range"),
    ({"faults": {"cache_node_loss": ["0@1"]}}, "result_cache.nodes=0"),
    ({"sessions": {"mode": "half"}}, "sessions.mode"),
    ({"sessions": {"think": "exp:-1"}}, "sessions.think"),
    ({"memory": {"reclaim_high": 0.5, "reclaim_low": 0.6}}, "memory.reclaim_low"),
    ({"result_cache": {"capacity": -1}}, "result_cache.capacity"),
    ({"result_cache": {"capcity": 1}}, "unknown key 'result_cache.capcity'"),
    ({"scheduler": {"queue": "lifo"}}, "edf | fcfs | priority | sjf"),
])
def test_bad_new_settings_are_named(data, msg):
    with pytest.raises(ConfigError, match=msg):
        config_from_dict(data)


def test_cli_flags_for_every_new_feature(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["simulate", "--trace", f"{DATA}/lmcache-taubench", "--sessions", "closed", "--think-time", "0.2",
            "--replicas", "3", "--router", "predicted_latency", "--queue", "sjf", "--sjf-aging", "50",
            "--result-cache-capacity", "100", "--result-cache-nodes", "3", "--result-cache-replication", "2",
            "--cache-node-loss", "1@2", "--crash", "0@1+3", "--crash", "2@5", "--mttr", "2",
            "--health-interval", "0.5", "--memory-sample", "0.5", "--reclaim-high", "0.95",
            "--devices", "3", "--edf-deadline", "chat=2", "--out", str(out), "--json", "--no-progress"]
    assert main(args) == 0
    s = json.loads(capsys.readouterr().out)
    c = s["config"]
    assert c["faults.crashes"] == ["0@1.0+3.0", "2@5.0"] and c["queue.edf_deadlines"] == {"chat": 2.0}
    assert s["meta"]["faults"]["crashes"] == [1, 0, 1]
    assert s["meta"]["result_cache"]["nodes"] == 3 and s["sessions"]["sessions"] > 0
    assert s["ok"] + s["rejected"] + s["timed_out"] + s["failed"] == s["requests"]
    assert (out / "timeseries.csv").read_text().startswith("time,replica,kv_used_blocks")
    rec = RunResult.read_csv(out / "records.csv")
    assert sorted(rec["id"].tolist()) == list(range(s["requests"]))
    assert "result_cache_hit" in rec
    assert main(["simulate", "--limit", "5", "--edf-deadline", "chat", "--no-progress"]) == 2
    assert "CLASS=SECONDS" in capsys.readouterr().err
