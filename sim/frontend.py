"""The path of a request outside the engines: result cache, router, retries after a crash, sessions.

    send(seq)      at its intended send time: the result cache answers it (a hit, after the cache
                   latency, touching no replica), or it goes on to `dispatch` (after the same latency);
    dispatch(seq)  the router picks a healthy replica; none healthy: rejected, "no healthy replica";
    done(seq)      every terminal sequence passes here exactly once: it is recorded, a completed miss
                   fills the result cache, and a closed-loop session sends its next step (or, if this
                   step did not complete, records the rest of the session as failed);
    crashed(...)   a replica crashed: its in-flight requests are re-routed with their original intended
                   send time (so TTFT includes the loss) or failed, per faults.on_crash.

Nothing here reads a clock other than the SimPy environment's `now`.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import simpy

from policies.hash_ring import DistributedCache, HashRing, HashRingConfig
from policies.result_cache import ResultCache, ResultCacheConfig, key_for_request
from policies.sequence import SeqStatus, Sequence
from sim.config import SimConfig
from sim.sessions import SessionPlan, plan_sessions
from traces.records import RecordTable
from traces.workload import Workload


class FrontCache:
    """One LRU/TTL cache, or a consistent-hash ring of them (nodes >= 1), behind one get/put."""

    def __init__(self, capacity: int, ttl: float, nodes: int = 0, replication: int = 1, vnodes: int = 100):
        cc = ResultCacheConfig(capacity=capacity, ttl=ttl)
        self.capacity = capacity
        self.lru: ResultCache | None = None
        self.ring: DistributedCache | None = None
        if nodes:
            self.ring = DistributedCache(HashRing(range(nodes), HashRingConfig(vnodes=vnodes, replication=replication)),
                                         cc)
        else:
            self.lru = ResultCache(cc)
        self.writes_acked: dict[int, int] = {}  # replicas that took a write -> writes

    def get(self, key: int, now: float):
        return self.lru.get(key, now) if self.lru is not None else self.ring.get(key, now)

    def put(self, key: int, value: Any, now: float) -> None:
        if self.lru is not None:
            self.lru.put(key, value, now)
            acks = 1
        else:
            acks = self.ring.put(key, value, now)
        self.writes_acked[acks] = self.writes_acked.get(acks, 0) + 1

    def node_down(self, node: int) -> None:
        self.ring.ring.mark_down(node)

    def node_up(self, node: int) -> None:
        self.ring.ring.mark_up(node)

    def caches(self) -> list[ResultCache]:
        if self.lru is not None:
            return [self.lru]
        return [self.ring.cache(n) for n in self.ring.ring.nodes]

    def stats(self) -> dict[str, Any]:
        caches = self.caches()
        out: dict[str, Any] = {
            "evictions": sum(c.stats.evictions for c in caches),
            "expirations": sum(c.stats.expirations for c in caches),
            "entries": sum(len(c) for c in caches),
            "writes_acked": {str(k): v for k, v in sorted(self.writes_acked.items())},
        }
        if self.ring is not None:
            out.update(nodes=len(caches), fallback_hits=self.ring.stats.fallback_hits,
                       failed_writes=self.ring.stats.failed_writes)
        return out


class Frontend:
    def __init__(self, env: simpy.Environment, replicas: list, records: RecordTable, router: Any,
                 workload: Workload, cfg: SimConfig, check: bool = False):
        self.env, self.replicas, self.records, self.router = env, replicas, records, router
        self.workload, self.cfg, self.check = workload, cfg, check
        self.n = len(workload)
        self.recorded = 0
        self.pending = 0  # timers of ours not yet fired (cache latency, session think times)
        self.arrivals_done = False
        self.progress: Callable[[int], None] | None = None
        rc = cfg.result_cache
        self.cache = FrontCache(rc.capacity, rc.ttl, rc.nodes, rc.replication, rc.vnodes) if rc.enabled else None
        self.latency = rc.latency
        self.lookups = self.hits = self.uncacheable = 0
        self._miss_key: dict[int, int] = {}  # request index -> its cache key, while it is served by a replica
        self.sessions: SessionPlan | None = (plan_sessions(workload, cfg.sessions.think, cfg.seed)
                                             if cfg.sessions.mode == "closed" else None)
        self.sessions_aborted = 0
        self.retries: dict[int, int] = {}  # request index -> times re-routed after a crash
        self.failed_by_crash = 0
        self.crash_log: list[tuple[float, str, int, float]] = []  # (time, kind, target, down for)
        self.submissions: list[tuple[float, int]] = []  # (time, replica), check mode only
        self.cache_hits_log: list[tuple[float, float]] = []  # (time, entry expiry), check mode only

    @property
    def needs_sink(self) -> bool:
        """Whether terminal sequences must pass through `done` (else the replicas record them directly)."""
        return self.sink_needed(self.cfg)

    @staticmethod
    def sink_needed(cfg: SimConfig) -> bool:
        return cfg.result_cache.enabled or cfg.sessions.mode == "closed" or bool(cfg.faults.replica_faults)

    # ---- arrivals ---------------------------------------------------------------------------------
    def arrivals(self):
        env, w = self.env, self.workload
        rows = self.sessions.heads.tolist() if self.sessions is not None else range(self.n)
        arrival = w.arrival.tolist()
        progress = self.progress if self.sessions is None else None
        tick = max(self.n // 200, 1)
        for i in rows:
            t = arrival[i]
            if t > env.now:
                yield env.timeout(t - env.now)
            self.send(Sequence(w.request(i)))
            if progress is not None and i % tick == 0:
                progress(i)
        self.arrivals_done = True

    def _later(self, delay: float, fn: Callable[..., None], *args: Any) -> None:
        self.pending += 1

        def fire(_e: Any) -> None:
            self.pending -= 1
            fn(*args)

        self.env.timeout(max(delay, 0.0)).callbacks.append(fire)

    def send(self, seq: Sequence) -> None:
        """The request leaves the client at its intended send time (seq.t_arrival)."""
        cache = self.cache
        if cache is None:
            self.dispatch(seq)
            return
        key = key_for_request(seq.req)
        if key is None:  # no content identity in the trace: the cache cannot answer it
            self.uncacheable += 1
            self.dispatch(seq)
            return
        now = self.env.now
        self.lookups += 1
        entry = cache.get(key, now)
        if entry is not None:
            self.hits += 1
            if self.check:
                assert now < entry.expires_at, "the result cache served an expired entry"
                self.cache_hits_log.append((now, entry.expires_at))
            t = seq.t_arrival + self.latency
            seq.t_admitted = seq.t_arrival
            seq.t_first_token = seq.t_last_token = seq.t_finish = t
            seq.num_generated = seq.req.output_tokens
            seq.status, seq.outcome = SeqStatus.FINISHED, "ok"
            self._later(t - now, self.done, seq, True)
            return
        self._miss_key[seq.req.index] = key
        if self.latency > 0:
            self._later(self.latency, self.dispatch, seq)
        else:
            self.dispatch(seq)

    def dispatch(self, seq: Sequence, crashed_on: int | None = None) -> None:
        now = self.env.now
        r = self.router.route(seq.req, self.replicas, now)
        if r is None:
            seq.status, seq.t_finish = SeqStatus.FINISHED, now
            if crashed_on is None:
                seq.outcome, seq.reason = "rejected", "no healthy replica"
            else:
                seq.outcome, seq.reason = "failed", f"replica {crashed_on} crashed; no healthy replica to retry on"
                self.failed_by_crash += 1
            self.done(seq)
            return
        rep = self.replicas[r]
        assert rep.up, f"router picked replica {r}, which is down"
        if self.check:
            self.submissions.append((now, r))
        rep.submit(seq)

    # ---- completion ---------------------------------------------------------------------------------
    def done(self, seq: Sequence, result_cache_hit: bool = False) -> None:
        """Record a terminal sequence; fill the cache; continue or abort its session."""
        self.records.put(seq, result_cache_hit)
        self.recorded += 1
        i = seq.req.index
        ok = seq.outcome == "ok"
        if self.cache is not None:
            key = self._miss_key.pop(i, None)
            if key is not None and ok:
                self.cache.put(key, i, self.env.now)
                if self.check:
                    for c in self.cache.caches():
                        assert len(c) <= self.cache.capacity, "result cache above capacity"
        sp = self.sessions
        if sp is not None:
            j = int(sp.next_row[i])
            if j >= 0:
                if ok:
                    nxt = Sequence(self.workload.request(j), now=seq.t_finish + float(sp.think[j]))
                    self._later(nxt.t_arrival - self.env.now, self.send, nxt)
                else:
                    self._abort_session(j, seq)
            if self.progress is not None and self.recorded % max(self.n // 200, 1) == 0:
                self.progress(self.recorded)

    def _abort_session(self, j: int, failed: Sequence) -> None:
        """Record every remaining step of the session, from row j on, as failed: they are never sent."""
        self.sessions_aborted += 1
        reason = f"session aborted after step {failed.req.step} failed"
        t = failed.t_finish if failed.t_finish is not None else self.env.now
        while j >= 0:
            s = Sequence(self.workload.request(j), now=t)
            s.status, s.outcome, s.reason, s.t_finish = SeqStatus.FINISHED, "failed", reason, t
            self.records.put(s)
            self.recorded += 1
            self._miss_key.pop(j, None)
            j = int(self.sessions.next_row[j])

    # ---- faults ---------------------------------------------------------------------------------------
    def crashed(self, replica: int, lost: list[Sequence], now: float) -> None:
        """A replica crashed with these sequences in flight (their KV blocks already freed)."""
        fc = self.cfg.faults
        for old in lost:
            i = old.req.index
            n = self.retries.get(i, 0)
            if fc.on_crash == "retry" and n < fc.max_retries:
                self.retries[i] = n + 1
                self.dispatch(Sequence(old.req, now=old.t_arrival), crashed_on=replica)
                continue
            old.status, old.outcome, old.t_finish = SeqStatus.FINISHED, "failed", now
            old.reason = (f"replica {replica} crashed" if fc.on_crash == "fail"
                          else f"replica {replica} crashed; retried {n} times already (max_retries={fc.max_retries})")
            self.failed_by_crash += 1
            self.done(old)

    def recovered(self, rep: Any) -> None:
        """The replica is back up; the next active health check (every health.interval s) lets traffic in."""
        iv = self.cfg.health.interval
        now = self.env.now
        if iv <= 0:
            rep.healthy = rep.up
            return
        tick = math.ceil(now / iv) * iv
        if tick < now:
            tick += iv

        def check(_e: Any) -> None:
            rep.healthy = rep.up

        self.env.timeout(tick - now).callbacks.append(check)

    def finished(self) -> bool:
        """True once every request has its record, or nothing can happen any more (fault processes stop)."""
        if self.recorded >= self.n:
            return True
        if not self.arrivals_done or self.pending:
            return False
        return all(not r.up or (r.idle and r.sched.next_wakeup() is None) for r in self.replicas)

    def meta(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.cache is not None:
            rc = self.cfg.result_cache
            out["result_cache"] = {
                "capacity": rc.capacity, "ttl": rc.ttl, "latency": rc.latency, "nodes": rc.nodes,
                "replication": rc.replication if rc.nodes else 1,
                "lookups": self.lookups, "hits": self.hits, "misses": self.lookups - self.hits,
                "uncacheable": self.uncacheable, "hit_rate": self.hits / self.lookups if self.lookups else 0.0,
                **self.cache.stats(),
            }
        if self.sessions is not None:
            out["sessions"] = {"mode": "closed", "think": self.cfg.sessions.think,
                               "sessions": self.sessions.sessions, "aborted": self.sessions_aborted}
        return out
