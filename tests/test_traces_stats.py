"""Workload statistics: exact small cases, and the published figures of the embedded trace."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console
from rich.table import Table

from traces.loaders import load_default_trace, load_trace
from traces.stats import compute_stats, render_stats
from traces.workload import Workload

DATA = Path(__file__).parent / "data"


def render(stats: dict) -> str:
    console = Console(record=True, width=140)
    console.print(render_stats(stats))
    return console.export_text()


def test_exact_small_case():
    w = Workload(arrival=np.array([0.0, 1.0, 3.0, 70.0, 80.0, 90.0]), input_tokens=np.array([1, 2, 3, 4, 5, 100]),
                 output_tokens=np.array([5, 5, 5, 5, 5, 5]),
                 block_hashes=[(1, 2), (1, 3), (1, 2, 4), (), (5,), (2,)], hash_block_size=16,
                 session_id=["a", "a", "b", None, "a", "b"], name="tiny")
    s = compute_stats(w)
    assert s["requests"] == 6 and s["span_s"] == 90.0
    assert s["mean_rate"] == pytest.approx(5 / 90)
    gaps = np.array([1.0, 2.0, 67.0, 10.0, 10.0])
    assert s["interarrival_cv"] == pytest.approx(gaps.std() / gaps.mean())
    assert s["busiest_minute"] == {"count": 3, "start_s": 0.0}
    assert s["input_tokens"]["p50"] == 3.5 and s["input_tokens"]["max"] == 100
    assert s["output_tokens"] == {"mean": 5.0, "p50": 5.0, "p90": 5.0, "p99": 5.0, "min": 5, "max": 5}
    # 9 block positions, 5 distinct ids: 1 (x3), 2 (x3), 3, 4, 5 -> 4 seen before
    assert s["prefix"] == {"block_tokens": 16, "blocks": 9, "distinct": 5, "reuse": 4 / 9}
    assert s["sessions"] == {"count": 2, "calls_mean": 2.5, "calls_max": 3, "no_session": 1}
    json.dumps(s)  # JSON-able
    text = render(s)
    assert "busiest minute" in text and "44.4%" in text and "sessions" in text


def test_busiest_minute_counts_from_first_arrival():
    w = Workload(arrival=np.array([30.0, 89.0, 91.0, 95.0, 149.0]), input_tokens=np.ones(5, np.int64),
                 output_tokens=np.ones(5, np.int64))
    # bins [30, 90) and [90, 150): 2 and 3 arrivals
    assert compute_stats(w)["busiest_minute"] == {"count": 3, "start_s": 90.0}


def test_empty_and_single():
    empty = Workload(arrival=np.zeros(0), input_tokens=np.zeros(0, np.int64), output_tokens=np.zeros(0, np.int64))
    s = compute_stats(empty)
    assert s["requests"] == 0 and s["mean_rate"] is None and s["busiest_minute"] is None
    assert isinstance(render_stats(s), Table)
    one = compute_stats(Workload(arrival=np.zeros(1), input_tokens=np.ones(1, np.int64),
                                 output_tokens=np.ones(1, np.int64)))
    assert one["interarrival_cv"] is None and one["busiest_minute"]["count"] == 1
    render(one)


def test_embedded_trace_matches_published_figures():
    # /work/shared/traces/README.md: conv 19,366 requests, 3,502 s, 5.53 req/s, CV 1.09,
    # input mean/p50/p99 1,155/1,020/4,142, output 211/129/601.
    s = compute_stats(load_default_trace())
    assert s["requests"] == 19_366
    assert round(s["span_s"]) == 3502 and round(s["mean_rate"], 2) == 5.53
    assert round(s["interarrival_cv"], 2) == 1.09
    assert [round(s["input_tokens"][k]) for k in ("mean", "p50", "p99")] == [1155, 1020, 4142]
    assert [round(s["output_tokens"][k]) for k in ("mean", "p50", "p99")] == [211, 129, 601]
    assert s["busiest_minute"]["count"] == 507
    assert s["notes"] == {}  # no zero-token rows, nothing reordered


def test_notes_show_dropped_and_clamped(tmp_path):
    p = tmp_path / "a.csv"
    p.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:00:00,3,0\n"
                 "2023-11-16 18:00:01,0,4\n2023-11-16 18:00:02,5,6\n")
    s = compute_stats(load_trace(p, zero_input="clamp", zero_output="drop"))
    assert s["notes"] == {"zero_input_rows": "1 (clamp)", "zero_output_rows": "1 (drop)", "dropped_rows": 1}
    assert "dropped rows" in render(s)


def test_lmcache_slice_notes():
    s = compute_stats(load_trace(DATA / "lmcache-taubench"))
    assert s["sessions"]["count"] == 3 and s["sessions"]["calls_max"] == 17
    assert s["notes"]["empty_files"] == 1 and s["notes"]["out_of_order_rows"] > 0
    assert s["notes"]["tokens_estimated"] == "ceil(chars/4), min 1"
    assert 0 < s["prefix"]["reuse"] < 1
