"""Held-out metrics, always in the original activation space.

nmse = sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 (fraction of variance unexplained, mean over the set)
mse  = sum ||x - x_hat||^2 / (N * d_in)          (per element)
l0   = mean number of nonzero latents per vector;  l1 = mean sum_i |z_i| per vector
dead_frac_eval = fraction of latents that fire on no vector of the set
"""
from __future__ import annotations

import torch

from sae_core.architectures import SparseCode
from sae_core.sae import SAE


@torch.no_grad()
def evaluate(sae: SAE, x: torch.Tensor, batch_size: int = 4096) -> dict[str, float]:
    device = sae.arch.W_dec.device
    n = sae.cfg.n_latents
    mean = x.to(torch.float64).mean(dim=0).to(device)
    sq_err = total_var = l0 = l1 = 0.0
    fired = torch.zeros(n, dtype=torch.bool, device=device)
    for start in range(0, x.shape[0], batch_size):
        xb = x[start:start + batch_size].to(device)
        code, stats = sae.encode_code(xb)
        x_hat = sae.decode(code, stats)
        sq_err += float((xb - x_hat).double().pow(2).sum())
        total_var += float((xb.double() - mean).pow(2).sum())
        z = code.vals if isinstance(code, SparseCode) else code  # never densify a sparse code
        l0 += float((z != 0).sum())
        l1 += float(z.abs().double().sum())
        fired[sae.arch.active_latents(code)] = True
    N, d = x.shape
    return {
        "nmse": sq_err / total_var if total_var > 0 else float("nan"),
        "mse": sq_err / (N * d),
        "l0": l0 / N,
        "l1": l1 / N,
        "dead_frac_eval": 1.0 - float(fired.float().mean()),
    }
