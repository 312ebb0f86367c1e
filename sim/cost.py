"""Cost models: how long one engine step takes, predicted from its plan.

A plan is reduced to a few features (see `StepFeatures`); both cost models
are functions of them, so a decode-only run of k steps (context growing by
the batch size each step) is predicted in one vectorised call with exactly
the arithmetic that k single calls would do.

- `AnalyticCost`: FLOPs and bytes moved against a device's peak compute and
  memory bandwidth (a roofline per step), plus a per-step overhead and, for
  tensor parallelism, two all-reduces per layer.
- fitted models (calibrated on the executor) live in sim/calibrate.py and
  provide the same two methods.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Protocol

from executor.grouping import decode_breaks, decode_grouping, steps_same_grouping
from policies.plan import StepPlan


class StepFeatures:
    """What a step's duration depends on (a plain slotted class: built once per simulated step)."""

    __slots__ = ("prefill_tokens", "decode_seqs", "prefill_attn", "decode_ctx", "logits", "decode_groups",
                 "decode_padded", "decode_breaks")

    def __init__(self, prefill_tokens: int, decode_seqs: int, prefill_attn: float, decode_ctx: int, logits: int,
                 decode_groups: int = 0, decode_padded: int = 0, decode_breaks: int = 0):
        self.prefill_tokens = prefill_tokens  # tokens computed by prefill chunks
        self.decode_seqs = decode_seqs  # sequences computing one decode token
        self.prefill_attn = prefill_attn  # sum over prefill query tokens of their attended context length
        self.decode_ctx = decode_ctx  # sum over decode sequences of their context length (incl. the new token)
        self.logits = logits  # sequences sampling a token this step
        # The executor's decode attention shape (executor.grouping.decode_grouping): SDPA calls and padded
        # key tokens. Filled in only for cost models that read them (`uses_grouping`), else 0.
        self.decode_groups = decode_groups
        self.decode_padded = decode_padded
        # Breaks in the decode rows' block tables (executor.grouping.decode_breaks): blocks the attention
        # gathers that do not follow their predecessor in the cache. Filled in with the two above.
        self.decode_breaks = decode_breaks

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StepFeatures) and all(
            getattr(self, k) == getattr(other, k) for k in self.__slots__)

    def __repr__(self) -> str:
        return "StepFeatures(" + ", ".join(f"{k}={getattr(self, k)!r}" for k in self.__slots__) + ")"

    @property
    def tokens(self) -> int:
        return self.prefill_tokens + self.decode_seqs


def plan_features(plan: StepPlan) -> StepFeatures:
    """Features of a plan, read before the scheduler's update()."""
    decode = plan.decode
    if not plan.prefill:  # decode only (the common case)
        nd = len(decode)
        ctx = plan.decode_ctx
        if ctx < 0:  # (not summed by the scheduler)
            ctx = nd
            for seq in decode:
                ctx += seq.num_computed
        return StepFeatures(0, nd, 0.0, ctx, nd)
    pt = 0
    attn = 0.0
    logits = 0
    for seq, n in zip(plan.prefill, plan.prefill_tokens):
        c0 = seq.num_computed
        pt += n
        attn += n * c0 + n * (n + 1) / 2
        if c0 + n == seq.num_tokens:
            logits += 1
    ctx = plan.decode_ctx
    if ctx < 0:
        ctx = 0
        for seq in plan.decode:
            ctx += seq.num_computed + 1
    nd = len(plan.decode)
    return StepFeatures(pt, nd, attn, ctx, logits + nd)


def grouping_features(f: StepFeatures, plan: StepPlan, block_size: int) -> int:
    """Fill in f's decode attention shape (decode_groups, decode_padded, decode_breaks) from the plan's decode
    rows, as the executor groups and gathers them, and return for how many decode steps from this one it
    stays the same (a decode run may be predicted in one piece only that far: no row takes a new block
    before then, so the breaks stay put too). For cost models with `uses_grouping`."""
    if not plan.decode:
        return 1 << 62
    ctxs = [s.num_computed + 1 for s in plan.decode]
    f.decode_groups, f.decode_padded = decode_grouping(ctxs, block_size)
    f.decode_breaks = decode_breaks(plan.decode, block_size)
    return steps_same_grouping(ctxs, block_size)


class DecodeRun:
    """Durations of consecutive decode-only steps i = 0, 1, ... of one shape, whose context grows by the
    batch size each step: d(i) = max(a1 + b1*i, a2 + b2*i) + c (slopes >= 0, so d never decreases).

    Both cost models reduce to this form (a fitted linear model has a2 = a1, b2 = b1), which gives the
    time to the end of step m in closed form: a run of a thousand steps costs what one step does.
    """

    __slots__ = ("a1", "b1", "a2", "b2", "c", "_top", "_x", "_cx", "_params", "first")

    def __init__(self, a1: float, b1: float, a2: float, b2: float, c: float):
        self.a1, self.b1, self.a2, self.b2, self.c = a1, b1, a2, b2, c
        self._params = (a1, b1, a2, b2, c)
        self.first = (a2 if a2 > a1 else a1) + c  # max(a1, a2) + c: the first step's duration, elapsed(1)
        if a2 > a1 or (a2 == a1 and b2 > b1):  # the line on top at i = 0 first
            a1, b1, a2, b2 = a2, b2, a1, b1
        self._top = (a1, b1, a2, b2)
        # The other line overtakes from step ceil(x) on (x = inf: never).
        if b2 <= b1:
            self._x = math.inf
            self._cx = 0
        else:
            x = self._x = (a1 - a2) / (b2 - b1)
            cx = math.ceil(x) if math.isfinite(x) else 0
            self._cx = cx if cx > 0 else 0  # max(0, ceil(x))

    def duration(self, i: int) -> float:
        return max(self.a1 + self.b1 * i, self.a2 + self.b2 * i) + self.c

    def elapsed(self, m: int) -> float:
        """Sum of the first m durations."""
        if m <= 0:
            return 0.0
        a1, b1, a2, b2 = self._top
        cross = m if not self._x < m else self._cx  # `not x < m` also catches inf and nan
        tot = cross * a1 + b1 * (cross * (cross - 1) / 2)
        if cross < m:
            n = m - cross
            tot += n * a2 + b2 * (n * (cross + m - 1) / 2)
        return tot + m * self.c

    def step_at(self, t: float, k: int) -> int:
        """Smallest j in [0, k) with elapsed(j + 1) >= t: the step in progress at time t after the start."""
        return self.step_end(t, k)[0]

    def step_end(self, t: float, k: int) -> tuple[int, float]:
        """(j, elapsed(j + 1)) for j = step_at(t, k): the step in progress at t and when it ends."""
        # Start from the root of the upper line's quadratic, a close guess, then settle it exactly.
        a = self.first  # max(a1, a2) + c
        b1, b2 = self.b1, self.b2
        b = b2 if b2 > b1 else b1  # max(b1, b2)
        if b > 0:
            # elapsed(m) ~ m*a + b*m*(m-1)/2 = t  =>  b/2 m^2 + (a - b/2) m - t = 0
            p = a - b / 2
            guess = (-p + math.sqrt(p * p + 2 * b * t)) / b
        else:
            guess = t / a if a > 0 else 0.0
        j = int(min(max(guess - 1, 0.0), k - 1)) if math.isfinite(guess) else k - 1
        elapsed = self.elapsed
        e = elapsed(j + 1)
        if e >= t:
            while j > 0:
                e0 = elapsed(j)
                if e0 < t:
                    break
                j -= 1
                e = e0
        else:
            while j < k - 1:
                j += 1
                e = elapsed(j + 1)
                if e >= t:
                    break
        return j, e

    def params(self) -> tuple[float, float, float, float, float]:
        return self._params


class CostModel(Protocol):
    kv_capacity_tokens: int

    def step_time(self, f: StepFeatures) -> float: ...

    def decode_run(self, f: StepFeatures) -> DecodeRun:
        """The durations of decode-only steps of shape f, then decode_ctx growing by decode_seqs per step."""
        ...


# ---- profiles -------------------------------------------------------------------------------

@dataclass(frozen=True)
class DeviceSpec:
    key: str
    name: str
    memory_gib: float
    peak_tflops: float
    mem_bw_gbs: float
    link_bw_gbs: float
    compute_efficiency: float
    bandwidth_efficiency: float
    step_overhead_s: float
    allreduce_latency_s: float


@dataclass(frozen=True)
class ModelSpec:
    key: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    bytes_per_param: float = 2
    kv_bytes: float = 2

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def params_per_layer(self) -> int:
        h, kvd = self.hidden, self.kv_heads * self.head_dim
        return h * h * 2 + h * kvd * 2 + 3 * h * self.intermediate + 2 * h

    @property
    def params(self) -> int:
        return self.layers * self.params_per_layer + 2 * self.vocab * self.hidden + self.hidden

    @property
    def kv_bytes_per_token(self) -> float:
        return 2 * self.layers * self.kv_heads * self.head_dim * self.kv_bytes


def _load_table(name: str) -> dict:
    with resources.files("sim.profiles").joinpath(name).open("rb") as f:
        return tomllib.load(f)


def device_names() -> list[str]:
    return sorted(_load_table("devices.toml"))


def model_names() -> list[str]:
    return sorted(_load_table("models.toml"))


def profile_names() -> list[str]:
    return [f"{m}@{d}" for m in model_names() for d in device_names()]


def load_device(key: str) -> DeviceSpec:
    t = _load_table("devices.toml")
    if key not in t:
        raise ValueError(f"unknown device '{key}'; valid: {', '.join(sorted(t))}")
    return DeviceSpec(key=key, **t[key])


def load_model(key: str) -> ModelSpec:
    t = _load_table("models.toml")
    if key not in t:
        raise ValueError(f"unknown model '{key}'; valid: {', '.join(sorted(t))}")
    return ModelSpec(key=key, **t[key])


class AnalyticCost:
    """Roofline per step: max(FLOPs / achieved compute, bytes / achieved bandwidth) + overheads."""

    def __init__(self, model: ModelSpec, device: DeviceSpec, tp: int = 1, gpu_memory_utilization: float = 0.9,
                 activation_reserve_gib: float = 2.0):
        if tp < 1 or tp & (tp - 1):
            raise ValueError(f"tp={tp} is out of range; allowed: a power of two >= 1")
        if model.heads % tp or model.kv_heads % tp and tp % model.kv_heads:
            raise ValueError(f"tp={tp} does not divide the model's {model.heads} attention heads")
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization={gpu_memory_utilization} is out of range; allowed: (0, 1]")
        self.model, self.device, self.tp = model, device, tp
        m, d = model, device
        self.name = f"{m.key}@{d.key}" + (f" tp={tp}" if tp > 1 else "")
        weight_bytes = m.params * m.bytes_per_param
        budget = tp * (d.memory_gib * gpu_memory_utilization - activation_reserve_gib) * 2**30
        kv_bytes = budget - weight_bytes
        if kv_bytes <= 0:
            raise ValueError(
                f"{m.key} ({weight_bytes / 2**30:.1f} GiB of weights) does not fit on {tp} x {d.key} "
                f"({d.memory_gib} GiB each at gpu_memory_utilization={gpu_memory_utilization}); raise tp")
        self.kv_capacity_tokens = int(kv_bytes // m.kv_bytes_per_token)
        flops_rate = tp * d.peak_tflops * 1e12 * d.compute_efficiency
        bw_rate = tp * d.mem_bw_gbs * 1e9 * d.bandwidth_efficiency
        nonembed = m.layers * m.params_per_layer
        attn_dim = m.heads * m.head_dim
        # time = max(c_tok*tokens + c_log*logits + c_att*attn, b_w + b_tok*tokens + b_ctx*ctx) + overhead
        self._c_tok = 2 * nonembed / flops_rate
        self._c_log = 2 * m.hidden * m.vocab / flops_rate
        self._c_att = 4 * m.layers * attn_dim / flops_rate
        self._b_w = weight_bytes / bw_rate
        self._b_tok = m.kv_bytes_per_token / bw_rate  # KV written
        self._b_ctx = m.kv_bytes_per_token / bw_rate  # KV read
        self._overhead = d.step_overhead_s
        if tp > 1:
            ring = 2 * (tp - 1) / tp
            self._ar_tok = 2 * m.layers * ring * m.hidden * m.bytes_per_param / (d.link_bw_gbs * 1e9)
            self._ar_fixed = 2 * m.layers * d.allreduce_latency_s
        else:
            self._ar_tok = self._ar_fixed = 0.0

    def step_time(self, f: StepFeatures) -> float:
        tokens = f.prefill_tokens + f.decode_seqs
        # Prefill attention reads the chunk's context once per chunk; decode reads each context once.
        compute = self._c_tok * tokens + self._c_log * f.logits + self._c_att * (f.prefill_attn + f.decode_ctx)
        memory = self._b_w + self._b_tok * tokens + self._b_ctx * f.decode_ctx
        return max(compute, memory) + self._overhead + self._ar_fixed + self._ar_tok * tokens

    def decode_run(self, f: StepFeatures) -> DecodeRun:
        tokens = f.prefill_tokens + f.decode_seqs
        b = f.decode_seqs
        a1 = self._c_tok * tokens + self._c_log * f.logits + self._c_att * (f.prefill_attn + f.decode_ctx)
        a2 = self._b_w + self._b_tok * tokens + self._b_ctx * f.decode_ctx
        return DecodeRun(a1, self._c_att * b, a2, self._b_ctx * b,
                         self._overhead + self._ar_fixed + self._ar_tok * tokens)


def load_cost_model(profile: str, tp: int = 1, gpu_memory_utilization: float = 0.9) -> CostModel:
    """A shipped analytic profile 'MODEL@DEVICE', or a profile file written by `twinfer profile`."""
    if profile.endswith((".toml", ".json")) or Path(profile).is_file():
        from sim.calibrate import load_profile_file  # fitted profiles

        return load_profile_file(profile)
    if "@" not in profile:
        raise ValueError(f"unknown profile '{profile}'; valid: {', '.join(profile_names())}, or a profile file")
    m, d = profile.split("@", 1)
    return AnalyticCost(load_model(m), load_device(d), tp=tp, gpu_memory_utilization=gpu_memory_utilization)
