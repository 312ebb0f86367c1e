"""The boundary between a scheduler and whatever executes a step.

A `StepPlan` says which sequences compute how many tokens this step. The
simulator hands it to a cost model (which predicts the step's duration); the
executor hands it to torch. Neither changes it.
"""

from __future__ import annotations

from policies.sequence import Sequence


class StepPlan:
    __slots__ = ("prefill", "prefill_tokens", "decode", "preempted", "decode_ctx", "min_left")

    def __init__(self) -> None:
        # Sequences computing prompt (or recomputed) tokens this step, and how many each.
        # seq.num_computed is the position of the first token of its chunk.
        self.prefill: list[Sequence] = []
        self.prefill_tokens: list[int] = []
        # Sequences computing exactly one token (their last sampled one).
        self.decode: list[Sequence] = []
        # Sequences preempted while building this plan (blocks freed, back to waiting).
        self.preempted: list[Sequence] = []
        # Sum over `decode` of their context length including the new token (num_computed + 1), summed by
        # the scheduler as it plans them (it reads each anyway); -1 when whoever built the plan did not.
        self.decode_ctx = -1
        # The fewest output tokens any of `decode` has left to generate (1 << 62 if none), found by the
        # scheduler as it plans them; -1 when whoever built the plan did not.
        self.min_left = -1

    @property
    def empty(self) -> bool:
        return not self.prefill and not self.decode

    @property
    def num_prefill_tokens(self) -> int:
        return sum(self.prefill_tokens)

    @property
    def num_tokens(self) -> int:
        return sum(self.prefill_tokens) + len(self.decode)

    @property
    def num_seqs(self) -> int:
        return len(self.prefill) + len(self.decode)
