"""experiments/diag_ttft.py's same-shape spread of decode steps."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def diag_module():
    spec = importlib.util.spec_from_file_location("diag_ttft", ROOT / "experiments" / "diag_ttft.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_same_shape_spread_is_the_decode_steps_mean_over_their_median_per_shape():
    spread = diag_module().same_shape_spread
    # shape A: 2 sequences at 300 tokens of padded context, 20 steps of 10 ms and 5 slow ones of 30 ms;
    # shape B: 4 sequences at 900, 25 steps of 20 ms; a prefill step and a small group are left out
    d = [0.010] * 20 + [0.030] * 5 + [0.020] * 25 + [0.5] + [0.040] * 3
    seqs = [2] * 25 + [4] * 25 + [0] + [8] * 3
    ctx = [300] * 25 + [900] * 25 + [0] + [2000] * 3
    pt = [0] * 50 + [512] + [0] * 3
    steps = {"duration": np.array(d), "decode_seqs": np.array(seqs), "decode_padded_context": np.array(ctx),
             "prefill_tokens": np.array(pt)}
    got, groups = spread(steps)
    assert groups == 2
    assert got == pytest.approx((0.35 + 0.5) / (25 * 0.010 + 25 * 0.020))
    # the same context bucket (128 tokens) is one shape; no group large enough: NaN
    steps["decode_padded_context"] = np.array([300] * 24 + [380] + [900] * 25 + [0] + [2000] * 3)
    assert spread(steps)[1] == 2
    assert np.isnan(spread(steps, min_steps=100)[0])
