"""Placing the configured replicas on a set of GPUs (cluster.devices), by memory.

Each replica needs weights + its KV cache + an activation reserve per device
of its tensor-parallel group (the analytic cost model's own memory budget),
split evenly over its `tp` devices; policies/placement.place_replicas packs
them best-fit decreasing. Replicas that do not fit are not built, and the run
reports which and why. Two replicas that share a device are simulated as if
each had it alone (no compute contention is modelled): the report lists such
devices under `shared_devices` so that the optimism is visible.
"""

from __future__ import annotations

from typing import Any

from policies.placement import Device, ReplicaSpec, place_replicas
from sim.config import SimConfig

GIB = 2**30
ACTIVATION_RESERVE_GIB = 2.0  # per device, as in sim/cost.AnalyticCost


def replica_memory_bytes(cost: Any, num_blocks: int, block_size: int, tp: int) -> int:
    model = getattr(cost, "model", None)
    if model is None or not hasattr(model, "kv_bytes_per_token"):
        raise ValueError("cluster.devices needs the model's weight and KV sizes: use an analytic profile "
                         "(MODEL@DEVICE), not a fitted profile file")
    weights = model.params * model.bytes_per_param
    kv = num_blocks * block_size * model.kv_bytes_per_token
    return int(weights + kv + tp * ACTIVATION_RESERVE_GIB * GIB)


def place(cfg: SimConfig, cost: Any, num_blocks: int) -> tuple[list[int], dict[str, Any]]:
    """Indices of the replicas that fit on cfg.cluster.devices GPUs, and a report of the placement."""
    cc = cfg.cluster
    device_gib = cc.device_memory_gib
    if device_gib is None:
        device = getattr(cost, "device", None)
        if device is None:
            raise ValueError("cluster.devices without cluster.device_memory_gib needs an analytic profile")
        device_gib = device.memory_gib
    usable = int(device_gib * cfg.gpu_memory_utilization * GIB)
    per_host = cc.devices_per_host or cc.devices
    devices = [Device(id=f"gpu{d}", memory=usable, host=f"host{d // per_host}") for d in range(cc.devices)]
    need = replica_memory_bytes(cost, num_blocks, cfg.scheduler.block_size, cfg.tp)
    specs = [ReplicaSpec(name=f"replica{i}", memory=need, tp=cfg.tp) for i in range(cfg.replicas)]
    p = place_replicas(devices, specs)
    placed = sorted(int(name[len("replica"):]) for name in p.assignments)
    users: dict[str, list[str]] = {}
    for name, group in p.assignments.items():
        for d in group:
            users.setdefault(str(d), []).append(name)
    report = {
        "devices": cc.devices, "device_memory_gib": device_gib, "usable_gib_per_device": usable / GIB,
        "replica_memory_gib": need / GIB, "tp": cfg.tp,
        "placed": {name: list(map(str, group)) for name, group in sorted(p.assignments.items())},
        "unplaced": [{"replica": u.replica.name, "reason": u.reason.value, "detail": u.detail} for u in p.unplaced],
        "shared_devices": {d: names for d, names in sorted(users.items()) if len(names) > 1},
    }
    return placed, report
