"""Run configuration: frozen dataclasses, built from flags or a TOML file, validated on construction.

Building a config writes no file and changes no global, so a tuner can build
thousands in one process.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from policies.queues import EDF_DEFAULT_DEADLINE, SJF_AGING
from policies.routers import ROUTERS
from policies.scheduler import SchedulerConfig


class ConfigError(ValueError):
    """A bad configuration value: names the source (file or flag) and the key."""


@dataclass(frozen=True)
class SLO:
    ttft: float | None = None  # s
    tpot: float | None = None  # s per output token
    e2e: float | None = None  # s

    def __post_init__(self) -> None:
        for k in ("ttft", "tpot", "e2e"):
            v = getattr(self, k)
            if v is not None and not v > 0:
                raise ValueError(f"slo.{k}={v!r} is out of range; allowed: > 0 or unset")


def _range(name: str, ok: bool, allowed: str, value: object) -> None:
    if not ok:
        raise ValueError(f"{name}={value!r} is out of range; allowed: {allowed}")


@dataclass(frozen=True)
class ResultCacheSettings:
    """A result cache in front of the engines (policies/result_cache.py, policies/hash_ring.py)."""

    capacity: int = 0  # entries per cache node; 0 = no result cache
    ttl: float = 300.0  # s an entry lives after it was written
    latency: float = 0.001  # s per lookup: a hit is answered after it, a miss goes to a replica after it
    nodes: int = 0  # 0: one LRU; N >= 1: N cache nodes on a consistent-hash ring
    replication: int = 1  # nodes holding each key (ring only)
    vnodes: int = 100  # ring points per node (ring only)

    def __post_init__(self) -> None:
        _range("result_cache.capacity", self.capacity >= 0, ">= 0 (0 = off)", self.capacity)
        _range("result_cache.ttl", self.ttl > 0, "> 0 (inf = never expires)", self.ttl)
        _range("result_cache.latency", 0 <= self.latency < math.inf, ">= 0", self.latency)
        _range("result_cache.nodes", self.nodes >= 0, ">= 0 (0 = one LRU)", self.nodes)
        _range("result_cache.replication", self.replication >= 1, ">= 1", self.replication)
        _range("result_cache.vnodes", self.vnodes >= 1, ">= 1", self.vnodes)

    @property
    def enabled(self) -> bool:
        return self.capacity > 0


def parse_event(spec: Any, what: str) -> tuple[int, float, float | None]:
    """'K@T' or 'K@T+D' (or [K, T] / [K, T, D]) -> (target index, at s, down for s or None)."""
    try:
        if isinstance(spec, str):
            target, rest = spec.split("@", 1)
            at, _, down = rest.partition("+")
            k, t, d = int(target), float(at), (float(down) if down else None)
        elif isinstance(spec, (list, tuple)) and len(spec) in (2, 3):
            k, t = int(spec[0]), float(spec[1])
            d = float(spec[2]) if len(spec) == 3 else None
        else:
            raise ValueError
    except (ValueError, TypeError):
        raise ValueError(f"{what}={spec!r} is not an event; expected 'INDEX@TIME' or 'INDEX@TIME+DOWN' "
                         f"(seconds), e.g. '0@120+30'") from None
    if k < 0 or not 0 <= t < math.inf or (d is not None and not d > 0):
        raise ValueError(f"{what}={spec!r} is out of range; allowed: index >= 0, time >= 0, down > 0")
    return k, t, d


def _event_str(k: int, t: float, d: float | None) -> str:
    return f"{k}@{t!r}" + (f"+{d!r}" if d is not None else "")


@dataclass(frozen=True)
class FaultSettings:
    """Replica crashes (listed, or a seeded failure process) and cache-node losses."""

    crashes: tuple[str, ...] = ()  # 'REPLICA@T[+DOWN]': down for DOWN s (default mttr)
    mtbf: float | None = None  # s: each replica fails after Exp(mtbf) up, recovers after Exp(mttr); unset = off
    mttr: float = 30.0  # s
    on_crash: str = "retry"  # in-flight requests of a crashed replica: retry elsewhere | fail
    max_retries: int = 3  # a request crashed on more than this many times fails
    cache_node_loss: tuple[str, ...] = ()  # 'NODE@T[+DOWN]': a result-cache node is unreachable (forever)

    def __post_init__(self) -> None:
        for name in ("crashes", "cache_node_loss"):
            v = getattr(self, name)
            if isinstance(v, (str, bytes)):
                v = [v]
            if not isinstance(v, (list, tuple)):
                raise ValueError(f"faults.{name}={v!r} must be a list of 'INDEX@TIME[+DOWN]' events")
            object.__setattr__(self, name, tuple(_event_str(*parse_event(e, f"faults.{name}")) for e in v))
        _range("faults.mtbf", self.mtbf is None or 0 < self.mtbf < math.inf, "> 0 or unset", self.mtbf)
        _range("faults.mttr", 0 < self.mttr < math.inf, "> 0", self.mttr)
        _range("faults.on_crash", self.on_crash in ("retry", "fail"), "retry | fail", self.on_crash)
        _range("faults.max_retries", self.max_retries >= 0, ">= 0", self.max_retries)

    @property
    def replica_faults(self) -> bool:
        return bool(self.crashes) or self.mtbf is not None


@dataclass(frozen=True)
class HealthSettings:
    # A crash is seen at once (its connections drop); a recovered replica is marked healthy at the next
    # active health check, every `interval` s on a fixed grid from t = 0 (0 = at once).
    interval: float = 1.0

    def __post_init__(self) -> None:
        _range("health.interval", 0 <= self.interval < math.inf, ">= 0", self.interval)


def parse_think(spec: str) -> tuple[str, float]:
    """'trace' | 'S' (fixed seconds) | 'exp:MEAN' -> (kind, value)."""
    s = str(spec).strip()
    try:
        if s == "trace":
            return "trace", 0.0
        if s.startswith("exp:"):
            v = float(s[4:])
            if v > 0:
                return "exp", v
        else:
            v = float(s)
            if v >= 0:
                return "fixed", v
    except ValueError:
        pass
    raise ValueError(f"sessions.think={spec!r} is out of range; allowed: trace | SECONDS (>= 0) | exp:MEAN (> 0)")


@dataclass(frozen=True)
class SessionSettings:
    mode: str = "open"  # open: every request at its recorded time; closed: step k+1 after step k finishes + think
    think: str = "trace"  # closed loop think time: trace (the recorded gap) | SECONDS | exp:MEAN (seeded)

    def __post_init__(self) -> None:
        _range("sessions.mode", self.mode in ("open", "closed"), "open | closed", self.mode)
        parse_think(self.think)


@dataclass(frozen=True)
class MemorySettings:
    sample_interval: float = 0.0  # s between KV samples per replica (at step ends); 0 = no time series
    reclaim_high: float | None = None  # evict cached KV blocks when the used share (cached included) exceeds this
    reclaim_low: float = 0.7  # ... down to this

    def __post_init__(self) -> None:
        _range("memory.sample_interval", 0 <= self.sample_interval < math.inf, ">= 0", self.sample_interval)
        if self.reclaim_high is not None:
            _range("memory.reclaim_high", 0 < self.reclaim_high <= 1, "(0, 1] or unset", self.reclaim_high)
            _range("memory.reclaim_low", 0 <= self.reclaim_low < self.reclaim_high, f"[0, {self.reclaim_high})",
                   self.reclaim_low)


@dataclass(frozen=True)
class ClusterSettings:
    devices: int = 0  # GPUs to place replicas on (best-fit by memory); 0 = every replica has its own
    device_memory_gib: float | None = None  # per device; default: the profile's device
    devices_per_host: int = 0  # a tensor-parallel group stays on one host; 0 = one host

    def __post_init__(self) -> None:
        _range("cluster.devices", self.devices >= 0, ">= 0", self.devices)
        _range("cluster.device_memory_gib", self.device_memory_gib is None or self.device_memory_gib > 0,
               "> 0 or unset", self.device_memory_gib)
        _range("cluster.devices_per_host", self.devices_per_host >= 0, ">= 0", self.devices_per_host)


@dataclass(frozen=True)
class GpuTaskSettings:
    """An independent stream of GPU tasks (embeddings, tool-model calls) on a separate pool of devices,
    dispatched by policies.placement.TaskScheduler (sim/gpu_tasks.py)."""

    rate: float = 0.0  # tasks/s, Poisson over the span of the LLM workload; 0 = off
    work: float = 0.05  # mean s of work on a speed-1.0 device
    work_cv: float = 0.0  # 0 = every task has `work`; else Gamma with this coefficient of variation
    speeds: tuple[float, ...] = (1.0,)  # one device per entry (work units per s); a list or "1,2"
    jitter: float = 0.0  # actual duration = predicted * lognormal(0, jitter) (seeded); 0 = exact predictions

    def __post_init__(self) -> None:
        _range("gpu_tasks.rate", 0 <= self.rate < math.inf, ">= 0 (0 = off)", self.rate)
        _range("gpu_tasks.work", 0 <= self.work < math.inf, ">= 0", self.work)
        _range("gpu_tasks.work_cv", 0 <= self.work_cv < math.inf, ">= 0", self.work_cv)
        _range("gpu_tasks.jitter", 0 <= self.jitter < math.inf, ">= 0", self.jitter)
        v = self.speeds
        if isinstance(v, str):
            v = [x for x in v.replace(" ", "").split(",") if x]
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            v = [v]
        if not isinstance(v, (list, tuple)) or not v:
            raise ValueError(f"gpu_tasks.speeds={self.speeds!r} must be a non-empty list of device speeds, "
                             f"e.g. [1.0, 2.0] or '1,2'")
        try:
            speeds = tuple(float(x) for x in v if not isinstance(x, bool))
        except (TypeError, ValueError):
            speeds = ()
        if len(speeds) != len(v):
            raise ValueError(f"gpu_tasks.speeds={self.speeds!r} must be numbers, e.g. [1.0, 2.0] or '1,2'")
        for x in speeds:
            _range("gpu_tasks.speeds", 0 < x < math.inf, "each > 0", list(speeds))
        object.__setattr__(self, "speeds", speeds)

    @property
    def enabled(self) -> bool:
        return self.rate > 0


@dataclass(frozen=True)
class QueueSettings:
    """Options of the waiting-queue disciplines (scheduler.queue picks one)."""

    sjf_aging: float = SJF_AGING  # tokens of priority gained per second waited
    edf_deadlines: dict[str, float] = field(default_factory=dict)  # SLO class -> s after the send time
    edf_default_deadline: float = EDF_DEFAULT_DEADLINE

    def __post_init__(self) -> None:
        _range("queue.sjf_aging", 0 <= self.sjf_aging < math.inf, ">= 0", self.sjf_aging)
        if not isinstance(self.edf_deadlines, dict):
            raise ValueError(f"queue.edf_deadlines={self.edf_deadlines!r} must be a table of class = seconds")
        for k, v in self.edf_deadlines.items():
            _range(f"queue.edf_deadlines.{k}", isinstance(v, (int, float)) and v >= 0, ">= 0", v)
        _range("queue.edf_default_deadline", self.edf_default_deadline >= 0, ">= 0", self.edf_default_deadline)

    def options(self, queue: str) -> dict[str, Any]:
        """Keyword arguments for policies.queues.create_queue(queue, ...)."""
        if queue == "sjf":
            return {"aging": self.sjf_aging}
        if queue == "edf":
            return {"deadlines": dict(self.edf_deadlines), "default_deadline": self.edf_default_deadline}
        return {}


@dataclass(frozen=True)
class SimConfig:
    replicas: int = 1
    router: str = "least_outstanding"
    profile: str = "llama3-8b@h100-80gb"
    tp: int = 1
    gpu_memory_utilization: float = 0.9
    num_blocks: int | None = None  # KV blocks per replica; default: from the profile's memory
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    slo: SLO = field(default_factory=SLO)
    seed: int = 0
    jump: bool = True  # advance runs of identical decode steps in one event (same records)
    queue: QueueSettings = field(default_factory=QueueSettings)
    result_cache: ResultCacheSettings = field(default_factory=ResultCacheSettings)
    faults: FaultSettings = field(default_factory=FaultSettings)
    health: HealthSettings = field(default_factory=HealthSettings)
    sessions: SessionSettings = field(default_factory=SessionSettings)
    memory: MemorySettings = field(default_factory=MemorySettings)
    cluster: ClusterSettings = field(default_factory=ClusterSettings)
    gpu_tasks: GpuTaskSettings = field(default_factory=GpuTaskSettings)

    def __post_init__(self) -> None:
        if not 1 <= self.replicas <= 100_000:
            raise ValueError(f"replicas={self.replicas!r} is out of range; allowed: 1..100000")
        if self.router not in ROUTERS:
            raise ValueError(f"unknown router '{self.router}'; valid: {', '.join(sorted(ROUTERS))}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_blocks={self.num_blocks!r} is out of range; allowed: >= 1 or unset")
        for e in self.faults.crashes:
            k = parse_event(e, "faults.crashes")[0]
            _range("faults.crashes", k < self.replicas, f"replica index < replicas={self.replicas}", e)
        if self.faults.cache_node_loss:
            n = self.result_cache.nodes if self.result_cache.enabled else 0
            for e in self.faults.cache_node_loss:
                k = parse_event(e, "faults.cache_node_loss")[0]
                _range("faults.cache_node_loss", k < n,
                       f"node index < result_cache.nodes={n} (a ring of cache nodes with capacity > 0)", e)


_SECTIONS = {"scheduler": SchedulerConfig, "slo": SLO, "queue": QueueSettings, "result_cache": ResultCacheSettings,
             "faults": FaultSettings, "health": HealthSettings, "sessions": SessionSettings,
             "memory": MemorySettings, "cluster": ClusterSettings,
             "gpu_tasks": GpuTaskSettings}


def _build(cls: type, data: dict[str, Any], where: str, prefix: str = "") -> Any:
    names = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for k, v in data.items():
        key = prefix + k
        if k not in names:
            raise ConfigError(f"{where}: unknown key '{key}'; valid: {', '.join(prefix + n for n in names)}")
        if k in _SECTIONS and cls is SimConfig:
            if not isinstance(v, dict):
                raise ConfigError(f"{where}: '{key}' must be a table")
            v = _build(_SECTIONS[k], v, where, prefix=f"{k}.")
        else:
            v = _coerce(names[k], v, where, key)
        kwargs[k] = v
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None


def _coerce(f: dataclasses.Field, v: Any, where: str, key: str) -> Any:
    t = str(f.type)
    if v is None:
        return None
    if t.startswith("bool"):
        if isinstance(v, bool):
            return v
        if isinstance(v, str) and v.lower() in ("true", "false", "1", "0", "yes", "no", "on", "off"):
            return v.lower() in ("true", "1", "yes", "on")
    elif t.startswith("int"):
        if isinstance(v, int) and not isinstance(v, bool):
            return v
        if isinstance(v, float) and v.is_integer():
            return int(v)
        if isinstance(v, str):
            try:
                return int(v)
            except ValueError:
                pass
    elif t.startswith("float"):
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
        if isinstance(v, str):
            try:
                return float(v)
            except ValueError:
                pass
    elif t.startswith("str"):
        if isinstance(v, str):
            return v
    else:
        return v
    raise ConfigError(f"{where}: '{key}' must be {t.split(' ')[0]}, got {v!r}")


def config_from_dict(data: dict[str, Any], where: str = "config") -> SimConfig:
    """Nested dict (as in TOML) -> SimConfig. Unknown keys and out-of-range values raise ConfigError."""
    return _build(SimConfig, data, where)


def flatten(cfg: SimConfig) -> dict[str, Any]:
    """SimConfig -> {'replicas': 4, 'scheduler.max_num_seqs': 256, ...}."""
    out: dict[str, Any] = {}
    for k, v in dataclasses.asdict(cfg).items():
        if isinstance(v, dict):
            for k2, v2 in v.items():
                out[f"{k}.{k2}"] = v2
        else:
            out[k] = v
    return out


def with_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Apply dotted-key overrides ('scheduler.max_num_seqs': 64) to a nested dict (copied)."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for key, v in overrides.items():
        if "." in key:
            sec, k = key.split(".", 1)
            out.setdefault(sec, {})
            out[sec][k] = v
        else:
            out[key] = v
    return out


def to_toml(cfg: SimConfig) -> str:
    """A config file that config_from_toml reads back to the same SimConfig."""
    def val(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(val(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{val(str(k))} = {val(x)}" for k, x in v.items()) + "}"
        return repr(v)

    top, sections = [], []
    for k, v in dataclasses.asdict(cfg).items():
        if isinstance(v, dict):
            lines = [f"[{k}]"] + [f"{k2} = {val(v2)}" for k2, v2 in v.items() if v2 is not None]
            sections.append("\n".join(lines))
        elif v is not None:
            top.append(f"{k} = {val(v)}")
    return "\n".join(top) + "\n\n" + "\n\n".join(sections) + "\n"


def load_toml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    try:
        with open(p, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{p}: config file not found") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: not valid TOML: {e}") from None


def config_from_toml(path: str | Path) -> SimConfig:
    data = load_toml(path)
    data.pop("run", None)  # [run] holds CLI-level settings (trace, out), not the model
    return config_from_dict(data, where=str(path))
