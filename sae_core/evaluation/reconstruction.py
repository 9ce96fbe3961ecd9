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


class _Totals:
    """One encoder's running sums over the batches of x; per-latent sums only when `latents` (the recovery grid
    needs its points' scalars alone, and n-sized sums per point would add up at 2^20 latents)."""

    def __init__(self, sae: SAE, layers: _Layers | None, latents: bool):
        device = sae.net.W_dec.device
        self.sq_err = self.l1 = self.nonzero = 0.0
        self.layer_err = None if layers is None else torch.zeros(layers.count, dtype=torch.float64, device=device)
        self.latent_sums = torch.zeros(3, sae.net.n_local, dtype=torch.float64, device=device) if latents else None

    def add(self, xb: torch.Tensor, code: Code, x_hat: torch.Tensor, gb: torch.Tensor | None) -> None:
        err = (xb - x_hat).double().pow(2)
        self.sq_err += float(err.sum())
        if gb is not None:
            self.layer_err.index_add_(0, gb, err.sum(dim=1))
        vals = code if isinstance(code, torch.Tensor) else code.vals  # never densify a sparse code
        self.l1 += float(vals.abs().sum(dtype=torch.float64))
        self.nonzero += float(torch.count_nonzero(vals))
        if self.latent_sums is None:
            return
        counts, sums, sq_sums = self.latent_sums
        if not isinstance(code, torch.Tensor):
            active = code.vals != 0
            latents = code.idx if isinstance(code, SparseCode) else code.latents
            idx, v = latents[active], code.vals[active].double()
            counts.index_add_(0, idx, torch.ones_like(v))
            sums.index_add_(0, idx, v)
            sq_sums.index_add_(0, idx, v.pow(2))
        else:
            counts += (code != 0).sum(dim=0)
            sums += code.double().sum(dim=0)
            sq_sums += code.double().pow(2).sum(dim=0)


class _Layers:
    """A multi-layer SAE's vectors grouped by layer: each layer's own mean and variance (module docstring)."""

    def __init__(self, x: torch.Tensor, layer_ids: torch.Tensor, device: torch.device):
        if layer_ids.shape != (x.shape[0],):
            raise ValueError(f"layer_ids: one per row of x ({x.shape[0]}), got shape {tuple(layer_ids.shape)}")
        layers, group = torch.unique(layer_ids.cpu(), return_inverse=True)
        self.count = len(layers)
        self.n = torch.bincount(group, minlength=self.count).to(torch.float64)
        self.mean = torch.stack([x[group == i].to(torch.float64).mean(dim=0) for i in range(self.count)]).to(device)
        self.group = group.to(device)
        self.var = torch.zeros(self.count, dtype=torch.float64, device=device)


def _passes(sae: SAE, x: torch.Tensor, encoders: list[Callable], batch_size: int, layer_ids: torch.Tensor | None,
            latents: bool) -> tuple[list[_Totals], float, _Layers | None]:
    """Every encoder over each batch before the next batch: encoders that share work per batch (the recovery
    grid's pre-activations, recovery.py) do it once. Returns their totals, the total variance and the layers."""
    device = sae.net.W_dec.device
    mean = x.to(torch.float64).mean(dim=0).to(device)
    layers = None if layer_ids is None else _Layers(x, layer_ids, device)
    totals = [_Totals(sae, layers, latents) for _ in encoders]
    total_var = 0.0
    for start in range(0, x.shape[0], batch_size):
        xb = x[start:start + batch_size].to(device)
        total_var += float((xb.double() - mean).pow(2).sum())
        gb = None
        if layers is not None:
            gb = layers.group[start:start + batch_size]
            layers.var.index_add_(0, gb, (xb.double() - layers.mean[gb]).pow(2).sum(dim=1))
        for encode, tot in zip(encoders, totals):
            code, stats = encode(xb)
            tot.add(xb, code, sae.decode(code, stats), gb)
    return totals, total_var, layers


def _scalars(sae: SAE, tot: _Totals, total_var: float, layers: _Layers | None, N: int, d: int) -> dict[str, float]:
    mesh = sae.net.mesh
    l1, nonzero = (float(v) for v in mesh.reduce_(torch.tensor([tot.l1, tot.nonzero], dtype=torch.float64),
                                                  "shards"))
    metrics = {
        "nmse": tot.sq_err / total_var if total_var > 0 else float("nan"),
        "mse": tot.sq_err / (N * d),
        "l0": nonzero / N,
        "l1": l1 / N,
    }
    if layers is not None:
        layer_nmse = torch.where(layers.var > 0, tot.layer_err / layers.var, torch.full_like(layers.var, float("nan")))
        metrics["nmse_pooled"], metrics["mse_pooled"] = metrics["nmse"], metrics["mse"]
        metrics["nmse"] = float(layer_nmse.mean())
        metrics["mse"] = float((tot.layer_err.cpu() / (layers.n * d)).mean())
    return metrics


@torch.no_grad()
def evaluate(sae: SAE, x: torch.Tensor, batch_size: int = 4096,
             encode: Callable[[torch.Tensor], tuple[Code, TokenStats | None]] | None = None,
             layer_ids: torch.Tensor | None = None) -> Evaluation:
    """encode: replaces `sae.encode_code` (e.g. a test-time TopK(k') through `sae.encode_with`).
    layer_ids: the layer of each row of x for a multi-layer SAE: nmse and mse become the mean over layers of
    each layer's, the pooled figures nmse_pooled and mse_pooled (module docstring).
    A sharded SAE is evaluated by all its shards together; each gets the whole evaluation."""
    (tot,), total_var, layers = _passes(sae, x, [encode or sae.encode_code], batch_size, layer_ids, latents=True)
    N, d = x.shape
    counts, sums, sq_sums = (sae.net.mesh.gather(t, dim=0) for t in tot.latent_sums)
    metrics = _scalars(sae, tot, total_var, layers, N, d)
    metrics = {**metrics, "dead_frac_eval": float((counts == 0).double().mean()),
               **dense_latents(counts / N, sae.cfg.d_in)}  # a multi-layer SAE's: of its pooled vectors (docstring)
    return Evaluation(metrics, (counts / N).float().cpu(), (sums / counts.clamp_min(1)).float().cpu(),
                      (sq_sums / N).float().cpu())


@torch.no_grad()
def evaluate_scalars(sae: SAE, x: torch.Tensor, encoders: list[Callable], batch_size: int = 4096,
                     layer_ids: torch.Tensor | None = None) -> list[dict[str, float]]:
    """nmse, mse, l0 and l1 (and the pooled figures, as `evaluate`) of each encoder, in one pass over x."""
    totals, total_var, layers = _passes(sae, x, encoders, batch_size, layer_ids, latents=False)
    return [_scalars(sae, tot, total_var, layers, *x.shape) for tot in totals]


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
