import logging
import math
import threading
import time
from types import SimpleNamespace

import pynvml
import pytest

from executor.telemetry import TelemetrySampler

MIB = 1024 * 1024
CPU_COLS = {"t", "proc.cpu_pct", "proc.rss_mib", "sys.cpu_pct", "sys.mem_used_mib"}
WAIT = 10.0  # generous upper bound on event waits; tests finish far sooner


def _nvml_missing(*_a, **_k):
    raise pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)


@pytest.fixture
def no_nvml(monkeypatch):
    monkeypatch.setattr(pynvml, "nvmlInit", _nvml_missing)


class Counting:
    """A source that returns its call count and sets `reached` on the n-th call."""

    def __init__(self, n: int, key: str = "replica0.waiting"):
        self.n, self.key, self.calls = n, key, 0
        self.reached = threading.Event()

    def __call__(self):
        self.calls += 1
        if self.calls >= self.n:
            self.reached.set()
        return {self.key: self.calls}


def test_collects_samples_and_stops_by_itself(no_nvml):
    src = Counting(5)
    with TelemetrySampler(0.01, [src]) as tel:
        assert tel.running
        assert src.reached.wait(WAIT)
    assert not tel.running
    n = len(tel)
    assert n >= 5
    data = tel.to_dict()
    assert set(data) == CPU_COLS | {"replica0.waiting"}
    assert all(len(col) == n for col in data.values())
    t = data["t"]
    assert 0 <= t[0] < WAIT and all(b > a for a, b in zip(t, t[1:]))
    assert math.isnan(data["proc.cpu_pct"][0]) and math.isnan(data["sys.cpu_pct"][0])
    assert all(0 <= v for v in data["proc.cpu_pct"][1:])
    assert all(0 <= v <= 100 for v in data["sys.cpu_pct"][1:])
    assert all(v > 0 for v in data["proc.rss_mib"]) and all(v > 0 for v in data["sys.mem_used_mib"])
    assert data["replica0.waiting"] == [float(i) for i in range(1, n + 1)]
    time.sleep(0.05)
    assert len(tel) == n  # nothing sampled after stop
    tel.stop()  # idempotent


def test_thread_is_daemon(no_nvml):
    tel = TelemetrySampler(0.01).start()
    try:
        assert tel._thread is not None and tel._thread.daemon
    finally:
        tel.stop()
    with pytest.raises(RuntimeError):
        tel.start()


def test_gpu_absent_one_notice_no_crash(no_nvml, caplog):
    src = Counting(3)
    with caplog.at_level(logging.INFO, logger="executor.telemetry"):
        with TelemetrySampler(0.01, [src]) as tel:
            assert src.reached.wait(WAIT)
    notes = [r.getMessage() for r in caplog.records if "GPU telemetry" in r.getMessage()]
    assert len(notes) == 1
    assert notes[0].startswith("GPU telemetry off: NVML not available (")
    assert notes[0].endswith("recording CPU telemetry only")
    assert tel.notices == notes
    assert not tel.gpu_enabled
    assert not any(c.startswith("gpu") for c in tel.columns)


def test_gpu_off_by_request_is_silent(caplog):
    with caplog.at_level(logging.INFO, logger="executor.telemetry"):
        with TelemetrySampler(0.01, gpu=False) as tel:
            pass
    assert tel.notices == [] and not caplog.records
    assert set(tel.columns) == CPU_COLS


@pytest.fixture
def fake_nvml(monkeypatch):
    state = SimpleNamespace(inits=0, shutdowns=0, power_fails=set())

    def power(h):
        if h in state.power_fails:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return 312_500 + h  # mW

    def init():
        state.inits += 1

    def shutdown():
        state.shutdowns += 1

    monkeypatch.setattr(pynvml, "nvmlInit", init)
    monkeypatch.setattr(pynvml, "nvmlShutdown", shutdown)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetCount", lambda: 2)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetHandleByIndex", lambda i: i)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetUtilizationRates", lambda h: SimpleNamespace(gpu=87 + h, memory=40))
    monkeypatch.setattr(pynvml, "nvmlDeviceGetMemoryInfo",
                        lambda h: SimpleNamespace(total=80 * 1024 * MIB, used=3072 * MIB, free=(80 * 1024 - 3072) * MIB))
    monkeypatch.setattr(pynvml, "nvmlDeviceGetPowerUsage", power)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetTemperature",
                        lambda h, sensor: 61 if sensor == pynvml.NVML_TEMPERATURE_GPU else -1)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return state


def test_fake_nvml_gpu_columns_and_units(fake_nvml):
    src = Counting(3)
    with TelemetrySampler(0.01, [src]) as tel:
        assert src.reached.wait(WAIT)
    assert tel.gpu_enabled and tel.notices == []
    data = tel.to_dict()
    for i in (0, 1):
        assert data[f"gpu{i}.util_pct"][0] == 87 + i
        assert data[f"gpu{i}.mem_util_pct"][0] == 40
        assert data[f"gpu{i}.mem_used_mib"][0] == 3072.0  # bytes -> MiB
        assert data[f"gpu{i}.mem_total_mib"][0] == 81920.0
        assert data[f"gpu{i}.power_w"][0] == pytest.approx(312.5 + i / 1000)  # mW -> W
        assert data[f"gpu{i}.temp_c"][0] == 61.0
    assert fake_nvml.inits == 1 and fake_nvml.shutdowns == 1
    s = tel.summary()
    assert s["gpu0.power_w"] == {"mean": pytest.approx(312.5), "max": pytest.approx(312.5)}


def test_fake_nvml_unsupported_field_is_nan_with_one_warning(fake_nvml, caplog):
    fake_nvml.power_fails.add(1)
    src = Counting(4)
    with caplog.at_level(logging.INFO, logger="executor.telemetry"):
        with TelemetrySampler(0.01, [src]) as tel:
            assert src.reached.wait(WAIT)
    data = tel.to_dict()
    assert all(math.isnan(v) for v in data["gpu1.power_w"])
    assert data["gpu0.power_w"][0] == pytest.approx(312.5)
    assert data["gpu1.temp_c"][0] == 61.0
    warnings = [r for r in caplog.records if "gpu1.power_w" in r.getMessage()]
    assert len(warnings) == 1


def test_gpu_selection_follows_cuda_visible_devices(fake_nvml, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    with TelemetrySampler(0.01) as tel:
        pass
    gpu_cols = {c for c in tel.columns if c.startswith("gpu")}
    assert gpu_cols and all(c.startswith("gpu1.") for c in gpu_cols)
    with TelemetrySampler(0.01, gpu_indices=[0]) as tel:
        pass
    assert all(c.startswith("gpu0.") for c in tel.columns if c.startswith("gpu"))


def test_failing_source_gives_nan_and_one_warning(no_nvml, caplog):
    def broken():
        raise RuntimeError("engine gone")

    src = Counting(4)
    with caplog.at_level(logging.INFO, logger="executor.telemetry"):
        with TelemetrySampler(0.01, [broken, src]) as tel:
            assert src.reached.wait(WAIT)
    assert len([r for r in caplog.records if "engine gone" in r.getMessage()]) == 1
    assert len(tel) >= 4


def test_columns_appearing_late_are_backfilled(no_nvml):
    calls = {"n": 0}
    done = threading.Event()

    def late():
        calls["n"] += 1
        if calls["n"] >= 4:
            done.set()
        return {"replica1.running": 2.0} if calls["n"] >= 3 else {}

    with TelemetrySampler(0.01, [late]) as tel:
        assert done.wait(WAIT)
    col = tel.to_dict()["replica1.running"]
    assert math.isnan(col[0]) and math.isnan(col[1]) and col[2] == 2.0
    assert len(col) == len(tel)


def test_bounded_memory_by_decimation(no_nvml):
    src = Counting(60, key="tick")
    with TelemetrySampler(0.001, [src], max_samples=8) as tel:
        assert src.reached.wait(WAIT)
        assert len(tel) <= 8
    assert len(tel) <= 8
    ticks = tel.to_dict()["tick"]
    body = ticks[:-1]  # the last row is the closing sample
    steps = {b - a for a, b in zip(body, body[1:])}
    assert body[0] == 1.0 and len(steps) == 1  # uniform coverage from the start of the run
    stride = steps.pop()
    assert stride >= 8 and math.log2(stride).is_integer()
    assert tel.ticks >= 60


def test_listeners_see_every_tick(no_nvml):
    seen = []
    src = Counting(20)
    with TelemetrySampler(0.001, [src], listeners=[seen.append], max_samples=4) as tel:
        assert src.reached.wait(WAIT)
    assert len(seen) == tel.ticks > len(tel)
    assert "proc.rss_mib" in seen[0]


def test_t0_aligns_with_run_clock(no_nvml):
    t0 = time.perf_counter() - 100.0
    tel = TelemetrySampler(0.01).start(t0=t0)
    tel.stop()
    assert tel.to_dict()["t"][0] >= 100.0


def test_save_load_summary(no_nvml, tmp_path):
    src = Counting(3)
    with TelemetrySampler(0.01, [src, lambda: {"replica0.kv_usage": 0.5, "nan.col": float("nan")}]) as tel:
        assert src.reached.wait(WAIT)
    path = tel.save(tmp_path / "telemetry.csv")
    header = path.read_text().splitlines()[0].split(",")
    assert header[0] == "t" and set(header) == set(tel.columns)
    back = TelemetrySampler.load(path)
    orig = tel.to_dict()
    assert set(back) == set(orig)
    for name in orig:
        assert all((math.isnan(a) and math.isnan(b)) or a == b for a, b in zip(orig[name], back[name]))
    s = tel.summary()
    assert "t" not in s
    assert s["replica0.kv_usage"] == {"mean": 0.5, "max": 0.5}
    assert math.isnan(s["nan.col"]["mean"]) and math.isnan(s["nan.col"]["max"])
    n = len(orig["t"])
    assert s["replica0.waiting"]["max"] == n and s["replica0.waiting"]["mean"] == pytest.approx((n + 1) / 2)


def test_bad_arguments():
    with pytest.raises(ValueError):
        TelemetrySampler(0)
    with pytest.raises(ValueError):
        TelemetrySampler(0.1, max_samples=1)
