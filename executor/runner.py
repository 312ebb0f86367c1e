"""Executes one StepPlan on the model: the executor's counterpart of the simulator's cost model.

    runner.run(plan)                      # forward pass, K/V into the cache, one token per finished step
    scheduler.update(plan, start, end)    # the shared scheduler then advances the counters

`run` reads each sequence's state as the scheduler left it (num_computed,
block_table, tokens) and changes only `seq.tokens` (it appends the sampled
id); the counters stay the scheduler's. Call `run` before `update`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from executor import hostmem
from executor.model import LlamaForCausalLM, ModelConfig
from executor.paged import PagedAttention, PagedKVCache
from policies.plan import StepPlan
from policies.sequence import Sequence

_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 is greedy. Otherwise each token is drawn with its own generator seeded from
    (seed, request id, token index), so a request's tokens do not depend on how it was batched."""

    temperature: float = 0.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    seed: int = 0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"sampling.temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"sampling.top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"sampling.top_p must be in (0, 1], got {self.top_p}")


def token_seed(seed: int, request_id: int, index: int) -> int:
    """A stable 63-bit seed for one sampled token (splitmix64 over the three keys)."""
    x = seed & _MASK64
    for v in (request_id, index):
        x = ((x ^ (v & _MASK64)) + 0x9E3779B97F4A7C15) & _MASK64
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
        x ^= x >> 31
    return x >> 1


def default_num_threads() -> int:
    """Cores this process may run on (its affinity mask), not the machine's core count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def kv_block_bytes(cfg: ModelConfig, block_size: int) -> int:
    """Bytes of one KV block across all layers (K and V)."""
    return block_size * cfg.kv_bytes_per_token()


class ModelRunner:
    """A model, its paged KV cache, and a sampler.

    On the CPU it sets torch's intra-op thread count (a process-wide setting) to `num_threads`,
    by default every core in this process's affinity mask. `host_memory` ("retain", the default, or
    "system") sets this process's C allocator (executor.hostmem, also process-wide): "retain" keeps
    freed activation memory for the next step instead of faulting it in again.
    """

    def __init__(self, model: LlamaForCausalLM, num_blocks: int, block_size: int,
                 device: torch.device | str | None = None, sampling: SamplingParams = SamplingParams(),
                 num_threads: int | None = None, host_memory: str = "retain"):
        self.host_memory = hostmem.configure(host_memory)  # before the cache and the first step allocate
        self.device = torch.device(device) if device is not None else model.device
        if model.device != self.device:
            model = model.to(self.device)
        self.model = model.eval()
        self.cfg = model.cfg
        self.block_size = block_size
        # PagedAttention's mask for prefill chunks past position 0: None picks per device (executor.paged).
        self.lower_right_bias: bool | None = None
        self.num_blocks = num_blocks
        self.sampling = sampling
        self.num_threads = num_threads or default_num_threads()
        if self.device.type == "cpu":
            torch.set_num_threads(self.num_threads)
        if self.device.type == "cuda":
            # Process-wide, like the thread count: scaled_dot_product_attention's cuDNN backend builds an
            # execution plan for every new (query length, key length) pair, about 6 ms of CPU per call on an
            # H100 (torch.profiler: aten::_cudnn_attention_forward). A serving loop's prefill chunks and
            # contexts differ every step, so its prefills ran 4 x the same shapes repeated in a profile grid
            # (experiments/diag_prefill_serving.py). Flash / memory-efficient / math take any shape as is.
            torch.backends.cuda.enable_cudnn_sdp(False)
        with torch.inference_mode():
            self.cache = PagedKVCache(self.cfg.layers, num_blocks, block_size, self.cfg.kv_heads,
                                      self.cfg.head_dim, self.cfg.torch_dtype, self.device)

    @torch.inference_mode()
    def run(self, plan: StepPlan) -> None:
        """Compute the plan's tokens; append one sampled id to each sequence whose step completes it."""
        if plan.empty:
            return
        ids: list[int] = []
        prefills: list[tuple[list[int], int, int]] = []
        decodes: list[tuple[list[int], int]] = []
        rows: list[int] = []  # flat-batch rows whose logits are needed
        out: list[Sequence] = []
        for seq, n in zip(plan.prefill, plan.prefill_tokens):
            toks = self._tokens(seq)
            start = seq.num_computed
            if n < 1 or start + n > seq.num_tokens:
                raise ValueError(f"request {seq.id}: chunk [{start}, {start + n}) outside its {seq.num_tokens} tokens")
            ids.extend(toks[start:start + n])
            prefills.append((seq.block_table, start, n))
            if start + n == seq.num_tokens:
                rows.append(len(ids) - 1)
                out.append(seq)
        # Longest context first, so decode groups of similar length are contiguous (see paged.py).
        for seq in sorted(plan.decode, key=lambda s: -s.num_computed):
            toks = self._tokens(seq)
            p = seq.num_computed
            if p != seq.num_tokens - 1:
                raise ValueError(f"request {seq.id}: decode with {seq.num_tokens - p} pending tokens")
            ids.append(toks[p])
            decodes.append((seq.block_table, p + 1))
            rows.append(len(ids) - 1)
            out.append(seq)
        longest = max([s + n for _, s, n in prefills] + [c for _, c in decodes])
        if longest > self.cfg.max_position:
            raise ValueError(f"a sequence reaches position {longest - 1}; model max_position={self.cfg.max_position}")
        attn = PagedAttention(self.cache, self.cfg.heads, prefills, decodes, self.lower_right_bias)
        input_ids = torch.from_numpy(np.asarray(ids, dtype=np.int64)).to(self.device)
        hidden = self.model(input_ids, attn.positions, attn)
        if out:
            sel = torch.tensor(rows, dtype=torch.long, device=self.device)
            new = self.sample(self.model.logits(hidden.index_select(0, sel)), out)
            for seq, t in zip(out, new):
                seq.tokens.append(t)

    def _tokens(self, seq: Sequence) -> list[int]:
        toks = seq.tokens
        if toks is None:
            raise ValueError(f"request {seq.id} has no token ids: add it through Engine.add (or set seq.tokens)")
        if len(toks) != seq.num_tokens:
            raise ValueError(f"request {seq.id} holds {len(toks)} token ids but num_tokens={seq.num_tokens}: "
                             "call scheduler.update(plan, ...) after each run(plan)")
        return toks

    def sample(self, logits: Tensor, seqs: list[Sequence]) -> list[int]:
        """One token id per row of logits [N, vocab]; row i belongs to seqs[i]."""
        sp = self.sampling
        if sp.temperature == 0:
            return logits.argmax(dim=-1).tolist()
        x = logits / sp.temperature
        if sp.top_k and sp.top_k < x.shape[-1]:
            kth = x.topk(sp.top_k, dim=-1).values[:, -1:]
            x = x.masked_fill(x < kth, float("-inf"))
        if sp.top_p < 1:
            sx, idx = x.sort(dim=-1, descending=True)
            p = sx.softmax(dim=-1)
            drop = p.cumsum(dim=-1) - p > sp.top_p  # keep the smallest head whose mass reaches top_p
            x = torch.empty_like(x).scatter_(-1, idx, sx.masked_fill(drop, float("-inf")))
        probs = x.softmax(dim=-1)
        # Exponential race: argmax p_i / E_i with E_i ~ Exp(1) draws i with probability p_i.
        race = torch.empty_like(probs)
        for i, seq in enumerate(seqs):
            g = torch.Generator(device=probs.device).manual_seed(token_seed(sp.seed, seq.id, seq.num_generated))
            race[i].exponential_(generator=g)
        return (probs / race).argmax(dim=-1).tolist()
