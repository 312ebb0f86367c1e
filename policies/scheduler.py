"""Step schedulers: which sequences compute how many tokens next.

`ContinuousBatchingScheduler` is the vLLM/Sarathi family: a token budget per
step, a cap on running sequences, chunked prefill, preemption by recompute
when KV blocks run out. `DynamicBatchScheduler` is a classic request batcher
(max batch size, max wait; a batch runs to completion).

Both follow one cycle, driven by the simulator or the executor:

    plan = sched.schedule(now)                 # a StepPlan
    ... execute it (cost model or torch), the step ends at `end` ...
    sched.update(plan, start=now, end=end)

A run of decode-only steps whose shape cannot change (no prefill, no
admission possible, no preemption) can be applied in one call:
`k = sched.horizon(plan)` steps are safe, and `sched.advance(plan, ends)`
applies the first len(ends) of them, giving the same state and records that
len(ends) single steps would.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

from policies.kv_cache import BlockManager, prefix_block_hashes
from policies.plan import StepPlan
from policies.queues import RequestQueue, create_queue, QUEUES
from policies.sequence import SeqStatus, Sequence
from traces.records import ITL_FLUSH, ItlLog

# (module globals: a class attribute of an enum is read by a slower path than a global in Python 3.11)
_WAITING, _RUNNING, _FINISHED = SeqStatus.WAITING, SeqStatus.RUNNING, SeqStatus.FINISHED


def _check(name: str, ok: bool, allowed: str, value: object) -> None:
    if not ok:
        raise ValueError(f"{name}={value!r} is out of range; allowed: {allowed}")


@dataclass(frozen=True)
class SchedulerConfig:
    kind: str = "continuous"  # "continuous" or "dynamic"
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    chunked_prefill: bool = True
    block_size: int = 16
    prefix_caching: bool = True
    queue: str = "fcfs"
    max_waiting: int | None = None  # admission limit: arrivals beyond it are rejected
    queue_timeout: float | None = None  # s a request may wait before first admission
    # dynamic batching only
    max_batch_size: int = 32
    max_wait: float = 0.05

    def __post_init__(self) -> None:
        _check("scheduler.kind", self.kind in SCHEDULERS, " | ".join(SCHEDULERS), self.kind)
        _check("scheduler.max_num_seqs", self.max_num_seqs >= 1, ">= 1", self.max_num_seqs)
        _check("scheduler.max_num_batched_tokens", self.max_num_batched_tokens >= 1, ">= 1",
               self.max_num_batched_tokens)
        _check("scheduler.block_size", 1 <= self.block_size <= 4096, "1..4096", self.block_size)
        _check("scheduler.queue", self.queue in QUEUES, " | ".join(sorted(QUEUES)), self.queue)
        _check("scheduler.max_waiting", self.max_waiting is None or self.max_waiting >= 0, ">= 0 or unset",
               self.max_waiting)
        _check("scheduler.queue_timeout", self.queue_timeout is None or self.queue_timeout > 0, "> 0 or unset",
               self.queue_timeout)
        _check("scheduler.max_batch_size", self.max_batch_size >= 1, ">= 1", self.max_batch_size)
        _check("scheduler.max_wait", self.max_wait >= 0, ">= 0", self.max_wait)


class ContinuousBatchingScheduler:
    def __init__(self, cfg: SchedulerConfig, num_blocks: int, queue: RequestQueue | None = None):
        self.cfg = cfg
        self.kv = BlockManager(num_blocks, cfg.block_size, cfg.prefix_caching)
        self.waiting: RequestQueue = queue if queue is not None else create_queue(cfg.queue)
        self.running: list[Sequence] = []
        self.done: list[Sequence] = []  # terminal sequences not yet collected by the driver
        self.num_preemptions = 0
        # Inter-token latency samples: one (duration, count) entry per step for the sequences whose
        # previous token came at that step's start, single gaps for the rest, closed-form runs from advance().
        self.itl = ItlLog()
        # Sum over waiting and running sequences of (input + output - num_computed): the tokens still to
        # compute or generate. Kept as a running total so routers can read it in O(1).
        self.pending = 0
        self._deadlines: list[tuple[float, int, Sequence]] = []
        self._jumpable = False
        self._min_left: int | None = None  # fewest output tokens left among the last plan's decodes
        # Set by update() and advance() when the next step is certain to be every running sequence as a
        # decode, none needing a new block: (running list, its length, next decode_ctx, next _min_left).
        # The next _schedule_running then plans it without walking the batch (the list's identity and
        # length guard it; every other change to the batch clears or replaces it).
        self._steady: tuple | None = None
        # Whether next_wakeup() can ever return a time (else callers may skip asking).
        self.may_wake = (cfg.queue_timeout is not None
                         or type(self).next_wakeup is not ContinuousBatchingScheduler.next_wakeup)

    # ---- arrivals ---------------------------------------------------------------
    def add(self, seq: Sequence, now: float) -> bool:
        """Queue a new request. False (and the sequence is in `done`, rejected) if it cannot be admitted."""
        cfg = self.cfg
        req = seq.req
        kv = self.kv
        need = -(-(req.input_tokens + req.output_tokens - 1) // kv.block_size)  # (kv.blocks_for, inlined)
        if need > kv.num_blocks:
            return self._reject(seq, now, f"needs {need} KV blocks, replica has {kv.num_blocks}")
        if cfg.max_waiting is not None and len(self.waiting) >= cfg.max_waiting:
            return self._reject(seq, now, f"waiting queue full (max_waiting={cfg.max_waiting})")
        seq.status = _WAITING
        self.waiting.push(seq, now)
        self.pending += req.input_tokens + req.output_tokens - seq.num_computed
        if cfg.queue_timeout is not None:
            heapq.heappush(self._deadlines, (seq.t_arrival + cfg.queue_timeout, seq.order, seq))
        return True

    def _reject(self, seq: Sequence, now: float, reason: str) -> bool:
        seq.status, seq.outcome, seq.reason, seq.t_finish = SeqStatus.FINISHED, "rejected", reason, now
        self.done.append(seq)
        return False

    def _expire(self, now: float) -> None:
        dl = self._deadlines
        while dl and dl[0][0] <= now:
            _, _, seq = heapq.heappop(dl)
            if seq.status is SeqStatus.WAITING and seq.t_admitted is None:
                self.waiting.remove(seq)
                self.pending -= seq.req.input_tokens + seq.req.output_tokens - seq.num_computed
                seq.status, seq.outcome, seq.t_finish = SeqStatus.FINISHED, "timed_out", now
                seq.reason = f"not admitted within queue_timeout={self.cfg.queue_timeout}s"
                self.done.append(seq)

    def next_wakeup(self) -> float | None:
        """The earliest time the scheduler needs to be asked again even if nothing else happens."""
        dl = self._deadlines
        while dl and (dl[0][2].status is not SeqStatus.WAITING or dl[0][2].t_admitted is not None):
            heapq.heappop(dl)
        return dl[0][0] if dl else None

    # ---- load, for routers --------------------------------------------------------
    @property
    def num_outstanding(self) -> int:
        return len(self.waiting) + len(self.running)

    def pending_tokens(self) -> int:
        """Tokens still to compute or generate for everything on this replica (O(1))."""
        return self.pending

    # ---- one step -------------------------------------------------------------------
    def schedule(self, now: float) -> StepPlan:
        cfg = self.cfg
        if cfg.queue_timeout is not None:
            self._expire(now)
        plan = StepPlan()
        budget = cfg.max_num_batched_tokens
        if cfg.chunked_prefill:  # (_schedule_running sets _min_left)
            if self.running:
                budget, all_scheduled = self._schedule_running(plan, budget)
            else:  # (what _schedule_running gives for no running sequences)
                plan.decode_ctx = 0
                plan.min_left = self._min_left = 1 << 62
                all_scheduled = True
            if not plan.preempted and len(self.waiting):
                self._admit(plan, budget, now)
        else:
            # Prefill first (whole prompts, no decodes in that step), as vLLM does without chunking.
            self._min_left = None
            self._admit(plan, budget, now)
            all_scheduled = not self.running
            if not plan.prefill:
                _, all_scheduled = self._schedule_running(plan, budget)
        self._jumpable = all_scheduled and not plan.prefill and not plan.preempted
        return plan

    def _schedule_running(self, plan: StepPlan, budget: int) -> tuple[int, bool]:
        running = self.running
        st = self._steady
        if st is not None:
            self._steady = None
            if st[0] is running and st[1] == len(running) and st[1] <= budget:
                # After a decode run with no finish: every running sequence decodes again and none needs a
                # block (advance checked), so the loop below would plan exactly this.
                plan.decode.extend(running)
                plan.decode_ctx = st[2]
                plan.min_left = self._min_left = st[3]
                return budget - st[1], True
        kv, chunked, bs = self.kv, self.cfg.chunked_prefill, self.cfg.block_size
        decode, prefill, prefill_tokens = plan.decode, plan.prefill, plan.prefill_tokens
        all_scheduled = True
        ctx = 0  # plan.decode_ctx, and the fewest tokens any decode has left (horizon reads it)
        min_left = 1 << 62
        i = 0
        nrun = len(running)
        while i < nrun:  # (running shrinks when a sequence is preempted)
            seq = running[i]
            computed = seq.num_computed
            g = seq.num_generated
            req = seq.req
            n = req.input_tokens + g - computed
            if n > budget:  # without chunking, running sequences are all decodes (n == 1)
                n = budget if chunked else 0
                if n <= 0:
                    all_scheduled = False
                    i += 1
                    continue
            table = seq.block_table
            need = (computed + n + bs - 1) // bs - len(table)
            if need > 0:
                while need > len(kv._free) + len(kv._evictable):  # (kv.num_free)
                    victim = running.pop()
                    self._preempt(victim, plan)
                    if victim is seq:
                        break
                nrun = len(running)
                if seq.status is not _RUNNING:
                    break
                table.extend(kv.allocate(need))
            if n == 1 and g:
                decode.append(seq)
                ctx += computed + 1
                left = req.output_tokens - g
                if left < min_left:
                    min_left = left
            else:
                prefill.append(seq)
                prefill_tokens.append(n)
            budget -= n
            i += 1
        plan.decode_ctx = ctx
        plan.min_left = self._min_left = min_left
        return budget, all_scheduled

    def _preempt(self, seq: Sequence, plan: StepPlan) -> None:
        """Recompute preemption: free its blocks, send it back to the front of the queue."""
        self.kv.free(seq.block_table, seq.num_hashed_blocks)
        seq.block_table = []
        self.pending += seq.num_computed
        seq.num_computed = 0
        seq.num_hashed_blocks = 0
        seq.status = SeqStatus.WAITING
        seq.preemptions += 1
        self.num_preemptions += 1
        self.waiting.push_front(seq)
        plan.preempted.append(seq)

    def _admit(self, plan: StepPlan, budget: int, now: float) -> None:
        cfg, kv, waiting, running = self.cfg, self.kv, self.waiting, self.running
        if not len(waiting):
            return
        bs = cfg.block_size
        while len(waiting) and len(running) < cfg.max_num_seqs and budget > 0:
            seq = waiting.peek(now)
            if seq.hashes is None:
                seq.hashes = prefix_block_hashes(seq.req, bs) if cfg.prefix_caching else []
            hit = kv.lookup(seq.hashes) if seq.hashes else []
            num_tokens = seq.req.input_tokens + seq.num_generated
            max_hit = (num_tokens - 1) // bs  # always compute at least the last token
            if len(hit) > max_hit:
                hit = hit[:max_hit]
            cached = len(hit) * bs
            n = num_tokens - cached
            if n > budget:
                if cfg.chunked_prefill:
                    n = budget
                elif plan.prefill:
                    break
                # else: a prompt longer than the budget runs alone in its own step
            need = (cached + n + bs - 1) // bs - len(hit)
            if need + (kv.evictable_among(hit) if hit else 0) > len(kv._free) + len(kv._evictable):  # (num_free)
                break
            waiting.pop(now)
            if hit:
                kv.acquire(hit)
            kv.queries += num_tokens  # (kv.count_query, inlined)
            kv.hits += cached
            seq.block_table = hit + kv.allocate(need)
            seq.num_computed = cached
            self.pending -= cached
            seq.num_hashed_blocks = len(hit)
            if seq.t_admitted is None:
                seq.t_admitted = now
                seq.num_cached_tokens = cached
            seq.status = _RUNNING
            running.append(seq)
            plan.prefill.append(seq)
            plan.prefill_tokens.append(n)
            budget -= n

    def update(self, plan: StepPlan, start: float, end: float) -> None:
        """Apply one executed step that ran from `start` to `end`."""
        finished = False
        bs = self.cfg.block_size
        kv = self.kv
        decode = plan.decode
        nd = len(decode)
        self.pending -= sum(plan.prefill_tokens) + nd
        # Whether the next step plans every running sequence as a decode with no new block (then set
        # _steady, as advance() does): its context sum and fewest tokens left, found on the way.
        steady = plan.min_left >= 0 and not plan.preempted and len(self.running) == len(plan.prefill) + nd
        ctx = plan.decode_ctx + nd
        min_left = plan.min_left - 1
        for seq, n in zip(plan.prefill, plan.prefill_tokens):
            seq.num_computed += n
            hashes = seq.hashes
            if hashes:
                k = seq.num_hashed_blocks
                full = min(len(hashes), seq.num_computed // bs)
                if full > k:
                    kv.register_range(seq.block_table, hashes, k, full)
                    seq.num_hashed_blocks = full
            computed = seq.num_computed
            if computed == seq.req.input_tokens + seq.num_generated:  # (num_tokens)
                if seq.num_generated:  # resumed after preemption: the gap spans it
                    self.itl.single(end - seq.t_last_token)
                else:
                    seq.t_first_token = end
                seq.num_generated += 1
                seq.t_last_token = end
                left = seq.req.output_tokens - seq.num_generated
                if left <= 0:
                    self._finish(seq, end)
                    finished = True
                elif steady:
                    ctx += computed + 1
                    if left < min_left:
                        min_left = left
                    if computed == len(seq.block_table) * bs:
                        steady = False
            else:
                steady = False  # (its prompt continues in the next step)
        c = 0
        itl = self.itl
        for seq in decode:
            computed = seq.num_computed + 1
            seq.num_computed = computed
            if computed == len(seq.block_table) * bs:
                steady = False
            t = seq.t_last_token
            if t == start:
                c += 1
            else:  # (ItlLog.single, inlined)
                itl.step_d.append(end - t)
                itl.step_w.append(1)
            seq.t_last_token = end
            g = seq.num_generated + 1
            seq.num_generated = g
            if g >= seq.req.output_tokens:
                self._finish(seq, end)
                finished = True
        if c:  # (ItlLog.step, inlined)
            itl.step_d.append(end - start)
            itl.step_w.append(c)
        if finished:
            self.running = [s for s in self.running if s.status is _RUNNING]
            self._steady = None
        elif steady:
            self._steady = (self.running, len(self.running), ctx, min_left)
        else:
            self._steady = None

    def _finish(self, seq: Sequence, now: float) -> None:
        seq.status, seq.outcome, seq.t_finish = _FINISHED, "ok", now
        self.pending -= seq.req.input_tokens + seq.req.output_tokens - seq.num_computed
        self.kv.free(seq.block_table, seq.num_hashed_blocks)
        seq.block_table = []
        self.done.append(seq)

    # ---- many identical decode steps at once ------------------------------------------
    def _alloc_events(self, plan: StepPlan, k: int) -> list[tuple[int, int]]:
        """(step, position in plan.decode) of each block allocation in steps 2..k, in stepping order."""
        bs = self.cfg.block_size
        ev: list[tuple[int, int]] = []
        for pos, seq in enumerate(plan.decode):
            # Step i computes the token at position num_computed + i - 1 (num_computed as planned).
            i = len(seq.block_table) * bs - seq.num_computed + 1
            while i <= k:
                ev.append((i, pos))
                i += bs
        ev.sort()
        return ev

    def horizon(self, plan: StepPlan) -> int:
        """How many steps of this plan's shape are certain to follow, this one included."""
        decode = plan.decode
        if not self._jumpable or not decode:
            return 1
        k = self._min_left  # as _schedule_running found it for this plan
        if k is None:
            k = 1 << 62
            for s in decode:
                left = s.req.output_tokens - s.num_generated
                if left < k:
                    k = left
        if k > 1:
            bs = self.cfg.block_size
            kv = self.kv
            free = len(kv._free) + len(kv._evictable)  # (kv.num_free, inlined)
            if free < len(decode) * ((k - 1) // bs + 1):  # else surely enough (each needs at most that many)
                need = 0
                for seq in decode:  # blocks the next k-1 steps allocate
                    i = len(seq.block_table) * bs - seq.num_computed + 1
                    if i <= k:
                        need += (k - i) // bs + 1
                if need > free:
                    k = self._alloc_events(plan, k)[free][0] - 1  # that step would need a preemption
        return k if k > 1 else 1  # (max(k, 1))

    def advance(self, plan: StepPlan, m: int, start: float, first_end: float, end: float, run) -> None:
        """Apply m decode steps of `plan` (m <= horizon(plan)), from `start` to `end`, the first ending at
        `first_end`. `run.params()` gives the closed-form durations of steps 1..m-1 (see ItlLog.run)."""
        if m == 1:
            self.update(plan, start, end)
            return
        decode = plan.decode
        # Each sequence takes the blocks its m steps need (stepping would take them in (step, position)
        # order; they are plain, unhashed blocks, so which id goes to which sequence changes nothing else,
        # and the cached blocks evicted for them are the same, in the same LRU order). Sequences finish
        # only at step m, so their blocks are freed after every allocation, as stepping would.
        bs = self.cfg.block_size
        itl = self.itl
        c = 0
        done = None
        grow = None  # (table, blocks) of the sequences that need blocks: one allocation for all of them
        total = 0
        edge = False  # whether some sequence that goes on needs a new block in step m + 1
        m1 = m + 1
        min_left = 1 << 62  # the fewest tokens left among those that go on
        gone = 0  # the context (num_computed + 1) of those that finish
        for seq in decode:
            computed = seq.num_computed
            table = seq.block_table
            i = len(table) * bs - computed + 1  # the step that needs the next block (if <= m)
            if i <= m:
                k = (m - i) // bs + 1
                total += k
                if grow is None:
                    grow = [(table, k)]
                else:
                    grow.append((table, k))
                i += k * bs
            t = seq.t_last_token
            if t == start:
                c += 1
            else:  # (ItlLog.single, inlined)
                itl.step_d.append(first_end - t)
                itl.step_w.append(1)
            computed += m
            seq.num_computed = computed
            g = seq.num_generated + m
            seq.num_generated = g
            seq.t_last_token = end
            left = seq.req.output_tokens - g
            if left <= 0:
                if done is None:
                    done = [seq]
                else:
                    done.append(seq)
                gone += computed + 1
            else:
                if left < min_left:
                    min_left = left
                if i == m1:
                    edge = True
        if grow is not None:  # (consecutive allocations would hand out these blocks in this order)
            kv = self.kv
            if len(grow) == 1:
                grow[0][0].extend(kv.allocate(total))
            else:
                blocks = kv.allocate(total)
                p = 0
                for table, k in grow:
                    table.extend(blocks[p:p + k])
                    p += k
        nd = len(decode)
        self.pending -= m * nd
        if c:  # (ItlLog.step, inlined)
            itl.step_d.append(first_end - start)
            itl.step_w.append(c)
        buf = itl._buf  # (ItlLog.run(run.params(), 1, m, nd), inlined: m > 1 here)
        buf += run.params()
        buf += (1, m, nd)
        if len(buf) >= ITL_FLUSH:
            itl._flush()
        # The next plan is every running sequence as a decode, with no new block, if every running sequence
        # was one of this plan's decodes (and _schedule_running built it): then set _steady.
        steady = not edge and plan.min_left >= 0 and len(self.running) == nd
        if done is not None:
            for seq in done:
                self._finish(seq, end)
            if len(done) == 1:  # (the common case; a copy without it is quicker than the comprehension)
                running = self.running.copy()
                running.remove(done[0])
                self.running = running
            else:
                running = self.running = [s for s in self.running if s.status is _RUNNING]
            self._steady = (running, len(running), plan.decode_ctx + m * nd - gone, min_left) \
                if steady and running else None
        else:
            self._steady = (self.running, nd, plan.decode_ctx + m * nd, min_left) if steady else None

    def evacuate(self) -> list[Sequence]:
        """Take every waiting and running sequence off this replica (a crash): their KV blocks are
        freed and the queue is emptied in place (it may carry discipline options). The caller decides
        what becomes of them; their status is left as it was."""
        self._steady = None
        out = list(self.running) + list(self.waiting)
        for seq in out:
            if seq.block_table:
                self.kv.free(seq.block_table, seq.num_hashed_blocks)
                seq.block_table = []
        for seq in list(self.waiting):
            self.waiting.remove(seq)
        self.running = []
        self.pending = 0
        return out

    def abort_all(self, now: float, reason: str) -> None:
        """End everything still here as failed (a crash, or the end of a run)."""
        for seq in self.evacuate():
            seq.status, seq.outcome, seq.reason, seq.t_finish = SeqStatus.FINISHED, "failed", reason, now
            self.done.append(seq)


class DynamicBatchScheduler(ContinuousBatchingScheduler):
    """Classic request batching: wait for `max_batch_size` requests or `max_wait` seconds since the
    oldest arrived, then run that batch (whole prompts, then decode) until every member finishes.
    KV blocks for the full sequence are reserved when the batch forms, so it never preempts."""

    def _oldest_waiting(self) -> float | None:
        return min((s.t_arrival for s in self.waiting), default=None)

    def next_wakeup(self) -> float | None:
        t = super().next_wakeup()
        if not self.running and len(self.waiting):
            w = self._oldest_waiting() + self.cfg.max_wait
            t = w if t is None else min(t, w)
        return t

    def schedule(self, now: float) -> StepPlan:
        cfg = self.cfg
        if cfg.queue_timeout is not None:
            self._expire(now)
        plan = StepPlan()
        self._min_left = None
        if not self.running and len(self.waiting):
            oldest = self._oldest_waiting()
            if len(self.waiting) >= cfg.max_batch_size or now >= oldest + cfg.max_wait:
                self._form_batch(plan, now)
        else:
            for seq in self.running:
                plan.decode.append(seq)
        self._jumpable = not plan.prefill
        return plan

    def _form_batch(self, plan: StepPlan, now: float) -> None:
        kv, bs = self.kv, self.cfg.block_size
        while len(self.waiting) and len(self.running) < self.cfg.max_batch_size:
            seq = self.waiting.peek(now)
            if seq.hashes is None:
                seq.hashes = prefix_block_hashes(seq.req, bs) if self.cfg.prefix_caching else []
            hit = kv.lookup(seq.hashes) if seq.hashes else []
            max_hit = (seq.req.input_tokens - 1) // bs
            hit = hit[:max_hit]
            need = kv.blocks_for(seq.req.input_tokens + seq.req.output_tokens - 1) - len(hit)
            if need + (kv.evictable_among(hit) if hit else 0) > kv.num_free:
                break
            self.waiting.pop(now)
            if hit:
                kv.acquire(hit)
            cached = len(hit) * bs
            kv.count_query(seq.num_tokens, cached)
            seq.block_table = hit + kv.allocate(need)
            seq.num_computed = cached
            self.pending -= cached
            seq.num_hashed_blocks = len(hit)
            seq.t_admitted = now
            seq.num_cached_tokens = cached
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            plan.prefill.append(seq)
            plan.prefill_tokens.append(seq.num_tokens - cached)


SCHEDULERS = {"continuous": ContinuousBatchingScheduler, "dynamic": DynamicBatchScheduler}


def create_scheduler(cfg: SchedulerConfig, num_blocks: int) -> ContinuousBatchingScheduler:
    return SCHEDULERS[cfg.kind](cfg, num_blocks)
