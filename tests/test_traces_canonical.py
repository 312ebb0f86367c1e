"""twinfer's canonical workload format: exact layout, round trips, and bad files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from traces.canonical import FORMAT_NAME, VERSION, load_canonical, save_workload
from traces.loaders import detect_format, load_trace
from traces.workload import TraceError, Workload

DATA = Path(__file__).parent / "data"


def assert_same(a: Workload, b: Workload) -> None:
    for col in ("arrival", "input_tokens", "output_tokens", "step", "think_time", "priority"):
        x, y = getattr(a, col), getattr(b, col)
        assert (x is None) == (y is None), col
        if x is not None:
            assert x.dtype == y.dtype and np.array_equal(x, y), col
    for col in ("block_hashes", "session_id", "slo_class", "cache_key"):
        x, y = getattr(a, col), getattr(b, col)
        assert (x is None) == (y is None), col
        if x is not None:
            assert list(x) == list(y), col
    assert a.hash_block_size == b.hash_block_size and a.name == b.name and a.meta == b.meta


@st.composite
def workloads(draw) -> Workload:
    n = draw(st.integers(0, 12))
    gaps = draw(st.lists(st.floats(0, 1e4, allow_nan=False), min_size=n, max_size=n))
    arrival = np.cumsum(np.array(gaps, dtype=np.float64))
    tokens = st.lists(st.integers(1, 2 ** 40), min_size=n, max_size=n)
    opt = lambda s: draw(st.one_of(st.none(), st.lists(s, min_size=n, max_size=n)))  # noqa: E731
    hashes = opt(st.tuples(st.integers(-2 ** 63, 2 ** 63 - 1)) | st.tuples())
    step = opt(st.integers(0, 1000))
    think = opt(st.floats(0, 1e6, allow_nan=False))
    prio = opt(st.integers(-5, 5))
    return Workload(
        arrival=arrival, input_tokens=np.array(draw(tokens), dtype=np.int64),
        output_tokens=np.array(draw(tokens), dtype=np.int64),
        block_hashes=hashes, hash_block_size=draw(st.sampled_from([16, 512])) if hashes is not None else 0,
        session_id=opt(st.none() | st.text(max_size=5)),
        step=None if step is None else np.array(step, dtype=np.int64),
        think_time=None if think is None else np.array(think, dtype=np.float64),
        priority=None if prio is None else np.array(prio, dtype=np.int64),
        slo_class=opt(st.text(max_size=4)), cache_key=opt(st.none() | st.integers(0, 2 ** 63 - 1)),
        name=draw(st.text(min_size=1, max_size=8)), meta=draw(st.dictionaries(st.text(max_size=4), st.integers())),
    )


@settings(max_examples=60, deadline=None)
@given(workloads())
def test_round_trip_is_identity(tmp_path_factory, w):
    p = tmp_path_factory.mktemp("rt") / "w.jsonl"
    save_workload(w, p)
    assert detect_format(p) == "canonical"
    assert_same(load_canonical(p), w)


def test_exact_layout(tmp_path):
    w = Workload(arrival=np.array([0.0, 0.1 + 0.2]), input_tokens=np.array([3, 4]), output_tokens=np.array([5, 6]),
                 session_id=["a", None], name="tiny", meta={"format": "azure"})
    p = save_workload(w, tmp_path / "w.jsonl")
    lines = p.read_text().splitlines()
    assert json.loads(lines[0]) == {"format": FORMAT_NAME, "version": VERSION, "name": "tiny", "requests": 2,
                                    "hash_block_size": 0, "columns": ["session_id"], "meta": {"format": "azure"}}
    assert lines[1:] == ['{"arrival": 0.0, "input_tokens": 3, "output_tokens": 5, "session_id": "a"}',
                         '{"arrival": 0.30000000000000004, "input_tokens": 4, "output_tokens": 6, "session_id": null}']


@pytest.mark.parametrize("rel", ["lmcache-taubench", "mooncake/conversation_trace.head300.jsonl",
                                 "azure2023/AzureLLMInferenceTrace_code.head300.csv"])
def test_real_slices_round_trip(tmp_path, rel):
    w = load_trace(DATA / rel)
    for name in ("w.jsonl", "w.jsonl.gz"):
        assert_same(load_trace(save_workload(w, tmp_path / name)), w)


HEADER = {"format": FORMAT_NAME, "version": 1, "name": "x", "requests": 2, "hash_block_size": 0,
          "columns": ["step"], "meta": {}}
ROW = {"arrival": 0.0, "input_tokens": 3, "output_tokens": 4, "step": 0}


@pytest.mark.parametrize("header, rows, line, field", [
    ({**HEADER, "version": 2}, [ROW, ROW], 1, "version"),
    ({**HEADER, "version": "1"}, [ROW, ROW], 1, "version"),
    ({**HEADER, "format": "other"}, [ROW, ROW], 1, "format"),
    ({**HEADER, "columns": ["steps"]}, [ROW, ROW], 1, "columns"),
    ({**HEADER, "columns": ["block_hashes"]}, [ROW, ROW], 1, "hash_block_size"),
    (HEADER, [ROW], 2, None),  # truncated: header says 2
    (HEADER, [ROW, {**ROW, "arrival": -1.0}], 3, "arrival"),
    (HEADER, [{**ROW, "arrival": 2.0}, {**ROW, "arrival": 1.0}], 3, "arrival"),
    (HEADER, [ROW, {**ROW, "input_tokens": 0}], 3, "input_tokens"),
    (HEADER, [ROW, {**ROW, "output_tokens": 2.5}], 3, "output_tokens"),
    (HEADER, [ROW, {**ROW, "step": -1}], 3, "step"),
    (HEADER, [ROW, {k: v for k, v in ROW.items() if k != "step"}], 3, "step"),
    (HEADER, [ROW, {**ROW, "priority": 1}], 3, None),
    (HEADER, [ROW, "[1]"], 3, None),
    (HEADER, [ROW, "", {**ROW, "step": -1}], 4, "step"),  # blank lines are skipped, lines still counted
    (HEADER, [ROW, '{"arrival": NaN, "input_tokens": 3, "output_tokens": 4, "step": 0}'], 3, "arrival"),
    (HEADER, [ROW, {**ROW, "input_tokens": 2 ** 70}], 3, "input_tokens"),
    (HEADER, [ROW, '{"arrival": 1, "input_tokens": 3, "output_tokens": 4, "step": 0}, {"arrival": 1}'], 3, None),
    (HEADER, [ROW, "{"], 3, None),
])
def test_bad_files(tmp_path, header, rows, line, field):
    p = tmp_path / "w.jsonl"
    p.write_text("\n".join(json.dumps(x) if not isinstance(x, str) else x for x in [header, *rows]) + "\n")
    with pytest.raises(TraceError) as ei:
        load_canonical(p)
    assert (ei.value.line, ei.value.field) == (line, field), str(ei.value)


def test_blank_lines_allowed(tmp_path):
    p = tmp_path / "w.jsonl"
    p.write_text("\n".join([json.dumps(HEADER), "", json.dumps(ROW), json.dumps({**ROW, "arrival": 1.5}), ""]))
    assert load_canonical(p).arrival.tolist() == [0.0, 1.5]


def test_empty_workload_round_trips(tmp_path):
    w = Workload(arrival=np.zeros(0), input_tokens=np.zeros(0, np.int64), output_tokens=np.zeros(0, np.int64))
    assert_same(load_canonical(save_workload(w, tmp_path / "e.jsonl")), w)
