"""`twinfer trace ...`: inspect and convert trace files.

    twinfer trace stats FILE [--format NAME] [--json]
    twinfer trace convert FILE OUT [--format NAME]     (OUT in twinfer's canonical format)

The main CLI calls `register(subparsers)`; each command sets `func`, which
takes the parsed args and returns an exit code. Bad input prints
`error: <message>` to stderr and raises SystemExit(2).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable

from traces.canonical import save_workload
from traces.loaders import FORMATS, load_trace
from traces.stats import compute_stats, render_stats
from traces.workload import TraceError, Workload


def _fail(e: Exception) -> None:
    print(f"error: {e}", file=sys.stderr)
    raise SystemExit(2)


def _options(args: argparse.Namespace) -> dict[str, Any]:
    """Loader options given on the command line (only those set, so each loader gets what it takes)."""
    opts: dict[str, Any] = {}
    for key in ("zero_input", "zero_output", "rate", "cv", "seed", "time_unit"):
        v = getattr(args, key, None)
        if v is not None:
            opts[key] = v
    if getattr(args, "column", None):
        cols = {}
        for spec in args.column:
            canon, sep, src = spec.partition("=")
            if not sep:
                raise ValueError(f"--column wants CANONICAL=SOURCE, got {spec!r}")
            cols[canon] = src
        opts["columns"] = cols
    return opts


def _load(args: argparse.Namespace) -> Workload:
    try:
        return load_trace(args.file, args.format, **_options(args))
    except (TraceError, ValueError) as e:
        _fail(e)
        raise  # unreachable; keeps type checkers calm


def cmd_stats(args: argparse.Namespace) -> int:
    stats = compute_stats(_load(args))
    if args.json:
        print(json.dumps(stats, indent=2))
    else:
        from rich.console import Console

        Console().print(render_stats(stats))
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    w = _load(args)
    try:
        out = save_workload(w, args.out)
    except OSError as e:
        _fail(e)
    print(f"wrote {len(w):,} requests to {out}")
    return 0


def _add_load_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="trace file (or a directory of LMCache session files)")
    p.add_argument("--format", choices=sorted(FORMATS), help="trace format (default: detect from content)")
    g = p.add_argument_group("loader options (each format takes the ones that apply)")
    g.add_argument("--zero-input", dest="zero_input", choices=("error", "drop", "clamp"),
                   help="rows with 0 input tokens (default: error)")
    g.add_argument("--zero-output", dest="zero_output", choices=("error", "drop", "clamp"),
                   help="rows with 0 output tokens (default: error)")
    g.add_argument("--rate", type=float, help="sharegpt: synthetic arrival rate, req/s")
    g.add_argument("--cv", type=float, help="sharegpt: inter-arrival CV (1 = Poisson)")
    g.add_argument("--seed", type=int, help="sharegpt: seed of the arrival process")
    g.add_argument("--column", action="append", metavar="CANONICAL=SOURCE",
                   help="generic: map a canonical column to the file's column (repeatable)")
    g.add_argument("--time-unit", dest="time_unit", choices=("s", "ms", "us", "ns", "datetime"),
                   help="generic: unit of the arrival column")


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `trace` command group to a main parser's subparsers."""
    trace = subparsers.add_parser("trace", help="inspect and convert trace files")
    sub = trace.add_subparsers(dest="trace_command", required=True, metavar="COMMAND")
    stats = sub.add_parser("stats", help="summary statistics of a trace")
    _add_load_options(stats)
    stats.add_argument("--json", action="store_true", help="print JSON instead of a table")
    stats.set_defaults(func=cmd_stats)
    convert = sub.add_parser("convert", help="convert a trace to twinfer's canonical format")
    _add_load_options(convert)
    convert.add_argument("out", help="output file (.jsonl, or .jsonl.gz to compress)")
    convert.set_defaults(func=cmd_convert)
    return trace


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (`python -m traces.cli trace stats FILE`)."""
    parser = argparse.ArgumentParser(prog="twinfer")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    return func(args)


if __name__ == "__main__":
    raise SystemExit(main())
