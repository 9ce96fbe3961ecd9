"""Gao et al.'s headline (Fig. 2a) on synthetic ground-truth data: at matched L0, TopK's nmse is no worse
than ReLU's. bench/frontier_synthetic.py runs the larger version over every family."""
import numpy as np
import pytest

from analysis.frontier import value_at_l0
from sae_core import Trainer
from sae_core.sources import SyntheticSource


def test_value_at_l0_interpolates_log_log_and_never_extrapolates():
    l0, nmse = np.array([2.0, 8.0]), np.array([0.4, 0.1])
    assert value_at_l0(l0, nmse, 4.0) == pytest.approx(0.2)  # the log-log midpoint
    assert np.isnan(value_at_l0(l0, nmse, 1.0)) and np.isnan(value_at_l0(l0, nmse, 9.0))


def test_topk_is_no_worse_than_relu_at_matched_l0():
    src = SyntheticSource(d_in=16, n_features=128, active_per_vector=4, noise_std=0.01, seed=2, n_eval=2048)
    base = {"d_in": 16, "n_latents": 64, "normalization": "none"}
    train = {"train_tokens": 60_000, "batch_size": 512, "lr": 3e-3, "dead_window_tokens": 20_000}
    topk = [Trainer({**base, "arch": "topk", "k": k}, train, src).run().metrics for k in (2, 4, 8, 16)]
    relu = [Trainer({**base, "arch": "relu", "l1_coeff": c}, train, src).run().metrics for c in (0.3, 1.0)]
    at = value_at_l0([m["l0"] for m in topk], [m["nmse"] for m in topk], [m["l0"] for m in relu])
    compared = [(m["l0"], m["nmse"], t) for m, t in zip(relu, at) if np.isfinite(t)]
    assert len(compared) >= 2, (topk, relu)
    for l0, relu_nmse, topk_nmse in compared:
        assert topk_nmse <= relu_nmse, (l0, relu_nmse, topk_nmse)
