"""Which device runs the executor, what it is, and how to time a step on it honestly.

torch is imported inside the functions that need it, so `import executor.device`
stays cheap (the simulator and the CLI import this module without paying for torch).

    dev = select_device("auto")          # cuda:0 if there is one, else the CPU (with a notice)
    info = describe_device(dev)          # name, memory, capability, versions: saved with the run
    with timer(dev) as t:
        outcome = model_runner.run(plan)
    duration = t.elapsed                 # wall seconds, GPU work included
"""

from __future__ import annotations

import logging
import os
import platform
import re
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Self, TypeVar

from executor import hostmem

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

CPU_FALLBACK_NOTICE = "no CUDA device (torch.cuda.is_available() is False): running on the CPU"

_PREFERENCE = re.compile(r"^(auto|cpu|cuda)(?::(\d+))?$")

T = TypeVar("T")


class DeviceUnavailableError(RuntimeError):
    """The requested device does not exist on this machine."""


def select_device(preference: str = "auto") -> torch.device:
    """Resolve "auto", "cpu", "cuda" or "cuda:N" to a torch.device.

    "auto" picks the current CUDA device when torch sees one, else the CPU, and
    then logs CPU_FALLBACK_NOTICE once (a WARNING: CPU timings are not GPU timings).
    Asking for CUDA where there is none raises DeviceUnavailableError saying why.
    """
    import torch

    m = _PREFERENCE.match(preference.strip().lower())
    if m is None or (m.group(2) is not None and m.group(1) != "cuda"):
        raise ValueError(f"device preference {preference!r}: expected 'auto', 'cpu', 'cuda' or 'cuda:N'")
    kind, index = m.group(1), m.group(2)
    if kind == "cpu":
        return torch.device("cpu")
    if kind == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        log.warning(CPU_FALLBACK_NOTICE)
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DeviceUnavailableError(f"{preference!r} was requested but {_why_no_cuda()}; "
                                     "use 'cpu' or 'auto' to run on the CPU")
    n = torch.cuda.device_count()
    i = torch.cuda.current_device() if index is None else int(index)
    if i >= n:
        raise DeviceUnavailableError(f"{preference!r} was requested but torch sees {n} CUDA device(s) "
                                     f"(cuda:0..cuda:{n - 1}; CUDA_VISIBLE_DEVICES="
                                     f"{os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')})")
    return torch.device("cuda", i)


def select_devices(preference: str = "auto") -> list[torch.device]:
    """Every device a preference covers: "cuda"/"auto" -> all visible GPUs; otherwise one device."""
    import torch

    p = preference.strip().lower()
    if p in ("cuda", "auto") and torch.cuda.is_available():
        return [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    return [select_device(preference)]


def _why_no_cuda() -> str:
    import torch

    if torch.version.cuda is None:
        return f"this torch build ({torch.__version__}) has no CUDA support (torch.version.cuda is None)"
    return (f"torch.cuda.is_available() is False (torch {torch.__version__} built for CUDA {torch.version.cuda}: "
            "no driver or no visible GPU; CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')})")


def assign_devices(n_replicas: int, devices: Sequence[T]) -> list[T]:
    """Replica i runs on devices[i % len(devices)]: round-robin, one or more replicas per device."""
    if n_replicas < 0:
        raise ValueError(f"n_replicas must be >= 0, got {n_replicas}")
    if not devices:
        raise ValueError("assign_devices needs at least one device")
    return [devices[i % len(devices)] for i in range(n_replicas)]


def describe_device(dev: torch.device | str) -> dict[str, Any]:
    """A plain dict describing the device, for the run's metadata and the profile."""
    import torch

    dev = torch.device(dev)
    info: dict[str, Any] = {
        "device": str(dev),
        "type": dev.type,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "torch_threads": torch.get_num_threads(),
        "host_memory": hostmem.describe(),  # this process's C allocator setting (executor.hostmem)
    }
    if dev.type == "cuda":
        i = dev.index if dev.index is not None else torch.cuda.current_device()
        p = torch.cuda.get_device_properties(i)
        info.update(
            index=i,
            name=p.name,
            memory_bytes=int(p.total_memory),
            capability=f"{p.major}.{p.minor}",
            multiprocessors=p.multi_processor_count,
            cudnn=torch.backends.cudnn.version(),
        )
        return info
    import psutil

    info.update(
        name=_cpu_model(),
        memory_bytes=int(psutil.virtual_memory().total),
        capability=None,
        cores_physical=psutil.cpu_count(logical=False),
        cores_logical=psutil.cpu_count(logical=True),
        machine=platform.machine(),
    )
    return info


def _cpu_model() -> str:
    # platform.processor() is often empty on Linux; /proc/cpuinfo has the marketing name.
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


class StepTimer:
    """Context manager timing a block of device work.

    `elapsed` is wall seconds from entry to exit with all GPU work done: on CUDA the
    device is synchronized on entry (so earlier work is not billed to this step) and
    on exit (so this step's asynchronous kernels are). `device_elapsed` is the time
    between two CUDA events on the current stream (GPU-side only; None on the CPU);
    elapsed - device_elapsed is roughly host overhead.
    """

    __slots__ = ("_events", "_t0", "device", "device_elapsed", "elapsed")

    def __init__(self, device: torch.device | str):
        self.device = device
        self.elapsed = float("nan")
        self.device_elapsed: float | None = None
        self._t0 = 0.0
        self._events: tuple[Any, Any, Any] | None = None

    def _is_cuda(self) -> bool:
        return (self.device if isinstance(self.device, str) else self.device.type).startswith("cuda")

    def __enter__(self) -> Self:
        if self._is_cuda():
            import torch

            torch.cuda.synchronize(self.device)
            stream = torch.cuda.current_stream(self.device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self._events = (stream, start, end)
            self._t0 = time.perf_counter()
            start.record(stream)
        else:
            self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._events is not None:
            import torch

            stream, start, end = self._events
            end.record(stream)
            torch.cuda.synchronize(self.device)
            self.elapsed = time.perf_counter() - self._t0
            self.device_elapsed = start.elapsed_time(end) / 1000.0  # ms -> s
            self._events = None
        else:
            self.elapsed = time.perf_counter() - self._t0


def timer(dev: torch.device | str) -> StepTimer:
    """`with timer(dev) as t: ...` then read t.elapsed (seconds)."""
    return StepTimer(dev)
