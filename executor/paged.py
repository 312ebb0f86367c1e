"""Paged KV cache and attention over it, in plain torch (CPU and CUDA alike).

The cache is one preallocated K and one V tensor per layer, shaped
[num_blocks, block_size, n_kv_heads, head_dim]. A sequence's tokens live in
the blocks of its block table (`seq.block_table`, kept by the shared
`BlockManager`): token p is in block `table[p // B]` at offset `p % B`, i.e.
flat slot `table[p // B] * B + p % B`.

A step's flat batch holds prefill chunks first (query positions
[start, start + n) attending causally to everything before plus within the
chunk), then decode tokens (one query each, attending to its whole context).
For every layer `PagedAttention`:

1. writes the batch's new K/V into their slots (so a chunk sees itself);
2. gathers each prefill chunk's blocks and runs one SDPA call per chunk
   (`is_causal` when the chunk starts at position 0, else a bottom-right causal
   mask), with SDPA's own grouped-query support. On CUDA the bottom-right mask
   is torch's `causal_lower_right` bias, never materialised: it runs the flash
   kernel, which takes grouped-query heads. An explicit mask cannot run on flash,
   and with grouped-query heads it falls to a kernel that builds the
   [heads, chunk, context] score matrix (the math one, or cuDNN);
3. gathers the decode tokens' blocks in groups of similar context length
   (padding each group to its longest member, masked) and runs one SDPA call
   per group. There the G query heads sharing a KV head are folded into the
   query-length axis (a view, no K/V copy), so any SDPA kernel that takes a
   mask can run it.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.bias import CausalBias, causal_lower_right

from executor.grouping import group_rows


class PagedKVCache:
    """Per-layer K and V block tensors, plus a reusable gather workspace."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        self.num_layers, self.num_blocks, self.block_size = num_layers, num_blocks, block_size
        self.n_kv_heads, self.head_dim = n_kv_heads, head_dim
        self.dtype, self.device = dtype, torch.device(device)
        shape = (num_blocks, block_size, n_kv_heads, head_dim)
        # Zeros, not empty: padded slots are masked, and garbage NaNs there would still poison softmax.
        self.k = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(num_layers)]
        # Gathered blocks are copied into one buffer reused by every layer and step: a fresh
        # tens-of-MB tensor per call costs page faults on the CPU that rival the copy itself.
        self._ws_k = torch.empty((0, block_size, n_kv_heads, head_dim), dtype=dtype, device=self.device)
        self._ws_v = torch.empty_like(self._ws_k)

    def reserve(self, n_blocks: int) -> int:
        """Grow the gather workspace to hold `n_blocks` blocks now, written once (zeros), so no decode step of
        the run pays for first touching it (on the CPU, tens of MB of fresh pages faulted in mid-step).
        Returns the workspace's capacity in blocks."""
        if n_blocks < 0:
            raise ValueError(f"n_blocks={n_blocks} is out of range; allowed: >= 0")
        if n_blocks > self._ws_k.shape[0]:
            self._ws_k = torch.zeros((n_blocks, *self._ws_k.shape[1:]), dtype=self.dtype, device=self.device)
            self._ws_v = torch.zeros_like(self._ws_k)
        return int(self._ws_k.shape[0])

    @property
    def nbytes(self) -> int:
        return 2 * self.num_layers * self.k[0].numel() * self.k[0].element_size()

    def write(self, layer: int, slots: Tensor, k: Tensor, v: Tensor) -> None:
        """Store k/v [T, n_kv_heads, head_dim] at flat slots [T]."""
        self.k[layer].view(-1, self.n_kv_heads, self.head_dim).index_copy_(0, slots, k)
        self.v[layer].view(-1, self.n_kv_heads, self.head_dim).index_copy_(0, slots, v)

    def gather(self, layer: int, block_ids: Tensor) -> tuple[Tensor, Tensor]:
        """K and V of `block_ids` [N], each [N * block_size, n_kv_heads, head_dim] (valid until the next gather)."""
        n = block_ids.shape[0]
        if n > self._ws_k.shape[0]:
            cap = max(n, 2 * self._ws_k.shape[0])
            self._ws_k = torch.empty((cap, *self._ws_k.shape[1:]), dtype=self.dtype, device=self.device)
            self._ws_v = torch.empty_like(self._ws_k)
        k, v = self._ws_k[:n], self._ws_v[:n]
        torch.index_select(self.k[layer], 0, block_ids, out=k)
        torch.index_select(self.v[layer], 0, block_ids, out=v)
        return k.view(-1, self.n_kv_heads, self.head_dim), v.view(-1, self.n_kv_heads, self.head_dim)


@dataclass(slots=True)
class _Prefill:
    start: int  # rows [start, end) of the flat batch
    end: int
    context: int  # keys visible to the chunk's last token (= its start position + n)
    block_ids: Tensor  # [ceil(context / B)]
    # [n, context] additive, or torch's lower-right causal bias (CUDA); None when the chunk starts at 0
    mask: Tensor | CausalBias | None


@dataclass(slots=True)
class _DecodeGroup:
    start: int  # rows [start, end) of the flat batch, one decode token each
    end: int
    blocks_per_row: int
    block_ids: Tensor  # [rows * blocks_per_row], short tables padded with their own first block
    mask: Tensor  # [rows, 1, 1, blocks_per_row * B] additive


class PagedAttention:
    """The attention of one step's flat batch over the paged cache (an `AttentionFn`).

    prefills: (block_table, start position, n tokens) per chunk, in batch order;
    decodes: (block_table, context length incl. the new token) per decode token, after them.
    Decode groups are formed from consecutive rows, so sorting decodes by context length
    (longest first) makes them tighter; any order is correct.
    `lower_right_bias`: mask chunks that start past position 0 with torch's `causal_lower_right`
    bias instead of an explicit mask; None (the default) does so on CUDA only (module doc). The
    CPU keeps the explicit mask its profiles were measured with.
    """

    def __init__(self, cache: PagedKVCache, n_heads: int, prefills: Seq[tuple[Seq[int], int, int]],
                 decodes: Seq[tuple[Seq[int], int]], lower_right_bias: bool | None = None):
        self.cache = cache
        if lower_right_bias is None:
            lower_right_bias = cache.device.type == "cuda"
        bs, dev, dt = cache.block_size, cache.device, cache.dtype
        self.group = n_heads // cache.n_kv_heads
        self.n_heads = n_heads
        positions: list[np.ndarray] = []
        slots: list[np.ndarray] = []
        self.prefills: list[_Prefill] = []
        row = 0
        for table, start, n in prefills:
            ctx = start + n
            nb = -(-ctx // bs)
            if nb > len(table):
                raise ValueError(f"block table has {len(table)} blocks, chunk reaches token {ctx}")
            tab = np.asarray(table[:nb], dtype=np.int64)
            pos = np.arange(start, ctx, dtype=np.int64)
            positions.append(pos)
            slots.append(tab[pos // bs] * bs + pos % bs)
            mask: Tensor | CausalBias | None = None
            if start and lower_right_bias:
                mask = causal_lower_right(n, ctx)
            elif start:
                key = torch.arange(ctx, device=dev)
                qpos = torch.arange(start, ctx, device=dev)
                mask = _additive(key[None, :] <= qpos[:, None], dt)
            self.prefills.append(_Prefill(row, row + n, ctx, _to(tab, dev), mask))
            row += n
        self.num_prefill_tokens = row
        self.decode_groups: list[_DecodeGroup] = []
        if decodes:
            ctxs = np.array([c for _, c in decodes], dtype=np.int64)
            pos = ctxs - 1
            positions.append(pos)
            for (table, ctx), p in zip(decodes, pos):
                if -(-ctx // bs) > len(table):
                    raise ValueError(f"block table has {len(table)} blocks, decode reaches token {ctx}")
                slots.append(np.array([table[p // bs] * bs + p % bs], dtype=np.int64))
            nblk = -(-ctxs // bs)
            for lo, hi in group_rows(nblk.tolist(), bs):
                nb = int(nblk[lo:hi].max())
                ids = np.empty((hi - lo, nb), dtype=np.int64)
                for r, ((table, _), k) in enumerate(zip(decodes[lo:hi], nblk[lo:hi].tolist())):
                    ids[r, :k] = table[:k]
                    ids[r, k:] = table[0]
                key = torch.arange(nb * bs, device=dev)
                valid = key[None, :] < _to(ctxs[lo:hi], dev)[:, None]
                self.decode_groups.append(_DecodeGroup(row + lo, row + hi, nb, _to(ids.reshape(-1), dev),
                                                       _additive(valid, dt)[:, None, None, :]))
        self.num_tokens = row + len(decodes)
        self.positions = _to(np.concatenate(positions) if positions else np.zeros(0, np.int64), dev)
        self.slots = _to(np.concatenate(slots) if slots else np.zeros(0, np.int64), dev)

    def __call__(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        cache, g = self.cache, self.group
        kvh, hd = cache.n_kv_heads, cache.head_dim
        cache.write(layer, self.slots, k, v)
        out = torch.empty_like(q)
        for c in self.prefills:
            kc, vc = cache.gather(layer, c.block_ids)
            # [1, heads, tokens, head_dim]: the 4-D layout SDPA's fused GPU kernels require.
            qc = q[c.start:c.end].transpose(0, 1)[None]
            kc, vc = kc[:c.context].transpose(0, 1)[None], vc[:c.context].transpose(0, 1)[None]
            o = F.scaled_dot_product_attention(qc, kc, vc, attn_mask=c.mask, is_causal=c.mask is None,
                                               enable_gqa=g > 1)
            out[c.start:c.end] = o[0].transpose(0, 1)
        for d in self.decode_groups:
            rows = d.end - d.start
            qg = q[d.start:d.end].view(rows, kvh, g, hd)
            kc, vc = cache.gather(layer, d.block_ids)
            kc = kc.view(rows, -1, kvh, hd).transpose(1, 2)
            vc = vc.view(rows, -1, kvh, hd).transpose(1, 2)
            o = F.scaled_dot_product_attention(qg, kc, vc, attn_mask=d.mask)
            out[d.start:d.end] = o.reshape(rows, self.n_heads, hd)
        return out


def _additive(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, torch.tensor(float("-inf"), dtype=dtype, device=allowed.device))


def _to(a: np.ndarray, device: torch.device) -> Tensor:
    t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))
    return t if device.type == "cpu" else t.to(device, non_blocking=True)
