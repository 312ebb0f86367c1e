"""The SimPy model: N replicas behind a router, replaying a workload open loop.

Each replica is one SimPy process looping

    plan = scheduler.schedule(now)
    duration = cost_model(plan)        # instead of torch
    scheduler.update(plan, start, end)

with one refinement for speed: when the scheduler says the next k steps are
decode-only steps of a fixed shape (`horizon`), the replica predicts all k
durations at once and sleeps to the end of the run in one event. An arrival
(or a queue deadline) during that sleep cuts the run short at the end of the
step in progress, which is exactly when a step-by-step replica would have
looked at its queue again. `jump=False` turns this off; tests check both give
the same records.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import simpy

from policies.routers import create_router
from policies.scheduler import ContinuousBatchingScheduler, create_scheduler
from policies.sequence import SeqStatus, Sequence
from sim.config import SimConfig
from sim.cost import CostModel, load_cost_model, plan_features
from traces.records import ItlLog, RecordTable, ReplicaStats, RunResult
from traces.workload import Workload


class Replica:
    """One model replica: a scheduler, a cost model and a SimPy process."""

    def __init__(self, env: simpy.Environment, idx: int, sched: ContinuousBatchingScheduler, cost: CostModel,
                 records: RecordTable, jump: bool):
        self.env, self.idx, self.sched, self.cost = env, idx, sched, cost
        self.records, self.jump = records, jump
        self.kv = sched.kv
        self.healthy = True
        self.stats = ReplicaStats(kv_blocks=sched.kv.num_blocks)
        self._wake = env.event()
        self._token = 0  # invalidates timers armed before the last wake-up
        self._asleep = False
        self._jumping = False  # sleeping through a decode run; an arrival interrupts it
        self._interrupted = False
        self.clock = 0.0  # end of the last step, exactly as the step arithmetic gave it
        self.proc = env.process(self._loop())

    # Router view
    @property
    def num_outstanding(self) -> int:
        return self.sched.num_outstanding

    def pending_tokens(self) -> int:
        return self.sched.pending_tokens()

    def submit(self, seq: Sequence) -> None:
        seq.replica = self.idx
        self.sched.add(seq, self.env.now)
        if self._asleep:
            if not self._wake.triggered:
                self._wake.succeed()
        elif self._jumping and not self._interrupted:
            # Cheaper than arming a wake-up event for every run: only arrivals pay.
            self._interrupted = True
            self.proc.interrupt()

    def _arm(self, at: float) -> None:
        tok = self._token
        t = self.env.timeout(max(at - self.env.now, 0.0))
        t.callbacks.append(lambda _e: self._fire(tok))

    def _fire(self, tok: int) -> None:
        if tok == self._token and not self._wake.triggered:
            self._wake.succeed()

    def _sleep(self):
        self._asleep = True
        yield self._wake
        self._asleep = False
        self._token += 1
        self._wake = self.env.event()

    def _collect(self) -> None:
        done = self.sched.done
        if done:
            put = self.records.put
            for s in done:
                put(s)
            done.clear()

    def _loop(self):
        env, sched, cost, st = self.env, self.sched, self.cost, self.stats
        while True:
            now = self.clock  # == env.now up to rounding; the step arithmetic is the reference
            plan = sched.schedule(now)
            self._collect()
            if plan.empty:
                wake_at = sched.next_wakeup()
                if wake_at is not None:
                    self._arm(wake_at)
                yield from self._sleep()
                self.clock = env.now
                continue
            f = plan_features(plan)
            k = sched.horizon(plan) if self.jump else 1
            if k == 1:
                d = cost.step_time(f)
                yield env.timeout(d)
                end = now + d
                sched.update(plan, now, end)
                st.busy_time += d
                st.steps += 1
                st.tokens += f.prefill_tokens + f.decode_seqs
            else:
                run = cost.decode_run(f)
                m = k
                deadline = sched.next_wakeup()
                if deadline is not None and deadline < now + run.elapsed(k):
                    m = run.step_at(deadline - now, k) + 1
                end = now + run.elapsed(m)
                self._jumping = True
                try:
                    yield env.timeout(end - env.now)
                except simpy.Interrupt:  # an arrival: finish the step in progress, then look again
                    woke = env.now
                    self._interrupted = False
                    if woke < end:
                        m = run.step_at(woke - now, m) + 1
                        end = now + run.elapsed(m)
                    if end > woke:
                        self._jumping = False
                        yield env.timeout(end - woke)
                self._jumping = False
                sched.advance(plan, m, now, now + run.elapsed(1), end, run)
                st.busy_time += end - now
                st.steps += m
                st.tokens += m * f.decode_seqs
            self.clock = end
            self._collect()


@dataclass
class Cluster:
    env: simpy.Environment
    replicas: list[Replica]
    records: RecordTable
    cfg: SimConfig
    meta: dict = field(default_factory=dict)


def build_cluster(workload: Workload, cfg: SimConfig, cost: CostModel | None = None) -> Cluster:
    """Wire every object of a run in one visible place."""
    env = simpy.Environment()
    cost = cost if cost is not None else load_cost_model(cfg.profile, cfg.tp, cfg.gpu_memory_utilization)
    num_blocks = cfg.num_blocks or cost.kv_capacity_tokens // cfg.scheduler.block_size
    records = RecordTable(len(workload))
    replicas = [Replica(env, i, create_scheduler(cfg.scheduler, num_blocks), cost, records, cfg.jump)
                for i in range(cfg.replicas)]
    return Cluster(env, replicas, records, cfg, meta={"cost_model": getattr(cost, "name", type(cost).__name__),
                                                      "kv_blocks_per_replica": num_blocks})


def _arrivals(cluster: Cluster, workload: Workload, router, progress: Callable[[int], None] | None):
    env, replicas, records = cluster.env, cluster.replicas, cluster.records
    arrival = workload.arrival.tolist()
    n = len(arrival)
    tick = max(n // 200, 1)
    for i in range(n):
        t = arrival[i]
        if t > env.now:
            yield env.timeout(t - env.now)
        req = workload.request(i)
        seq = Sequence(req)
        r = router.route(req, replicas, env.now)
        if r is None:
            seq.status, seq.outcome, seq.t_finish = SeqStatus.FINISHED, "rejected", env.now
            seq.reason = "no healthy replica"
            records.put(seq)
        else:
            replicas[r].submit(seq)
        if progress is not None and i % tick == 0:
            progress(i)


def _checked(sched: ContinuousBatchingScheduler) -> None:
    """Wrap a scheduler so that every step verifies the KV pool (tests; slow)."""
    def verify():
        kv = sched.kv
        kv.check()
        held = sum(len(s.block_table) for s in sched.running)
        assert kv.num_used <= kv.num_blocks
        assert kv.num_used <= held, "a block is used that no running sequence holds"
        for s in sched.waiting:
            assert not s.block_table, "a waiting sequence holds KV blocks"

    upd, adv = sched.update, sched.advance

    def update(*a, **k):
        upd(*a, **k)
        verify()

    def advance(*a, **k):
        adv(*a, **k)
        verify()

    sched.update, sched.advance = update, advance


def simulate(workload: Workload, cfg: SimConfig, cost: CostModel | None = None,
             progress: Callable[[int], None] | None = None, check: bool = False) -> RunResult:
    """Replay `workload` through a simulated cluster; every request ends with one record.
    `check=True` verifies the KV pool's invariants after every step (for tests)."""
    t0 = time.perf_counter()
    cluster = build_cluster(workload, cfg, cost)
    if check:
        for rep in cluster.replicas:
            _checked(rep.sched)
    router = create_router(cfg.router, seed=cfg.seed)
    cluster.env.process(_arrivals(cluster, workload, router, progress))
    cluster.env.run()
    end = cluster.env.now
    for rep in cluster.replicas:  # nothing should be left; if it is, say so rather than lose it
        rep.sched.abort_all(end, "simulation ended before the request finished")
        rep._collect()
    if check:
        for rep in cluster.replicas:
            kv = rep.sched.kv
            kv.check()
            assert kv.num_free == kv.num_blocks, "KV blocks still held at the end of the run"
    missing = cluster.records.missing()
    if len(missing):
        raise RuntimeError(f"{len(missing)} requests have no record (first: {missing[:5].tolist()})")
    for rep in cluster.replicas:
        s, kv = rep.sched, rep.sched.kv
        rep.stats.preemptions = s.num_preemptions
        rep.stats.prefix_queries, rep.stats.prefix_hits, rep.stats.evictions = kv.queries, kv.hits, kv.evictions
    rec = cluster.records.cols
    finish = rec["finish"]
    last = float(np.nanmax(finish)) if len(finish) else 0.0
    start = float(workload.arrival[0]) if len(workload) else 0.0
    meta = dict(cluster.meta, source="sim", workload=workload.name, requests=len(workload),
                wall_s=time.perf_counter() - t0, seed=cfg.seed)
    itl = ItlLog()
    for rep in cluster.replicas:
        itl.extend(rep.sched.itl)
    return RunResult(records=rec, itl=itl, start=start, end=max(last, start),
                     replicas=[r.stats for r in cluster.replicas], meta=meta)
