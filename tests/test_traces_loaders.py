"""Trace loaders: exact small cases, every bad-input case, and the vendored slices."""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from traces.loaders import (
    FORMATS, default_trace_path, detect_format, estimate_tokens, load_default_trace, load_trace,
    text_block_hashes, text_cache_key,
)
from traces.synth import poisson_arrivals
from traces.workload import TraceError

DATA = Path(__file__).parent / "data"
AZURE_HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens\n"


def write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def jsonl(tmp_path: Path, name: str, rows: list) -> Path:
    return write(tmp_path, name, "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def raises_at(path: Path, line: int | None, field: str | None, fmt: str | None = None, **opts) -> TraceError:
    with pytest.raises(TraceError) as ei:
        load_trace(path, fmt, **opts)
    e = ei.value
    assert (e.path, e.line, e.field) == (str(path), line, field), str(e)
    return e


# ---- azure -------------------------------------------------------------------------------------


def test_azure_exact(tmp_path):
    p = write(tmp_path, "a.csv", AZURE_HEADER
              + "2023-11-16 18:15:46.6805900,374,44\n"
              + "2023-11-16 18:15:50.9951690,396,109\n"
              + "2023-11-16 18:15:46.6805901,10,5\n")  # 100 ns after the first: out of order
    w = load_trace(p)
    assert w.meta["format"] == "azure"
    np.testing.assert_array_equal(w.arrival, [0.0, 1e-7, 4.314579])
    assert w.input_tokens.tolist() == [374, 10, 396]
    assert w.output_tokens.tolist() == [44, 5, 109]
    assert w.block_hashes is None and w.session_id is None
    assert w.meta["time_origin_iso"] == "2023-11-16T18:15:46.680590+00:00"
    assert w.meta["out_of_order_rows"] == 1
    assert w.meta["zero_tokens"]["dropped_rows"] == 0
    assert w.name == "a"


def test_azure_no_rebase_keeps_epoch_seconds(tmp_path):
    p = write(tmp_path, "a.csv", AZURE_HEADER + "1970-01-01 00:00:10.5000000,1,1\n1970-01-01 00:00:12,2,2\n")
    w = load_trace(p, rebase=False)
    assert w.arrival.tolist() == [10.5, 12.0]
    assert load_trace(p).meta["time_origin_s"] == 10.5


@pytest.mark.parametrize("body, line, field", [
    ("2023-11-16 18:15:46.68,abc,4\n", 2, "ContextTokens"),
    ("2023-11-16 18:15:46.68,3,4\n2023-11-16 18:15:47,3,-1\n", 3, "GeneratedTokens"),
    ("2023-11-16 18:15:46.68,12.5,4\n", 2, "ContextTokens"),
    ("2023-11-16 25:15:46.68,3,4\n", 2, "TIMESTAMP"),
    ("2023-11-16 18:15:46.68,3,4\nyesterday,3,4\n", 3, "TIMESTAMP"),
    (",3,4\n", 2, "TIMESTAMP"),
    ("NaT,3,4\n", 2, "TIMESTAMP"),
    ("2023-11-16 18:15:46.68,3,4\n2023-11-16 18:15:47,3\n", 3, None),
    ("2023-11-16 18:15:46.68,3,4\n2023-11-16 18:15:47,3,0\n", 3, "GeneratedTokens"),
    ("2023-11-16 18:15:46.68,0,4\n", 2, "ContextTokens"),
])
def test_azure_bad_rows(tmp_path, body, line, field):
    raises_at(write(tmp_path, "a.csv", AZURE_HEADER + body), line, field, "azure")


def test_azure_missing_column(tmp_path):
    p = write(tmp_path, "a.csv", "TIMESTAMP,ContextTokens\n2023-11-16 18:15:46,3\n")
    e = raises_at(p, 1, "GeneratedTokens", "azure")
    assert "missing column" in str(e)


def test_azure_empty_file(tmp_path):
    raises_at(write(tmp_path, "a.csv", ""), None, None, "azure")


def test_blank_lines_are_not_rows(tmp_path):
    p = write(tmp_path, "a.csv", AZURE_HEADER + "2023-11-16 18:15:46,3,4\n\n2023-11-16 18:15:47,5,6\n")
    assert len(load_trace(p)) == 2
    raises_at(write(tmp_path, "b.csv", AZURE_HEADER + "2023-11-16 18:15:46,3,4\n\n2023-11-16 18:15:47,x,6\n"),
              4, "ContextTokens")


def test_zero_token_policies(tmp_path):
    p = write(tmp_path, "a.csv", AZURE_HEADER + "2023-11-16 18:00:00,3,0\n2023-11-16 18:00:01,0,4\n"
              "2023-11-16 18:00:02,5,6\n2023-11-16 18:00:03,0,0\n")
    e = raises_at(p, 2, "GeneratedTokens")
    assert "zero_output='drop' or 'clamp'" in str(e)
    w = load_trace(p, zero_input="clamp", zero_output="clamp")
    assert w.input_tokens.tolist() == [3, 1, 5, 1] and w.output_tokens.tolist() == [1, 4, 6, 1]
    assert w.meta["zero_tokens"] == {"input": {"policy": "clamp", "rows": 2},
                                     "output": {"policy": "clamp", "rows": 2}, "dropped_rows": 0}
    w = load_trace(p, zero_input="drop", zero_output="drop")
    assert w.input_tokens.tolist() == [5] and w.arrival.tolist() == [0.0]
    assert w.meta["time_origin_iso"].startswith("2023-11-16T18:00:02")
    assert w.meta["zero_tokens"]["dropped_rows"] == 3
    w = load_trace(p, zero_input="clamp", zero_output="drop")
    assert w.input_tokens.tolist() == [1, 5] and w.meta["zero_tokens"]["dropped_rows"] == 2
    with pytest.raises(ValueError, match="zero_output"):
        load_trace(p, zero_output="ignore")


def test_default_trace_embedded():
    p = default_trace_path()
    assert p.is_file() and (p.parent / "LICENSE").is_file()
    w = load_default_trace()
    assert len(w) == 19_366 and w.arrival[0] == 0.0
    assert w.meta["time_origin_iso"] == "2023-11-16T18:15:46.680590+00:00"


# ---- mooncake ----------------------------------------------------------------------------------

MC = {"timestamp": 0, "input_length": 1000, "output_length": 5, "hash_ids": [0, 1]}


def test_mooncake_exact(tmp_path):
    p = jsonl(tmp_path, "m.jsonl", [
        {"timestamp": 250, "input_length": 1000, "output_length": 5, "hash_ids": [0, 1]},
        {"timestamp": 1750, "input_length": 600, "output_length": 7, "hash_ids": [0, 2]},
        {"timestamp": 1750, "input_length": 512, "output_length": 1, "hash_ids": [3]},
    ])
    w = load_trace(p)
    assert w.meta["format"] == "mooncake"
    assert w.arrival.tolist() == [0.0, 1.5, 1.5]
    assert w.meta["time_origin_s"] == 0.25
    assert w.input_tokens.tolist() == [1000, 600, 512] and w.output_tokens.tolist() == [5, 7, 1]
    assert list(w.block_hashes) == [(0, 1), (0, 2), (3,)] and w.hash_block_size == 512
    assert w.request(1).block_hashes == (0, 2)


@pytest.mark.parametrize("rows, line, field", [
    ([MC, {**MC, "timestamp": 2000}, {**MC, "timestamp": 1000}], 3, "timestamp"),
    ([{**MC, "timestamp": -1}], 1, "timestamp"),
    ([MC, '{"timestamp": 0, "input_length": 5'], 2, None),
    ([MC, "[1, 2]"], 2, None),
    ([MC, {k: v for k, v in MC.items() if k != "hash_ids"}], 2, "hash_ids"),
    ([{k: v for k, v in MC.items() if k != "output_length"}], 1, "output_length"),
    ([MC, {**MC, "hash_ids": "0 1"}], 2, "hash_ids"),
    ([MC, {**MC, "hash_ids": [0, 1.5]}], 2, "hash_ids"),
    ([MC, {**MC, "hash_ids": [0, 1, 2]}], 2, "hash_ids"),  # 3 ids for 1000 tokens
    ([MC, {**MC, "input_length": "1000"}], 2, "input_length"),
    ([MC, {**MC, "output_length": True}], 2, "output_length"),
    ([MC, {**MC, "output_length": -3}], 2, "output_length"),
    ([MC, {**MC, "output_length": 0}], 2, "output_length"),
    ([MC, {**MC, "timestamp": "soon"}], 2, "timestamp"),
])
def test_mooncake_bad_rows(tmp_path, rows, line, field):
    raises_at(jsonl(tmp_path, "m.jsonl", rows), line, field, "mooncake")


def test_mooncake_blank_line_keeps_line_numbers(tmp_path):
    p = jsonl(tmp_path, "m.jsonl", [MC, "", {**MC, "output_length": "x"}])
    raises_at(p, 3, "output_length")


# ---- lmcache -----------------------------------------------------------------------------------


def _blake(parent: int, chunk: str) -> int:
    d = hashlib.blake2b(parent.to_bytes(8, "little") + chunk.encode(), digest_size=8, person=b"twinfer-block")
    return int.from_bytes(d.digest(), "little") & ((1 << 63) - 1)


def test_text_block_hashes_chain_and_prefix_sharing():
    a, b = "a" * 64, "b" * 64
    h1 = text_block_hashes(a + b + "tail", 64)
    assert h1 == (_blake(0, a), _blake(_blake(0, a), b))
    assert text_block_hashes(a + b + "other tail, longer than before", 64)[:2] == h1
    assert text_block_hashes(b + b, 64)[1] != h1[1]  # same chunk, different parent
    assert text_block_hashes("x" * 63, 64) == ()
    assert all(0 <= h < 2 ** 63 for h in h1)
    assert text_cache_key("abc") == text_cache_key("abc") != text_cache_key("abd")


def test_text_hashes_are_pinned():
    # Literal values: a change of hash function would silently change every saved workload's ids.
    assert text_block_hashes("a" * 64, 64) == (0x384635098D672FE9,)
    assert text_cache_key("abc") == 0x703B05D53D0BFAC4


def test_estimate_tokens():
    assert [estimate_tokens(s) for s in ("", "a", "abcd", "abcde", "é" * 8)] == [1, 1, 1, 2, 2]


def lm(ts: int, inp: str, out: str = "", sid: str = "s1") -> dict:
    return {"timestamp": ts, "input": inp, "output": out, "session_id": sid}


def test_lmcache_exact(tmp_path):
    d = tmp_path / "sessions"
    d.mkdir()
    base = 1_760_000_000_000_000
    p1 = "a" * 130
    p2 = p1 + "b" * 70
    jsonl(d, "s1.jsonl", [lm(base + 3_000_000, p2, "x" * 9), lm(base, "hi"), lm(base + 1_000_000, p1, "")])
    jsonl(d, "s2.jsonl", [lm(base + 500_000, p1, "ok", sid="s2")])
    write(d, "empty.jsonl", "")
    write(d, "notes.txt", "ignored: not a session file")
    w = load_trace(d)
    assert w.meta["format"] == "lmcache"
    assert w.arrival.tolist() == [0.0, 0.5, 1.0, 3.0]
    assert list(w.session_id) == ["s1", "s2", "s1", "s1"]
    assert w.step.tolist() == [0, 0, 1, 2]
    assert w.think_time.tolist() == [0.0, 0.0, 1.0, 2.0]
    assert w.input_tokens.tolist() == [1, 33, 33, 50]  # ceil(chars / 4), min 1
    assert w.output_tokens.tolist() == [1, 1, 1, 3]  # "" -> 1, "ok" -> 1, 9 chars -> 3
    assert w.hash_block_size == 16
    hp1 = text_block_hashes(p1, 64)
    assert list(w.block_hashes) == [(), hp1, hp1, text_block_hashes(p2, 64)]
    assert len(hp1) == 2 and w.block_hashes[3][:2] == hp1 and len(w.block_hashes[3]) == 3
    assert w.cache_key[1] == w.cache_key[2] == text_cache_key(p1) != w.cache_key[3]
    assert w.meta["sessions"] == 2 and w.meta["empty_files"] == ["empty.jsonl"]
    assert w.meta["out_of_order_rows"] == 1 and w.meta["empty_outputs"] == 2
    assert w.meta["time_origin_s"] == base / 1e6


def test_lmcache_empty_file_is_empty_session(tmp_path):
    p = write(tmp_path, "e.jsonl", "")
    w = load_trace(p, "lmcache")
    assert len(w) == 0 and w.meta["empty_files"] == ["e.jsonl"] and w.meta["sessions"] == 0
    with pytest.raises(TraceError, match="empty"):
        load_trace(p)  # nothing to detect a format from


@pytest.mark.parametrize("rows, line, field", [
    ([lm(1, "a"), {"timestamp": 2, "input": "b", "output": ""}], 2, "session_id"),
    ([lm(1, "a"), lm(-5, "b")], 2, "timestamp"),
    ([lm(1, "a"), lm(2.5, "b")], 2, "timestamp"),
    ([lm(1, "a"), lm(2, None)], 2, "input"),
    ([lm(1, "a"), lm(2, "b", out=None)], 2, "output"),
    ([lm(1, "a"), '{"timestamp": 2,'], 2, None),
])
def test_lmcache_bad_rows(tmp_path, rows, line, field):
    raises_at(jsonl(tmp_path, "s.jsonl", rows), line, field, "lmcache")


# ---- sharegpt ------------------------------------------------------------------------------------

SG_HEADER = "num_prefill_tokens,num_decode_tokens,num_total_tokens,pd_ratio\n"


def test_sharegpt_exact(tmp_path):
    p = write(tmp_path, "s.csv", SG_HEADER + "74,918,992,0.08\n290,905,1195,0.32\n1402,711,2113,1.97\n")
    e = raises_at(p, None, None)
    assert "rate" in str(e)
    w = load_trace(p, rate=2.0, seed=7)
    assert w.meta["format"] == "sharegpt"
    assert w.input_tokens.tolist() == [74, 290, 1402] and w.output_tokens.tolist() == [918, 905, 711]
    np.testing.assert_array_equal(w.arrival, poisson_arrivals(3, 2.0, np.random.default_rng(7)))
    assert w.meta["arrivals"] == {"process": "poisson", "rate": 2.0, "cv": 1.0, "seed": 7}
    assert np.array_equal(load_trace(p, rate=2.0, seed=7).arrival, w.arrival)
    assert not np.array_equal(load_trace(p, rate=2.0, seed=8).arrival, w.arrival)
    assert load_trace(p, rate=2.0, cv=3.0).meta["arrivals"]["process"] == "gamma"


def test_sharegpt_bad_rows(tmp_path):
    raises_at(write(tmp_path, "s.csv", SG_HEADER + "74,918,992,0.08\n-2,905,903,0\n"), 3, "num_prefill_tokens",
              rate=1.0)
    raises_at(write(tmp_path, "t.csv", "num_prefill_tokens,x\n1,2\n"), 1, "num_decode_tokens", "sharegpt", rate=1.0)


# ---- generic -------------------------------------------------------------------------------------


def test_generic_csv_with_mapping(tmp_path):
    p = write(tmp_path, "g.csv", "t_ms,prompt,gen,user,prio,hashes\n"
              "2000,10,3,u1,1,7 8\n1000,20,4,u2,0,7\n3000,30,5,u1,2,\n4000,40,6,,0,9\n")
    w = load_trace(p, "generic", columns={"arrival": "t_ms", "input_tokens": "prompt", "output_tokens": "gen",
                                          "session_id": "user", "priority": "prio", "block_hashes": "hashes"},
                   time_unit="ms", hash_block_size=16)
    assert w.arrival.tolist() == [0.0, 1.0, 2.0, 3.0]
    assert w.input_tokens.tolist() == [20, 10, 30, 40]
    assert list(w.session_id) == ["u2", "u1", "u1", None]
    assert w.step.tolist() == [0, 0, 1, 0]  # derived: order within the session
    assert w.priority.tolist() == [0, 1, 2, 0]
    assert list(w.block_hashes) == [(7,), (7, 8), (), (9,)] and w.hash_block_size == 16
    assert w.meta["time_origin_s"] == 1.0 and w.meta["out_of_order_rows"] == 1


def test_generic_detected_by_canonical_names(tmp_path):
    p = write(tmp_path, "g.csv", "arrival,input_tokens,output_tokens,slo_class\n0.5,3,4,gold\n1.25,5,6,\n")
    assert detect_format(p) == "generic"
    w = load_trace(p, rebase=False)
    assert w.arrival.tolist() == [0.5, 1.25] and list(w.slo_class) == ["gold", ""]


def test_generic_jsonl_datetime(tmp_path):
    p = jsonl(tmp_path, "g.jsonl", [
        {"when": "2024-01-01T00:00:01.5", "in": 3, "out": 4, "session_id": "a", "think_time": 0, "cache_key": 5},
        {"when": "2024-01-01T00:00:00", "in": 5, "out": 6, "session_id": None, "think_time": 0.25,
         "cache_key": None},
    ])
    w = load_trace(p, "generic", columns={"arrival": "when", "input_tokens": "in", "output_tokens": "out"},
                   time_unit="datetime")
    assert w.arrival.tolist() == [0.0, 1.5]
    assert w.meta["time_origin_iso"] == "2024-01-01T00:00:00+00:00"
    assert list(w.session_id) == [None, "a"] and w.think_time.tolist() == [0.25, 0.0]
    assert list(w.cache_key) == [None, 5]


@pytest.mark.parametrize("text, opts, line, field", [
    ("a,b,c\n1,2,3\n", {"columns": {"arrival": "t"}}, 1, "t"),
    ("t,input_tokens,output_tokens\n1,2,3\n", {"columns": {"arrival": "t", "session_id": "sid"}}, 1, "sid"),
    ("t,input_tokens,output_tokens\n1,2,3\nnan,2,3\n", {"columns": {"arrival": "t"}}, 3, "t"),
    ("t,input_tokens,output_tokens\n1,2,3\n-1,2,3\n", {"columns": {"arrival": "t"}}, 3, "t"),
    ("t,input_tokens,output_tokens\n2024-01-01,2,3\n2024-02-30,2,3\n",
     {"columns": {"arrival": "t"}, "time_unit": "datetime"}, 3, "t"),
    ('{"arrival": 1, "input_tokens": 2, "output_tokens": 3}\n{"arrival": 2, "input_tokens": 2}\n', {}, 2,
     "output_tokens"),
    ('{"arrival": 1, "input_tokens": 2, "output_tokens": 3, "step": 0}\n'
     '{"arrival": 2, "input_tokens": 2, "output_tokens": 3}\n', {}, 2, "step"),
    ('{"arrival": "x", "input_tokens": 2, "output_tokens": 3}\n', {}, 1, "arrival"),
    ('{"arrival": 1, "input_tokens": 2, "output_tokens": 3, "block_hashes": [1, "a"]}\n',
     {"hash_block_size": 4}, 1, "block_hashes"),
])
def test_generic_bad(tmp_path, text, opts, line, field):
    raises_at(write(tmp_path, "g.txt", text), line, field, "generic", **opts)


def test_generic_bad_options(tmp_path):
    p = write(tmp_path, "g.csv", "arrival,input_tokens,output_tokens\n1,2,3\n")
    with pytest.raises(ValueError, match="time_unit"):
        load_trace(p, time_unit="minutes")
    with pytest.raises(ValueError, match="unknown canonical column 'arival'"):
        load_trace(p, columns={"arival": "arrival"})


# ---- entry point -----------------------------------------------------------------------------------


def test_unknown_format_lists_valid_ones(tmp_path):
    with pytest.raises(ValueError) as ei:
        load_trace(tmp_path / "x.csv", "parquet")
    for name in FORMATS:
        assert name in str(ei.value)


def test_unknown_option_lists_accepted(tmp_path):
    p = write(tmp_path, "a.csv", AZURE_HEADER + "2023-11-16 18:00:00,3,4\n")
    with pytest.raises(ValueError, match="takes no option 'rate'.*zero_output"):
        load_trace(p, rate=3.0)


def test_missing_file_and_undetectable(tmp_path):
    raises_at(tmp_path / "nope.csv", None, None)
    raises_at(write(tmp_path, "x.csv", "a,b\n1,2\n"), 1, None)
    raises_at(write(tmp_path, "x.jsonl", '{"a": 1}\n'), None, None)
    raises_at(write(tmp_path, "x.txt", "ok\n"), 1, None)


def test_not_utf8(tmp_path):
    p = tmp_path / "x.csv"
    p.write_bytes(AZURE_HEADER.encode() + b"\xff\xfe,1,2\n")
    raises_at(p, None, None, "azure")


def test_gzip_and_bom(tmp_path):
    body = AZURE_HEADER + "2023-11-16 18:00:00,3,4\n2023-11-16 18:00:02,5,6\n"
    p = tmp_path / "a.csv.gz"
    with gzip.open(p, "wt") as f:
        f.write(body)
    assert load_trace(p).arrival.tolist() == [0.0, 2.0]
    q = tmp_path / "bom.csv"
    q.write_bytes(b"\xef\xbb\xbf" + body.encode())
    assert load_trace(q).input_tokens.tolist() == [3, 5]


# ---- vendored slices of the real traces ----------------------------------------------------------------

SLICES = [
    ("azure2023/AzureLLMInferenceTrace_code.head300.csv", "azure", 300),
    ("azure2023/AzureLLMInferenceTrace_conv.head300.csv", "azure", 300),
    ("mooncake/conversation_trace.head300.jsonl", "mooncake", 300),
    ("mooncake/synthetic_trace.head300.jsonl", "mooncake", 300),
    ("lmcache-taubench", "lmcache", 27),
]


@pytest.mark.parametrize("rel, fmt, n", SLICES)
def test_vendored_slices_load(rel, fmt, n):
    path = DATA / rel
    assert detect_format(path) == fmt
    w = load_trace(path)
    assert len(w) == n and w.arrival[0] == 0.0 and np.all(np.diff(w.arrival) >= 0)
    assert w.input_tokens.min() >= 1 and w.output_tokens.min() >= 1
    licence = path if path.is_dir() else path.parent
    assert any(p.name.startswith("LICENSE") for p in licence.iterdir())


def test_vendored_azure_code_head():
    w = load_trace(DATA / "azure2023/AzureLLMInferenceTrace_code.head300.csv")
    assert w.meta["time_origin_iso"] == "2023-11-16T18:17:03.979960+00:00"
    assert (w.input_tokens[0], w.output_tokens[0]) == (4808, 10)
    assert w.arrival[1] == pytest.approx(0.052)


def test_vendored_mooncake_conversation_head():
    w = load_trace(DATA / "mooncake/conversation_trace.head300.jsonl")
    assert (w.input_tokens[0], w.output_tokens[0]) == (6758, 500)
    assert w.block_hashes[0] == tuple(range(14)) and w.block_hashes[1][0] == 0
    assert all(len(h) == -(-n // 512) for h, n in zip(w.block_hashes, w.input_tokens.tolist()))


def test_vendored_lmcache_sessions():
    w = load_trace(DATA / "lmcache-taubench")
    assert w.meta["sessions"] == 3 and w.meta["empty_files"] == ["ea09a0dc475dbe00b56101ef665b8c03.jsonl"]
    assert w.meta["out_of_order_rows"] > 0  # recorded lines are not in time order
    sizes = {s: list(w.session_id).count(s) for s in set(w.session_id)}
    assert sorted(sizes.values()) == [4, 6, 17]
    for sid in sizes:  # steps 0..k-1 in time order, think times = send gaps
        idx = [i for i, s in enumerate(w.session_id) if s == sid]
        assert w.step[idx].tolist() == list(range(len(idx)))
        np.testing.assert_allclose(w.think_time[idx][1:], np.diff(w.arrival[idx]), atol=1e-9)
    one = load_trace(DATA / "lmcache-taubench/22ffaaf33001ec7197ccd612e03d428e.jsonl")
    assert len(one) == 6 and set(one.session_id) == {"22ffaaf33001ec7197ccd612e03d428e"}


def test_vendored_sharegpt_head():
    w = load_trace(DATA / "sharegpt-lengths/sharegpt_8k_filtered_stats_llama2_tokenizer.head300.csv", rate=10.0)
    assert len(w) == 300 and (w.input_tokens[0], w.output_tokens[0]) == (74, 918)
