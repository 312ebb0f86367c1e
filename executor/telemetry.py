"""Resource telemetry sampled on a background thread and saved with the run.

Every `interval_s` the sampler records one row:

    t                  seconds since start (or since the `t0` given to start())
    proc.cpu_pct       this process's CPU %, psutil convention: 100 = one core busy
    proc.rss_mib       this process's resident memory, MiB
    sys.cpu_pct        whole-machine CPU %, 0..100 over all cores
    sys.mem_used_mib   whole-machine memory in use (total - available), MiB
    gpu{i}.util_pct, gpu{i}.mem_util_pct, gpu{i}.mem_used_mib, gpu{i}.mem_total_mib,
    gpu{i}.power_w, gpu{i}.temp_c
                       per NVML device i, when NVML works (same meanings as DCGM's
                       GPU_UTIL, MEM_COPY_UTIL, FB_USED, POWER_USAGE (W), GPU_TEMP (C))
    ...                whatever the sources return, e.g. the engine's
                       lambda: {"replica0.waiting": 3, "replica0.running": 8,
                                "replica0.kv_usage": 0.41, "replica0.prefix_hit_rate": 0.7}

The first row's CPU columns are NaN (a percentage needs an interval). A value a
source or NVML could not give is NaN, and a column that appears late is NaN before.

Bounded memory: at most `max_samples` rows are kept. When the buffer is full every
other row is dropped and from then on only every second tick is stored, so the
table always covers the whole run at uniform (halved, quartered, ...) resolution
and holds at most max_samples * columns floats. Listeners (live metrics) still see
every tick.

Without a GPU, a driver, or nvidia-ml-py, the sampler logs one notice
("GPU telemetry off: ...") and records CPU telemetry only.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import threading
import time
from array import array
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import psutil

log = logging.getLogger(__name__)

Source = Callable[[], Mapping[str, float]]
Listener = Callable[[Mapping[str, float]], None]

NAN = float("nan")
MIB = 1024 * 1024
GPU_FIELDS = ("util_pct", "mem_util_pct", "mem_used_mib", "mem_total_mib", "power_w", "temp_c")


class _Nvml:
    """NVML handles for the chosen devices; `sample()` returns their gpu{i}.* columns."""

    def __init__(self, indices: Sequence[int] | None):
        import pynvml  # nvidia-ml-py; attribute lookups at call time so tests can fake it

        self.nv = pynvml
        pynvml.nvmlInit()
        try:
            count = pynvml.nvmlDeviceGetCount()
            chosen = list(range(count)) if indices is None else [i for i in indices if 0 <= i < count]
            self.handles = {i: pynvml.nvmlDeviceGetHandleByIndex(i) for i in chosen}
        except Exception:
            pynvml.nvmlShutdown()
            raise
        self._failed: set[str] = set()

    def sample(self) -> dict[str, float]:
        nv = self.nv
        out: dict[str, float] = {}
        for i, h in self.handles.items():
            p = f"gpu{i}."
            util = self._read(p + "util_pct", lambda: nv.nvmlDeviceGetUtilizationRates(h))
            out[p + "util_pct"] = NAN if util is None else float(util.gpu)
            out[p + "mem_util_pct"] = NAN if util is None else float(util.memory)
            mem = self._read(p + "mem_used_mib", lambda: nv.nvmlDeviceGetMemoryInfo(h))
            out[p + "mem_used_mib"] = NAN if mem is None else mem.used / MIB
            out[p + "mem_total_mib"] = NAN if mem is None else mem.total / MIB
            mw = self._read(p + "power_w", lambda: nv.nvmlDeviceGetPowerUsage(h))
            out[p + "power_w"] = NAN if mw is None else mw / 1000.0  # NVML reports milliwatts
            temp = self._read(p + "temp_c", lambda: nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU))
            out[p + "temp_c"] = NAN if temp is None else float(temp)
        return out

    def _read(self, what: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except self.nv.NVMLError as e:  # e.g. power or utilisation "Not Supported" on MIG slices
            if what not in self._failed:
                self._failed.add(what)
                log.warning("GPU telemetry: %s unavailable (%s); recording NaN", what, e)
            return None

    def close(self) -> None:
        try:
            self.nv.nvmlShutdown()
        except Exception:
            pass


def _visible_gpu_indices() -> list[int] | None:
    """NVML indices matching CUDA_VISIBLE_DEVICES when it lists plain integers; None = all GPUs.

    NVML ignores CUDA_VISIBLE_DEVICES, so without this a run pinned to GPU 3 would
    record the whole machine. (UUID/MIG forms are not mapped: all GPUs are sampled.)
    """
    v = os.environ.get("CUDA_VISIBLE_DEVICES")
    if v is None or not v.strip():
        return None
    parts = [p.strip() for p in v.split(",")]
    if all(p.isdigit() for p in parts):
        return [int(p) for p in parts]
    return None


class TelemetrySampler:
    """Background sampler of CPU, memory, GPU (NVML) and pluggable gauges.

        with TelemetrySampler(0.5, [engine_gauges], listeners=[metrics.on_telemetry]) as tel:
            run()
        tel.save(run_dir / "telemetry.csv"); tel.summary()

    Sources are called on the sampler thread; they should be cheap and only read
    state (a stale-by-one-step value is fine; an exception gives NaN and one warning).
    """

    def __init__(
        self,
        interval_s: float = 0.5,
        sources: Iterable[Source] = (),
        *,
        listeners: Iterable[Listener] = (),
        max_samples: int = 20_000,
        gpu: bool = True,
        gpu_indices: Sequence[int] | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ):
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        if max_samples < 2:
            raise ValueError(f"max_samples must be >= 2, got {max_samples}")
        self.interval_s = interval_s
        self.max_samples = max_samples - max_samples % 2  # even, so decimation keeps ticks aligned
        self._sources = list(sources)
        self._listeners = list(listeners)
        self._want_gpu = gpu
        self._gpu_indices = gpu_indices
        self._clock = clock

        self.notices: list[str] = []
        self.gpu_enabled = False
        self.ticks = 0  # samples taken, stored or not
        self._cols: dict[str, array] = {"t": array("d")}
        self._stride = 1  # store every stride-th tick
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._nvml: _Nvml | None = None
        self._proc = psutil.Process()
        self._t0 = 0.0
        self._failed: set[int] = set()

    # -- lifecycle ---------------------------------------------------------

    def add_source(self, source: Source) -> None:
        if self._thread is not None:
            raise RuntimeError("add sources before start()")
        self._sources.append(source)

    def add_listener(self, listener: Listener) -> None:
        if self._thread is not None:
            raise RuntimeError("add listeners before start()")
        self._listeners.append(listener)

    def start(self, t0: float | None = None) -> TelemetrySampler:
        """Start sampling; `t0` (on the sampler's clock) aligns `t` with the run's clock."""
        if self._thread is not None:
            raise RuntimeError("TelemetrySampler already started")
        self._t0 = self._clock() if t0 is None else t0
        if self._want_gpu:
            self._open_nvml()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="twinfer-telemetry", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread (one last sample is taken on the way out); safe to call twice."""
        t = self._thread
        if t is None:
            return
        self._stop.set()
        t.join(timeout)
        if t.is_alive():
            log.warning("telemetry thread did not stop within %.1f s (a source is blocking?)", timeout)
            return  # it is a daemon: it will not keep the process alive
        if self._nvml is not None:
            self._nvml.close()
            self._nvml = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def __enter__(self) -> TelemetrySampler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _open_nvml(self) -> None:
        try:
            self._nvml = _Nvml(self._gpu_indices if self._gpu_indices is not None else _visible_gpu_indices())
        except Exception as e:  # ImportError, NVMLError_LibraryNotFound, NVMLError_DriverNotLoaded, ...
            self._notice(f"GPU telemetry off: NVML not available ({type(e).__name__}: {e}); "
                         "recording CPU telemetry only")
            return
        if not self._nvml.handles:
            self._nvml.close()
            self._nvml = None
            self._notice("GPU telemetry off: NVML sees no GPU; recording CPU telemetry only")
            return
        self.gpu_enabled = True

    def _notice(self, msg: str) -> None:
        self.notices.append(msg)
        log.warning(msg)

    # -- sampling ----------------------------------------------------------

    def _run(self) -> None:
        next_t = self._clock()
        while True:
            self._tick(store=self.ticks % self._stride == 0)
            next_t += self.interval_s
            now = self._clock()
            if next_t < now:  # fell behind (slow source, suspended process): skip, don't burst
                next_t = now + self.interval_s
            if self._stop.wait(next_t - now):
                break
        self._tick(store=True)

    def _tick(self, store: bool) -> None:
        first = self.ticks == 0
        row: dict[str, float] = {"t": self._clock() - self._t0}
        row.update(self._cpu(first))
        if self._nvml is not None:
            row.update(self._nvml.sample())
        for k, src in enumerate(self._sources):
            try:
                row.update({name: float(v) for name, v in src().items()})
            except Exception as e:
                if k not in self._failed:
                    self._failed.add(k)
                    log.warning("telemetry source %r failed (%s: %s); its columns are NaN", src, type(e).__name__, e)
        self.ticks += 1
        if store:
            self._append(row)
        for k, fn in enumerate(self._listeners):
            try:
                fn(row)
            except Exception as e:
                if -1 - k not in self._failed:
                    self._failed.add(-1 - k)
                    log.warning("telemetry listener %r failed (%s: %s)", fn, type(e).__name__, e)

    def _cpu(self, first: bool) -> dict[str, float]:
        # cpu_percent(None) measures since the previous call (psutil keeps that per thread /
        # per Process object), so the first call only primes it.
        proc_cpu = self._proc.cpu_percent(None)
        sys_cpu = psutil.cpu_percent(None)
        vm = psutil.virtual_memory()
        return {
            "proc.cpu_pct": NAN if first else proc_cpu,
            "proc.rss_mib": self._proc.memory_info().rss / MIB,
            "sys.cpu_pct": NAN if first else sys_cpu,
            "sys.mem_used_mib": (vm.total - vm.available) / MIB,
        }

    def _append(self, row: Mapping[str, float]) -> None:
        with self._lock:
            cols = self._cols
            n = len(cols["t"])
            for name in row:
                if name not in cols:
                    cols[name] = array("d", [NAN]) * n
            for name, col in cols.items():
                col.append(row.get(name, NAN))
            if n + 1 >= self.max_samples:
                for name in cols:
                    cols[name] = cols[name][::2]
                self._stride *= 2

    # -- results -----------------------------------------------------------

    @property
    def columns(self) -> list[str]:
        with self._lock:
            return list(self._cols)

    def __len__(self) -> int:
        with self._lock:
            return len(self._cols["t"])

    def to_dict(self) -> dict[str, list[float]]:
        """Columnar copy: {"t": [...], "proc.cpu_pct": [...], ...}, all columns the same length."""
        with self._lock:
            return {name: col.tolist() for name, col in self._cols.items()}

    def summary(self) -> dict[str, dict[str, float]]:
        """{series: {"mean": ..., "max": ...}} over stored samples, NaNs ignored (NaN if none)."""
        out: dict[str, dict[str, float]] = {}
        for name, vals in self.to_dict().items():
            if name == "t":
                continue
            ok = [v for v in vals if not math.isnan(v)]
            out[name] = {"mean": sum(ok) / len(ok) if ok else NAN, "max": max(ok) if ok else NAN}
        return out

    def save(self, path: str | Path) -> Path:
        """Write the samples as CSV (header = columns; NaN written as an empty cell)."""
        path = Path(path)
        data = self.to_dict()
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(data)
            for row in zip(*data.values()):
                w.writerow(["" if math.isnan(v) else repr(v) for v in row])
        return path

    @staticmethod
    def load(path: str | Path) -> dict[str, list[float]]:
        """Read a CSV written by save() back into columns."""
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
        header, body = rows[0], rows[1:]
        return {name: [float(r[j]) if r[j] else NAN for r in body] for j, name in enumerate(header)}
