"""Fault injection: replica crashes (listed, or a seeded failure process) and result-cache node losses.

- A listed crash 'K@T+D' takes replica K down at T for D seconds (faults.mttr if no D).
- `faults.mtbf` runs a failure process per replica: up for Exp(mtbf), down for Exp(mttr), and so on,
  from one numpy generator per replica seeded by (seed, replica): the same seed gives the same faults.
- A crash loses the replica's in-flight work and its KV cache (GPU memory); the front end re-routes or
  fails its requests (faults.on_crash). It is seen at once (connections drop); after recovery the replica
  gets traffic again at the next active health check (health.interval).
- A cache-node loss 'N@T+D' makes result-cache node N unreachable from T (for D seconds, or for good):
  reads and writes of its keys fall back to the other replicas of each key on the hash ring.

The processes stop once every request has its record, so a failure process does not run forever.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import simpy

from sim.config import FaultSettings, parse_event


def start_faults(env: simpy.Environment, replicas: list, fe: Any, cfg: FaultSettings, seed: int) -> None:
    for spec in cfg.crashes:
        k, at, down = parse_event(spec, "faults.crashes")
        if k >= len(replicas):
            raise ValueError(f"faults.crashes={spec!r}: replica {k} does not exist "
                             f"({len(replicas)} replicas were built)")
        env.process(_crash_at(env, replicas[k], at, down if down is not None else cfg.mttr, fe))
    if cfg.mtbf is not None:
        for rep in replicas:
            rng = np.random.default_rng([seed, 0xFA17, rep.idx])
            env.process(_failure_process(env, rep, rng, cfg.mtbf, cfg.mttr, fe))
    for spec in cfg.cache_node_loss:
        node, at, down = parse_event(spec, "faults.cache_node_loss")
        env.process(_cache_node_loss(env, fe, node, at, down))


def _crash_at(env: simpy.Environment, rep: Any, at: float, down: float, fe: Any):
    if at > env.now:
        yield env.timeout(at - env.now)
    if not fe.finished():
        rep.crash(down)


def _failure_process(env: simpy.Environment, rep: Any, rng: np.random.Generator, mtbf: float, mttr: float, fe: Any):
    while True:
        yield env.timeout(float(rng.exponential(mtbf)))
        if fe.finished():
            return
        down = float(rng.exponential(mttr))
        rep.crash(down)
        yield env.timeout(down)


def _cache_node_loss(env: simpy.Environment, fe: Any, node: int, at: float, down: float | None):
    if at > env.now:
        yield env.timeout(at - env.now)
    fe.cache.node_down(node)
    fe.crash_log.append((env.now, "cache_node_down", node, down if down is not None else float("inf")))
    if down is not None:
        yield env.timeout(down)
        fe.cache.node_up(node)
        fe.crash_log.append((env.now, "cache_node_up", node, 0.0))
