"""The L1 sparsity penalty shared by the L1 family (relu, gated, prolu).

penalty = lambda_t * sqrt(mse_scale) * mean_b sum_i |z_bi| * w_i
  lambda_t  = l1_coeff * min(1, progress / l1_warmup_frac): linear warm-up (Conerly et al. 2024)
  w_i       = ||W_dec,i|| with l1_decoder_norm (Conerly et al. 2024; the decoder is then left
              unconstrained, as in Gao et al.'s GPT-4 baselines), else 1 (unit-norm decoder rows)
  sqrt(mse_scale) = 1 / RMS distance of the inputs from their mean: latents scale with the inputs, so
              this makes l1_coeff dimensionless, like the FVU it is traded against. For unit-norm inputs
              (the default normalisation) it is close to 1, the scale of the paper's lambda grids.
"""
from __future__ import annotations

import math

import torch
from pydantic import Field

from sae_core.architectures.base import Architecture, SAEConfig, StepContext


class L1Config(SAEConfig):
    l1_coeff: float = Field(5e-3, ge=0, allow_inf_nan=False)  # mid-range of Gao et al.'s ReLU grid, 1.7e-3..1e-2
    l1_warmup_frac: float = Field(0.05, ge=0, le=1)  # Conerly et al. 2024 warm up over 5% of training
    l1_decoder_norm: bool = False


def l1_penalty(z: torch.Tensor, W_dec: torch.Tensor, cfg: L1Config, ctx: StepContext) -> torch.Tensor:
    warm = min(1.0, ctx.progress / cfg.l1_warmup_frac) if cfg.l1_warmup_frac > 0 else 1.0
    per_latent = z.abs().sum(dim=0)
    if cfg.l1_decoder_norm:
        per_latent = per_latent * W_dec.norm(dim=1)
    return cfg.l1_coeff * warm * math.sqrt(ctx.mse_scale) * per_latent.sum() / z.shape[0]


class L1Family(Architecture):
    """What every L1-penalised family shares: dead latents are resampled 4 times in training (Gao et al.
    appendix B.2), and the unit-norm decoder constraint is dropped when the penalty carries the norms."""

    default_resamples = 4

    @property
    def constrain_decoder(self) -> bool:
        return not self.cfg.l1_decoder_norm
