"""The executor's engine: the shared scheduler driving a real model, on wall-clock time.

One step is the same cycle the simulator runs, with torch in place of the cost model:

    plan = scheduler.schedule(now)
    runner.run(plan)
    scheduler.update(plan, start, end)

Every non-empty step is logged with its timing and shape (`StepRecord`): the
data the simulator's fitted cost model is calibrated on.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields, replace

import numpy as np
import torch

from executor.grouping import decode_breaks, decode_grouping
from executor.runner import ModelRunner
from executor.tokens import prompt_tokens
from policies.plan import StepPlan
from policies.scheduler import ContinuousBatchingScheduler
from policies.sequence import SeqStatus, Sequence
from traces.workload import Request

try:
    import resource
except ImportError:  # not Unix: steps log no faults
    resource = None  # type: ignore[assignment]


def _rusage() -> tuple[int, float]:
    """(minor page faults, kernel CPU seconds) of this process so far; (0, 0.0) without getrusage."""
    if resource is None:
        return 0, 0.0
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_minflt, r.ru_stime


@dataclass(frozen=True, slots=True)
class StepRecord:
    """One executed step. Times in seconds on the engine's clock."""

    start: float
    duration: float  # schedule + forward + sampling, up to the (synchronised) end of the step
    schedule_s: float  # of which spent in scheduler.schedule()
    prefill_seqs: int
    prefill_tokens: int
    decode_seqs: int
    prefill_context: int  # sum over prefill chunks of (start position + n): keys its last token sees
    decode_context: int  # sum over decode tokens of their context length, the new token included
    attention_pairs: int  # (query, key) pairs attended, all sequences: attention's FLOPs scale with it
    sampled: int  # sequences that got a new token (logits rows computed)
    preempted: int  # sequences preempted while this plan was built
    kv_blocks_used: int  # after scheduling
    running: int  # after scheduling
    waiting: int
    # The decode attention's shape (executor.grouping.decode_grouping): SDPA calls, and key tokens read
    # with each row padded to its group's longest. 0 without decodes.
    decode_groups: int = 0
    decode_padded_context: int = 0
    # This process's minor page faults and kernel CPU seconds during the step (getrusage; 0 where the
    # platform has no getrusage). Faults in a step that allocates nothing new mean the C allocator gave
    # memory back to the kernel in between (executor.hostmem).
    minor_faults: int = 0
    kernel_s: float = 0.0
    # Breaks in the decode rows' block tables (executor.grouping.decode_breaks): gathered blocks that do not
    # follow their predecessor in the cache.
    decode_breaks: int = 0

    @property
    def num_tokens(self) -> int:
        return self.prefill_tokens + self.decode_seqs

    @property
    def context_tokens(self) -> int:
        return self.prefill_context + self.decode_context


@dataclass(slots=True)
class StepOutcome:
    plan: StepPlan
    start: float
    end: float
    tokens: list[tuple[Sequence, int]]  # (sequence, token id) sampled this step, in plan order
    finished: list[Sequence]  # sequences that became terminal since the last step (rejections included)


class Engine:
    """Runs `scheduler`'s plans on `runner`. The clock is time.perf_counter() from construction,
    read after a CUDA synchronize on a GPU so a step's end is when its kernels finished."""

    def __init__(self, runner: ModelRunner, scheduler: ContinuousBatchingScheduler):
        if scheduler.cfg.block_size != runner.block_size:
            raise ValueError(f"scheduler block_size={scheduler.cfg.block_size}, runner block_size={runner.block_size}")
        if scheduler.kv.num_blocks != runner.num_blocks:
            raise ValueError(f"scheduler has {scheduler.kv.num_blocks} KV blocks, runner's cache {runner.num_blocks}")
        self.runner = runner
        self.scheduler = scheduler
        self.step_log: list[StepRecord] = []
        self._t0 = time.perf_counter()

    # ---- time ---------------------------------------------------------------------
    def _sync(self) -> None:
        if self.runner.device.type == "cuda":
            torch.cuda.synchronize(self.runner.device)

    def now(self) -> float:
        self._sync()
        return time.perf_counter() - self._t0

    def _read(self, now_fn: Callable[[], float] | None) -> float:
        self._sync()
        return now_fn() if now_fn is not None else time.perf_counter() - self._t0

    # ---- requests -----------------------------------------------------------------
    def add(self, seq: Sequence, now: float) -> bool:
        """Give the request its prompt ids (unless it has some) and queue it. False if rejected."""
        cfg = self.runner.cfg
        if seq.tokens is None:
            seq.tokens = prompt_tokens(seq.req, cfg.vocab)
        elif len(seq.tokens) != seq.num_tokens:
            raise ValueError(f"request {seq.id}: {len(seq.tokens)} token ids for {seq.num_tokens} tokens")
        # The last generated token's KV is never computed, so positions reach input + output - 2.
        span = seq.req.input_tokens + seq.req.output_tokens - 1
        if span > cfg.max_position:
            seq.status, seq.outcome, seq.t_finish = SeqStatus.FINISHED, "rejected", now
            seq.reason = f"needs {span} positions, model max_position={cfg.max_position}"
            self.scheduler.done.append(seq)
            return False
        return self.scheduler.add(seq, now)

    @property
    def has_work(self) -> bool:
        return self.scheduler.num_outstanding > 0

    # ---- one step -----------------------------------------------------------------
    def step(self, now_fn: Callable[[], float] | None = None) -> StepOutcome:
        """Schedule, execute and apply one step. `now_fn` gives the run's clock (default: the engine's)."""
        sched = self.scheduler
        r0 = _rusage()
        start = self._read(now_fn)
        t = time.perf_counter()
        plan = sched.schedule(start)
        schedule_s = time.perf_counter() - t
        completing = [s for s, n in zip(plan.prefill, plan.prefill_tokens) if s.num_computed + n == s.num_tokens]
        completing += plan.decode
        record = None if plan.empty else self._shape(plan, start, schedule_s, len(completing))
        self.runner.run(plan)
        end = self._read(now_fn)
        r1 = _rusage()
        tokens = [(s, s.tokens[-1]) for s in completing]
        sched.update(plan, start, end)
        if record is not None:
            self.step_log.append(replace(record, duration=end - start, minor_faults=r1[0] - r0[0],
                                         kernel_s=r1[1] - r0[1]))
        finished = sched.done
        sched.done = []
        return StepOutcome(plan, start, end, tokens, finished)

    def _shape(self, plan: StepPlan, start: float, schedule_s: float, sampled: int) -> StepRecord:
        pctx = pairs = 0
        for s, n in zip(plan.prefill, plan.prefill_tokens):
            c = s.num_computed
            pctx += c + n
            pairs += n * c + n * (n + 1) // 2
        ctxs = [s.num_computed + 1 for s in plan.decode]
        dctx = sum(ctxs)
        sched = self.scheduler
        groups, padded = decode_grouping(ctxs, sched.kv.block_size)
        breaks = decode_breaks(plan.decode, sched.kv.block_size)
        return StepRecord(
            start=start, duration=0.0, schedule_s=schedule_s, prefill_seqs=len(plan.prefill),
            prefill_tokens=plan.num_prefill_tokens, decode_seqs=len(plan.decode), prefill_context=pctx,
            decode_context=dctx, attention_pairs=pairs + dctx, sampled=sampled, preempted=len(plan.preempted),
            kv_blocks_used=sched.kv.num_used, running=len(sched.running), waiting=len(sched.waiting),
            decode_groups=groups, decode_padded_context=padded, decode_breaks=breaks,
        )

    def step_table(self) -> dict[str, np.ndarray]:
        """The step log as columns (one numpy array per StepRecord field)."""
        out: dict[str, np.ndarray] = {}
        for f in fields(StepRecord):
            vals = [getattr(r, f.name) for r in self.step_log]
            out[f.name] = np.array(vals, dtype=np.float64 if f.type == "float" else np.int64)
        return out

    # ---- convenience ----------------------------------------------------------------
    def run_offline(self, requests: Iterable[Request]) -> list[Sequence]:
        """Add every request now (arrival = now, whatever the trace says) and step until all are done.
        Returns their sequences in the order given; generated ids are seq.tokens[req.input_tokens:]."""
        seqs: list[Sequence] = []
        for req in requests:
            now = self.now()
            seq = Sequence(req, now=now)
            self.add(seq, now)
            seqs.append(seq)
        while self.has_work:
            out = self.step()
            if out.plan.empty and not out.plan.preempted:
                wake = self.scheduler.next_wakeup()
                if wake is None:
                    raise RuntimeError(f"scheduler made no progress with {self.scheduler.num_outstanding} "
                                       "requests outstanding and no wake-up time")
                time.sleep(max(0.0, wake - self.now()))
        return seqs

