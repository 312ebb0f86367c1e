"""experiments/gpu_fidelity.sh's checks before anything runs: a machine without simpy or without CUDA is told
so, in one line, and nothing is measured."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "gpu_fidelity.sh"


def run_script(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out"), "1"], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "WHEELS": str(tmp_path / "no-wheels"), **env})


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_without_simpy_or_its_wheel_it_stops_and_says_so(tmp_path):
    fake = tmp_path / "python-without-simpy"
    fake.write_text(f"#!/bin/sh\nif [ \"$1\" = -c ]; then exit 1; fi\nexec {sys.executable} \"$@\"\n")
    fake.chmod(0o755)
    res = run_script(tmp_path, PYTHON=str(fake))
    assert res.returncode == 2
    assert "simpy is not installed" in res.stderr and "no-wheels/ holds no wheel" in res.stderr
    assert not (tmp_path / "out" / "fidelity.log").exists()  # nothing ran


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_asking_for_cuda_where_torch_sees_none_stops_with_the_reason(tmp_path):
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the check passes here")
    res = run_script(tmp_path, PYTHON=sys.executable, DEVICE="cuda")
    assert res.returncode == 1
    assert "DEVICE=cuda but torch sees no CUDA device" in res.stderr and "DEVICE=cpu" in res.stderr
    assert not (tmp_path / "out" / "fidelity.log").exists()
