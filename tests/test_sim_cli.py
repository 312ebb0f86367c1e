"""`twinfer simulate` end to end: every vendored real trace, outputs, config files, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from sim.cli import main
from traces.records import RunResult

DATA = Path(__file__).parent / "data"
SLICES = [
    ("azure2023/AzureLLMInferenceTrace_conv.head300.csv", None),
    ("azure2023/AzureLLMInferenceTrace_code.head300.csv", None),
    ("mooncake/conversation_trace.head300.jsonl", None),
    ("mooncake/synthetic_trace.head300.jsonl", None),
    ("lmcache-taubench", None),
    ("sharegpt-lengths/sharegpt_8k_filtered_stats_llama2_tokenizer.head300.csv", "2"),
]


@pytest.mark.parametrize("path,rate", SLICES)
def test_simulate_each_real_trace_slice(path, rate, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["simulate", "--trace", str(DATA / path), "--replicas", "2", "--router", "prefix_affinity",
            "--slo-ttft", "2", "--out", str(out), "--no-progress", "--json"] + (["--rate", rate] if rate else [])
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    rec = RunResult.read_csv(out / "records.csv")
    n = summary["requests"]
    assert n > 0 and len(rec["id"]) == n
    assert sorted(rec["id"].tolist()) == list(range(n))  # every request exactly once
    assert summary["ok"] + summary["rejected"] + summary["timed_out"] + summary["failed"] == n
    ok = rec["status"] == "ok"
    assert np.all(rec["finish"][ok] >= rec["first_token"][ok])
    saved = json.loads((out / "summary.json").read_text())
    assert saved["ttft"]["p99"] == pytest.approx(summary["ttft"]["p99"])
    if "mooncake" in path:
        assert summary["prefix_hit_rate"] > 0  # the trace reuses prefix blocks


def test_default_trace_table_output(capsys):
    assert main(["simulate", "--limit", "200", "--replicas", "2", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "TTFT" in out and "AzureLLMInferenceTrace_conv" in out and "200 requests" in out


def test_config_file_and_flag_precedence(tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text('replicas = 3\nrouter = "round_robin"\n[scheduler]\nmax_num_seqs = 4\n[slo]\nttft = 1.5\n'
                   '[run]\nformat = "azure"\n')
    assert main(["simulate", "--config", str(cfg), "--limit", "50", "--replicas", "2", "--json",
                 "--no-progress"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["config"]["replicas"] == 2  # the flag wins
    assert s["config"]["router"] == "round_robin" and s["config"]["scheduler.max_num_seqs"] == 4
    assert s["slo"] == {"ttft": 1.5}


@pytest.mark.parametrize("args,msg", [
    (["--router", "fastest"], "unknown router 'fastest'"),
    (["--profile", "llama3-8b@tpu9"], "unknown device 'tpu9'"),
    (["--max-num-seqs", "0"], "scheduler.max_num_seqs=0 is out of range"),
    (["--slo-ttft", "-1"], "slo.ttft=-1.0 is out of range"),
    (["--format", "nope"], "nope"),
    (["--limit", "0"], "--limit=0 is out of range"),
])
def test_bad_settings_exit_2_with_clear_error(args, msg, capsys):
    assert main(["simulate", "--limit", "20", "--no-progress"] + args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and msg in err


def test_bad_config_key_names_file_and_key(tmp_path, capsys):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[scheduler]\nmax_num_seq = 4\n")
    assert main(["simulate", "--config", str(cfg), "--limit", "5"]) == 2
    err = capsys.readouterr().err
    assert str(cfg) in err and "unknown key 'scheduler.max_num_seq'" in err


def test_malformed_trace_row_names_file_line_field(tmp_path, capsys):
    bad = tmp_path / "t.csv"
    bad.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.6805900,374,44\n"
                   "2023-11-16 18:15:47.0000000,abc,10\n")
    assert main(["simulate", "--trace", str(bad)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "line 3" in err and "ContextTokens" in err


def test_profiles_lists_shipped_profiles(capsys):
    assert main(["profiles"]) == 0
    out = capsys.readouterr().out
    for p in ("llama3-8b@h100-80gb", "llama3-8b@a100-80gb", "llama3-70b@h100-80gb", "llama3-70b@a100-80gb"):
        assert p in out
