"""scripts/size_readout.py's held-out ridge read-out: it finds a size that is linearly in the features and does not
find one that is not (the claim docs/seeing_base.md makes of the base rests on it)."""

import importlib.util
from pathlib import Path

import numpy as np

spec = importlib.util.spec_from_file_location(
    "size_readout", Path(__file__).resolve().parents[1] / "scripts" / "size_readout.py"
)
size_readout = importlib.util.module_from_spec(spec)
spec.loader.exec_module(size_readout)


def test_readout_finds_a_linear_size_and_not_noise():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 32))
    size = x @ rng.normal(size=32) * 0.05 + 0.5
    r2, pred = size_readout.readout(x, size, ridge=1e-3)
    assert r2 > 0.99 and pred.shape == (200,)
    r2_noise, _ = size_readout.readout(x, rng.uniform(0.2, 0.95, 400), ridge=1.0)
    assert r2_noise < 0.1
