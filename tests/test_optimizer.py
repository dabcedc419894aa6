"""The learning-rate schedule against its closed form (Pythia / GPT-NeoX: linear warmup
from 0, cosine decay to ``min_lr_ratio`` of the peak at the last step, flat after)."""

import math

import numpy as np
import pytest

from neox_jax.training.optimizer import learning_rate_schedule


def closed_form(step, lr, total, warmup, ratio):
    warmup = max(0, min(warmup, total))
    if step < warmup:
        return lr * step / warmup
    progress = min(step - warmup, max(1, total - warmup)) / max(1, total - warmup)
    return lr * (ratio + (1 - ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@pytest.mark.parametrize(
    "lr,total,warmup,ratio",
    [
        (3e-3, 200, 30, 0.1),  # configs/pretrain.py:tiny
        (1e-3, 143_000, 1430, 0.1),  # Pythia: 1% warmup of 143k steps
        (6e-4, 1000, 0, 0.1),  # no warmup
        (2e-4, 1000, 30, 0.0),  # decay to zero
        (1e-3, 10, 10, 0.1),  # warmup is the whole run
        (1e-3, 10, 50, 0.1),  # warmup longer than the run: clamped
    ],
)
def test_schedule_matches_closed_form(lr, total, warmup, ratio):
    schedule = learning_rate_schedule(lr, total, warmup, ratio)
    steps = np.unique(np.linspace(0, total + 20, 400).astype(int))
    got = np.array([float(schedule(s)) for s in steps])
    want = np.array([closed_form(int(s), lr, total, warmup, ratio) for s in steps])
    # float32 schedule vs float64 formula: a few ulps of the peak.
    np.testing.assert_allclose(got, want, rtol=0, atol=lr * 1e-6)
