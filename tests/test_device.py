import logging
import subprocess
import sys
import time

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from executor import device as D


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def two_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


def test_import_is_cheap():
    code = "import sys, executor.device; assert 'torch' not in sys.modules, 'torch imported eagerly'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cpu():
    assert D.select_device("cpu") == torch.device("cpu")
    assert D.select_device(" CPU ") == torch.device("cpu")


def test_auto_falls_back_to_cpu_with_one_notice(no_cuda, caplog):
    with caplog.at_level(logging.INFO, logger="executor.device"):
        dev = D.select_device("auto")
    assert dev == torch.device("cpu")
    notes = [r for r in caplog.records if r.name == "executor.device"]
    assert len(notes) == 1
    assert notes[0].getMessage() == "no CUDA device (torch.cuda.is_available() is False): running on the CPU"
    assert notes[0].levelno == logging.WARNING


@pytest.mark.parametrize("pref", ["cuda", "cuda:0", "cuda:1"])
def test_cuda_without_cuda_raises_clearly(no_cuda, pref):
    with pytest.raises(D.DeviceUnavailableError) as e:
        D.select_device(pref)
    msg = str(e.value)
    assert repr(pref) in msg and "'cpu' or 'auto'" in msg
    assert "no CUDA support" in msg or "torch.cuda.is_available() is False" in msg


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_on_this_machine_raises():
    with pytest.raises(D.DeviceUnavailableError, match="cuda"):
        D.select_device("cuda")


@pytest.mark.parametrize("pref", ["tpu", "cpu:1", "auto:0", "cuda:x", ""])
def test_bad_preference(pref):
    with pytest.raises(ValueError, match="expected 'auto', 'cpu', 'cuda' or 'cuda:N'"):
        D.select_device(pref)


def test_cuda_selection_when_present(two_gpus, caplog):
    with caplog.at_level(logging.INFO, logger="executor.device"):
        assert D.select_device("auto") == torch.device("cuda", 0)
        assert D.select_device("cuda") == torch.device("cuda", 0)
        assert D.select_device("cuda:1") == torch.device("cuda", 1)
    assert not caplog.records
    assert D.select_devices("cuda") == [torch.device("cuda", 0), torch.device("cuda", 1)]
    assert D.select_devices("cuda:1") == [torch.device("cuda", 1)]
    with pytest.raises(D.DeviceUnavailableError, match="sees 2 CUDA device"):
        D.select_device("cuda:2")


def test_select_devices_cpu(no_cuda):
    assert D.select_devices("auto") == [torch.device("cpu")]
    assert D.select_devices("cpu") == [torch.device("cpu")]


def test_assign_devices_round_robin():
    assert D.assign_devices(5, ["cuda:0", "cuda:1"]) == ["cuda:0", "cuda:1", "cuda:0", "cuda:1", "cuda:0"]
    assert D.assign_devices(2, ["cpu"]) == ["cpu", "cpu"]
    assert D.assign_devices(0, ["cpu"]) == []
    with pytest.raises(ValueError):
        D.assign_devices(1, [])
    with pytest.raises(ValueError):
        D.assign_devices(-1, ["cpu"])


@given(st.integers(0, 200), st.integers(1, 16))
def test_assign_devices_balanced(n, d):
    devs = list(range(d))
    out = D.assign_devices(n, devs)
    assert len(out) == n
    counts = [out.count(i) for i in devs]
    assert max(counts) - min(counts) <= 1
    assert sum(counts) == n


def test_describe_cpu():
    info = D.describe_device("cpu")
    assert info["type"] == "cpu" and info["device"] == "cpu"
    assert info["torch"] == torch.__version__
    assert info["cores_logical"] >= 1 and info["memory_bytes"] > 0
    assert isinstance(info["name"], str) and info["name"]


def test_timer_cpu():
    with D.timer(torch.device("cpu")) as t:
        time.sleep(0.01)
    assert 0.005 < t.elapsed < 5.0
    assert t.device_elapsed is None


class _FakeEvent:
    def __init__(self, enable_timing=False):
        assert enable_timing
        self.stream = None

    def record(self, stream=None):
        self.stream = stream

    def elapsed_time(self, other):
        return 7.5  # ms


def test_timer_cuda_synchronizes_and_reads_events(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda dev=None: calls.append(("sync", str(dev))))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda dev=None: f"stream({dev})")
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    dev = torch.device("cuda", 1)
    with D.timer(dev) as t:
        calls.append(("work", ""))
    assert calls == [("sync", "cuda:1"), ("work", ""), ("sync", "cuda:1")]
    assert t.device_elapsed == pytest.approx(0.0075)
    assert t.elapsed >= 0
