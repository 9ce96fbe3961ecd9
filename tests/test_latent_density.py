"""Per-latent density and importance (Gao et al. 2024, App. E.4) and the dense-latent metrics (App. E.5,
Fig. 20) of the held-out evaluation, against a float64 dense reference computed by hand."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from sae_core.evaluation.reconstruction import dense_latents, evaluate
from sae_core.sae import SAE
from sae_core.sae_files import load_latent_stats, save_latent_stats

D, N = 8, 48


def reference(sae: SAE, x: torch.Tensor) -> dict:
    with torch.no_grad():
        z = sae.encode(x).double()
    density = (z != 0).double().mean(0)
    l0 = float(density.sum())
    top = density.sort(descending=True).values[:D]
    return {"density": density, "sq": z.pow(2).mean(0), "l0": l0,
            "dense_frac": float((density > 0.1).double().mean()), "dense_top_density": float(top.mean()) / l0}


@pytest.mark.parametrize("arch", [{"arch": "topk", "k": 6}, {"arch": "relu"}])
def test_density_importance_and_dense_metrics_match_a_dense_reference(arch):
    torch.manual_seed(0)
    sae = SAE({"d_in": D, "n_latents": N, "normalization": "none", **arch})
    x = torch.randn(300, D) + 0.5
    ref = reference(sae, x)
    ev = evaluate(sae, x, batch_size=64)  # several batches, the last one short
    torch.testing.assert_close(ev.frequency, ref["density"].float())
    torch.testing.assert_close(ev.mean_sq_activation, ref["sq"].float())
    assert ev.metrics["l0"] == pytest.approx(ref["l0"])
    assert ev.metrics["dense_frac"] == pytest.approx(ref["dense_frac"])
    assert ev.metrics["dense_top_density"] == pytest.approx(ref["dense_top_density"])
    if arch["arch"] == "topk":  # an untrained ReLU SAE's latents are all dense; TopK's are not
        assert 0 < ev.metrics["dense_frac"] < 1


def test_multi_layer_sae_dense_metrics_are_of_the_pooled_vectors():
    torch.manual_seed(1)
    sae = SAE({"d_in": D, "n_latents": N, "arch": "topk", "k": 4, "normalization": "none"})
    x = torch.cat([torch.randn(100, D), 5 * torch.randn(100, D) + 1])
    ids = torch.tensor([0] * 100 + [3] * 100)
    ev, ref = evaluate(sae, x, layer_ids=ids), reference(sae, x)
    assert ev.metrics["dense_frac"] == pytest.approx(ref["dense_frac"])
    assert ev.metrics["dense_top_density"] == pytest.approx(ref["dense_top_density"])
    torch.testing.assert_close(ev.mean_sq_activation, ref["sq"].float())


def test_dense_latents_by_hand():
    m = dense_latents(torch.tensor([0.5, 0.2, 0.05, 0.0, 0.25]), d_in=2)
    assert m["dense_frac"] == pytest.approx(3 / 5)  # 0.5, 0.2, 0.25 exceed 0.1
    assert m["dense_top_density"] == pytest.approx((0.5 + 0.25) / 2 / 1.0)  # l0 = 1.0
    assert dense_latents(torch.tensor([0.3, 0.1]), d_in=8)["dense_top_density"] == pytest.approx(0.2 / 0.4)
    assert torch.isnan(torch.tensor(dense_latents(torch.zeros(4), d_in=2)["dense_top_density"]))


def test_latent_stats_round_trip_and_an_older_file_without_importance(tmp_path):
    sae = SAE({"d_in": D, "n_latents": N, "arch": "topk", "k": 4})
    ev = evaluate(sae, torch.randn(64, D))
    save_latent_stats(ev, tmp_path / "new.safetensors")
    stats = load_latent_stats(tmp_path / "new.safetensors")
    assert set(stats) == {"frequency", "mean_activation", "mean_sq_activation"}
    torch.testing.assert_close(stats["mean_sq_activation"], ev.mean_sq_activation)
    save_file({"frequency": ev.frequency, "mean_activation": ev.mean_activation}, tmp_path / "old.safetensors")
    assert set(load_latent_stats(tmp_path / "old.safetensors")) == {"frequency", "mean_activation"}
