"""Multi-GPU scheduling: placing model replicas on devices, and GPU tasks on devices.

`place_replicas` packs tensor-parallel replicas onto devices by memory (best
fit decreasing). `TaskScheduler` sends independent GPU tasks (embeddings,
tool-model calls) to the device predicted to finish them first.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Hashable, NamedTuple, Sequence

DeviceId = Hashable


@dataclass(frozen=True)
class Device:
    id: DeviceId
    memory: int  # bytes free for model replicas
    host: str = ""  # a tensor-parallel group stays on one host (NVLink); "" = all one host

    def __post_init__(self) -> None:
        if self.memory < 0:
            raise ValueError(f"Device.memory must be >= 0 bytes, got {self.memory}")


@dataclass(frozen=True)
class ReplicaSpec:
    name: str
    memory: int  # bytes for the whole replica (weights + KV budget), split evenly over its TP group
    tp: int = 1  # tensor-parallel group size: the replica needs this many distinct devices

    def __post_init__(self) -> None:
        if self.memory < 1:
            raise ValueError(f"ReplicaSpec.memory must be >= 1 byte, got {self.memory}")
        if self.tp < 1:
            raise ValueError(f"ReplicaSpec.tp must be >= 1, got {self.tp}")

    @property
    def per_device(self) -> int:
        return -(-self.memory // self.tp)


class UnplacedReason(enum.Enum):
    TOO_FEW_DEVICES = "too_few_devices"  # no host has tp devices at all
    OUT_OF_MEMORY = "out_of_memory"  # less free memory in total than the replica needs
    FRAGMENTED = "fragmented"  # enough in total, but no host has tp devices with per_device free each


@dataclass(frozen=True)
class Unplaced:
    replica: ReplicaSpec
    reason: UnplacedReason
    detail: str


@dataclass
class Placement:
    assignments: dict[str, tuple[DeviceId, ...]] = field(default_factory=dict)  # replica -> its TP group
    unplaced: list[Unplaced] = field(default_factory=list)
    free: dict[DeviceId, int] = field(default_factory=dict)  # memory left on each device


def place_replicas(devices: Sequence[Device], replicas: Sequence[ReplicaSpec]) -> Placement:
    """Best-fit decreasing bin packing of TP replicas onto devices.

    Replicas go largest per-device share first (then larger tp, then input
    order). A TP-k replica takes k distinct devices of one host, each with
    `per_device` bytes free: on each host the k tightest-fitting devices,
    and the host whose choice leaves the least memory over. Ties go to the
    earlier device in `devices`. A device is never over-committed.
    """
    if len({d.id for d in devices}) != len(devices):
        raise ValueError("device ids must be unique")
    if len({r.name for r in replicas}) != len(replicas):
        raise ValueError("replica names must be unique")
    rank = {d.id: i for i, d in enumerate(devices)}
    free = {d.id: d.memory for d in devices}
    hosts: dict[str, list[DeviceId]] = {}
    for d in devices:
        hosts.setdefault(d.host, []).append(d.id)
    out = Placement(free=free)
    order = sorted(range(len(replicas)), key=lambda i: (-replicas[i].per_device, -replicas[i].tp, i))
    for i in order:
        r = replicas[i]
        group = _best_group(r, hosts, free, rank)
        if isinstance(group, Unplaced):
            out.unplaced.append(group)
            continue
        for dev in group:
            free[dev] -= r.per_device
        out.assignments[r.name] = group
    return out


def _best_group(r: ReplicaSpec, hosts: dict[str, list[DeviceId]], free: dict[DeviceId, int],
                rank: dict[DeviceId, int]) -> tuple[DeviceId, ...] | Unplaced:
    best: tuple[int, int, tuple[DeviceId, ...]] | None = None  # (leftover, rank of first device, group)
    for devs in hosts.values():
        fits = sorted((d for d in devs if free[d] >= r.per_device), key=lambda d: (free[d], rank[d]))
        if len(fits) < r.tp:
            continue
        group = tuple(sorted(fits[:r.tp], key=rank.__getitem__))
        cand = (sum(free[d] - r.per_device for d in group), rank[group[0]], group)
        if best is None or cand[:2] < best[:2]:
            best = cand
    if best is not None:
        return best[2]
    largest_host = max((len(devs) for devs in hosts.values()), default=0)
    if largest_host < r.tp:
        return Unplaced(r, UnplacedReason.TOO_FEW_DEVICES,
                        f"tp={r.tp} but the largest host has {largest_host} devices")
    total_free = sum(free.values())
    if total_free < r.memory:
        return Unplaced(r, UnplacedReason.OUT_OF_MEMORY, f"needs {r.memory} bytes, {total_free} free in total")
    return Unplaced(r, UnplacedReason.FRAGMENTED,
                    f"no host has {r.tp} devices with {r.per_device} bytes free each")


@dataclass(frozen=True)
class TaskDevice:
    id: DeviceId
    speed: float = 1.0  # work units per second (1.0 = the reference device)

    def __post_init__(self) -> None:
        if not self.speed > 0:
            raise ValueError(f"TaskDevice.speed must be > 0, got {self.speed}")


@dataclass(frozen=True)
class GpuTask:
    id: int
    work: float  # seconds on the reference device (speed 1.0)

    def __post_init__(self) -> None:
        if not self.work >= 0:
            raise ValueError(f"GpuTask.work must be >= 0 s, got {self.work}")


class Assignment(NamedTuple):
    device: DeviceId
    start: float
    predicted_finish: float


class TaskScheduler:
    """Earliest-predicted-finish dispatch of independent tasks; each device runs its tasks one at a time, FIFO.

    `submit` picks the device with the lowest predicted finish time
    (max(now, device free at) + work / speed; ties to the earlier device).
    `complete` reports the actual finish: the device's later tasks then
    start at that time, so a prediction error shifts them all.
    """

    def __init__(self, devices: Sequence[TaskDevice]) -> None:
        if not devices:
            raise ValueError("TaskScheduler needs at least one device")
        if len({d.id for d in devices}) != len(devices):
            raise ValueError("device ids must be unique")
        self.devices = tuple(devices)
        self._free_at: dict[DeviceId, float] = {d.id: 0.0 for d in devices}
        self._pending: dict[DeviceId, dict[int, float]] = {d.id: {} for d in devices}  # task -> duration, FIFO
        self._where: dict[int, DeviceId] = {}

    def predict(self, task: GpuTask, now: float) -> Assignment:
        """Where `task` would go if submitted now (changes nothing)."""
        best: Assignment | None = None
        for d in self.devices:
            start = max(now, self._free_at[d.id])
            a = Assignment(d.id, start, start + task.work / d.speed)
            if best is None or a.predicted_finish < best.predicted_finish:
                best = a
        assert best is not None
        return best

    def submit(self, task: GpuTask, now: float) -> Assignment:
        if task.id in self._where:
            raise ValueError(f"task {task.id} was already submitted")
        a = self.predict(task, now)
        self._free_at[a.device] = a.predicted_finish
        self._pending[a.device][task.id] = a.predicted_finish - a.start
        self._where[task.id] = a.device
        return a

    def complete(self, task_id: int, now: float) -> None:
        """Task `task_id` finished at `now`; the device's remaining tasks run back to back from `now`."""
        dev = self._where.pop(task_id)
        del self._pending[dev][task_id]
        self._free_at[dev] = now + sum(self._pending[dev].values())

    def free_at(self, device: DeviceId) -> float:
        """Predicted time the device finishes everything it has been given."""
        return self._free_at[device]

    def pending(self, device: DeviceId) -> list[int]:
        """Unfinished task ids on the device, in submission order."""
        return list(self._pending[device])
