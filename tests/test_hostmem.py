"""executor.hostmem: the "retain" allocator setting keeps freed memory, and says what it did."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from executor import hostmem

GLIBC = hostmem._glibc() is not None

# A fresh process (the setting is process-wide and one-way): apply MODE, then allocate, fill and free
# a 64 MiB block five times; print the minor page faults of each round. glibc serves a block this
# large with mmap under its defaults (its adaptive threshold stops at 32 MiB), so every round faults
# the block in again; with "retain" only the first round does. (How many faults one round takes
# depends on the page size the kernel hands out: 16,384 with 4 KiB pages, a few hundred where
# transparent huge pages are on; the test compares rounds, not counts.)
_PROBE = textwrap.dedent("""
    import json, resource, sys
    import numpy as np
    from executor import hostmem
    hostmem.configure(sys.argv[1])
    faults = []
    for _ in range(5):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        a = np.empty(64 << 20, dtype=np.uint8)
        a.fill(1)
        del a
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    print(json.dumps({"mode": hostmem.mode(), "describe": hostmem.describe(), "faults": faults}))
""")


def _probe(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_unknown_mode_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="host_memory='pooled' is not known; allowed: retain, system"):
        hostmem.configure("pooled")


@pytest.mark.skipif(not GLIBC, reason="the retain setting acts on glibc's malloc only; this C library is not glibc")
def test_retain_keeps_freed_pages_and_system_does_not():
    system = _probe("system")
    retain = _probe("retain")
    assert system["mode"] == "system" and system["describe"].startswith("system: ")
    assert retain["mode"] == "retain" and "mmap threshold 256 MiB" in retain["describe"]
    # Under glibc's defaults every round faults the block in again, as many faults as the first ...
    first = system["faults"][0]
    assert first >= 32, system  # at least one fault per 2 MiB huge page
    assert all(f >= 0.5 * first for f in system["faults"][1:]), system
    # ... with "retain" the first round does, and the later rounds reuse the heap's pages.
    assert retain["faults"][0] >= 32, retain
    assert all(f <= 0.05 * retain["faults"][0] for f in retain["faults"][1:]), retain


def test_runner_applies_the_setting_and_the_device_record_names_it():
    torch = pytest.importorskip("torch")
    from executor.device import describe_device
    from executor.model import LlamaForCausalLM, preset
    from executor.runner import ModelRunner

    model = LlamaForCausalLM.from_seed(preset("tiny"), 0)
    with pytest.raises(ValueError, match="host_memory='bogus'"):
        ModelRunner(model, 8, 16, num_threads=1, host_memory="bogus")
    runner = ModelRunner(model, 8, 16, num_threads=1)
    assert runner.host_memory == hostmem.describe()
    assert describe_device(torch.device("cpu"))["host_memory"] == hostmem.describe()
    if GLIBC:
        assert hostmem.mode() == "retain"
