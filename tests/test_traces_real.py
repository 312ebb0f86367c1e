"""End to end on the full public traces, when a shared copy exists (skipped otherwise).

Figures are those of the traces' README (measured on the files themselves).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from traces.loaders import load_trace
from traces.stats import compute_stats

ROOT = next((p for p in (Path("/work/shared/traces"), Path(__file__).resolve().parents[2] / "shared" / "traces")
             if p.is_dir()), None)
pytestmark = pytest.mark.skipif(ROOT is None, reason="full public traces not present (../shared/traces)")


def stats(rel: str, **opts) -> tuple[dict, None]:
    return compute_stats(load_trace(ROOT / rel, **opts)), None


def test_azure_code():
    s, _ = stats("azure2023/AzureLLMInferenceTrace_code.csv")
    assert s["requests"] == 8_819 and round(s["span_s"]) == 3436 and round(s["mean_rate"], 2) == 2.57
    assert round(s["interarrival_cv"], 1) == 13.2 and s["busiest_minute"]["count"] == 632
    assert [round(s["input_tokens"][k]) for k in ("mean", "p50", "p99")] == [2048, 1469, 7436]
    assert [round(s["output_tokens"][k]) for k in ("mean", "p50", "p99")] == [28, 13, 251]


def test_azure_conv():
    s, _ = stats("azure2023/AzureLLMInferenceTrace_conv.csv")
    assert s["requests"] == 19_366 and round(s["interarrival_cv"], 2) == 1.09


def test_mooncake():
    s, _ = stats("mooncake/conversation_trace.jsonl")
    assert s["requests"] == 12_031 and round(s["span_s"]) == 3537 and round(s["mean_rate"], 2) == 3.40
    assert [round(s["input_tokens"][k]) for k in ("mean", "p50")] == [12035, 6909]
    assert round(s["input_tokens"]["p99"], -2) == 85_400
    assert round(100 * s["prefix"]["reuse"], 1) == 36.6
    s, _ = stats("mooncake/synthetic_trace.jsonl")
    assert s["requests"] == 3_993 and round(s["mean_rate"], 2) == 3.91 and round(100 * s["prefix"]["reuse"]) == 64


def test_lmcache():
    s, _ = stats("lmcache-taubench")
    assert s["requests"] == 471 and s["sessions"]["count"] == 24 and s["notes"]["empty_files"] == 1


def test_sharegpt():
    s, _ = stats("sharegpt-lengths/sharegpt_8k_filtered_stats_llama2_tokenizer.csv", rate=5.0)
    assert s["requests"] == 30_731
    assert [round(s["input_tokens"][k]) for k in ("mean", "p50", "p99")] == [2340, 1730, 7434]
    assert [round(s["output_tokens"][k]) for k in ("mean", "p50", "p99")] == [439, 415, 998]
