"""The engine on the shared scheduler: a request's tokens do not depend on how it was served.

Exact-token comparisons run the tiny model in float64, so that no argmax can flip on a
last-bit difference between batch shapes (a float32 property of the hardware's kernels,
not of this code); the logits of every sampled token are compared too.
"""

from __future__ import annotations

from dataclasses import replace
from functools import cache

import numpy as np
import pytest
import torch

from executor.engine import Engine
from executor.model import LlamaForCausalLM, preset
from executor.runner import ModelRunner, SamplingParams
from policies.scheduler import ContinuousBatchingScheduler, DynamicBatchScheduler, SchedulerConfig
from policies.sequence import Sequence
from traces.workload import Request

BS = 8


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@cache
def _model(dtype: str) -> LlamaForCausalLM:
    return LlamaForCausalLM.from_seed(preset("tiny", dtype=dtype), seed=11)


class RecordingRunner(ModelRunner):
    """Keeps the logits each token was sampled from, keyed by (request id, token index)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.seen: dict[tuple[int, int], torch.Tensor] = {}

    def sample(self, logits, seqs):
        for row, s in zip(logits, seqs):
            key = (s.id, s.num_generated)
            assert key not in self.seen, f"token {key} sampled twice"
            self.seen[key] = row.clone()
        return super().sample(logits, seqs)


def _engine(dtype: str = "float64", num_blocks: int = 256, sampling: SamplingParams | None = None,
            **sched) -> Engine:
    runner = RecordingRunner(_model(dtype), num_blocks, BS, sampling=sampling or SamplingParams(), num_threads=1)
    cfg = SchedulerConfig(block_size=BS, **sched)
    return Engine(runner, ContinuousBatchingScheduler(cfg, num_blocks))


def _outputs(seqs: list[Sequence]) -> dict[int, list[int]]:
    for s in seqs:
        assert s.outcome == "ok", (s, s.reason)
        assert len(s.tokens) == s.req.input_tokens + s.req.output_tokens
    return {s.id: s.tokens[s.req.input_tokens:] for s in seqs}


def _same_logits(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k, v in a.items():
        torch.testing.assert_close(v, b[k], atol=1e-9, rtol=1e-9)


REQS = [Request(i, 0.0, n, m) for i, (n, m) in enumerate([(30, 9), (47, 14), (12, 6), (64, 11), (25, 20), (9, 1)])]


@cache
def _alone(dtype: str = "float64") -> tuple[dict, dict]:
    tokens, logits = {}, {}
    for r in REQS:
        e = _engine(dtype)
        tokens.update(_outputs(e.run_offline([r])))
        logits.update(e.runner.seen)
    return tokens, logits


def test_batched_chunked_and_preempted_runs_match_running_alone():
    alone, alone_logits = _alone()
    batched = _engine()
    assert _outputs(batched.run_offline(REQS)) == alone
    _same_logits(batched.runner.seen, alone_logits)
    assert max(r.decode_seqs for r in batched.step_log) >= 4  # really batched

    chunked = _engine(max_num_batched_tokens=8)
    assert _outputs(chunked.run_offline(REQS)) == alone
    _same_logits(chunked.runner.seen, alone_logits)
    assert any(r.prefill_context > r.prefill_tokens for r in chunked.step_log)  # a chunk started mid-prompt

    preempted = _engine(num_blocks=12)  # the longest request alone needs 10 blocks
    seqs = preempted.run_offline(REQS)
    assert _outputs(seqs) == alone
    _same_logits(preempted.runner.seen, alone_logits)
    assert preempted.scheduler.num_preemptions > 0 and any(s.preemptions for s in seqs)


def test_dynamic_batching_scheduler_drives_the_same_engine():
    alone, _ = _alone()
    runner = RecordingRunner(_model("float64"), 256, BS, num_threads=1)
    cfg = SchedulerConfig(kind="dynamic", block_size=BS, max_batch_size=4, max_wait=0.01)
    e = Engine(runner, DynamicBatchScheduler(cfg, 256))
    assert _outputs(e.run_offline(REQS)) == alone
    assert max(r.prefill_seqs for r in e.step_log) == 4


def test_engine_matches_dense_greedy_generation():
    model = _model("float64")
    alone, _ = _alone()
    for r in REQS[:3]:
        s = Sequence(r)
        _engine().add(s, 0.0)  # just to get its prompt ids
        toks = list(s.tokens)
        for _ in range(r.output_tokens):
            toks.append(int(model.reference_logits(toks)[-1].argmax()))
        assert toks[r.input_tokens:] == alone[r.index]


def test_prefix_cache_hit_skips_cached_prefill_and_changes_nothing():
    # Trace blocks of 16 tokens, KV blocks of 8: A and B share two trace blocks = 4 KV blocks.
    a = Request(0, 0.0, 56, 5, block_hashes=(1, 2, 3), hash_block_size=16)
    b = Request(1, 0.0, 60, 7, block_hashes=(1, 2, 4), hash_block_size=16)
    ref = {}
    for r in (a, b):
        e = _engine(prefix_caching=False)
        ref.update(_outputs(e.run_offline([r])))
        ref_logits = e.runner.seen

    e = _engine()
    sa, sb = Sequence(a), Sequence(b)
    e.add(sa, e.now())
    while e.has_work:
        e.step()
    e.add(sb, e.now())
    first = e.step()
    assert first.plan.prefill == [sb] and first.plan.prefill_tokens == [60 - 32]
    while e.has_work:
        e.step()
    assert sa.num_cached_tokens == 0 and sb.num_cached_tokens == 32
    assert sa.tokens[:32] == sb.tokens[:32] and sa.tokens[32:48] != sb.tokens[32:48]
    assert _outputs([sa, sb]) == ref
    _same_logits({k: v for k, v in e.runner.seen.items() if k[0] == 1}, ref_logits)
    assert e.step_log[-1].start > e.step_log[0].start


def test_engine_generates_exactly_the_requested_output_tokens():
    reqs = [Request(i, 0.0, n, m) for i, (n, m) in enumerate([(5, 1), (33, 2), (17, 40), (80, 3), (1, 7)])]
    e = _engine("float32", max_num_batched_tokens=32)
    for r in reqs:
        e.add(Sequence(r, now=0.0), 0.0)
    streamed: dict[int, list[int]] = {r.index: [] for r in reqs}
    finished = []
    while e.has_work:
        out = e.step()
        assert out.end >= out.start
        for s, t in out.tokens:
            streamed[s.id].append(t)
        finished += out.finished
    assert sorted(s.id for s in finished) == [r.index for r in reqs]
    for s in finished:
        assert s.outcome == "ok" and s.num_generated == s.req.output_tokens
        assert streamed[s.id] == s.tokens[s.req.input_tokens:]
        assert len(streamed[s.id]) == s.req.output_tokens
        assert s.t_admitted <= s.t_first_token <= s.t_finish
    # Every computed token is in the step log once: whole prompts, then all but the last output.
    t = e.step_table()
    assert int((t["prefill_tokens"] + t["decode_seqs"]).sum()) == sum(r.input_tokens + r.output_tokens - 1
                                                                     for r in reqs)
    assert int(t["sampled"].sum()) == sum(r.output_tokens for r in reqs)
    assert (t["duration"] > 0).all() and (t["duration"] >= t["schedule_s"]).all()
    assert (t["start"][1:] > t["start"][:-1]).all()
    # This process's page faults and kernel time per step (getrusage), for telling allocator churn apart
    assert t["minor_faults"].dtype == np.int64 and (t["minor_faults"] >= 0).all()
    assert t["kernel_s"].dtype == np.float64 and (t["kernel_s"] >= 0).all()
    assert t["kernel_s"].sum() <= t["duration"].sum() * torch.get_num_threads() + 0.05  # 10 ms clock ticks


def test_step_log_counts_the_page_faults_of_a_step_that_touches_new_memory(monkeypatch):
    """A step whose forward pass writes 32 MiB of never-touched memory faults it in, and the step log says
    so; the same step on memory the process already holds does not."""
    e = _engine()
    fresh: list[torch.Tensor] = []
    run = e.runner.run

    def run_and_touch(plan):
        run(plan)
        if fresh:
            fresh.pop().fill_(1.0)  # first touch of an untouched mmap'd block: one fault per page

    monkeypatch.setattr(e.runner, "run", run_and_touch)
    import mmap

    n = (32 << 20) // 4
    buf = mmap.mmap(-1, n * 4)  # anonymous, untouched: no allocator can hand back pages it already holds
    fresh.append(torch.frombuffer(buf, dtype=torch.float32, count=n))
    e.add(Sequence(REQS[0]), 0.0)
    e.step()
    e.step()  # nothing new touched
    t = e.step_table()
    assert t["minor_faults"][0] >= 32 << 20 >> 21  # at least one per 2 MiB (huge pages), 8192 with 4 KiB pages
    assert t["minor_faults"][1] < t["minor_faults"][0] / 4


def test_seeded_sampling_does_not_depend_on_batching():
    sp = SamplingParams(temperature=0.9, top_k=50, top_p=0.95, seed=3)
    alone = {}
    for r in REQS:
        alone.update(_outputs(_engine(sampling=sp).run_offline([r])))
    assert _outputs(_engine(sampling=sp, max_num_batched_tokens=16).run_offline(REQS)) == alone
    greedy, _ = _alone()
    other = _outputs(_engine(sampling=replace(sp, seed=4)).run_offline(REQS))
    assert alone != greedy and alone != other


def test_requests_beyond_the_models_positions_are_rejected():
    e = _engine()
    ok, too_long = Request(0, 0.0, 10, 3), Request(1, 0.0, 1000, 30)
    seqs = e.run_offline([ok, too_long])
    assert seqs[0].outcome == "ok"
    assert seqs[1].outcome == "rejected" and "max_position" in seqs[1].reason


def test_runner_refuses_a_plan_applied_twice():
    e = _engine()
    s = Sequence(REQS[0])
    e.add(s, 0.0)
    plan = e.scheduler.schedule(0.0)
    e.runner.run(plan)
    with pytest.raises(ValueError, match="scheduler.update"):
        e.runner.run(plan)


def test_engine_and_scheduler_must_agree_on_blocks():
    runner = ModelRunner(_model("float32"), 16, BS, num_threads=1)
    with pytest.raises(ValueError, match="block_size"):
        Engine(runner, ContinuousBatchingScheduler(SchedulerConfig(block_size=16), 16))
    with pytest.raises(ValueError, match="KV blocks"):
        Engine(runner, ContinuousBatchingScheduler(SchedulerConfig(block_size=BS), 32))


def test_step_log_counts_the_breaks_in_the_decode_rows_block_tables():
    """decode_breaks in the step log: per step, the decode rows' blocks (up to their context) that do not
    follow their predecessor in the cache, as the tables stood when the step ran. Sequences that grow a
    block at a time beside each other interleave their blocks; one sequence alone never breaks."""
    from executor.grouping import table_breaks

    def run(reqs):
        e = _engine("float32", num_blocks=128, max_num_batched_tokens=64)
        seen = []
        inner = e.runner.run

        def run_and_look(plan):
            seen.append(sum(table_breaks(s.block_table, (s.num_computed + BS) // BS) for s in plan.decode))
            return inner(plan)

        e.runner.run = run_and_look
        _outputs(e.run_offline(reqs))
        return e.step_table()["decode_breaks"].tolist(), seen

    logged, seen = run([Request(0, 0.0, 20, 60)])
    assert logged == seen and max(logged) == 0
    logged, seen = run([Request(i, 0.0, 20 + 9 * i, 70) for i in range(4)])
    assert logged == seen and max(logged) > 0
