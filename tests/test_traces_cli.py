"""`twinfer trace stats|convert`, driven through `register` on a fresh parser."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from traces.canonical import load_canonical
from traces.cli import register
from traces.loaders import load_trace

DATA = Path(__file__).parent / "data"
CODE = DATA / "azure2023/AzureLLMInferenceTrace_code.head300.csv"


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="twinfer")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_stats_json(capsys):
    assert run(["trace", "stats", str(CODE), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["requests"] == 300 and s["format"] == "azure"


def test_stats_table(capsys):
    assert run(["trace", "stats", str(DATA / "lmcache-taubench")]) == 0
    out = capsys.readouterr().out
    assert "requests" in out and "sessions" in out and "prefix blocks seen before" in out


def test_stats_loader_options(capsys):
    p = DATA / "sharegpt-lengths/sharegpt_8k_filtered_stats_llama2_tokenizer.head300.csv"
    assert run(["trace", "stats", str(p), "--rate", "4", "--seed", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["notes"]["synthetic_arrivals"] == "poisson 4.0 req/s, cv 1.0, seed 1"


def test_convert_round_trip(tmp_path, capsys):
    out = tmp_path / "code.jsonl"
    assert run(["trace", "convert", str(CODE), str(out)]) == 0
    assert "wrote 300 requests" in capsys.readouterr().out
    a, b = load_trace(CODE), load_canonical(out)
    assert a.arrival.tolist() == b.arrival.tolist() and a.meta == b.meta


@pytest.mark.parametrize("argv, message", [
    (["trace", "stats", "{tmp}/missing.csv"], "no such file"),
    (["trace", "stats", "{tmp}/bad.csv"], "line 3, field 'ContextTokens'"),
    (["trace", "stats", "{data}/sharegpt-lengths/sharegpt_8k_filtered_stats_llama2_tokenizer.head300.csv"], "rate"),
    (["trace", "stats", "{tmp}/bad.csv", "--format", "mooncake"], "line 1"),
    (["trace", "stats", str(CODE), "--rate", "3"], "takes no option 'rate'"),
])
def test_errors_exit_2(tmp_path, capsys, argv, message):
    (tmp_path / "bad.csv").write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:00:00,3,4\n"
                                      "2023-11-16 18:00:01,three,4\n")
    argv = [a.format(tmp=tmp_path, data=DATA) for a in argv]
    with pytest.raises(SystemExit) as ei:
        run(argv)
    assert ei.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err


def test_unknown_format_rejected_by_argparse(capsys):
    with pytest.raises(SystemExit) as ei:
        run(["trace", "stats", str(CODE), "--format", "parquet"])
    assert ei.value.code == 2 and "invalid choice" in capsys.readouterr().err
