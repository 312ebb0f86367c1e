"""Deterministic prompt token ids for trace requests.

Traces record token counts, not ids. The executor still needs ids, and they
must make prefix caching real: two requests whose trace block hashes agree
must start with identical tokens, so the KV blocks one of them computed are
valid for the other. So:

- a prompt token covered by the trace hashes (position p < len(block_hashes) *
  hash_block_size) gets an id from (block_hashes[p // hbs], p % hbs);
- every other prompt token gets an id from (request index, p).

Ids come from a stable 64-bit mix (splitmix64), never from Python's salted
`hash`, so they are the same in every process and on every machine.
"""

from __future__ import annotations

import numpy as np

from traces.workload import Request

_MASK64 = (1 << 64) - 1
# Domain tags keep trace-derived ids and request-derived ids from sharing a stream.
_TRACE_DOMAIN = 0x7472616365626C6B  # "traceblk"
_REQUEST_DOMAIN = 0x7265717565737421  # "request!"


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer over a uint64 array (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def _ids(keys: np.ndarray, offsets: np.ndarray, vocab: int) -> np.ndarray:
    with np.errstate(over="ignore"):
        h = _mix(_mix(keys) + offsets.astype(np.uint64))
    return (h % np.uint64(vocab)).astype(np.int64)


def prompt_tokens(req: Request, vocab: int) -> list[int]:
    """The request's prompt as `req.input_tokens` ids in [0, vocab)."""
    if vocab < 1:
        raise ValueError(f"vocab must be >= 1, got {vocab}")
    n = req.input_tokens
    hbs = req.hash_block_size
    covered = min(n, len(req.block_hashes) * hbs) if req.block_hashes and hbs > 0 else 0
    out = np.empty(n, dtype=np.int64)
    if covered:
        pos = np.arange(covered, dtype=np.int64)
        block_keys = np.array([(int(b) ^ _TRACE_DOMAIN) & _MASK64 for b in req.block_hashes], dtype=np.uint64)
        out[:covered] = _ids(block_keys[pos // hbs], pos % hbs, vocab)
    if covered < n:
        pos = np.arange(covered, n, dtype=np.int64)
        key = np.full(n - covered, (req.index ^ _REQUEST_DOMAIN) & _MASK64, dtype=np.uint64)
        out[covered:] = _ids(key, pos, vocab)
    return out.tolist()
