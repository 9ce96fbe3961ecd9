"""Held-out metrics, always in the original activation space.

nmse = sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 (fraction of variance unexplained, mean over the set)
mse  = sum ||x - x_hat||^2 / (N * d_in)          (per element)
l0   = mean number of nonzero latents per vector;  l1 = mean sum_i |z_i| per vector
dead_frac_eval = fraction of latents that fire on no vector of the set
Per latent: frequency (fraction of vectors on which it is active: its density), mean activation when active,
and mean_sq_activation = E[z_i^2] over all vectors, Gao et al. (2024, App. E.4)'s "importance" of a latent
(an approximation of its marginal impact on the MSE).
dense_frac = fraction of latents with density > 0.1; dense_top_density = the mean density of the d_in
densest latents divided by l0, Gao et al. (2024, App. E.5, Fig. 20)'s measure of a solution with dense latents
(d_in is their d_model).

A multi-layer SAE's set holds vectors of several layers (`layer_ids`). Lawson et al. (2024, "Residual stream
analysis with multi-layer SAEs", App. B.1) record the FVU and the MSE "for the inputs from each transformer
layer and the mean over all layers": there nmse = the mean over layers of each layer's FVU (its own mean(x)
and variance), mse = the mean over layers of each layer's mse, and the figures over all vectors pooled, where
the high-norm late layers dominate, are kept as nmse_pooled and mse_pooled (mse_pooled = mse when the
layers hold equal numbers of vectors). l0, l1, dead_frac_eval, the per-latent statistics and the dense-latent
metrics are over all the vectors pooled (equal numbers per layer make l0 and l1 the mean over layers too; a
latent's density is its density over every layer the SAE reads). Without layer_ids there are no *_pooled keys.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from sae_core.architectures import Code, SparseCode
from sae_core.normalization import TokenStats
from sae_core.sae import SAE


@dataclass
class Evaluation:
    metrics: dict[str, float]
    frequency: torch.Tensor  # [n_latents]: fraction of the vectors on which each latent is active
    mean_activation: torch.Tensor  # [n_latents]: mean value when active (0 if never active)
    mean_sq_activation: torch.Tensor  # [n_latents]: E[z_i^2] over all the vectors (Gao et al. 2024, App. E.4)


@torch.no_grad()
def evaluate(sae: SAE, x: torch.Tensor, batch_size: int = 4096,
             encode: Callable[[torch.Tensor], tuple[Code, TokenStats | None]] | None = None,
             layer_ids: torch.Tensor | None = None) -> Evaluation:
    """encode: replaces `sae.encode_code` (e.g. a test-time TopK(k') through `sae.encode_with`).
    layer_ids: the layer of each row of x for a multi-layer SAE: nmse and mse become the mean over layers of
    each layer's, the pooled figures nmse_pooled and mse_pooled (module docstring).
    A sharded SAE is evaluated by all its shards together; each gets the whole evaluation."""
    encode = encode or sae.encode_code
    device, mesh = sae.net.W_dec.device, sae.net.mesh
    n = sae.net.n_local
    mean = x.to(torch.float64).mean(dim=0).to(device)
    sq_err = total_var = l1 = 0.0
    counts = torch.zeros(n, dtype=torch.float64, device=device)
    sums = torch.zeros(n, dtype=torch.float64, device=device)
    sq_sums = torch.zeros(n, dtype=torch.float64, device=device)
    if layer_ids is not None:
        if layer_ids.shape != (x.shape[0],):
            raise ValueError(f"layer_ids: one per row of x ({x.shape[0]}), got shape {tuple(layer_ids.shape)}")
        layers, group = torch.unique(layer_ids.cpu(), return_inverse=True)
        layer_n = torch.bincount(group, minlength=len(layers)).to(torch.float64)
        layer_mean = torch.stack([x[group == i].to(torch.float64).mean(dim=0) for i in range(len(layers))])
        layer_mean, group = layer_mean.to(device), group.to(device)
        layer_err = torch.zeros(len(layers), dtype=torch.float64, device=device)
        layer_var = torch.zeros(len(layers), dtype=torch.float64, device=device)
    for start in range(0, x.shape[0], batch_size):
        xb = x[start:start + batch_size].to(device)
        code, stats = encode(xb)
        x_hat = sae.decode(code, stats)
        err = (xb - x_hat).double().pow(2)
        sq_err += float(err.sum())
        total_var += float((xb.double() - mean).pow(2).sum())
        if layer_ids is not None:
            gb = group[start:start + batch_size]
            layer_err.index_add_(0, gb, err.sum(dim=1))
            layer_var.index_add_(0, gb, (xb.double() - layer_mean[gb]).pow(2).sum(dim=1))
        if isinstance(code, SparseCode):  # never densify a sparse code
            active = code.vals != 0
            counts.index_add_(0, code.idx[active], torch.ones_like(code.vals[active], dtype=torch.float64))
            sums.index_add_(0, code.idx[active], code.vals[active].double())
            sq_sums.index_add_(0, code.idx[active], code.vals[active].double().pow(2))
            l1 += float(code.vals.abs().double().sum())
        else:
            counts += (code != 0).sum(dim=0)
            sums += code.double().sum(dim=0)
            sq_sums += code.double().pow(2).sum(dim=0)
            l1 += float(code.abs().double().sum())
    N, d = x.shape
    counts, sums, sq_sums = (mesh.gather(t, dim=0) for t in (counts, sums, sq_sums))
    l1 = float(mesh.reduce_(torch.tensor([l1], dtype=torch.float64), "shards"))
    metrics = {
        "nmse": sq_err / total_var if total_var > 0 else float("nan"),
        "mse": sq_err / (N * d),
        "l0": float(counts.sum()) / N,
        "l1": l1 / N,
        "dead_frac_eval": float((counts == 0).double().mean()),
        **dense_latents(counts / N, sae.cfg.d_in),  # a multi-layer SAE's: of its pooled vectors (docstring)
    }
    if layer_ids is not None:
        layer_nmse = torch.where(layer_var > 0, layer_err / layer_var, torch.full_like(layer_var, float("nan")))
        metrics["nmse_pooled"], metrics["mse_pooled"] = metrics["nmse"], metrics["mse"]
        metrics["nmse"] = float(layer_nmse.mean())
        metrics["mse"] = float((layer_err.cpu() / (layer_n * d)).mean())
    return Evaluation(metrics, (counts / N).float().cpu(), (sums / counts.clamp_min(1)).float().cpu(),
                      (sq_sums / N).float().cpu())


def dense_latents(density: torch.Tensor, d_in: int) -> dict[str, float]:
    """density: every latent's fraction of active vectors (its sum is l0). dense_frac: the fraction of latents
    with density > 0.1. dense_top_density: the mean density of the d_in densest latents over l0 (Gao et al.
    2024, App. E.5, Fig. 20): d_model dense latents could span the whole space, so this is high when the SAE
    spends its L0 on a few near-always-on latents (their k = 512 SAEs); nan when no latent fires."""
    density = density.double()
    l0 = float(density.sum())
    top = density.topk(min(d_in, density.numel())).values
    return {"dense_frac": float((density > 0.1).double().mean()),
            "dense_top_density": float(top.mean()) / l0 if l0 > 0 else float("nan")}
