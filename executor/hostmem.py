"""The host allocator of an executor process: keep freed memory for the next step.

On the CPU, torch allocates every activation with the C library's malloc. glibc serves blocks above
its mmap threshold (128 KiB, raised on the fly to at most 32 MiB) with fresh mmap calls, and returns
free memory at the top of its heap to the kernel once it exceeds the trim threshold. A prefill of
2048 tokens through the default model builds 8 MiB MLP activations in every layer; with glibc's
defaults those pages go back to the kernel when freed and are faulted in again, zero-filled, by the
next layer or step. Measured on this project's CPU (experiments/bench_host_memory.py): 37,000
minor page faults in one 2048-token prefill (62,000 at 3072 tokens), about 10 % of its time in the
kernel; in a serving loop 0 to 117,000 per prefill of 1-4k tokens, and how many
depends on what the process allocated before, so the same step shape costs a different amount in a
serving loop than in `twinfer profile`'s grid.

`configure("retain")` raises both thresholds (mallopt M_MMAP_THRESHOLD and M_TRIM_THRESHOLD), so
blocks up to RETAIN_MMAP_THRESHOLD come from the heap and freed memory stays with the process for
the next step, as a GPU caching allocator keeps device memory. A process then holds on to its peak
activation memory (tens of MiB for the default model) instead of returning it after every step.

The setting is process-wide and one-way: glibc has no call that restores its adaptive defaults.
Every ModelRunner applies "retain" unless told "system" (ModelRunner(host_memory=...)); with another
C library (musl, macOS) nothing changes and `describe()` says so.
"""

from __future__ import annotations

import ctypes
import sys

MODES = ("retain", "system")
RETAIN_MMAP_THRESHOLD = 256 << 20  # bytes: blocks up to this come from the heap (glibc default: 128 KiB, adaptive)
RETAIN_TRIM_THRESHOLD = 1 << 30  # bytes: free memory kept at the top of the heap before any is returned
_M_TRIM_THRESHOLD = -1  # glibc <malloc.h>
_M_MMAP_THRESHOLD = -3

_state = "system"  # what this process runs with: "system" until configure("retain") succeeds
_detail = "the C library's defaults"


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        version = libc.gnu_get_libc_version
    except (OSError, AttributeError):  # not glibc (musl has no gnu_get_libc_version)
        return None
    version.restype = ctypes.c_char_p
    return libc if hasattr(libc, "mallopt") else None


def configure(mode: str = "retain") -> str:
    """Apply `mode` ("retain" or "system") to this process's allocator; returns describe().
    "system" changes nothing (and cannot undo an earlier "retain": see the module doc)."""
    global _state, _detail
    if mode not in MODES:
        raise ValueError(f"host_memory={mode!r} is not known; allowed: {', '.join(MODES)}")
    if mode == "system" or _state == "retain":
        return describe()
    libc = _glibc()
    if libc is None:
        _detail = f"not glibc ({sys.platform}): the C library's allocator is left as it is"
        return describe()
    ok = (libc.mallopt(_M_MMAP_THRESHOLD, RETAIN_MMAP_THRESHOLD) == 1
          and libc.mallopt(_M_TRIM_THRESHOLD, RETAIN_TRIM_THRESHOLD) == 1)
    if not ok:
        _detail = "glibc refused mallopt: the C library's defaults"
        return describe()
    _state = "retain"
    _detail = (f"glibc {libc.gnu_get_libc_version().decode()} malloc keeps freed memory "
               f"(mmap threshold {RETAIN_MMAP_THRESHOLD >> 20} MiB, trim threshold {RETAIN_TRIM_THRESHOLD >> 20} MiB)")
    return describe()


def mode() -> str:
    """"retain" once configure("retain") took effect in this process, else "system"."""
    return _state


def describe() -> str:
    return f"{_state}: {_detail}"
