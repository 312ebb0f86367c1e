"""Trace loaders: recorded trace files in, `Workload` out.

`load_trace(path)` sniffs the format from the content (a CSV header or the
first JSON line); `load_trace(path, "azure")` names it. Every loader returns a
workload sorted by arrival (stable: equal times keep file order) and, unless
`rebase=False`, shifted so the first request arrives at t=0. The original
first timestamp is kept in `meta["time_origin_s"]` (seconds since the Unix
epoch for wall-clock traces, with `meta["time_origin_iso"]`; seconds from the
trace's own start otherwise).

Bad input raises `TraceError` naming the file, the 1-based line and the field.
Nothing is dropped or invented silently. Rows with 0 input or output tokens
(no TTFT is defined for a request that generates nothing) follow an explicit
policy, `zero_input=` / `zero_output=`:

- "error" (default): raise, naming the line. None of the public traces this
  project ships or tests against (Azure 2023 code and conv, Mooncake,
  ShareGPT lengths) has such a row, so the default loads all of them.
- "drop": leave the row out; "clamp": count it as 1 token.

Either way the counts go to `meta["zero_tokens"]` and `compute_stats` shows
them. Negative counts are always an error.

Parsing is stdlib csv/json plus numpy: each column is converted in one pass
and validated with vectorised checks; only when a check fails is the column
walked again to name the offending line.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import inspect
import io
import json
import warnings
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Sequence, TextIO

import numpy as np

from traces.canonical import FORMAT_NAME, load_canonical
from traces.workload import TraceError, Workload

ZeroPolicy = Literal["error", "drop", "clamp"]
ZERO_POLICIES = ("error", "drop", "clamp")

DEFAULT_TRACE = "AzureLLMInferenceTrace_conv.csv"

# LMCache text -> token estimate (see load_lmcache).
CHARS_PER_TOKEN = 4
LMCACHE_BLOCK_TOKENS = 16
_INT63 = (1 << 63) - 1
_INT_ONLY = {int}


# ---- files ------------------------------------------------------------------------------------


def _open_text(path: Path) -> TextIO:
    # utf-8-sig: a byte-order mark before a CSV header would otherwise become part of its first name.
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8-sig", newline="")
    return open(path, encoding="utf-8-sig", newline="")


def _first_line(path: Path) -> str | None:
    """The first non-blank line of a file, or None if it has none."""
    with _open_text(path) as f:
        for line in f:
            if line.strip():
                return line.strip()
    return None


def detect_format(path: str | Path) -> str:
    """The name of the loader that fits `path`, from its content (a directory is LMCache sessions)."""
    path = Path(path)
    if path.is_dir():
        return "lmcache"
    line = _first_line(path)
    if line is None:
        raise TraceError(path, None, None, "file is empty: cannot detect its format (name one, e.g. format='lmcache')")
    if line.startswith("{"):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise TraceError(path, None, None, f"first line looks like JSON but does not parse: {e.msg}") from None
        if not isinstance(obj, dict):
            raise TraceError(path, None, None, "first line is JSON but not an object: cannot detect the format")
        keys = set(obj)
        if obj.get("format") == FORMAT_NAME:
            return "canonical"
        if {"timestamp", "input_length", "output_length"} <= keys:
            return "mooncake"
        if {"timestamp", "input", "session_id"} <= keys:
            return "lmcache"
        if {"arrival", "input_tokens", "output_tokens"} <= keys:
            return "generic"
        raise TraceError(path, None, None, f"unrecognised JSON lines with keys {sorted(keys)}: "
                         "name a format (e.g. format='generic' with a column mapping)")
    header = {c.strip() for c in next(csv.reader([line]))}
    if {"TIMESTAMP", "ContextTokens", "GeneratedTokens"} <= header:
        return "azure"
    if {"num_prefill_tokens", "num_decode_tokens"} <= header:
        return "sharegpt"
    if {"arrival", "input_tokens", "output_tokens"} <= header:
        return "generic"
    raise TraceError(path, 1, None, f"unrecognised CSV header {sorted(header)}: "
                     "name a format (e.g. format='generic' with a column mapping)")


def _read_csv(path: Path, required: Sequence[str], optional: Sequence[str] = ()
              ) -> tuple[dict[str, list[str]], list[int]]:
    """Columns by header name (required ones must exist) and each row's line number."""
    with _open_text(path) as f:
        reader = csv.reader(f)
        header = next(reader, None)
        while header is not None and not any(c.strip() for c in header):
            header = next(reader, None)
        if header is None:
            raise TraceError(path, None, None, "file is empty: expected a CSV header")
        header_line = reader.line_num
        names = [c.strip() for c in header]
        for col in required:
            if col not in names:
                raise TraceError(path, header_line, col, f"missing column (header has {names})")
        width = len(names)
        rows = list(reader)
        # Fast path: every row has the full width and sits on its own line (the usual file).
        simple = reader.line_num == header_line + len(rows) and (not rows or set(map(len, rows)) == {width})
    if simple:
        lines = list(range(header_line + 1, header_line + 1 + len(rows)))
    else:
        rows, lines = _csv_rows_slow(path, header_line, width)
    wanted = [c for c in (*required, *optional) if c in names]
    cols_t = list(zip(*rows)) if rows else [()] * width
    return {c: list(cols_t[names.index(c)]) for c in wanted}, lines


def _csv_rows_slow(path: Path, header_line: int, width: int) -> tuple[list[list[str]], list[int]]:
    """Rows after the header with their line numbers, skipping blank lines, checking widths."""
    rows: list[list[str]] = []
    lines: list[int] = []
    with _open_text(path) as f:
        reader = csv.reader(f)
        for row in reader:
            if reader.line_num <= header_line:
                continue
            if len(row) != width:
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue  # a blank line is not a row
                raise TraceError(path, reader.line_num, None, f"expected {width} fields, got {len(row)}")
            rows.append(row)
            lines.append(reader.line_num)
    return rows, lines


def _read_jsonl(path: Path) -> tuple[list[dict], list[int]]:
    """The JSON objects of a JSON-lines file and their line numbers (blank lines skipped)."""
    records: list[dict] = []
    lines: list[int] = []
    with _open_text(path) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise TraceError(path, i, None, f"malformed JSON: {e.msg} (column {e.colno})") from None
            if not isinstance(obj, dict):
                raise TraceError(path, i, None, f"expected a JSON object, got {type(obj).__name__}")
            records.append(obj)
            lines.append(i)
    return records, lines


def _field(path: Path, records: list[dict], lines: list[int], key: str, required: bool = True) -> list[Any]:
    try:
        return [r[key] for r in records]
    except KeyError:
        if not required:
            return [r.get(key) for r in records]
        i = next(i for i, r in enumerate(records) if key not in r)
        raise TraceError(path, lines[i], key, "missing field") from None


# ---- values -----------------------------------------------------------------------------------


# Converters for one value. CSV cells are strings; JSON values must already be numbers (exact
# types, so a JSON true does not pass as 1 nor "12" as 12).

_int_text = int
_float_text = float


def _int_json(v: Any) -> int:
    t = type(v)
    if t is int:
        return v
    if t is float and v.is_integer():
        return int(v)
    raise ValueError(v)


def _float_json(v: Any) -> float:
    t = type(v)
    if t is int or t is float:
        return float(v)
    raise ValueError(v)


def _convert(path: Path, field: str, values: Sequence[Any], lines: Sequence[int],
             conv: Callable[[Any], Any], dtype: type, what: str) -> np.ndarray:
    try:
        return np.fromiter(map(conv, values), dtype=dtype, count=len(values))
    except (ValueError, TypeError, OverflowError):
        pass
    for v, line in zip(values, lines):  # slow path: find the first bad value
        try:
            np.array([conv(v)], dtype=dtype)
        except (ValueError, TypeError, OverflowError):
            raise TraceError(path, line, field, f"expected {what}, got {v!r}") from None
    raise AssertionError("unreachable")


def _ints(path: Path, field: str, values: Sequence[Any], lines: Sequence[int], *, text: bool,
          min_value: int | None = 0) -> np.ndarray:
    a = _convert(path, field, values, lines, _int_text if text else _int_json, np.int64, "an integer")
    if min_value is not None:
        _check(path, field, lines, a < min_value, a, f"must be >= {min_value}")
    return a


def _floats(path: Path, field: str, values: Sequence[Any], lines: Sequence[int], *, text: bool,
            nonneg: bool = True) -> np.ndarray:
    a = _convert(path, field, values, lines, _float_text if text else _float_json, np.float64, "a number")
    _check(path, field, lines, ~np.isfinite(a), a, "must be finite")
    if nonneg:
        _check(path, field, lines, a < 0, a, "must not be negative")
    return a


def _check(path: Path, field: str, lines: Sequence[int], bad: np.ndarray, values: np.ndarray, message: str) -> None:
    if bad.any():
        i = int(np.argmax(bad))
        raise TraceError(path, lines[i], field, f"{message}, got {values[i]}")


def _datetimes_ns(path: Path, field: str, values: Sequence[str], lines: Sequence[int]) -> np.ndarray:
    """Date-time strings -> int64 ns since the Unix epoch (naive times are taken as UTC)."""
    def parse(vals: Sequence[str]) -> np.ndarray:
        with warnings.catch_warnings():  # numpy warns when it converts an explicit offset to UTC
            warnings.simplefilter("ignore", UserWarning)
            return np.array(vals, dtype="datetime64[ns]")

    ns = None
    if all(type(v) is str for v in values):  # numpy would also take numbers (as epoch counts)
        try:
            ns = parse(values)
        except (ValueError, TypeError, OverflowError):
            pass
    if ns is None or np.isnat(ns).any():
        for v, line in zip(values, lines):
            try:
                ok = type(v) is str and not np.isnat(parse([v])[0])
            except (ValueError, TypeError, OverflowError):
                ok = False
            if not ok:
                raise TraceError(path, line, field, f"unparsable date-time {v!r}")
        if ns is None:  # each value parses alone though the batch did not (mixed forms)
            ns = np.array([parse([v])[0] for v in values], dtype="datetime64[ns]")
    return ns.astype(np.int64)


def _check_policy(name: str, policy: str) -> None:
    if policy not in ZERO_POLICIES:
        raise ValueError(f"{name} must be one of {ZERO_POLICIES}, got {policy!r}")


# ---- assembling a workload ---------------------------------------------------------------------


def _build(path: Path, fmt: str, t: np.ndarray, inp: np.ndarray, out: np.ndarray, lines: Sequence[int], *,
           token_fields: tuple[str, str], zero_input: str, zero_output: str, rebase: bool, name: str | None,
           origin: float = 0.0, epoch: bool = False, columns: Mapping[str, Any] | None = None,
           hash_block_size: int = 0, meta: Mapping[str, Any] | None = None) -> Workload:
    """Apply the zero-token policy, sort by arrival, rebase and wrap the columns.

    `t` is seconds relative to `origin` (seconds; since the epoch when `epoch`).
    `columns` holds optional Workload columns in file order (lists or arrays).
    """
    _check_policy("zero_input", zero_input)
    _check_policy("zero_output", zero_output)
    columns = dict(columns or {})
    zero_meta: dict[str, Any] = {}
    keep = np.ones(len(t), dtype=bool)
    checks = (("input", inp, zero_input, token_fields[0]), ("output", out, zero_output, token_fields[1]))
    refused = [(int(np.argmax(col == 0)), kind, field) for kind, col, policy, field in checks
               if policy == "error" and (col == 0).any()]
    if refused:
        i, kind, field = min(refused)  # the first bad line in the file
        raise TraceError(path, lines[i], field,
                         f"0 {kind} tokens; load with zero_{kind}='drop' or 'clamp' to accept such rows")
    for kind, col, policy, _ in checks:
        zero = col == 0
        nz = int(zero.sum())
        if policy == "clamp":
            col[zero] = 1
        elif policy == "drop":
            keep &= ~zero
        zero_meta[kind] = {"policy": policy, "rows": nz}
    zero_meta["dropped_rows"] = int((~keep).sum())

    idx = np.flatnonzero(keep)
    t = t[idx]
    order = np.argsort(t, kind="stable")
    out_of_order = int(np.count_nonzero(np.diff(t) < 0))
    idx = idx[order]
    t = t[order]
    first = float(t[0]) if len(t) else 0.0
    arrival = t - first if rebase else t + origin

    def pick(col: Any) -> Any:
        if isinstance(col, np.ndarray):
            return col[idx]
        return [col[i] for i in idx]

    m: dict[str, Any] = {"format": fmt, "source": str(path), "rebased": rebase,
                         "time_origin_s": origin + first, "out_of_order_rows": out_of_order,
                         "zero_tokens": zero_meta}
    if epoch:
        m["time_origin_iso"] = datetime.fromtimestamp(origin + first, tz=timezone.utc).isoformat()
    m.update(meta or {})
    return Workload(
        arrival=arrival, input_tokens=inp[idx], output_tokens=out[idx],
        block_hashes=pick(columns["block_hashes"]) if "block_hashes" in columns else None,
        hash_block_size=hash_block_size,
        **{k: pick(v) for k, v in columns.items() if k != "block_hashes"},
        name=name or path.stem, meta=m,
    )


# ---- Azure LLM inference trace 2023 --------------------------------------------------------------


def load_azure(path: str | Path, *, zero_input: ZeroPolicy = "error", zero_output: ZeroPolicy = "error",
               rebase: bool = True, name: str | None = None) -> Workload:
    """Azure LLM inference trace 2023 CSV: `TIMESTAMP,ContextTokens,GeneratedTokens`.

    TIMESTAMP is a naive date-time string with 7 decimals (100 ns), taken as UTC.
    """
    path = Path(path)
    cols, lines = _read_csv(path, ("TIMESTAMP", "ContextTokens", "GeneratedTokens"))
    ns = _datetimes_ns(path, "TIMESTAMP", cols["TIMESTAMP"], lines)
    inp = _ints(path, "ContextTokens", cols["ContextTokens"], lines, text=True)
    out = _ints(path, "GeneratedTokens", cols["GeneratedTokens"], lines, text=True)
    base = int(ns.min()) if len(ns) else 0
    # Subtract in integer ns before converting, so sub-microsecond gaps survive float64.
    t = (ns - base).astype(np.float64) / 1e9
    return _build(path, "azure", t, inp, out, lines, token_fields=("ContextTokens", "GeneratedTokens"),
                  zero_input=zero_input, zero_output=zero_output, rebase=rebase, name=name,
                  origin=base / 1e9, epoch=True)


# ---- Mooncake (FAST'25) ---------------------------------------------------------------------------


def load_mooncake(path: str | Path, *, block_size: int = 512, zero_input: ZeroPolicy = "error",
                  zero_output: ZeroPolicy = "error", rebase: bool = True, name: str | None = None) -> Workload:
    """Mooncake JSONL: `timestamp` (ms from trace start), `input_length`, `output_length`, `hash_ids`.

    `hash_ids` has one id per `block_size` prompt tokens (the last block may be
    partial); equal ids mean an equal prefix block. They become `block_hashes`
    unchanged. Timestamps must not decrease (the trace is a replay log).
    """
    path = Path(path)
    records, lines = _read_jsonl(path)
    ts = _floats(path, "timestamp", _field(path, records, lines, "timestamp"), lines, text=False)
    down = np.diff(ts) < 0
    if down.any():
        i = int(np.argmax(down)) + 1
        raise TraceError(path, lines[i], "timestamp", f"decreases from {ts[i - 1]:g} to {ts[i]:g} ms")
    inp = _ints(path, "input_length", _field(path, records, lines, "input_length"), lines, text=False)
    out = _ints(path, "output_length", _field(path, records, lines, "output_length"), lines, text=False)
    raw = _field(path, records, lines, "hash_ids")
    hashes: list[tuple[int, ...]] = []
    for ids, n_in, line in zip(raw, inp.tolist(), lines):
        if type(ids) is not list or (ids and set(map(type, ids)) != _INT_ONLY):
            raise TraceError(path, line, "hash_ids", "expected a list of integers")
        if len(ids) > -(-n_in // block_size):
            raise TraceError(path, line, "hash_ids", f"{len(ids)} block ids for {n_in} tokens "
                             f"(at most one per {block_size} tokens)")
        hashes.append(tuple(ids))
    return _build(path, "mooncake", ts / 1000.0, inp, out, lines, token_fields=("input_length", "output_length"),
                  zero_input=zero_input, zero_output=zero_output, rebase=rebase, name=name,
                  columns={"block_hashes": hashes}, hash_block_size=block_size)


# ---- LMCache agent sessions (tau-bench) ------------------------------------------------------------


def estimate_tokens(text: str, chars_per_token: int = CHARS_PER_TOKEN) -> int:
    """Token count estimate for text without a tokenizer: ceil(chars / chars_per_token), at least 1."""
    return max(1, -(-len(text) // chars_per_token))


def _h63(data: bytes, person: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8, person=person).digest(), "little") & _INT63


def text_block_hashes(text: str, block_chars: int) -> tuple[int, ...]:
    """Chained ids of the full `block_chars`-character blocks of `text`.

    Block k's id hashes its parent's id and its own characters, so two texts
    share leading ids exactly as far as they share full leading blocks. Stable
    across processes (blake2b, not Python's salted hash), 63-bit non-negative.
    """
    out: list[int] = []
    parent = 0
    for k in range(len(text) // block_chars):
        chunk = text[k * block_chars:(k + 1) * block_chars].encode("utf-8")
        parent = _h63(parent.to_bytes(8, "little") + chunk, b"twinfer-block")
        out.append(parent)
    return tuple(out)


def text_cache_key(text: str) -> int:
    """Stable 63-bit key of a full prompt text (a result cache hits only on identical text)."""
    return _h63(text.encode("utf-8"), b"twinfer-key")


def load_lmcache(path: str | Path, *, chars_per_token: int = CHARS_PER_TOKEN,
                 block_tokens: int = LMCACHE_BLOCK_TOKENS, rebase: bool = True, name: str | None = None) -> Workload:
    """LMCache agent-trace sessions: one JSONL file per session, or a directory of them.

    Each line is one LLM call: `timestamp` (µs since the epoch, the send
    time), `input` (full prompt text), `output` (text, may be empty),
    `session_id`. Lines are not always in time order, so each session is
    sorted by timestamp (ties keep file order).

    The trace has no token counts, so they are estimated (documented, not measured):
    - input_tokens = ceil(len(input) / chars_per_token), at least 1;
    - output_tokens = ceil(len(output) / chars_per_token), at least 1 (an
      empty output, e.g. a bare tool call, still costs the one sampled token);
      the number of empty outputs is in `meta["empty_outputs"]`.
    - block_hashes: `text_block_hashes` over blocks of block_tokens tokens =
      block_tokens * chars_per_token characters; full blocks only.
    - cache_key: `text_cache_key` of the full input.
    - step: 0-based position in the session by timestamp; think_time: this
      step's send time minus the previous step's send time (the trace has no
      finish times, so this includes the previous step's own latency), 0 for step 0.

    An empty file is an empty session: it adds no request and is listed in
    `meta["empty_files"]`.
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith((".jsonl", ".jsonl.gz")))
        if not files:
            raise TraceError(path, None, None, "directory holds no .jsonl session files")
    else:
        files = [path]
    if chars_per_token < 1 or block_tokens < 1:
        raise ValueError("chars_per_token and block_tokens must be >= 1")
    block_chars = block_tokens * chars_per_token

    sessions: dict[str, list[tuple[int, int, str, str]]] = {}  # id -> (timestamp us, order, input, output)
    empty_files: list[str] = []
    out_of_order = 0
    order = 0
    for f in files:
        records, lines = _read_jsonl(f)
        if not records:
            empty_files.append(f.name)
            continue
        ts = _ints(f, "timestamp", _field(f, records, lines, "timestamp"), lines, text=False)
        out_of_order += int(np.count_nonzero(np.diff(ts) < 0))
        for key in ("input", "output", "session_id"):
            for v, line in zip(_field(f, records, lines, key), lines):
                if type(v) is not str:
                    raise TraceError(f, line, key, f"expected a string, got {type(v).__name__}")
        for r, t in zip(records, ts.tolist()):
            sessions.setdefault(r["session_id"], []).append((t, order, r["input"], r["output"]))
            order += 1

    rows: list[tuple[int, str, int, int, str, str]] = []  # (ts, session, step, think us, input, output)
    for sid, calls in sessions.items():
        calls.sort()
        prev = calls[0][0]
        for step, (t, _, text_in, text_out) in enumerate(calls):
            rows.append((t, sid, step, t - prev, text_in, text_out))
            prev = t
    rows.sort(key=lambda r: r[0])  # stable: same-time calls keep session order

    n = len(rows)
    ts_us = np.array([r[0] for r in rows], dtype=np.int64)
    base = int(ts_us[0]) if n else 0
    t = (ts_us - base).astype(np.float64) / 1e6
    inp = np.fromiter((estimate_tokens(r[4], chars_per_token) for r in rows), np.int64, n)
    out = np.fromiter((estimate_tokens(r[5], chars_per_token) for r in rows), np.int64, n)
    columns = {
        "block_hashes": [text_block_hashes(r[4], block_chars) for r in rows],
        "session_id": [r[1] for r in rows],
        "step": np.array([r[2] for r in rows], dtype=np.int64),
        "think_time": np.array([r[3] for r in rows], dtype=np.float64) / 1e6,
        "cache_key": [text_cache_key(r[4]) for r in rows],
    }
    meta = {"sessions": len(sessions), "files": len(files), "empty_files": empty_files,
            "out_of_order_rows": out_of_order, "empty_outputs": sum(1 for r in rows if not r[5]),
            "tokens_estimated": f"ceil(chars/{chars_per_token}), min 1",
            "think_time_basis": "send-time gap to the previous step"}
    lines = list(range(1, n + 1))  # only named by zero-token errors, which estimates (>= 1) never raise
    return _build(path, "lmcache", t, inp, out, lines, token_fields=("input", "output"),
                  zero_input="error", zero_output="error", rebase=rebase, name=name,
                  origin=base / 1e6, epoch=True, columns=columns, hash_block_size=block_tokens, meta=meta)


# ---- ShareGPT lengths (sarathi-serve) ---------------------------------------------------------------


def load_sharegpt(path: str | Path, *, rate: float | None = None, cv: float = 1.0,
                  seed: int | np.random.Generator = 0, zero_input: ZeroPolicy = "error",
                  zero_output: ZeroPolicy = "error", name: str | None = None) -> Workload:
    """ShareGPT length CSV (`num_prefill_tokens`, `num_decode_tokens`, ...) with synthetic arrivals.

    The file has no times, so arrivals come from a renewal process at `rate`
    req/s (required), Poisson when cv == 1, Gamma with that CV otherwise,
    seeded by `seed`; the first at t=0. Rows keep file order. The process is
    recorded in `meta["arrivals"]`.
    """
    from traces.synth import renewal_arrivals  # synth imports this module for its default lengths

    path = Path(path)
    if rate is None:
        raise TraceError(path, None, None, "a ShareGPT length file has no arrival times: give a rate "
                         "in requests/s (rate=..., or --rate) for synthetic arrivals")
    cols, lines = _read_csv(path, ("num_prefill_tokens", "num_decode_tokens"))
    inp = _ints(path, "num_prefill_tokens", cols["num_prefill_tokens"], lines, text=True)
    out = _ints(path, "num_decode_tokens", cols["num_decode_tokens"], lines, text=True)
    t = renewal_arrivals(len(inp), rate, cv, np.random.default_rng(seed))
    meta = {"arrivals": {"process": "poisson" if cv == 1 else "gamma", "rate": rate, "cv": cv,
                         "seed": seed if isinstance(seed, int) else "generator"}}
    return _build(path, "sharegpt", t, inp, out, lines, token_fields=("num_prefill_tokens", "num_decode_tokens"),
                  zero_input=zero_input, zero_output=zero_output, rebase=True, name=name, meta=meta)


# ---- generic CSV / JSONL with a column mapping --------------------------------------------------------

GENERIC_COLUMNS = ("arrival", "input_tokens", "output_tokens", "session_id", "step", "think_time",
                   "priority", "slo_class", "block_hashes", "cache_key")
TIME_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "ns": 1e-9, "datetime": 1.0}


def load_generic(path: str | Path, *, columns: Mapping[str, str] | None = None, time_unit: str = "s",
                 hash_block_size: int = 0, zero_input: ZeroPolicy = "error", zero_output: ZeroPolicy = "error",
                 rebase: bool = True, name: str | None = None) -> Workload:
    """A CSV or JSONL file (sniffed: JSONL if the first line starts with '{') with a column mapping.

    `columns` maps canonical names (`GENERIC_COLUMNS`) to the file's column
    names; canonical names not mapped are looked up under their own name.
    arrival, input_tokens and output_tokens are required. `time_unit` is the
    unit of arrival and think_time numbers (s, ms, us, ns), or "datetime" for
    an ISO date-time arrival column (think_time then in s). block_hashes are
    a JSON list, or space-separated integers in CSV, one per
    `hash_block_size` tokens. In CSV an empty session_id/cache_key cell is
    None. With session_id but no step column, step is the 0-based arrival
    order within the session.
    """
    path = Path(path)
    mapping = dict(columns or {})
    for canon in mapping:
        if canon not in GENERIC_COLUMNS:
            raise ValueError(f"unknown canonical column {canon!r}; valid: {', '.join(GENERIC_COLUMNS)}")
    if time_unit not in TIME_UNITS:
        raise ValueError(f"time_unit must be one of {', '.join(TIME_UNITS)}, got {time_unit!r}")
    src = {c: mapping.get(c, c) for c in GENERIC_COLUMNS}
    # Mapped columns must exist; unmapped optional ones are used when present under their own name.
    required = [src[c] for c in GENERIC_COLUMNS if c in GENERIC_COLUMNS[:3] or c in mapping]
    optional = [src[c] for c in GENERIC_COLUMNS[3:] if c not in mapping]
    first = _first_line(path)
    is_json = first is not None and first.startswith("{")
    if is_json:
        records, lines = _read_jsonl(path)
        raw = {c: _field(path, records, lines, src[c]) for c in GENERIC_COLUMNS[:3]}
        for c in GENERIC_COLUMNS[3:]:
            if c in mapping or any(src[c] in r for r in records):
                raw[c] = _field(path, records, lines, src[c], required=c in mapping)
    else:
        cols, lines = _read_csv(path, required, optional)
        raw = {c: cols[src[c]] for c in GENERIC_COLUMNS if src[c] in cols}

    a_field = src["arrival"]
    origin, epoch = 0.0, False
    if time_unit == "datetime":
        ns = _datetimes_ns(path, a_field, raw["arrival"], lines)
        base = int(ns.min()) if len(ns) else 0
        t, origin, epoch = (ns - base).astype(np.float64) / 1e9, base / 1e9, True
    else:
        t = _floats(path, a_field, raw["arrival"], lines, text=not is_json) * TIME_UNITS[time_unit]
    inp = _ints(path, src["input_tokens"], raw["input_tokens"], lines, text=not is_json)
    out = _ints(path, src["output_tokens"], raw["output_tokens"], lines, text=not is_json)

    def opt_str(v: Any) -> str | None:
        return None if v is None or (not is_json and v == "") else str(v)

    extra: dict[str, Any] = {}
    if "session_id" in raw:
        extra["session_id"] = [opt_str(v) for v in raw["session_id"]]
    if "step" in raw:
        extra["step"] = _ints(path, src["step"], raw["step"], lines, text=not is_json)
    if "think_time" in raw:
        scale = 1.0 if time_unit == "datetime" else TIME_UNITS[time_unit]
        think = _floats(path, src["think_time"], raw["think_time"], lines, text=not is_json)
        extra["think_time"] = think * scale
    if "priority" in raw:
        extra["priority"] = _ints(path, src["priority"], raw["priority"], lines, text=not is_json,
                                  min_value=None)
    if "slo_class" in raw:
        extra["slo_class"] = [opt_str(v) or "" for v in raw["slo_class"]]
    if "cache_key" in raw:
        keys = [opt_str(v) for v in raw["cache_key"]]
        present = [i for i, k in enumerate(keys) if k is not None]
        vals = _ints(path, src["cache_key"], [raw["cache_key"][i] for i in present],
                     [lines[i] for i in present], text=not is_json, min_value=None).tolist()
        extra["cache_key"] = [None] * len(keys)
        for i, v in zip(present, vals):
            extra["cache_key"][i] = v
    if "block_hashes" in raw:
        if hash_block_size <= 0:
            raise ValueError("a block_hashes column needs hash_block_size (tokens per block id) > 0")
        hashes = []
        for v, line in zip(raw["block_hashes"], lines):
            try:
                ids = v.split() if isinstance(v, str) else v
                if type(ids) is not list:
                    raise ValueError(v)
                hashes.append(tuple((_int_text if isinstance(v, str) else _int_json)(x) for x in ids))
            except (ValueError, TypeError):
                raise TraceError(path, line, src["block_hashes"], f"expected a list of integers, got {v!r}") from None
        extra["block_hashes"] = hashes
    if "session_id" in extra and "step" not in extra:
        extra["step"] = _session_steps(t, extra["session_id"])
    return _build(path, "generic", t, inp, out, lines, token_fields=(src["input_tokens"], src["output_tokens"]),
                  zero_input=zero_input, zero_output=zero_output, rebase=rebase, name=name, origin=origin,
                  epoch=epoch, columns=extra, hash_block_size=hash_block_size if "block_hashes" in extra else 0)


def _session_steps(t: np.ndarray, session_id: Sequence[str | None]) -> np.ndarray:
    step = np.zeros(len(t), dtype=np.int64)
    seen: dict[str, int] = {}
    for i in np.argsort(t, kind="stable").tolist():
        sid = session_id[i]
        if sid is not None:
            step[i] = seen.get(sid, 0)
            seen[sid] = step[i] + 1
    return step


# ---- registry --------------------------------------------------------------------------------------

FORMATS: dict[str, Callable[..., Workload]] = {
    "azure": load_azure,
    "mooncake": load_mooncake,
    "lmcache": load_lmcache,
    "sharegpt": load_sharegpt,
    "generic": load_generic,
    "canonical": load_canonical,
}


def load_trace(path: str | Path, format: str | None = None, **options: Any) -> Workload:
    """Load a trace file (or an LMCache session directory); `format` None = detect from content."""
    path = Path(path)
    if format is not None and format not in FORMATS:
        raise ValueError(f"unknown trace format {format!r}; valid formats: {', '.join(sorted(FORMATS))}")
    if not path.exists():
        raise TraceError(path, None, None, "no such file or directory")
    if path.is_dir() and format not in (None, "lmcache"):
        raise TraceError(path, None, None, "is a directory; only the lmcache format reads directories")
    fmt = format or detect_format(path)
    loader = FORMATS[fmt]
    accepted = [p for p in inspect.signature(loader).parameters if p != "path"]
    for key in options:
        if key not in accepted:
            raise ValueError(f"format {fmt!r} takes no option {key!r}; its options: {', '.join(accepted)}")
    try:
        return loader(path, **options)
    except UnicodeDecodeError as e:
        raise TraceError(path, None, None, f"not UTF-8 text ({e.reason} at byte {e.start})") from None
    except (OSError, EOFError) as e:  # unreadable, or a truncated .gz
        raise TraceError(path, None, None, f"cannot read: {e}") from None


def default_trace_path() -> Path:
    """The embedded default workload: Azure LLM inference trace 2023, conversation (CC-BY-4.0)."""
    return Path(str(resources.files("traces") / "data" / DEFAULT_TRACE))


def load_default_trace(**options: Any) -> Workload:
    """The embedded default workload, loaded (options as for `load_azure`)."""
    return load_azure(default_trace_path(), **options)
