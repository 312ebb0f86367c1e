"""Invariants of the wired-in policies over generated workloads, crash schedules and cache configurations.

- every request ends exactly once with a terminal status, whatever crashes, caches and sessions do;
- a crashed replica receives no request while down, and no request completes across a crash of its replica;
- the result cache never holds more than its capacity and never answers with an expired entry;
- closed loop: step k+1 is sent no earlier than step k's finish plus its think time, and a failed step
  aborts the rest of its session;
- the same seed gives the same records with faults on; the decode-run jump gives the records of
  stepping one token at a time with crashes and KV reclaim on.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policies.result_cache import key_for_request
from sim.cluster import simulate
from sim.config import FaultSettings, HealthSettings, MemorySettings, ResultCacheSettings, SessionSettings
from traces.records import STATUSES
from tests.test_sim_cluster import LinearCost, configs, workloads

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TIE_BREAK = math.pi * 1e-5  # keeps generated crash times off the step grid of LinearCost (exact ties)


@st.composite
def agent_workloads(draw):
    """A generated workload with, optionally, result-cache keys (a few repeated prompts) and sessions."""
    w = draw(workloads())
    n = len(w)
    keys = None
    if draw(st.booleans()):
        keys = draw(st.lists(st.sampled_from([None, 1, 2, 3]), min_size=n, max_size=n))
    sid = step = think = None
    if draw(st.booleans()):
        owner = draw(st.lists(st.integers(0, 3), min_size=n, max_size=n))
        sid, step, seen = [], [], {}
        for o in owner:
            sid.append(f"s{o}")
            step.append(seen.get(o, 0))
            seen[o] = seen.get(o, 0) + 1
        step = np.array(step)
        think = np.array(draw(st.lists(st.floats(0.0, 0.3), min_size=n, max_size=n)))
        think[step == 0] = 0.0
    return dataclasses.replace(w, cache_key=keys, session_id=sid, step=step, think_time=think)


@st.composite
def fault_configs(draw, w):
    cfg = draw(configs())
    n = cfg.replicas
    crashes = tuple(f"{draw(st.integers(0, n - 1))}@{draw(st.floats(0.0, 3.0)) + TIE_BREAK!r}"
                    f"+{draw(st.floats(0.01, 2.0))!r}"
                    for _ in range(draw(st.integers(0, 3))))
    rc = ResultCacheSettings()
    loss: tuple[str, ...] = ()
    if draw(st.booleans()):
        nodes = draw(st.integers(0, 3))
        rc = ResultCacheSettings(capacity=draw(st.integers(1, 3)), ttl=draw(st.sampled_from([0.2, 1.0, math.inf])),
                                 latency=draw(st.sampled_from([0.0, 0.003])), nodes=nodes,
                                 replication=draw(st.integers(1, 2)), vnodes=8)
        if nodes and draw(st.booleans()):
            loss = (f"{draw(st.integers(0, nodes - 1))}@{draw(st.floats(0.0, 3.0))!r}",)
    faults = FaultSettings(crashes=crashes, mtbf=draw(st.sampled_from([None, None, 1.5])), mttr=0.3,
                           on_crash=draw(st.sampled_from(["retry", "fail"])), max_retries=draw(st.integers(0, 2)),
                           cache_node_loss=loss)
    closed = w.session_id is not None and draw(st.booleans())
    return dataclasses.replace(
        cfg, result_cache=rc, faults=faults, health=HealthSettings(interval=draw(st.sampled_from([0.0, 0.25]))),
        sessions=SessionSettings(mode="closed" if closed else "open"),
        memory=MemorySettings(reclaim_high=draw(st.sampled_from([None, 0.3])), reclaim_low=0.1))


@st.composite
def runs(draw):
    w = draw(agent_workloads())
    return w, draw(fault_configs(w))


def _down(intervals, r, t):
    # Open at the crash instant: a request sent at that very time, before the crash event, was sent to a
    # replica that was up (the front end asserts `up` on every submission, in event order).
    return any(a < t < (b if b is not None else math.inf) for a, b in intervals[r])


@SETTINGS
@given(runs())
def test_every_request_once_under_crashes_caches_and_sessions(run):
    w, cfg = run
    r = simulate(w, cfg, cost=LinearCost(per_ctx=1e-6), check=True)  # check: KV pool, cache capacity, expiry
    rec = r.records
    n = len(w)
    assert list(rec["id"]) == list(range(n))
    assert set(rec["status"]) <= set(STATUSES)
    assert sum(r.status_counts().values()) == n
    ok = rec["status"] == "ok"
    assert np.all(rec["generated_tokens"][ok] == rec["output_tokens"][ok])
    assert np.all(rec["first_token"][ok] >= rec["arrival"][ok] - 1e-12)
    assert np.all(rec["finish"][ok] >= rec["first_token"][ok])
    for s, why in zip(rec["status"], rec["reason"]):
        assert (s == "ok") == (why == "")
    hit = rec["result_cache_hit"] == 1
    assert np.all(rec["replica"][hit] == -1) and np.all(ok[hit])

    # crashed replicas receive nothing while down; nothing completes across a crash of its replica
    down = r.meta.get("faults", {}).get("down_intervals", [[] for _ in r.replicas])
    for t, k in r.meta["check"]["submissions"]:
        assert not _down(down, k, t), f"replica {k} got a request at {t} while down"
    for i in np.flatnonzero(ok & ~hit):
        k, a, f = rec["replica"][i], rec["admitted"][i], rec["finish"][i]
        assert not any(a < c < f for c, _ in down[k]), f"request {i} completed across a crash of replica {k}"

    # every hit was answered from a live entry: a completed miss with the same key, written before it
    # and less than ttl earlier (the cache's own expiry check runs in check mode)
    ttl = cfg.result_cache.ttl
    for t, expires in r.meta["check"]["cache_hits"]:
        assert t < expires
    keys = [key_for_request(w.request(j)) for j in range(n)]
    for i in np.flatnonzero(hit):
        writers = [j for j in range(n) if keys[j] == keys[i] and ok[j] and not hit[j]]
        assert any(rec["finish"][j] <= rec["arrival"][i] + 1e-9 < rec["finish"][j] + ttl for j in writers)

    # closed loop: step k+1 goes out after step k finished plus its think time, or is aborted with it
    if cfg.sessions.mode == "closed":
        by: dict[str, list[int]] = {}
        for i, s in enumerate(w.session_id):
            by.setdefault(s, []).append(i)
        for rows in by.values():
            rows.sort(key=lambda i: w.step[i])
            for a, b in zip(rows, rows[1:]):
                if ok[a]:
                    assert rec["arrival"][b] >= rec["finish"][a] + w.think_time[b] - 1e-9
                else:
                    assert rec["status"][b] == "failed"
                    assert rec["reason"][b].startswith("session aborted after step")


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(runs())
def test_same_seed_same_records_with_faults(run):
    w, cfg = run
    cost = LinearCost(per_ctx=1e-6)
    a, b = simulate(w, cfg, cost=cost), simulate(w, cfg, cost=cost)
    for name in a.records:
        assert np.array_equal(a.records[name], b.records[name], equal_nan=a.records[name].dtype.kind == "f"), name
    assert a.meta.get("faults") == b.meta.get("faults")


@SETTINGS
@given(runs())
def test_jump_gives_the_records_of_single_steps_with_crashes_and_reclaim(run):
    w, cfg = run
    cost = LinearCost(per_ctx=1e-6)
    a = simulate(w, cfg, cost=cost)
    b = simulate(w, dataclasses.replace(cfg, jump=False), cost=cost)
    for name in ("status", "replica", "generated_tokens", "cached_tokens", "preemptions", "result_cache_hit"):
        assert list(a.records[name]) == list(b.records[name]), name
    for name in ("arrival", "admitted", "first_token", "finish"):
        np.testing.assert_allclose(a.records[name], b.records[name], rtol=1e-9, atol=1e-12, equal_nan=True)
