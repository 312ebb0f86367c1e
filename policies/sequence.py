"""A request's mutable serving state: it owns its own counters.

Token accounting (as in vLLM): a sequence holds `num_tokens = input + generated`
tokens; `num_computed` of them have KV in the cache. A step computes tokens
[num_computed, num_computed + n). When a step brings num_computed up to
num_tokens, the engine samples one new token (generated += 1). Decode is the
case n == 1. The last generated token's KV is never computed.
"""

from __future__ import annotations

import enum

from traces.workload import Request


class SeqStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    FINISHED = 2


_WAITING = SeqStatus.WAITING  # (a global: reading an enum member off its class is slow in Python 3.11)


class Sequence:
    __slots__ = (
        "req", "status", "num_computed", "num_generated", "block_table", "num_cached_tokens",
        "num_hashed_blocks", "preemptions", "t_arrival", "t_admitted", "t_first_token",
        "t_last_token", "t_finish", "replica", "tokens", "order", "outcome", "reason", "hashes", "kv_breaks",
    )

    def __init__(self, req: Request, now: float | None = None):
        self.req = req
        self.status = _WAITING
        self.num_computed = 0
        self.num_generated = 0
        self.block_table: list[int] = []
        self.num_cached_tokens = 0  # prompt tokens served from the prefix cache at (first) admission
        self.num_hashed_blocks = 0  # leading blocks of block_table registered in the prefix cache
        self.preemptions = 0
        self.t_arrival = req.arrival if now is None else now  # intended send time
        self.t_admitted: float | None = None
        self.t_first_token: float | None = None
        self.t_last_token: float | None = None
        self.t_finish: float | None = None
        self.replica = -1
        self.tokens: list[int] | None = None  # real token ids (executor only)
        self.order = req.index  # tie-breaker for queues
        self.outcome = ""  # terminal: "ok", "rejected", "timed_out" or "failed"
        self.reason = ""
        self.hashes: list[int] | None = None  # chained prefix hashes of its full prompt blocks (lazy)
        # (block_table, blocks counted, breaks among them): executor.grouping.decode_breaks' cache
        self.kv_breaks: tuple[list[int], int, int] | None = None

    @property
    def id(self) -> int:
        return self.req.index

    @property
    def num_tokens(self) -> int:
        return self.req.input_tokens + self.num_generated

    @property
    def remaining_output(self) -> int:
        return self.req.output_tokens - self.num_generated

    @property
    def is_prefill(self) -> bool:
        return self.num_tokens - self.num_computed > 1 or self.num_generated == 0

    def __repr__(self) -> str:
        return (f"Sequence(id={self.id}, status={self.status.name}, computed={self.num_computed}, "
                f"generated={self.num_generated}/{self.req.output_tokens}, blocks={len(self.block_table)})")
