"""`twinfer run` end to end: same records as `twinfer simulate` on the same slice, its outputs, clear errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from sim.cli import main
from traces.records import FIELD_NAMES, RunResult

CONV = str(Path(__file__).parent / "data" / "azure2023" / "AzureLLMInferenceTrace_conv.head300.csv")
SLICE = ["--trace", CONV, "--limit", "8", "--rate-scale", "16", "--num-blocks", "256", "--max-num-seqs", "8"]
FAST = ["--model", "tiny", "--device", "cpu", "--threads", "1", "--telemetry-interval", "0.05", "--no-progress"]


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def header(path: Path) -> list[str]:
    with open(path, newline="") as f:
        return next(csv.reader(f))


def test_run_and_simulate_give_the_same_records_schema_and_requests(tmp_path, capsys):
    real, sim = tmp_path / "real", tmp_path / "sim"
    assert main(["run", *SLICE, *FAST, "--slo-ttft", "2", "--out", str(real), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert main(["simulate", *SLICE, "--slo-ttft", "2", "--out", str(sim), "--json", "--no-progress"]) == 0
    sim_summary = json.loads(capsys.readouterr().out)
    assert header(real / "records.csv") == header(sim / "records.csv") == list(FIELD_NAMES)
    r, s = RunResult.read_csv(real / "records.csv"), RunResult.read_csv(sim / "records.csv")
    assert r["id"].tolist() == s["id"].tolist() == list(range(8))
    assert r["arrival"].tolist() == pytest.approx(s["arrival"].tolist())
    assert summary["requests"] == 8 and summary["ok"] + summary["rejected"] + summary["failed"] == 8
    assert set(summary) == set(sim_summary) and summary["slo"] == {"ttft": 2.0}
    assert summary["meta"]["source"] == "executor" and summary["config"]["scheduler.max_num_seqs"] == 8
    for name in ("summary.json", "records.csv", "telemetry.csv", "steps.csv"):
        assert (real / name).is_file(), name
    assert json.loads((real / "summary.json").read_text())["requests"] == 8
    assert "replica0.kv_usage" in header(real / "telemetry.csv")
    assert header(real / "steps.csv")[:3] == ["replica", "start", "duration"]


def test_table_names_the_executor_and_device(capsys):
    assert main(["run", *SLICE, *FAST, "--limit", "3", "--max-duration", "60"]) == 0
    out = " ".join(capsys.readouterr().out.split())  # the title wraps at the table's width
    assert "twinfer run (executor)" in out and "tiny on cpu" in out and "TTFT" in out
    assert "3 requests, 1 x tiny on cpu (1 thread(s) each)" in out


@pytest.mark.parametrize("extra,message", [
    (["--model", "no-such-model"], "neither a preset"),
    (["--tp", "2"], "tensor parallelism is simulated only"),
    (["--profile", "llama3-8b@h100-80gb"], "--profile is the simulator's"),
    (["--max-duration", "0"], "max_duration"),
    (["--router", "nope"], "unknown router"),
])
def test_clear_errors_exit_2(extra, message, capsys):
    args = ["run", *SLICE, "--device", "cpu", "--no-progress", *extra]
    assert main(args) == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_requested_without_one_is_a_clear_error(capsys):
    assert main(["run", *SLICE, "--model", "tiny", "--device", "cuda", "--no-progress"]) == 2
    assert "'cuda' was requested" in capsys.readouterr().err


def test_metrics_port_in_use_is_a_clear_error(capsys):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert main(["run", *SLICE, *FAST, "--limit", "2", "--metrics-port", str(port)]) == 2
    assert f"metrics port {port} on 127.0.0.1" in capsys.readouterr().err
