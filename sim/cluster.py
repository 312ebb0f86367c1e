"""The SimPy model: N replicas behind a router, replaying a workload open loop.

Each replica is one SimPy process looping

    plan = scheduler.schedule(now)
    duration = cost_model(plan)        # instead of torch
    scheduler.update(plan, start, end)

with two refinements for speed (`jump=True`, the default; `jump=False` turns
both off, and tests check that both modes give the same records):

- Decode runs: when the scheduler says the next k steps are decode-only steps
  of a fixed shape (`horizon`), the replica predicts all k durations in closed
  form and waits to the end of the run in one event. An arrival (or a queue
  deadline) during that wait cuts the run short at the end of the step in
  progress, which is exactly when a step-by-step replica would have looked at
  its queue again; a router reading the replica meanwhile sees the steps
  completed so far (`pending_tokens`).
- The direct driver (`run_direct`): in an open-loop replay with nothing
  between the front end and the replicas (no result cache, sessions, faults
  or other processes), nothing can look at or change a replica before the
  front end's next arrival. Then no event queue is needed: before each
  arrival every replica applies the steps that end before it, and the request
  is routed at its arrival time. Otherwise each replica is a SimPy process.
  Both drivers plan and apply steps with the same code (`Replica._step`).

Around the replicas (sim/frontend.py): a result cache, the router, retries
after crashes, closed-loop sessions; sim/faults.py injects crashes and cache
node losses; sim/devices.py places replicas on GPUs. A replica can also
sample its KV pool over time and reclaim cached blocks above a watermark.
Each of these is off unless configured, and costs nothing per step then.
"""

from __future__ import annotations

import math
import time
from array import array
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import simpy

from policies.queues import create_queue
from policies.reclaim import WatermarkReclaimer
from policies.routers import create_router
from policies.scheduler import ContinuousBatchingScheduler, create_scheduler
from policies.sequence import SeqStatus, Sequence
from sim.config import SimConfig
from sim.cost import CostModel, StepFeatures, grouping_features, load_cost_model, plan_features
from sim.frontend import Frontend
from traces.records import ItlLog, RecordTable, ReplicaStats, RunResult
from traces.workload import Workload


_NS = 8  # values per sample in Replica.samples


class Replica:
    """One model replica: a scheduler, a cost model, and a SimPy process (or `catch_up` calls from
    run_direct)."""

    def __init__(self, env: simpy.Environment | DirectClock, idx: int, sched: ContinuousBatchingScheduler,
                 cost: CostModel, records: RecordTable, jump: bool, new_queue: Callable[[], Any] | None = None,
                 direct: bool = False):
        self.env, self.idx, self.sched, self.cost = env, idx, sched, cost
        self.records, self.jump = records, jump
        self.kv = sched.kv
        # A fitted model that prices the executor's decode attention grouping: fill those features in per
        # step, and cut decode runs where they change (sim.cost.grouping_features).
        self._grouping = bool(getattr(cost, "uses_grouping", False))
        self.sink: Callable[[Sequence], None] = records.put  # where terminal sequences go
        self.new_queue = new_queue or (lambda: create_queue(sched.cfg.queue))
        self.healthy = True  # as the router sees it
        self.up = True  # as it is
        self.down_until = 0.0
        self.crashes = 0
        self.downtime = 0.0
        self.down_log: list[list[float]] = []  # [went down, came back up (inf while down)]
        self.on_crash: Callable[[int, list[Sequence], float], None] | None = None
        self.on_recover: Callable[[Replica], None] | None = None
        self._up: simpy.Event | None = None
        # memory: optional watermark reclaim of cached KV blocks, and samples of the pool over time
        self.reclaimer: WatermarkReclaimer | None = None
        self.reclaimed = 0
        self.sample_every = 0.0
        self._next_sample = 0.0
        self.samples = array("d")  # t, used, evictable, cached, evictions, reclaimed, running, waiting
        self.stats = ReplicaStats(kv_blocks=sched.kv.num_blocks)
        self.direct = direct  # driven by run_direct (no SimPy process) rather than by _loop
        self._wake = env.event() if not direct else None
        self._token = 0  # invalidates timers armed before the last wake-up
        self._asleep = False
        self._in_run = False  # waiting out a decode run (an arrival cuts it: _cut_run)
        self._run_state: tuple | None = None  # (start, DecodeRun, steps, batch) of the run being waited out
        self._cut: tuple[int, float] | None = None  # (steps, end) of that run once an arrival cut it short
        self._idle = False  # asleep because there was nothing to schedule (not inside a decode run)
        self.clock = 0.0  # end of the last step, exactly as the step arithmetic gave it
        # A cost model's serving-loop terms (sim.calibrate.FittedCost): the first step after the replica has
        # been idle for wake[0] s or longer takes wake[1] x its forward time (wake[2] x, if given, when a co-located
        # neighbour has a step in progress as it starts), and every step with prefill tokens
        # prefill_factor x (both, when both hold). _last_end: when its last step ended.
        self._wake_term: tuple[float, ...] | None = getattr(cost, "wake", None)
        self._prefill_factor = float(getattr(cost, "prefill_factor", 1.0))
        self._loop_terms = self._wake_term is not None or self._prefill_factor != 1.0  # (one test per step)
        self._last_end = 0.0
        self.current: StepFeatures | None = None  # the step (or decode run) in progress, None when idle
        # A co-located cost model read continuously (sim.contention, continuous=True): the step in progress
        # is [time of the last re-timing, work left in alone-seconds, factor since then], and every change of
        # this replica's `current` re-times its neighbours' steps (_notify, _retime).
        self._cont = bool(getattr(cost, "continuous", False)) and hasattr(cost, "colocated")
        self._prog: list[float] | None = None
        # The step in progress as _step planned it: (plan, features, start, DecodeRun or None, steps, end);
        # t_next: when this replica next acts by itself (that step's end, a queue deadline, inf: never).
        self._pend: tuple | None = None
        self.t_next = math.inf
        self._jit: Callable[[bool], float] | None = None  # step-time jitter (sim.jitter), set by build_cluster
        self.num_outstanding = len(sched.waiting) + len(sched.running)
        self.proc = env.process(self._loop()) if not direct else None

    # Router view. num_outstanding (sequences waiting or running here) is a plain attribute, kept equal to
    # the scheduler's by _refresh wherever they change (submit, _step, _down, the end of a run): routers read
    # every replica on every arrival, and a property costs a call each time.
    def _refresh(self) -> None:
        s = self.sched
        self.num_outstanding = len(s.waiting) + len(s.running)

    @property
    def num_running(self) -> int:
        return len(self.sched.running)

    def pending_tokens(self) -> int:
        """As a replica stepping one step at a time would report it: inside a decode run, the steps that
        have completed by now count although the run is applied at its end."""
        p = self.sched.pending_tokens()
        rs = self._run_state
        if rs is not None:
            start, run, m, nd = rs
            t = self.env.now - start
            if t > 0:
                p -= run.step_at(t, m) * nd
        return p

    @property
    def idle(self) -> bool:
        """Nothing to do until something arrives (a queue deadline may still be armed)."""
        return self._idle

    def submit(self, seq: Sequence) -> None:
        seq.replica = self.idx
        now = self.env.now
        s = self.sched
        s.add(seq, now)
        self.num_outstanding = len(s.waiting) + len(s.running)
        if self.direct:
            p = self._pend
            if p is None:  # idle: it wakes now, once every arrival of this instant is in (see catch_up)
                if self.t_next > now:
                    self.t_next = now
            elif p[3] is not None and p[4] > 1:  # a decode run: cut it at the end of the step in progress
                plan, f, start, run, m, _ = p
                cut = _cut_point(start, run, m, now)
                if cut is not None:
                    j, end = cut
                    self._pend = (plan, f, start, run, j, end)
                    self.t_next = end
                    self._run_state = (start, run, j, f.decode_seqs)
        elif self._in_run:  # waiting out a decode run: cut it at the end of the step in progress
            self._cut_run()
        elif self._asleep and not self._wake.triggered:
            self._wake.succeed()

    def _cut_run(self) -> None:
        """New work arrived while the process waits out a decode run: it must stop after the step in
        progress. Rather than wake the process now only to make it wait again, move its wait to the end of
        that step (what simpy's own Interruption does to a waiting process, without the exception)."""
        self._in_run = False
        env, proc = self.env, self.proc
        start, run, m, _ = self._run_state
        now = env.now
        cut = _cut_point(start, run, m, now)
        if cut is None:
            return  # the run ends with the step in progress anyway
        end = cut[1]
        self._cut = cut
        target = proc._target
        target.callbacks.remove(proc._resume)
        t = env.timeout(max(end - now, 0.0))
        t.callbacks.append(proc._resume)
        proc._target = t

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
            put = self.sink
            for s in done:
                put(s)
            done.clear()

    # ---- one step: apply the one that ended, plan the next (shared by both drivers) ------------------
    def _step(self) -> bool:
        """Apply the step (or the m steps of the decode run) in progress, if any: it has ended. Then plan
        the next one, from its end (else from `clock`). False when there is nothing to do (then `t_next`
        is the scheduler's next wake-up, inf if none). One function for both halves: it runs once per
        simulated step, and a Python call costs as much as some of what it does."""
        sched = self.sched
        p = self._pend
        if p is not None:
            plan, f, start, run, m, now = p
            st = self.stats
            if run is None:
                sched.update(plan, start, now)
                st.steps += 1
                st.tokens += f.prefill_tokens + f.decode_seqs
            else:
                sched.advance(plan, m, start, start + run.first if m > 1 else now, now, run)
                st.steps += m
                st.tokens += m * f.decode_seqs
            st.busy_time += now - start
            self._last_end = now
            self._run_state = None
            self._prog = None
            self.clock = now
            if self.reclaimer is not None or self.sample_every:
                if sched.done:
                    self._collect()
                self._after_step(now)
        else:
            now = self.clock
        # plan the next
        plan = sched.schedule(now)
        if sched.done:
            self._collect()
        if not plan.decode and not plan.prefill:
            self._pend = self.current = None
            wake = sched.next_wakeup()
            self.t_next = wake if wake is not None else math.inf
            self._idle = True
            self.num_outstanding = len(sched.waiting) + len(sched.running)  # (_refresh)
            if self._cont:
                self._notify(now)
            return False
        self._idle = False
        f = plan_features(plan)
        self.current = f
        k = sched.horizon(plan) if self.jump and sched._jumpable else 1  # (horizon is 1 when not _jumpable)
        if k > 1 and self.reclaimer is not None:
            k = self._reclaim_horizon(plan, k)
        if self._grouping:
            k = min(k, grouping_features(f, plan, sched.cfg.block_size))
        if k == 1:
            run = None
            m = 1
            if self._cont:
                w, fac = self.cost.alone_time(f), self.cost.factor_now(f)
                if self._loop_terms:
                    w = self._with_loop_terms(w, f, p is None, now)
                if self._jit is not None:
                    w *= self._jit(f.prefill_tokens > 0)
                self._prog = [now, w, fac]
                end = now + w * fac
            else:
                t = self.cost.step_time(f)
                if self._loop_terms:
                    t = self._with_loop_terms(t, f, p is None, now)
                if self._jit is not None:
                    t *= self._jit(f.prefill_tokens > 0)
                end = now + t
        else:
            run = self.cost.decode_run(f)
            m = k
            end = now + run.elapsed(k)
            deadline = sched.next_wakeup() if sched.may_wake else None
            if deadline is not None and deadline < end:  # a queue deadline: look at the queue again then
                m = run.step_at(deadline - now, k) + 1
                end = now + run.elapsed(m)
        self._pend = (plan, f, now, run, m, end)
        self.t_next = end
        if run is not None and self.direct:  # (the SimPy driver sets it while it waits the run out)
            self._run_state = (now, run, m, f.decode_seqs)
        self.num_outstanding = len(sched.waiting) + len(sched.running)  # (_refresh)
        if self._cont:
            self._notify(now)
        return True

    def _with_loop_terms(self, t: float, f: StepFeatures, after_idle: bool, now: float) -> float:
        """Step time `t` with the cost model's serving-loop terms: the forward part (t without the loop's
        overhead) times prefill_factor for a step with prefill tokens, and times the wake factor for the first
        step after wake[0] s idle or more (`after_idle`: nothing was in progress before this one)."""
        loop = self._prefill_factor if f.prefill_tokens else 1.0
        wake = self._wake_term
        if after_idle and wake is not None and now - self._last_end >= wake[0]:
            nb = getattr(self.cost, "neighbours", None)  # (co-located replicas: who has a step in progress now)
            loop *= wake[2] if len(wake) > 2 and nb is not None and any(n is not None for n in nb()) else wake[1]
        if loop == 1.0:
            return t
        oh = self.cost.step_overhead_s
        return (t - oh) * loop + oh

    # ---- co-located replicas read continuously (sim.contention, continuous=True) ---------------------
    def _notify(self, now: float) -> None:
        """This replica's `current` just changed: re-time the steps its neighbours have in progress."""
        for r in self.cost.colocated():
            if r._prog is not None and r._pend is not None and r.up:
                r._retime(now)

    def _retime(self, now: float) -> None:
        """A neighbour changed: the work this step has left goes on at the factor of what they run now.
        The process's wait moves to the new end, as in _cut_run."""
        env, proc = self.env, self.proc
        target = proc._target
        if target is None or target.callbacks is None or proc._resume not in target.callbacks:
            return  # not waiting on its step (it is the one running now): nothing to move
        t0, w, fac = self._prog
        w = max(w - (now - t0) / fac, 0.0)
        new = self.cost.factor_now(self.current)
        self._prog = [now, w, new]
        if new == fac:
            return
        plan, f, start, run, m, _ = self._pend
        end = now + w * new
        self._pend = (plan, f, start, run, m, end)
        self.t_next = end
        target.callbacks.remove(proc._resume)
        t = env.timeout(max(end - env.now, 0.0))
        t.callbacks.append(proc._resume)
        proc._target = t

    # ---- the SimPy driver -------------------------------------------------------------------------
    def _loop(self):
        env = self.env
        while True:
            try:
                if not self._step():
                    if self.t_next < math.inf:
                        self._arm(self.t_next)
                    yield from self._sleep()
                    self._idle = False
                    self.clock = env.now
                    continue
                p = self._pend
                if p[3] is None:  # one step
                    yield env.timeout(p[5] - env.now)
                else:
                    plan, f, start, run, m, end = p
                    self._in_run = True  # submit() may cut the run short (see _cut_run)
                    self._run_state = (start, run, m, f.decode_seqs)
                    try:
                        yield env.timeout(end - env.now)
                    finally:  # (also on a crash: then the cut, if any, tells which steps were under way)
                        self._in_run = False
                        self._run_state = None
                        if self._cut is not None:
                            m, end = self._cut
                            self._cut = None
                            self._pend = (plan, f, start, run, m, end)
            except simpy.Interrupt:  # a crash (sim/faults.py): only ever raised at a yield above
                p = self._pend
                if p is not None:
                    self._lose_step(p[0], p[1], p[2], p[3], p[4])
                self._pend = None
                self.current = None
                self._prog = None
                if self._cont:
                    self._notify(env.now)
                yield from self._down()

    # ---- the direct driver (run_direct): no SimPy events at all -----------------------------------
    def catch_up(self, t: float) -> None:
        """Apply every step that ends before `t`, planning the next after each (direct driver)."""
        while self.t_next < t:
            if self._pend is None:  # woken by an arrival or a queue deadline
                self.clock = self.t_next
            self._step()

    # ---- crashes --------------------------------------------------------------------------------
    def crash(self, down: float) -> None:
        """Go down now for `down` seconds: in-flight work and the KV cache are lost (see _down)."""
        env = self.env
        until = env.now + down
        env.timeout(down).callbacks.append(self._maybe_recover)
        if not self.up:  # already down: the later recovery time wins
            self.down_until = max(self.down_until, until)
            return
        self.up = self.healthy = False
        self.down_until = until
        self.crashes += 1
        self.down_log.append([env.now, math.inf])
        self._up = env.event()
        self.proc.interrupt("crash")

    def _maybe_recover(self, _e: Any) -> None:
        if not self.up and self.env.now >= self.down_until:
            self.up = True
            self.down_log[-1][1] = self.env.now
            self._up.succeed()
            if self.on_recover is not None:
                self.on_recover(self)

    def _lose_step(self, plan, f: StepFeatures, start: float, run, m: int) -> None:
        """The crash hit a step (or a run of decode steps) in progress: steps of the run that completed
        before it are applied, exactly as a step-by-step replica would have; the step in progress is lost."""
        t = self.env.now
        st = self.stats
        if run is not None:
            j = run.step_at(t - start, m)  # the step in progress; j steps have completed
            if j >= 1:
                self.sched.advance(plan, j, start, start + run.elapsed(1), start + run.elapsed(j), run)
                st.steps += j
                st.tokens += j * f.decode_seqs
        st.busy_time += t - start

    def _down(self):
        env, sched, kv = self.env, self.sched, self.kv
        t = env.now
        self._asleep = self._idle = False
        self._token += 1
        self._wake = env.event()
        self._collect()  # what finished before the crash is recorded as such
        lost = sched.evacuate()
        self._refresh()
        for s in lost:
            s.status = SeqStatus.FINISHED  # this attempt is over (its queue-timeout entry is dropped)
        kv.evictions -= kv.evict_cached(kv.num_blocks)  # GPU memory is gone: an empty prefix cache, not evictions
        if self.on_crash is not None:
            self.on_crash(self.idx, lost, t)
        else:  # no front end to retry: fail them here
            for s in lost:
                s.outcome, s.reason, s.t_finish = "failed", f"replica {self.idx} crashed", t
                self.sink(s)
        yield self._up
        self.downtime += env.now - t
        self.clock = env.now

    # ---- memory ---------------------------------------------------------------------------------
    def _after_step(self, t: float) -> None:
        kv = self.kv
        rc = self.reclaimer
        if rc is not None:
            ev = _num_evictable(kv)
            if ev:
                n = rc.plan((kv.num_used + ev) / kv.num_blocks, ev, kv.num_blocks)
                if n:
                    self.reclaimed += kv.evict_cached(n)
        every = self.sample_every
        if every and t >= self._next_sample:
            self.samples.extend((t, kv.num_used, _num_evictable(kv), kv.num_cached, kv.evictions, self.reclaimed,
                                 len(self.sched.running), len(self.sched.waiting)))
            self._next_sample = (math.floor(t / every) + 1) * every

    def _reclaim_horizon(self, plan, k: int) -> int:
        """Cut a decode run so that no step before its last would cross the reclaim watermark: a stepping
        replica would reclaim after that step, the jump only at the end of the run."""
        kv = self.kv
        ev = _num_evictable(kv)
        if not ev:  # nothing is or becomes evictable during a decode run: reclaim cannot act
            return k
        nb = kv.num_blocks
        top = math.floor((self.reclaimer.high + 1e-9) * nb)  # most used blocks (cached included) with no reclaim
        while top / nb > self.reclaimer.high + 1e-9:
            top -= 1
        margin = top - (kv.num_used + ev)
        # Each decoding sequence takes at most ceil(i / block_size) new blocks in i steps.
        safe = (margin // len(plan.decode)) * kv.block_size + 1 if margin >= 0 else 1
        return max(1, min(k, safe))


def _cut_point(start: float, run, m: int, now: float) -> tuple[int, float] | None:
    """Where new work arriving at `now` cuts a decode run of m steps that began at `start`: (steps done,
    end) at the end of the step in progress, which is when a stepping replica looks at its queue again;
    None if that is the run's last step anyway."""
    j, e = run.step_end(now - start, m)
    j += 1
    return (j, start + e) if j < m else None


def _num_evictable(kv) -> int:
    """Cached blocks that no sequence holds (BlockManager keeps them in `_evictable`)."""
    return kv.num_evictable


@dataclass
class Cluster:
    env: simpy.Environment | DirectClock
    replicas: list[Replica]
    records: RecordTable
    cfg: SimConfig
    frontend: Frontend
    meta: dict = field(default_factory=dict)
    gpu_tasks: Any = None  # sim.gpu_tasks.GpuTaskStream when gpu_tasks.rate > 0


def router_options(name: str, cost: CostModel) -> dict[str, float]:
    """Constructor arguments a router takes from the cost model (predicted_latency: its coefficients)."""
    if name != "predicted_latency":
        return {}
    ctx = 1024  # a typical decode context
    prefill = cost.step_time(StepFeatures(2048, 0, 2048 * 2049 / 2, 0, 1)) / 2048
    d_one = cost.step_time(StepFeatures(0, 1, 0.0, ctx, 1))
    d_many = cost.step_time(StepFeatures(0, 65, 0.0, 65 * ctx, 65))
    return {"c_tok": prefill, "d0": d_one, "d1": max(d_many - d_one, 0.0) / 64}


def build_cluster(workload: Workload, cfg: SimConfig, cost: CostModel | None = None, check: bool = False,
                  direct: bool | None = None, jitter: Any = None) -> Cluster:
    """Wire every object of a run in one visible place. direct: drive it with run_direct (None: whenever
    the configuration allows it; False: always SimPy). jitter (sim.jitter.StepJitter): every step's time
    times a random factor from its kind's table, a stream per replica seeded by cfg.seed (decode-run
    jumps off: each step draws its own)."""
    cost = cost if cost is not None else load_cost_model(cfg.profile, cfg.tp, cfg.gpu_memory_utilization)
    num_blocks = cfg.num_blocks or cost.kv_capacity_tokens // cfg.scheduler.block_size
    meta: dict[str, Any] = {"cost_model": getattr(cost, "name", type(cost).__name__),
                            "kv_blocks_per_replica": num_blocks}
    n_replicas = cfg.replicas
    if cfg.cluster.devices:
        from sim.devices import place

        placed, meta["placement"] = place(cfg, cost, num_blocks)
        if not placed:
            why = "; ".join(f"{u['replica']}: {u['reason']} ({u['detail']})" for u in meta["placement"]["unplaced"])
            raise ValueError(f"no replica fits on cluster.devices={cfg.cluster.devices}: {why}")
        n_replicas = len(placed)  # identical replicas: the first len(placed) of them, renumbered 0..
    records = RecordTable(len(workload))
    queue_opts = cfg.queue.options(cfg.scheduler.queue)
    new_queue = (lambda: create_queue(cfg.scheduler.queue, **queue_opts)) if queue_opts else None
    replicas: list[Replica] = []
    # A cost model whose step times depend on what co-located replicas run (`for_replica(i, replicas)`
    # gives replica i its own view of the others' `current` steps) may also forbid decode-run jumps.
    bind = getattr(cost, "for_replica", None)
    jump = cfg.jump and getattr(cost, "jump_ok", True) and jitter is None
    # The direct driver (run_direct) needs every outside event that can touch a replica to be a known
    # arrival: open loop, nothing between the front end and the replicas, no faults, no other processes,
    # step times of its own (a cost model can opt out with `direct_ok = False`); otherwise SimPy drives.
    can_direct = (jump and not Frontend.sink_needed(cfg) and bind is None and not cfg.faults.cache_node_loss
                  and not (cfg.gpu_tasks.enabled and len(workload)) and getattr(cost, "direct_ok", True))
    if direct is None:
        direct = can_direct
    elif direct and not can_direct:
        raise ValueError("direct=True needs jump mode, no result cache, sessions, faults or GPU tasks, and a cost "
                         "model without per-replica views")
    env = DirectClock() if direct else simpy.Environment()
    for i in range(n_replicas):
        sched = create_scheduler(cfg.scheduler, num_blocks)
        if new_queue is not None:
            sched.waiting = new_queue()
        replicas.append(Replica(env, i, sched, cost if bind is None else bind(i, replicas), records, jump,
                                new_queue, direct=direct))
        if jitter is not None:
            replicas[-1]._jit = jitter.sampler(cfg.seed, i)
    if jitter is not None:
        meta["step_jitter"] = jitter.summary()
    router = create_router(cfg.router, seed=cfg.seed, **router_options(cfg.router, cost))
    fe = Frontend(env, replicas, records, router, workload, cfg, check=check)
    mem = cfg.memory
    for rep in replicas:
        if fe.needs_sink:
            rep.sink = fe.done
        rep.on_crash, rep.on_recover = fe.crashed, fe.recovered
        if mem.reclaim_high is not None:
            rep.reclaimer = WatermarkReclaimer(high=mem.reclaim_high, low=mem.reclaim_low)
        rep.sample_every = mem.sample_interval
    if cfg.faults.replica_faults or cfg.faults.cache_node_loss:
        from sim.faults import start_faults

        start_faults(env, replicas, fe, cfg.faults, cfg.seed)
    gpu = None
    if cfg.gpu_tasks.enabled and len(workload):
        from sim.gpu_tasks import start_gpu_tasks

        gpu = start_gpu_tasks(env, cfg.gpu_tasks, cfg.seed, float(workload.arrival[0]), float(workload.arrival[-1]))
    return Cluster(env, replicas, records, cfg, fe, meta=meta, gpu_tasks=gpu)


class DirectClock:
    """The clock of a run without SimPy (run_direct): the replicas and the front end read `now`."""

    __slots__ = ("now",)

    def __init__(self) -> None:
        self.now = 0.0


def drive(cluster: Cluster) -> None:
    """Replay the workload's arrivals through the cluster to the end, with its driver."""
    if isinstance(cluster.env, DirectClock):
        run_direct(cluster)
    else:
        cluster.env.process(cluster.frontend.arrivals())
        cluster.env.run()


def run_direct(cluster: Cluster) -> None:
    """Replay the arrivals in order without an event queue: before each arrival, every replica applies
    the steps that end before it (nothing else can touch a replica in between), then the front end
    routes the request at its arrival time. Gives the records the SimPy driver gives (tests check it);
    build_cluster decides when it applies."""
    fe, reps, clock = cluster.frontend, cluster.replicas, cluster.env
    w = fe.workload
    request, progress = w.request, fe.progress
    send = fe.send if fe.cache is not None else fe.dispatch  # (what send does without a result cache)
    tick = max(len(w) // 200, 1)
    for i, t in enumerate(w.arrival.tolist()):
        for r in reps:
            while r.t_next < t:  # (r.catch_up(t), inlined)
                if r._pend is None:
                    r.clock = r.t_next
                r._step()
        clock.now = t
        send(Sequence(request(i)))
        if progress is not None and i % tick == 0:
            progress(i)
    fe.arrivals_done = True
    end = clock.now
    for r in reps:
        r.catch_up(math.inf)
        end = max(end, r.clock)
    clock.now = end


def _checked(sched: ContinuousBatchingScheduler) -> None:
    """Wrap a scheduler so that every step verifies the KV pool (tests; slow)."""
    def verify():
        kv = sched.kv
        kv.check()
        held = sum(len(s.block_table) for s in sched.running)
        brute = sum(s.req.input_tokens + s.req.output_tokens - s.num_computed
                    for s in list(sched.running) + list(sched.waiting))
        assert sched.pending == brute, (sched.pending, brute)
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
             progress: Callable[[int], None] | None = None, check: bool = False,
             direct: bool | None = None, jitter: Any = None) -> RunResult:
    """Replay `workload` through a simulated cluster; every request ends with one record.
    jitter (sim.jitter.StepJitter): random step-time factors (build_cluster).
    `check=True` verifies the KV pool's invariants after every step and the front end's (result cache
    capacity and expiry, submissions only to replicas that are up) as it goes (for tests)."""
    t0 = time.perf_counter()
    cluster = build_cluster(workload, cfg, cost, check=check, direct=direct, jitter=jitter)
    if check:
        for rep in cluster.replicas:
            _checked(rep.sched)
    fe = cluster.frontend
    fe.progress = progress
    drive(cluster)
    end = cluster.env.now
    for rep in cluster.replicas:  # nothing should be left; if it is, say so rather than lose it
        rep.sched.abort_all(end, "simulation ended before the request finished")
        rep._refresh()
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
    meta.update(fe.meta())
    meta.update(_fault_meta(cluster))
    mem = _memory_meta(cluster)
    if mem:
        meta["memory"] = mem
    if cluster.gpu_tasks is not None:
        meta["gpu_tasks"] = cluster.gpu_tasks.summary(start)
    if check:  # what the invariant tests look at
        meta["check"] = {"submissions": fe.submissions, "cache_hits": fe.cache_hits_log}
    itl = ItlLog()
    for rep in cluster.replicas:
        itl.extend(rep.sched.itl)
    return RunResult(records=rec, itl=itl, start=start, end=max(last, start),
                     replicas=[r.stats for r in cluster.replicas], meta=meta, timeseries=_timeseries(cluster))


def _fault_meta(cluster: Cluster) -> dict[str, Any]:
    fc, fe = cluster.cfg.faults, cluster.frontend
    if not (fc.replica_faults or fc.cache_node_loss):
        return {}
    return {"faults": {
        "on_crash": fc.on_crash, "max_retries": fc.max_retries, "health_interval": cluster.cfg.health.interval,
        "crashes": [r.crashes for r in cluster.replicas],
        "down_intervals": [[[a, b if b < math.inf else None] for a, b in r.down_log] for r in cluster.replicas],
        "downtime_s": [r.downtime for r in cluster.replicas],
        "requests_retried": len(fe.retries), "retries": sum(fe.retries.values()),
        "failed_by_crash": fe.failed_by_crash,
        "cache_node_events": [list(e) for e in fe.crash_log],
    }}


def _memory_meta(cluster: Cluster) -> dict[str, Any]:
    mem = cluster.cfg.memory
    if mem.reclaim_high is None and not mem.sample_interval:
        return {}
    out: dict[str, Any] = {"sample_interval": mem.sample_interval}
    if mem.reclaim_high is not None:
        out.update(reclaim_high=mem.reclaim_high, reclaim_low=mem.reclaim_low,
                   reclaimed_blocks=[r.reclaimed for r in cluster.replicas])
    peak = []
    for r in cluster.replicas:
        x = np.frombuffer(r.samples, dtype=np.float64).reshape(-1, _NS) if len(r.samples) else np.zeros((0, _NS))
        peak.append(float(x[:, 1].max() / r.kv.num_blocks) if len(x) else 0.0)
    if mem.sample_interval:
        out["peak_sampled_kv_usage"] = peak
    return out


# kv_used_blocks: held by sequences; kv_evictable_blocks: cached, held by none (reusable or evictable);
# kv_usage = kv_used_blocks / blocks; kv_cached_blocks: blocks with a prefix hash (held or not); evictions and
# reclaimed_blocks: cumulative (evictions include the reclaimed ones).
TIMESERIES_COLUMNS = ("time", "replica", "kv_used_blocks", "kv_usage", "kv_evictable_blocks", "kv_cached_blocks",
                      "evictions", "reclaimed_blocks", "running", "waiting")


def _timeseries(cluster: Cluster) -> dict[str, np.ndarray] | None:
    """Per-replica KV samples (memory.sample_interval), merged in time order."""
    if not cluster.cfg.memory.sample_interval:
        return None
    parts = []
    for r in cluster.replicas:
        x = np.frombuffer(r.samples, dtype=np.float64).reshape(-1, _NS) if len(r.samples) else np.zeros((0, _NS))
        parts.append(np.column_stack([x[:, 0], np.full(len(x), r.idx), x[:, 1], x[:, 1] / r.kv.num_blocks, x[:, 2:]]))
    allx = np.concatenate(parts) if parts else np.zeros((0, len(TIMESERIES_COLUMNS)))
    allx = allx[np.lexsort((allx[:, 1], allx[:, 0]))]
    out = {}
    for j, name in enumerate(TIMESERIES_COLUMNS):
        col = allx[:, j]
        out[name] = col if name in ("time", "kv_usage") else col.astype(np.int64)
    return out
