"""twinfer's own workload file format (version 1): JSON lines with a header.

Line 1 is a header object; then one object per request, in arrival order:

    {"format": "twinfer-workload", "version": 1, "name": "conv", "requests": 2,
     "hash_block_size": 0, "columns": ["session_id"], "meta": {...}}
    {"arrival": 0.0, "input_tokens": 374, "output_tokens": 44, "session_id": "a"}
    {"arrival": 4.314579, "input_tokens": 396, "output_tokens": 109, "session_id": null}

Why JSON lines: it streams (no need to hold the file to read it), every
error has a line number, diffs and `head` work, and it holds what CSV cannot
without ad-hoc escaping (block hash lists, free-text session ids, null). The
header makes a file self-describing: `version` lets a later twinfer migrate
old files and refuse newer ones, `columns` lists the optional columns
present (the required ones are arrival, input_tokens, output_tokens),
`requests` detects truncation, and `meta` carries provenance. Floats are
written with repr, so a save/load round trip is exact. A name ending in
".gz" is gzip-compressed.

Times are stored as they are (no rebasing on load): the file is the workload.
"""

from __future__ import annotations

import gzip
import io
import json
import math
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from traces.workload import TraceError, Workload

FORMAT_NAME = "twinfer-workload"
VERSION = 1
REQUIRED = ("arrival", "input_tokens", "output_tokens")
OPTIONAL = ("block_hashes", "session_id", "step", "think_time", "priority", "slo_class", "cache_key")


def _open(path: Path, mode: str) -> TextIO:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, mode + "b"), encoding="utf-8", newline="\n")
    return open(path, mode, encoding="utf-8", newline="\n")


def save_workload(w: Workload, path: str | Path) -> Path:
    """Write `w` in the canonical format; returns the path. Meta must be JSON-able (else str())."""
    path = Path(path)
    present = [c for c in OPTIONAL if getattr(w, c) is not None]
    header = {"format": FORMAT_NAME, "version": VERSION, "name": w.name, "requests": len(w),
              "hash_block_size": w.hash_block_size, "columns": present, "meta": w.meta}
    names = list(REQUIRED) + present
    cols: list[Any] = [w.arrival.tolist(), w.input_tokens.tolist(), w.output_tokens.tolist()]
    for c in present:
        v = getattr(w, c)
        cols.append(v.tolist() if isinstance(v, np.ndarray) else list(v))
    enc = json.JSONEncoder(separators=(", ", ": "), allow_nan=False)
    with _open(path, "w") as f:
        f.write(json.dumps(header, default=str) + "\n")
        for row in zip(*cols):
            f.write(enc.encode(dict(zip(names, row))) + "\n")
    return path


def _is_int(v: Any) -> bool:
    return type(v) is int and -(1 << 63) <= v < (1 << 63)  # must fit int64


def _is_num(v: Any) -> bool:
    return (type(v) is int or type(v) is float) and math.isfinite(v)


# Per column: (check, what a valid value is). Checked per row on load.
_CHECKS = {
    "arrival": (lambda v: _is_num(v) and v >= 0, "a finite number >= 0"),
    "input_tokens": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "output_tokens": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "block_hashes": (lambda v: type(v) is list and all(type(h) is int for h in v), "a list of integers"),
    "session_id": (lambda v: v is None or type(v) is str, "a string or null"),
    "step": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "think_time": (lambda v: _is_num(v) and v >= 0, "a finite number >= 0"),
    "priority": (_is_int, "an integer"),
    "slo_class": (lambda v: type(v) is str, "a string"),
    "cache_key": (lambda v: v is None or type(v) is int, "an integer or null"),
}


def load_canonical(path: str | Path, *, name: str | None = None) -> Workload:
    """Read a file written by `save_workload` (any version up to `VERSION`)."""
    path = Path(path)
    with _open(path, "r") as f:
        head = f.readline()
        try:
            header = json.loads(head)
        except json.JSONDecodeError as e:
            raise TraceError(path, 1, None, f"malformed header: {e.msg}") from None
        if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
            raise TraceError(path, 1, "format", f"not a {FORMAT_NAME} file")
        version = header.get("version")
        if not _is_int(version) or version < 1:
            raise TraceError(path, 1, "version", f"expected a positive integer, got {version!r}")
        if version > VERSION:
            raise TraceError(path, 1, "version", f"file is version {version}; this twinfer reads up to {VERSION}")
        present = header.get("columns", [])
        if type(present) is not list or any(c not in OPTIONAL for c in present):
            raise TraceError(path, 1, "columns", f"expected a list drawn from {OPTIONAL}, got {present!r}")
        hbs = header.get("hash_block_size", 0)
        if not _is_int(hbs) or hbs < 0 or ("block_hashes" in present and hbs == 0):
            raise TraceError(path, 1, "hash_block_size", f"expected an integer >= 0 (> 0 with block_hashes), got {hbs!r}")
        expected = header.get("requests")
        meta = header.get("meta", {})
        if not isinstance(meta, dict):
            raise TraceError(path, 1, "meta", "expected an object")

        names = list(REQUIRED) + present
        keys = set(names)
        checks = [(c, *_CHECKS[c]) for c in names]
        cols: dict[str, list[Any]] = {c: [] for c in names}
        prev = 0.0
        lineno = 1
        for lineno, line in enumerate(f, 2):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise TraceError(path, lineno, None, f"malformed JSON: {e.msg} (column {e.colno})") from None
            if type(rec) is not dict or rec.keys() != keys:
                got = set(rec) if type(rec) is dict else type(rec).__name__
                missing = sorted(keys - got) if isinstance(got, set) else None
                field = missing[0] if missing else None
                raise TraceError(path, lineno, field, f"expected an object with keys {names}, got {got}")
            for c, ok, what in checks:
                v = rec[c]
                if not ok(v):
                    raise TraceError(path, lineno, c, f"expected {what}, got {v!r}")
                cols[c].append(v)
            if rec["arrival"] < prev:
                raise TraceError(path, lineno, "arrival", f"decreases from {prev!r} to {rec['arrival']!r}")
            prev = rec["arrival"]
    n = len(cols["arrival"])
    if expected is not None and expected != n:
        raise TraceError(path, lineno, None, f"header says {expected} requests, file has {n} (truncated?)")

    def col(c: str, dtype: Any = None) -> Any:
        if c not in cols:
            return None
        if c == "block_hashes":
            return [tuple(v) for v in cols[c]]
        return np.array(cols[c], dtype=dtype) if dtype else cols[c]

    return Workload(
        arrival=np.array(cols["arrival"], dtype=np.float64),
        input_tokens=np.array(cols["input_tokens"], dtype=np.int64),
        output_tokens=np.array(cols["output_tokens"], dtype=np.int64),
        block_hashes=col("block_hashes"), hash_block_size=hbs, session_id=col("session_id"),
        step=col("step", np.int64), think_time=col("think_time", np.float64), priority=col("priority", np.int64),
        slo_class=col("slo_class"), cache_key=col("cache_key"),
        name=name or str(header.get("name", path.stem)), meta=meta,
    )
