"""Run configuration: frozen dataclasses, built from flags or a TOML file, validated on construction.

Building a config writes no file and changes no global, so a tuner can build
thousands in one process.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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

    def __post_init__(self) -> None:
        if not 1 <= self.replicas <= 100_000:
            raise ValueError(f"replicas={self.replicas!r} is out of range; allowed: 1..100000")
        if self.router not in ROUTERS:
            raise ValueError(f"unknown router '{self.router}'; valid: {', '.join(sorted(ROUTERS))}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_blocks={self.num_blocks!r} is out of range; allowed: >= 1 or unset")


_SECTIONS = {"scheduler": SchedulerConfig, "slo": SLO}


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
