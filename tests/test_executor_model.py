"""The executor's model and paged attention: paged == dense reference, checkpoints round-trip."""

from __future__ import annotations

import json
import random
from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.attention.bias import CausalBias

from executor.grouping import group_rows
from executor.model import (
    LlamaForCausalLM,
    ModelConfig,
    RopeScaling,
    preset,
    rope_inv_freq,
)
from executor.paged import PagedAttention, PagedKVCache


@pytest.fixture(autouse=True)
def _one_thread():
    # One thread: fast enough for the tiny model, and immune to other processes on a small machine.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _tokens(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(vocab) for _ in range(n)]


@pytest.mark.parametrize("kv_heads", [2, 4, 1])
@pytest.mark.parametrize("lower_right_bias", [False, True], ids=["explicit-mask", "causal-lower-right"])
def test_paged_attention_matches_dense_reference_on_a_mixed_batch(kv_heads, lower_right_bias):
    # lower_right_bias is what CUDA runs for chunks past position 0 (torch's causal_lower_right bias, the
    # flash kernel there); on the CPU torch materialises it, which checks that it masks what the explicit
    # mask does.
    cfg = preset("tiny", kv_heads=kv_heads)
    model = LlamaForCausalLM.from_seed(cfg, seed=1)
    bs, num_blocks = 8, 128
    cache = PagedKVCache(cfg.layers, num_blocks, bs, cfg.kv_heads, cfg.head_dim, cfg.torch_dtype, "cpu")
    rng = random.Random(0)
    free = list(range(num_blocks))
    rng.shuffle(free)  # scattered, out-of-order block ids: the addressing must not assume contiguity

    def table(n_tokens: int) -> list[int]:
        return [free.pop() for _ in range(-(-n_tokens // bs))]

    # (name, total tokens, already cached, computed this step); decodes compute 1 token.
    seqs = {
        "fresh": (37, 0, 37),  # a whole prompt from position 0
        "chunk": (45, 20, 25),  # second chunk of a chunked prefill
        "tail": (30, 29, 1),  # a prefill chunk of one token (not a decode)
        "dec_long": (700, 699, 1),  # decodes of very different lengths: split into two groups
        "dec_mid": (50, 49, 1),
        "dec_short": (17, 16, 1),
    }
    toks = {k: _tokens(rng, t, cfg.vocab) for k, (t, _, _) in seqs.items()}
    tables = {k: table(t) for k, (t, _, _) in seqs.items()}

    def step(prefills: list[tuple[str, int, int]], decodes: list[str]) -> torch.Tensor:
        ids = [t for k, s, n in prefills for t in toks[k][s:s + n]] + [toks[k][seqs[k][0] - 1] for k in decodes]
        attn = PagedAttention(cache, cfg.heads, [(tables[k], s, n) for k, s, n in prefills],
                              [(tables[k], seqs[k][0]) for k in decodes], lower_right_bias=lower_right_bias)
        for c in attn.prefills:
            at_zero = c.context == c.end - c.start
            assert (c.mask is None) == at_zero
            assert at_zero or isinstance(c.mask, CausalBias) == lower_right_bias
        with torch.inference_mode():
            return model.logits(model(torch.tensor(ids), attn.positions, attn))

    # Step 1 fills the cache with what step 2 treats as already computed (the long one in two chunks).
    step([(k, 0, c) for k, (_, c, _) in seqs.items() if c and k != "dec_long"] + [("dec_long", 0, 400)], [])
    step([("dec_long", 400, 299)], [])
    prefills = [(k, c, n) for k, (t, c, n) in seqs.items() if not k.startswith("dec")]
    decodes = [k for k in seqs if k.startswith("dec")]
    attn = PagedAttention(cache, cfg.heads, [(tables[k], s, n) for k, s, n in prefills],
                          [(tables[k], seqs[k][0]) for k in decodes])
    assert len(attn.decode_groups) == 2
    got = step(prefills, decodes)

    row = 0
    for k, c, n in prefills:
        ref = model.reference_logits(toks[k])[c:c + n]
        torch.testing.assert_close(got[row:row + n], ref, atol=1e-4, rtol=1e-4)
        row += n
    for k in decodes:
        ref = model.reference_logits(toks[k])[-1]
        torch.testing.assert_close(got[row], ref, atol=1e-4, rtol=1e-4)
        row += 1


def test_decode_groups_bound_padding():
    assert group_rows([], 16) == []
    assert group_rows([5], 16) == [(0, 1)]
    # equal lengths: one group; a long one and many short ones: split
    assert group_rows([10, 10, 10], 16) == [(0, 3)]
    assert group_rows([100, 3, 3, 3], 16) == [(0, 1), (1, 4)]
    blocks = np.array(sorted(np.random.default_rng(0).integers(1, 300, 64), reverse=True))
    for lo, hi in group_rows(blocks.tolist(), 16):
        padded = blocks[lo:hi].max() * (hi - lo)
        useful = blocks[lo:hi].sum()
        assert padded <= 1.25 * useful or (padded - useful) * 16 <= 256 * (hi - lo) or hi - lo == 1


def test_seeded_weights_are_reproducible_and_leave_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = LlamaForCausalLM.from_seed(preset("tiny"), seed=7)
    after = torch.rand(3)
    assert torch.equal(before, after)
    b = LlamaForCausalLM.from_seed(preset("tiny"), seed=7)
    c = LlamaForCausalLM.from_seed(preset("tiny"), seed=8)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["model.layers.0.self_attn.q_proj.weight"], sc["model.layers.0.self_attn.q_proj.weight"])


def test_parameter_names_follow_hf_llama_layout():
    names = set(LlamaForCausalLM.from_seed(preset("tiny")).state_dict())
    assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
            "model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight",
            "model.layers.1.post_attention_layernorm.weight"} <= names
    tied = set(LlamaForCausalLM.from_seed(preset("tiny", tie_embeddings=True)).state_dict())
    assert "lm_head.weight" not in tied
    assert preset("tiny").num_params == sum(p.numel() for p in LlamaForCausalLM.from_seed(preset("tiny")).parameters())


@pytest.mark.parametrize("tied", [False, True])
def test_checkpoint_round_trip_gives_identical_logits(tmp_path, tied):
    cfg = preset("tiny", tie_embeddings=tied)
    model = LlamaForCausalLM.from_seed(cfg, seed=3)
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    loaded = LlamaForCausalLM.from_pretrained(tmp_path)
    assert replace(loaded.cfg, name="x") == replace(cfg, name="x")
    ids = list(range(5, 60))
    assert torch.equal(loaded.reference_logits(ids), model.reference_logits(ids))


def _hf_llama_config(**over) -> dict:
    """What transformers' LlamaConfig(...).to_dict() writes, for the tiny shape."""
    d = {
        "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 1, "eos_token_id": 2, "head_dim": 16, "hidden_act": "silu", "hidden_size": 64,
        "initializer_range": 0.02, "intermediate_size": 128, "max_position_embeddings": 1024, "mlp_bias": False,
        "model_type": "llama", "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 2,
        "pretraining_tp": 1, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 10000.0,
        "tie_word_embeddings": False, "torch_dtype": "float32", "transformers_version": "4.46.0",
        "use_cache": True, "vocab_size": 512,
    }
    d.update(over)
    return d


def test_loads_checkpoint_with_standard_hf_llama_config(tmp_path):
    from safetensors.torch import save_file

    src = LlamaForCausalLM.from_seed(preset("tiny", norm_eps=1e-6), seed=5)
    (tmp_path / "config.json").write_text(json.dumps(_hf_llama_config()))
    state = {k: v.contiguous() for k, v in src.state_dict().items()}
    state["model.rotary_emb.inv_freq"] = rope_inv_freq(src.cfg, torch.device("cpu"))  # old checkpoints carry it
    save_file(state, str(tmp_path / "model.safetensors"))
    loaded = LlamaForCausalLM.from_pretrained(tmp_path)
    assert (loaded.cfg.hidden, loaded.cfg.kv_heads, loaded.cfg.norm_eps, loaded.cfg.tie_embeddings) == (64, 2, 1e-6, False)
    ids = [3, 1, 4, 1, 5, 9, 2, 6]
    assert torch.equal(loaded.reference_logits(ids), src.reference_logits(ids))
    # the dtype can be overridden at load time
    assert LlamaForCausalLM.from_pretrained(tmp_path, dtype="float64").model.norm.weight.dtype == torch.float64


def test_hf_config_refusals_and_missing_tensors(tmp_path):
    with pytest.raises(ValueError, match="hidden_act"):
        ModelConfig.from_hf(_hf_llama_config(hidden_act="gelu"))
    with pytest.raises(ValueError, match="attention_bias"):
        ModelConfig.from_hf(_hf_llama_config(attention_bias=True))
    with pytest.raises(ValueError, match="rope_scaling type"):
        ModelConfig.from_hf(_hf_llama_config(rope_scaling={"rope_type": "yarn", "factor": 4.0}))
    cfg = ModelConfig.from_hf(_hf_llama_config(num_key_value_heads=None))
    assert cfg.kv_heads == 4
    from safetensors.torch import save_file

    (tmp_path / "config.json").write_text(json.dumps(_hf_llama_config()))
    state = LlamaForCausalLM.from_seed(preset("tiny")).state_dict()
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="lacks 1 tensors"):
        LlamaForCausalLM.from_pretrained(tmp_path)


def test_llama3_rope_scaling_bands():
    base = preset("tiny", head_dim_override=128, rope_theta=500000.0)
    scaled = replace(base, rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 8192))
    inv, inv_s = rope_inv_freq(base, torch.device("cpu")), rope_inv_freq(scaled, torch.device("cpu"))
    wavelen = 2 * torch.pi / inv
    assert torch.equal(inv_s[wavelen < 8192 / 4], inv[wavelen < 8192 / 4])  # high frequencies kept
    torch.testing.assert_close(inv_s[wavelen > 8192], inv[wavelen > 8192] / 8)  # low frequencies slowed
    mid = (wavelen >= 8192 / 4) & (wavelen <= 8192)
    assert mid.any() and torch.all(inv_s[mid] <= inv[mid]) and torch.all(inv_s[mid] >= inv[mid] / 8)
    assert ModelConfig.from_hf(scaled.to_hf()).rope_scaling == scaled.rope_scaling


def test_config_validation():
    with pytest.raises(ValueError, match="multiple of model.kv_heads"):
        ModelConfig(heads=6, kv_heads=4)
    with pytest.raises(ValueError, match="dtype"):
        ModelConfig(dtype="int8")
    with pytest.raises(ValueError, match="unknown model preset"):
        preset("huge")


@pytest.mark.parametrize("contexts", [[2000, 40], [300, 40, 35], [17, 900, 16, 1, 2500, 33, 700], [5]])
def test_decode_grouping_is_what_paged_attention_builds(contexts):
    """executor.grouping.decode_grouping (logged per step as decode_groups / decode_padded_context) counts the
    SDPA calls and padded key tokens PagedAttention itself builds for decodes given longest first."""
    from executor.grouping import decode_grouping
    from executor.paged import PagedAttention, PagedKVCache

    bs, kvh, hd = 16, 2, 8
    tables, at = [], 0
    for c in sorted(contexts, reverse=True):
        n = -(-c // bs)
        tables.append((list(range(at, at + n)), c))
        at += n
    cache = PagedKVCache(1, at, bs, kvh, hd, torch.float32, "cpu")
    attn = PagedAttention(cache, 4, [], tables)
    groups, padded = decode_grouping(contexts, bs)
    assert groups == len(attn.decode_groups)
    assert padded == sum((g.end - g.start) * g.blocks_per_row for g in attn.decode_groups) * bs
    assert padded >= sum(-(-c // bs) for c in contexts) * bs
    assert decode_grouping([], bs) == (0, 0)
    if contexts == [2000, 40]:  # far apart: two calls, and no padding of the short row to 2000
        assert groups == 2 and padded == (125 + 3) * bs


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(2, 3000), min_size=1, max_size=40), st.sampled_from([1, 4, 16, 32]))
def test_grouping_is_unchanged_exactly_as_long_as_steps_same_grouping_says(contexts, bs):
    """The simulator may treat a fitted model's grouping features as constant over `steps_same_grouping`
    decode steps: every step in that span groups like the first, and the step after it is the first at
    which some row needs a new block."""
    from executor.grouping import decode_grouping, steps_same_grouping

    k = steps_same_grouping(contexts, bs)
    assert k >= 1
    blocks = [-(-c // bs) for c in contexts]
    first = decode_grouping(contexts, bs)
    for i in range(min(k, 40)):
        now = [c + i for c in contexts]
        assert [-(-c // bs) for c in now] == blocks
        assert decode_grouping(now, bs) == first
    assert [-(-(c + k) // bs) for c in contexts] != blocks


def test_table_breaks_counts_blocks_not_right_after_the_one_before():
    from executor.grouping import table_breaks

    assert table_breaks([7, 8, 9, 10], 4) == 0
    assert table_breaks([7, 8, 20, 21, 3], 5) == 2
    assert table_breaks([7, 8, 20, 21, 3], 3) == 1  # only the first n blocks
    assert table_breaks([9, 8, 7], 3) == 2  # descending is not contiguous
    assert table_breaks([5], 1) == table_breaks([], 0) == 0
    assert table_breaks([7, 8, 20, 21, 3], 5, start=3, count=1) == 2  # carried on from block 3


class _Seq:
    def __init__(self):
        self.block_table: list[int] = []
        self.num_computed = 0
        self.kv_breaks = None


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.sampled_from(["decode", "grow", "replace", "prefill"]),
                          st.integers(1, 40), st.integers(0, 10_000)), max_size=60),
       st.sampled_from([1, 4, 16]))
def test_decode_breaks_cached_per_sequence_equals_counting_afresh(ops, bs):
    """decode_breaks keeps a count per sequence and only looks at new blocks; whatever happens to the tables
    (a decode step, blocks appended in place, a table replaced as after preemption), the total is what
    counting every table afresh gives."""
    from executor.grouping import decode_breaks, table_breaks

    seqs = [_Seq() for _ in range(4)]
    for i, op, n, blk in ops:
        s = seqs[i]
        if op == "decode":
            s.num_computed += 1
        elif op == "prefill":
            s.num_computed += n
        elif op == "grow":
            s.block_table.extend(range(blk, blk + n) if n % 2 else [blk + 3 * k for k in range(n)])
        else:  # a new table (readmitted after preemption): recomputed from its first block
            s.block_table = [blk + (k if k % 3 else 2 * k) for k in range(len(s.block_table))]
        for q in seqs:  # tables always cover the context, as the scheduler keeps them
            need = (q.num_computed + bs) // bs
            if len(q.block_table) < need:
                q.block_table.extend(range(blk + 50_000, blk + 50_000 + need - len(q.block_table)))
        live = [q for q in seqs if q.block_table]
        assert decode_breaks(live, bs) == sum(table_breaks(q.block_table, (q.num_computed + bs) // bs) for q in live)
