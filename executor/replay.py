"""Real-time, open-loop replay of a workload on executor replicas (`twinfer run`).

    result = run_workload(workload, cfg, model_config="tiny", out="runs/r1")   # a traces.records.RunResult

The parent process releases request i at its intended send time `arrival[i]`
(rate-scaled) on the wall clock, whatever the replicas are doing: a late
engine never delays later sends, and every latency is measured from the
intended send time, so queueing shows as latency (no coordinated omission).
The run's clock is the workload's time axis: `clock() == arrival[0]` when
the replay starts, so the records' `arrival` column equals the simulator's.

    parent: clock -> router (policies.routers, shared with the simulator) -> replica inbox
    replica k (a worker process; a thread when there is one replica):
        loop: take new requests -> Engine.step() (shared scheduler + torch) -> report
    parent: reports -> records (one per request), router mirror, Prometheus, telemetry

The router runs in the parent and needs each replica's load without asking
it (a question would make dispatch wait on a busy engine). It sees a mirror
(`ReplicaMirror`): outstanding requests counted exactly (+1 on dispatch, -1
on the completion report), the batch size and pending tokens from the last
report plus the requests sent since, and for prefix lookups an approximate
prefix index: the prefix block hashes of the requests sent to that replica,
LRU-bounded by its KV block count (the approximation SGLang's cache-aware
router makes). It does not see evictions the engine makes earlier than LRU
order over dispatches would predict.

Every request ends with exactly one record. Overload ends in rejections
(`scheduler.max_waiting`) or time-outs (`scheduler.queue_timeout`) with a
reason; `max_duration` ends the run and fails whatever is unfinished with
"run stopped at max_duration"; Ctrl-C does the same with "interrupted" and
raises ReplayInterrupted (a KeyboardInterrupt) carrying the partial result.
A replica that crashes fails its outstanding requests with the error as the
reason; the router no longer sees it as healthy.

With `out`, the run writes summary.json and records.csv (as `twinfer
simulate` does), telemetry.csv (executor.telemetry) and steps.csv (every
engine step's timing and shape, one row per step and replica: the data the
simulator's cost model is calibrated on).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import multiprocessing as mp
import queue
import signal
import threading
import time
import traceback
from collections import OrderedDict, deque
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from executor.engine import Engine, StepRecord
from executor.metrics import ServingMetrics, start_metrics_server
from executor.model import PRESETS, LlamaForCausalLM, ModelConfig, preset
from executor.telemetry import TelemetrySampler
from policies.kv_cache import prefix_block_hashes
from policies.queues import create_queue
from policies.routers import create_router
from policies.scheduler import SCHEDULERS, ContinuousBatchingScheduler, SchedulerConfig
from policies.sequence import SeqStatus, Sequence
from sim.config import SimConfig
from traces.records import ItlLog, RecordTable, ReplicaStats, RunResult
from traces.workload import Request, Workload

log = logging.getLogger(__name__)

STOPPED_AT_MAX_DURATION = "run stopped at max_duration"
INTERRUPTED = "interrupted"
STEP_FIELDS = tuple(f.name for f in fields(StepRecord))
STEP_COLUMNS = ("replica",) + STEP_FIELDS

# KV cache on the CPU: a share of the memory available when the run starts, split between the
# replicas, at most CPU_KV_MAX_BYTES each. (A GPU uses cfg.gpu_memory_utilization, as vLLM does.)
CPU_KV_MEMORY_FRACTION = 0.1
CPU_KV_MAX_BYTES = 1 << 30

_STOP_GRACE_S = 10.0  # how long a stopping replica may take to finish its step and report
_POLL_S = 0.05


class ReplayInterrupted(KeyboardInterrupt):
    """Ctrl-C during a replay: `result` holds every request, unfinished ones failed "interrupted"."""

    def __init__(self, result: RunResult):
        super().__init__("replay interrupted")
        self.result = result


class ReplicaError(RuntimeError):
    """A replica could not start (its traceback is in the message)."""


# ---- what each replica runs -------------------------------------------------------------------

@dataclass(frozen=True)
class ModelSpec:
    """A model every worker can build on its own: a preset/config with seeded weights, or a local HF directory."""

    cfg: ModelConfig
    path: str | None = None  # HF-layout directory (config.json + safetensors); None: random weights from seed
    seed: int = 0

    def build(self, device: str) -> LlamaForCausalLM:
        if self.path is not None:
            return LlamaForCausalLM.from_pretrained(self.path, device=device)
        return LlamaForCausalLM.from_seed(self.cfg, self.seed, device=device)


def resolve_model(model_config: str | Path | ModelConfig, seed: int = 0) -> ModelSpec:
    """A preset name (executor.model.PRESETS), a ModelConfig, or a local HF-layout directory."""
    if isinstance(model_config, ModelConfig):
        return ModelSpec(model_config, None, seed)
    name = str(model_config)
    if isinstance(model_config, str) and name in PRESETS:
        return ModelSpec(preset(name), None, seed)
    path = Path(name)
    if path.is_dir():
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise FileNotFoundError(f"{path}: no config.json (expected a Hugging Face model directory)")
        if not ((path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()):
            raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")
        return ModelSpec(ModelConfig.from_hf(json.loads(cfg_file.read_text()), name=path.name), str(path), seed)
    raise ValueError(f"--model {name!r} is neither a preset ({' | '.join(PRESETS)}) nor a model directory")


def kv_capacity(cfg: SimConfig, model: ModelConfig, devices: list[Any]) -> tuple[int, str]:
    """KV blocks per replica and how they were chosen.

    cfg.num_blocks when set. On CUDA: device memory x gpu_memory_utilization, minus each replica's
    weights and an activation reserve (one step's MLP/attention buffers at max_num_batched_tokens plus
    float32 logits for max_num_seqs rows), split between the replicas sharing the device. On the CPU:
    CPU_KV_MEMORY_FRACTION of the memory available now, split between the replicas, at most
    CPU_KV_MAX_BYTES each. Never more blocks than max_num_seqs sequences of max_position tokens fill.
    """
    bs = cfg.scheduler.block_size
    if cfg.num_blocks:
        return cfg.num_blocks, "num_blocks"
    block_bytes = bs * model.kv_bytes_per_token()
    useful = cfg.scheduler.max_num_seqs * -(-model.max_position // bs)
    dev = devices[0]
    if dev.type == "cuda":
        import torch

        sharing = sum(1 for d in devices if d == dev)
        sc = cfg.scheduler
        item = model.torch_dtype.itemsize
        act = sc.max_num_batched_tokens * (3 * model.intermediate + 4 * model.hidden) * item
        act += 2 * sc.max_num_seqs * model.vocab * 4
        total = torch.cuda.get_device_properties(dev).total_memory
        budget = (total * cfg.gpu_memory_utilization - sharing * (model.num_params * item + act)) / sharing
        how = (f"{cfg.gpu_memory_utilization:g} x {total / 2**30:.1f} GiB on {dev}, less weights and activations, "
               f"/ {sharing} replica(s)")
        if budget < block_bytes:
            raise ValueError(f"no memory left for the KV cache on {dev}: {how}; lower --replicas or raise "
                             "--gpu-memory-utilization, or set --num-blocks")
    else:
        import psutil

        avail = psutil.virtual_memory().available
        budget = min(avail * CPU_KV_MEMORY_FRACTION / cfg.replicas, CPU_KV_MAX_BYTES)
        how = (f"CPU: min({CPU_KV_MEMORY_FRACTION:g} x {avail / 2**30:.1f} GiB available / {cfg.replicas} "
               f"replica(s), {CPU_KV_MAX_BYTES / 2**30:g} GiB)")
    blocks = int(min(useful, budget // block_bytes))
    return max(blocks, 1), f"{how} = {blocks * block_bytes / 2**20:,.0f} MiB"


def _check_supported(cfg: SimConfig) -> None:
    """Refuse the simulator-only features rather than silently ignore them."""
    if cfg.tp != 1:
        raise ValueError(f"tp={cfg.tp}: the executor runs each replica on one device (tensor parallelism "
                         "is simulated only)")
    checks = [
        ("result_cache", lambda v: v.enabled, "a result cache"),
        ("faults", lambda v: v.replica_faults or bool(v.cache_node_loss), "fault injection"),
        ("sessions", lambda v: v.mode != "open", "closed-loop sessions"),
        ("memory", lambda v: v.reclaim_high is not None, "KV reclaim"),
        ("cluster", lambda v: v.devices != 0, "replica placement on shared devices"),
    ]
    for name, on, what in checks:
        v = getattr(cfg, name, None)
        if v is not None and on(v):
            raise ValueError(f"{name}: {what} is simulated only; the executor does not run it yet")


@dataclass(frozen=True)
class ReplicaSpec:
    """Everything a worker needs to build its replica (picklable)."""

    index: int
    model: ModelSpec
    device: str
    threads: int
    num_blocks: int
    scheduler: SchedulerConfig
    queue_options: dict = field(default_factory=dict)
    warmup: bool = True
    ignore_sigint: bool = False  # worker processes: Ctrl-C is the parent's to handle


def make_scheduler(sc: SchedulerConfig, num_blocks: int,
                   queue_options: Mapping[str, Any]) -> ContinuousBatchingScheduler:
    return SCHEDULERS[sc.kind](sc, num_blocks, create_queue(sc.queue, **queue_options))


# ---- the worker side ----------------------------------------------------------------------------

@dataclass(slots=True)
class Report:
    """A replica's news after a step (or after requests were rejected on arrival)."""

    replica: int
    received: int  # requests taken from the inbox so far
    running: int
    waiting: int
    kv_usage: float
    pending_tokens: int
    prefix_queries: int  # cumulative, tokens
    prefix_hits: int
    preemptions: int
    evictions: int
    step: tuple | None  # a StepRecord as a tuple (STEP_FIELDS order)
    itl: list[tuple[float, int]]  # new (gap, count) inter-token latency samples
    prompt_tokens: int  # prompts of requests whose first token came this step (vLLM's prompt_tokens)
    generated: int
    # (id, t_admitted, t_first_token, t_finish, generated, cached, preemptions, outcome, reason)
    finished: list[tuple]


def replica_main(spec: ReplicaSpec, inbox: Any, outbox: Any) -> None:
    """A replica's whole life: build, report ready, serve until told to stop."""
    if spec.ignore_sigint:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        worker = _Worker(spec, outbox)
    except BaseException:
        outbox.put(("error", spec.index, traceback.format_exc()))
        return
    outbox.put(("ready", spec.index, worker.info))
    try:
        worker.serve(inbox)
    except BaseException:
        outbox.put(("error", spec.index, traceback.format_exc()))
        return
    outbox.put(("done", spec.index, None))


class _Worker:
    def __init__(self, spec: ReplicaSpec, outbox: Any):
        from executor.device import describe_device
        from executor.runner import ModelRunner

        self.idx, self.outbox = spec.index, outbox
        model = spec.model.build(spec.device)
        runner = ModelRunner(model, spec.num_blocks, spec.scheduler.block_size, device=spec.device,
                             num_threads=spec.threads)
        if spec.warmup:
            _warm_up(runner, spec.scheduler)
        self.engine = Engine(runner, make_scheduler(spec.scheduler, spec.num_blocks, spec.queue_options))
        self.sched = self.engine.scheduler
        self.received = 0
        self._itl_seen = 0
        self._origin = 0.0
        self.info = {"device": describe_device(spec.device), "threads": spec.threads, "num_blocks": spec.num_blocks}

    def clock(self) -> float:
        return time.perf_counter() - self._origin

    def serve(self, inbox: Any) -> None:
        msg = inbox.get()
        if msg[0] == "stop":  # stopped before the run began
            return
        # perf_counter is the system-wide monotonic clock on Linux and macOS, so it agrees across processes.
        self._origin = msg[1]
        eng, sched = self.engine, self.sched
        stalled = False  # the last step planned nothing: wait for a message or the scheduler's next wake-up
        while True:
            if not eng.has_work:
                timeout: float | None = 0.5
            elif stalled:
                wake = sched.next_wakeup()
                timeout = _POLL_S if wake is None else min(max(wake - self.clock(), 0.0), _POLL_S)
            else:
                timeout = None
            for msg in _drain(inbox, timeout):
                if msg[0] == "req":
                    seq = Sequence(msg[1])
                    seq.replica = self.idx
                    eng.add(seq, self.clock())
                    self.received += 1
                    stalled = False
                elif msg[0] == "stop":
                    sched.abort_all(self.clock(), msg[1])
                    self._report(None, sched.done)
                    sched.done = []
                    return
            if eng.has_work:
                out = eng.step(self.clock)
                stalled = out.plan.empty and not out.plan.preempted
                if out.finished or not out.plan.empty:
                    self._report(out, out.finished)
            elif sched.done:  # rejected on arrival
                self._report(None, sched.done)
                sched.done = []

    def _report(self, out, finished: list[Sequence]) -> None:
        sched, kv = self.sched, self.sched.kv
        itl = sched.itl
        new_itl = list(zip(itl.step_d[self._itl_seen:].tolist(), itl.step_w[self._itl_seen:].tolist()))
        self._itl_seen = len(itl.step_d)
        step = None
        log_ = self.engine.step_log
        if log_:
            r = log_[-1]
            step = tuple(getattr(r, f) for f in STEP_FIELDS)
            log_.clear()
        prompt = gen = 0
        if out is not None:
            gen = len(out.tokens)
            prompt = sum(s.req.input_tokens for s, _ in out.tokens if s.num_generated == 1)
        self.outbox.put(("report", self.idx, Report(
            replica=self.idx, received=self.received, running=len(sched.running), waiting=len(sched.waiting),
            kv_usage=kv.usage, pending_tokens=sched.pending_tokens(), prefix_queries=kv.queries,
            prefix_hits=kv.hits, preemptions=sched.num_preemptions, evictions=kv.evictions, step=step,
            itl=new_itl, prompt_tokens=prompt, generated=gen,
            finished=[(s.id, s.t_admitted, s.t_first_token, s.t_finish, s.num_generated, s.num_cached_tokens,
                       s.preemptions, s.outcome, s.reason) for s in finished])))


def _drain(inbox: Any, timeout: float | None) -> list:
    """Every message waiting now; first wait up to `timeout` s for one (None: don't wait)."""
    out = []
    try:
        out.append(inbox.get(timeout=timeout) if timeout else inbox.get_nowait())
        while True:
            out.append(inbox.get_nowait())
    except queue.Empty:
        pass
    return out


WARMUP_MAX_TOKENS = 4096  # the warm-up's largest prefill, at most (and at most the model's positions)
WARMUP_MAX_WORKSPACE_BLOCKS = 8192  # the gather workspace reserved up front, at most (default model: 64 MiB)


def _warm_up(runner, sc: SchedulerConfig) -> dict[str, int]:
    """Steps of every kind on a throwaway scheduler, so set-up is not billed to the run:
    - a few small ones: a prompt from position 0, chunks past position 0 (another attention call: a
      bottom-right mask, on CUDA a different flash kernel, loaded on its first use), a one-token final
      chunk beside a decode, and decodes of two different lengths. On an H100 the first chunk past
      position 0 in a run took 190-215 ms (its shapes' kernels and memory set up), against about 25 ms for
      the same shape later;
    - on the CPU, the attention gather workspace sized for a full decode batch (PagedKVCache.reserve; at most
      WARMUP_MAX_WORKSPACE_BLOCKS blocks);
    - last, one prefill as large as the run's can be (the longest prompt the model and the scheduler's budget
      allow, up to WARMUP_MAX_TOKENS) and a decode after it, so the process's activation memory reaches its
      peak once, here. On the CPU freed memory stays with the process (executor.hostmem) but its first
      touch costs page faults: in the CPU fidelity runs each replica's first large prefill ran 17-38 %
      slower than the model, with up to 11,000 minor faults and 100-150 ms in the kernel.
    Returns what it ran: the large prefill's tokens and the workspace's blocks."""
    block_size = sc.block_size
    n = max(2, min(64, runner.cfg.max_position // 4))
    sched = ContinuousBatchingScheduler(SchedulerConfig(block_size=block_size, prefix_caching=False,
                                                        max_num_batched_tokens=n), runner.num_blocks)
    Engine(runner, sched).run_offline([Request(0, 0.0, 3 * n, 4), Request(1, 0.0, n, 4)])
    # the workspace first: taken after the large prefill, it would reuse the memory that step freed, and the
    # next large step would fault its own in again (measured: 6,900 faults in a 2048-token prefill that way)
    blocks = 0
    if runner.device.type == "cpu":  # (device memory is the KV cache's: the workspace grows there as needed)
        per_seq = -(-runner.cfg.max_position // block_size)
        blocks = runner.cache.reserve(min(runner.num_blocks, sc.max_num_seqs * per_seq, WARMUP_MAX_WORKSPACE_BLOCKS))
    capacity = runner.num_blocks * block_size
    big = min(runner.cfg.max_position - 2, capacity - 2 * block_size,
              max(sc.max_num_batched_tokens, WARMUP_MAX_TOKENS))
    if big > 3 * n:
        sched = ContinuousBatchingScheduler(SchedulerConfig(block_size=block_size, prefix_caching=False,
                                                            max_num_batched_tokens=big), runner.num_blocks)
        Engine(runner, sched).run_offline([Request(2, 0.0, big, 2)])
    return {"prefill_tokens": int(big) if big > 3 * n else 0, "workspace_blocks": blocks}


# ---- the parent side -----------------------------------------------------------------------------

class PrefixMirror:
    """An approximate prefix index of one replica: hashes of prompts sent there, LRU, at most its block count.
    Quacks like the BlockManager for routers: `block_size` and a side-effect-free `lookup`."""

    def __init__(self, block_size: int, capacity: int):
        self.block_size = block_size
        self.capacity = capacity
        self._lru: OrderedDict[int, None] = OrderedDict()

    def lookup(self, hashes: list[int]) -> list[int]:
        n = 0
        for h in hashes:
            if h not in self._lru:
                break
            n += 1
        return list(hashes[:n])

    def insert(self, hashes: list[int]) -> None:
        lru = self._lru
        for h in hashes:
            lru[h] = None
            lru.move_to_end(h)
        while len(lru) > self.capacity:
            lru.popitem(last=False)


class ReplicaMirror:
    """What the router sees of one replica (policies.routers.ReplicaView), kept in the parent."""

    def __init__(self, idx: int, block_size: int, num_blocks: int):
        self.idx = idx
        self.healthy = True
        self.kv = PrefixMirror(block_size, num_blocks)
        self.outstanding = 0
        self.sent = 0
        self._unseen: deque[tuple[int, int]] = deque()  # (send number, tokens) not yet in a report
        self.last: Report | None = None

    @property
    def num_outstanding(self) -> int:
        return self.outstanding

    @property
    def num_running(self) -> int:
        return min(self.last.running, self.outstanding) if self.last else 0

    def pending_tokens(self) -> int:
        base = self.last.pending_tokens if self.last else 0
        return base + sum(t for _, t in self._unseen)

    def dispatched(self, req: Request) -> None:
        self.outstanding += 1
        self.sent += 1
        self._unseen.append((self.sent, req.input_tokens + req.output_tokens))

    def reported(self, rep: Report) -> None:
        self.last = rep
        while self._unseen and self._unseen[0][0] <= rep.received:
            self._unseen.popleft()

    def gauges(self) -> dict[str, float]:
        r, p = self.last, f"replica{self.idx}."
        hit = r.prefix_hits / r.prefix_queries if r and r.prefix_queries else 0.0
        return {p + "waiting": r.waiting if r else 0, p + "running": r.running if r else 0,
                p + "kv_usage": r.kv_usage if r else 0.0, p + "prefix_hit_rate": hit,
                p + "outstanding": self.outstanding}


class _Handle:
    """A running replica: a spawned process, or a thread of this process."""

    def __init__(self, spec: ReplicaSpec, outbox: Any, ctx: Any | None):
        if ctx is None:
            self.inbox: Any = queue.Queue()
            self.proc: Any = threading.Thread(target=replica_main, args=(spec, self.inbox, outbox),
                                              name=f"twinfer-replica-{spec.index}", daemon=True)
        else:
            self.inbox = ctx.Queue()
            self.proc = ctx.Process(target=replica_main, args=(spec, self.inbox, outbox),
                                    name=f"twinfer-replica-{spec.index}", daemon=True)
        self.is_process = ctx is not None
        self.ready = self.done = False
        self.proc.start()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.is_process else None

    def alive(self) -> bool:
        return self.proc.is_alive()

    def close(self, timeout: float) -> None:
        """Join; a worker process that is still alive after `timeout` is terminated. One that said "done" has
        sent everything, so only its interpreter teardown (seconds, with torch loaded) is cut short."""
        self.proc.join(min(timeout, 0.2) if self.is_process and self.done else timeout)
        if self.is_process:
            if self.proc.is_alive():
                self.proc.terminate()
                self.proc.join(2.0)
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join(2.0)
            self.inbox.cancel_join_thread()
            self.inbox.close()


class _WorkerCpu:
    """Telemetry source: CPU % and RSS of each worker process."""

    def __init__(self, handles: list[_Handle]):
        import psutil

        self.procs = {i: psutil.Process(h.pid) for i, h in enumerate(handles) if h.pid is not None}
        self.first = True

    def __call__(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for i, p in self.procs.items():
            try:
                cpu = p.cpu_percent(None)
                out[f"replica{i}.cpu_pct"] = math.nan if self.first else cpu
                out[f"replica{i}.rss_mib"] = p.memory_info().rss / 2**20
            except Exception:  # the worker has exited
                out[f"replica{i}.cpu_pct"] = out[f"replica{i}.rss_mib"] = math.nan
        self.first = False
        return out


class _Replay:
    """One run's state in the parent: arrivals out, reports in, records kept."""

    def __init__(self, workload: Workload, cfg: SimConfig, num_blocks: int, metrics: ServingMetrics,
                 progress: Callable[[int], None] | None):
        self.w, self.cfg, self.metrics, self.progress = workload, cfg, metrics, progress
        n = len(workload)
        self.records = RecordTable(n)
        self.outstanding: dict[int, Sequence] = {}  # sent, not yet recorded
        self.finished = 0
        self._told = 0
        self._stopping = False
        self.stopped_at = -math.inf  # run clock when stop() began
        self.itl = ItlLog()
        self.steps: list[tuple] = []
        self.send_lag: list[float] = []  # actual send - intended send, s: how late the harness itself was
        self.stats = [ReplicaStats(kv_blocks=num_blocks) for _ in range(cfg.replicas)]
        self.router = create_router(cfg.router, seed=cfg.seed)
        self.views = [ReplicaMirror(i, cfg.scheduler.block_size, num_blocks) for i in range(cfg.replicas)]
        self.hash_prefixes = cfg.scheduler.prefix_caching
        self.handles: list[_Handle] = []
        self.outbox: Any = None
        self.worker_info: list[dict] = [{} for _ in range(cfg.replicas)]
        self.t0 = float(workload.arrival[0]) if n else 0.0
        self.origin = time.perf_counter() - self.t0
        self._next_liveness = 0.0

    def launch(self, specs: list[ReplicaSpec], in_process: bool) -> None:
        ctx = None if in_process else mp.get_context("spawn")
        self.outbox = queue.Queue() if ctx is None else ctx.Queue()
        for s in specs:
            self.handles.append(_Handle(s, self.outbox, ctx))

    def clock(self) -> float:
        return time.perf_counter() - self.origin

    # -- start ------------------------------------------------------------------------------
    def wait_ready(self) -> None:
        while not all(h.ready for h in self.handles):
            msg = self._get(1.0)
            if msg is None:
                for i, h in enumerate(self.handles):
                    if not h.ready and not h.alive():
                        raise ReplicaError(f"replica {i} exited while starting (exit code "
                                           f"{getattr(h.proc, 'exitcode', None)})")
                continue
            kind, i, body = msg
            if kind == "error":
                raise ReplicaError(f"replica {i} failed to start:\n{body}")
            if kind == "ready":
                self.handles[i].ready = True
                self.worker_info[i] = body

    def start(self) -> None:
        """Start the run's clock: now is the first intended send time."""
        self.origin = time.perf_counter() - self.t0
        for h in self.handles:
            h.inbox.put(("start", self.origin, self.t0))

    # -- the run ----------------------------------------------------------------------------
    def serve(self, deadline: float | None) -> str | None:
        """Dispatch every arrival on time and collect reports until every request has a record or the
        deadline passes. Returns None, or the reason the run stopped early."""
        arrival = self.w.arrival.tolist()
        n, i = len(arrival), 0
        while True:
            now = self.clock()
            while i < n and arrival[i] <= now:
                self._dispatch(i, now)
                i += 1
            if self.finished == n:
                return None
            if deadline is not None and now >= deadline:
                return STOPPED_AT_MAX_DURATION
            wake = min(arrival[i] if i < n else math.inf, deadline if deadline is not None else math.inf)
            self._pump(min(max(wake - self.clock(), 0.0), _POLL_S), until=wake)
            self._check_liveness()

    def _dispatch(self, i: int, now: float) -> None:
        req = self.w.request(i)
        seq = Sequence(req)  # t_arrival = the intended send time
        self.send_lag.append(now - req.arrival)
        k = self.router.route(req, self.views, now)
        if k is None:
            seq.status, seq.outcome, seq.t_finish = SeqStatus.FINISHED, "rejected", now
            seq.reason = "no healthy replica"
            self._record(seq)
            self._tick()
            return
        seq.replica = k
        view = self.views[k]
        view.dispatched(req)
        if self.hash_prefixes and req.block_hashes:
            view.kv.insert(prefix_block_hashes(req, view.kv.block_size))
        self.outstanding[i] = seq
        self.handles[k].inbox.put(("req", req))

    def _get(self, timeout: float) -> tuple | None:
        try:
            return self.outbox.get(timeout=timeout) if timeout > 0 else self.outbox.get_nowait()
        except queue.Empty:
            return None

    def _pump(self, timeout: float, until: float = math.inf) -> None:
        """Handle messages: wait up to `timeout` for the first, then take what is there until `until`."""
        msg = self._get(timeout)
        while msg is not None:
            self._handle(msg)
            if self.clock() >= until:
                return
            msg = self._get(0)

    def _handle(self, msg: tuple) -> None:
        kind, i, body = msg
        if kind == "report":
            self._on_report(body)
        elif kind == "done":
            self.handles[i].done = True
        elif kind == "error":
            self._replica_lost(i, f"replica {i} failed: {body.strip().splitlines()[-1]}", body)

    def _on_report(self, rep: Report) -> None:
        k = rep.replica
        view, st = self.views[k], self.stats[k]
        prev = view.last
        view.reported(rep)
        st.preemptions, st.prefix_queries, st.prefix_hits = rep.preemptions, rep.prefix_queries, rep.prefix_hits
        st.evictions = rep.evictions
        if rep.step is not None:
            rec = StepRecord(*rep.step)
            st.busy_time += rec.duration
            st.steps += 1
            st.tokens += rec.num_tokens
            self.steps.append((k, *rep.step))
        for d, c in rep.itl:
            self.itl.step(d, c)
        self.metrics.on_step(
            k, rep.running, rep.waiting, rep.kv_usage,
            prefix_queries=rep.prefix_queries - (prev.prefix_queries if prev else 0),
            prefix_hits=rep.prefix_hits - (prev.prefix_hits if prev else 0),
            preemptions=rep.preemptions - (prev.preemptions if prev else 0),
            prompt_tokens=rep.prompt_tokens, generation_tokens=rep.generated,
            itl=[d for d, c in rep.itl for _ in range(int(c))])
        for sid, adm, first, fin, gen, cached, pre, outcome, reason in rep.finished:
            seq = self.outstanding.pop(sid, None)
            if seq is None:  # already failed by the parent (a lost replica)
                continue
            seq.t_admitted, seq.t_first_token, seq.t_finish = adm, first, fin
            seq.num_generated, seq.num_cached_tokens, seq.preemptions = gen, cached, pre
            seq.status, seq.outcome, seq.reason = SeqStatus.FINISHED, outcome, reason
            view.outstanding -= 1
            self._record(seq)
        self._tick()

    def _record(self, seq: Sequence) -> None:
        self.records.put(seq)
        self.metrics.on_sequence_finished(seq)
        self.finished += 1

    def _tick(self) -> None:
        """Tell `progress`, once a batch of records is complete (it may raise KeyboardInterrupt)."""
        if self.progress is not None and self.finished != self._told and not self._stopping:
            self._told = self.finished
            self.progress(self.finished)

    def _check_liveness(self) -> None:
        now = time.perf_counter()
        if now < self._next_liveness:
            return
        self._next_liveness = now + 0.5
        for i, h in enumerate(self.handles):
            if self.views[i].healthy and not h.done and not h.alive():
                self._pump(0)  # its last words may still be in the queue
                if self.views[i].healthy:
                    self._replica_lost(i, f"replica {i} process exited (code {getattr(h.proc, 'exitcode', None)})")

    def _replica_lost(self, i: int, reason: str, tb: str = "") -> None:
        log.error("%s%s", reason, "\n" + tb if tb else "")
        self.views[i].healthy = False
        self.handles[i].done = True
        self._fail_outstanding(reason, replica=i)

    def _fail_outstanding(self, reason: str, replica: int | None = None) -> None:
        now = self.clock()
        for sid in [s for s, q in self.outstanding.items() if replica is None or q.replica == replica]:
            seq = self.outstanding.pop(sid)
            seq.status, seq.outcome, seq.reason, seq.t_finish = SeqStatus.FINISHED, "failed", reason, now
            self.views[seq.replica].outstanding -= 1
            self._record(seq)
        self._tick()

    # -- stop ---------------------------------------------------------------------------------
    def stop(self, reason: str, grace: float) -> None:
        """Tell every replica to abort what it holds (as failed, `reason`) and collect their last reports;
        whatever is still unrecorded after `grace` s, and every request never sent, fails here."""
        self._stopping = True
        self.stopped_at = self.clock()
        for h in self.handles:
            if not h.done and h.alive():
                h.inbox.put(("stop", reason))
        end = time.perf_counter() + grace
        while not all(h.done or not h.alive() for h in self.handles) and time.perf_counter() < end:
            self._pump(_POLL_S)
        self._pump(0)
        for h in self.handles:
            h.close(timeout=max(0.5, end - time.perf_counter()))
        self._fail_outstanding(reason)
        for i in np.flatnonzero(~self.records.filled).tolist():  # never sent
            seq = Sequence(self.w.request(i))
            seq.status, seq.outcome, seq.reason = SeqStatus.FINISHED, "failed", reason
            self._record(seq)
        self._tick()

    def result(self, wall_s: float, meta: dict, stopped_early: bool) -> RunResult:
        """The run's records; a run stopped early lasted until it was stopped, whatever had finished."""
        missing = self.records.missing()
        if len(missing):
            raise RuntimeError(f"{len(missing)} requests have no record (first: {missing[:5].tolist()})")
        rec = self.records.cols
        fin = rec["finish"]
        last = float(np.nanmax(fin)) if len(fin) and np.isfinite(fin).any() else self.t0
        if stopped_early:
            last = max(last, self.stopped_at)
        lag = np.array(self.send_lag)
        send_lag = {}
        if len(lag):
            send_lag = {"mean": float(lag.mean()), "p99": float(np.percentile(lag, 99)), "max": float(lag.max())}
        return RunResult(records=rec, itl=self.itl, start=self.t0, end=max(last, self.t0), replicas=self.stats,
                         meta=dict(meta, wall_s=wall_s, send_lag_s=send_lag))

    def write_steps(self, path: Path) -> Path:
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(STEP_COLUMNS)
            for row in sorted(self.steps, key=lambda r: (r[1], r[0])):
                w.writerow([repr(v) if isinstance(v, float) else v for v in row])
        return path


def read_steps(path: str | Path) -> dict[str, np.ndarray]:
    """steps.csv back as columns (the replica column plus Engine.step_table()'s)."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    header, body = rows[0], rows[1:]
    floats = {f.name for f in fields(StepRecord) if f.type == "float"}
    return {name: np.array([float(r[j]) if name in floats else int(r[j]) for r in body],
                           dtype=np.float64 if name in floats else np.int64)
            for j, name in enumerate(header)}


# ---- the entry point -------------------------------------------------------------------------------

def run_workload(workload: Workload, cfg: SimConfig, *, model_config: str | Path | ModelConfig = "default",
                 device: str = "auto", rate_scale: float = 1.0, metrics_port: int | None = None,
                 telemetry_interval: float = 0.5, out: str | Path | None = None,
                 progress: Callable[[int], None] | None = None, max_duration: float | None = None,
                 on_start: Callable[[dict[str, Any]], None] | None = None, in_process: bool | None = None,
                 threads: int | None = None, warmup: bool = True) -> RunResult:
    """Replay `workload` in real time on `cfg.replicas` executor replicas behind `cfg.router`.

    model_config: a preset name, a ModelConfig (random weights from cfg.seed) or a local HF directory.
    device: "auto" | "cpu" | "cuda" | "cuda:N"; replicas go round-robin over the devices it covers.
    rate_scale: arrivals are divided by it (2 = twice the rate), as traces.transforms.scale_rate.
    metrics_port: serve Prometheus metrics on 127.0.0.1:port during the run (0 = any free port).
    out: directory for summary.json, records.csv, telemetry.csv, steps.csv.
    progress(k): called with the number of requests finished so far.
    max_duration: wall seconds after the first send; then unfinished requests fail.
    on_start(info): called once the replicas are ready and the clock starts (info has "metrics_url").
    in_process: run the replicas as threads of this process (default: when there is one replica; several
    threads share the GIL, for tests and debugging); otherwise every replica is a spawned worker process
    (so call this under `if __name__ == "__main__":` in a script, as multiprocessing's spawn requires).
    threads: torch intra-op threads per replica (default: this process's cores // replicas, at least 1).
    """
    from executor.device import CPU_FALLBACK_NOTICE, assign_devices, select_devices
    from executor.runner import default_num_threads
    from traces.transforms import scale_rate

    t_wall = time.perf_counter()
    _check_supported(cfg)
    if max_duration is not None and not max_duration > 0:
        raise ValueError(f"max_duration={max_duration!r} is out of range; allowed: > 0 s or unset")
    if not telemetry_interval > 0:
        raise ValueError(f"telemetry_interval={telemetry_interval!r} is out of range; allowed: > 0 s")
    if rate_scale != 1.0:
        workload = scale_rate(workload, rate_scale)
    spec = resolve_model(model_config, cfg.seed)
    notices: list[str] = []
    devs = select_devices(device)
    if devs[0].type == "cpu" and device.strip().lower() == "auto":
        notices.append(CPU_FALLBACK_NOTICE)
    replica_devs = assign_devices(cfg.replicas, devs)
    num_blocks, kv_how = kv_capacity(cfg, spec.cfg, replica_devs)
    in_process = cfg.replicas == 1 if in_process is None else in_process
    if threads is not None and threads < 1:
        raise ValueError(f"threads={threads} is out of range; allowed: >= 1")
    threads = threads or max(1, default_num_threads() // cfg.replicas)
    metrics = ServingMetrics(spec.cfg.name, cfg.replicas, max_model_len=spec.cfg.max_position)
    n = len(workload)

    qopts = cfg.queue.options(cfg.scheduler.queue) if hasattr(cfg, "queue") else {}
    specs = [ReplicaSpec(i, spec, str(replica_devs[i]), threads, num_blocks, cfg.scheduler, qopts, warmup,
                         ignore_sigint=not in_process) for i in range(cfg.replicas)]

    run = _Replay(workload, cfg, num_blocks, metrics, progress)
    server = sampler = None
    stopped: str | None = None
    interrupted = False
    try:
        try:
            run.launch(specs, in_process)
            run.wait_ready()
            if metrics_port is not None:
                try:
                    server = start_metrics_server(metrics_port, "127.0.0.1", registry=metrics.registry)
                except OSError as e:
                    raise ValueError(f"metrics port {metrics_port} on 127.0.0.1: {e}") from None
                log.info("metrics at %s", server.url)
            sources: list[Callable[[], Mapping[str, float]]] = [
                lambda: {k: v for view in run.views for k, v in view.gauges().items()}]
            if not in_process:
                sources.append(_WorkerCpu(run.handles))
            sampler = TelemetrySampler(telemetry_interval, sources, listeners=[metrics.on_telemetry])
            run.start()
            sampler.start(t0=run.origin)  # telemetry's t is the run's clock
            notices.extend(sampler.notices)
            if on_start is not None:
                on_start({"metrics_url": server.url if server else None, "devices": [str(d) for d in replica_devs],
                          "kv_blocks_per_replica": num_blocks, "threads_per_replica": threads})
            deadline = None if max_duration is None else run.t0 + max_duration
            stopped = run.serve(deadline)
            run.stop(stopped or "run ended before the request finished", _STOP_GRACE_S)
        except KeyboardInterrupt:
            interrupted, stopped = True, INTERRUPTED
            run.stop(INTERRUPTED, grace=2.0)
    except BaseException:
        for h in run.handles:
            if h.alive():
                h.inbox.put(("stop", "error"))
            h.close(0.5)
        raise
    finally:
        if sampler is not None:
            sampler.stop()
        if server is not None:
            server.close()
    meta = {
        "source": "executor", "workload": workload.name, "requests": n, "seed": cfg.seed,
        "model": spec.cfg.name, "model_path": spec.path, "model_params": spec.cfg.num_params,
        "device": str(replica_devs[0]), "devices": [str(d) for d in replica_devs],
        "device_info": run.worker_info[0].get("device", {}), "threads_per_replica": threads,
        "workers": "thread" if in_process else "process", "kv_blocks_per_replica": num_blocks,
        "kv_capacity": kv_how, "rate_scale": rate_scale, "max_duration": max_duration, "stopped": stopped,
        "notices": notices, "metrics_url": server.url if server else None,
        "telemetry_samples": len(sampler) if sampler is not None else 0,
    }
    result = run.result(time.perf_counter() - t_wall, meta, stopped_early=stopped is not None)
    if out is not None:
        _write_run(result, cfg, out, run, sampler)
    if interrupted:
        raise ReplayInterrupted(result)
    return result


def _write_run(result: RunResult, cfg: SimConfig, out: str | Path, run: _Replay,
              sampler: TelemetrySampler | None) -> list[Path]:
    from sim.config import flatten
    from traces.report import summarize, write_outputs

    out = Path(out)
    summary = summarize(result, cfg.slo)
    summary["config"] = flatten(cfg)
    paths = write_outputs(result, summary, out)
    if sampler is not None:
        paths.append(sampler.save(out / "telemetry.csv"))
    paths.append(run.write_steps(out / "steps.csv"))
    return paths
