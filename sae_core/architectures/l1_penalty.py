"""The L1 sparsity penalty shared by the L1 family (relu, gated, prolu).

l1_coeff is the paper's lambda: Gao et al. 2024, eq. 1, L = ||x - x_hat||^2 + lambda ||z||_1 per vector on
unit-norm inputs (the reference code's loss.py: per-token NMSE + lambda ||z||_1 / ||x||, the same on
unit-norm inputs), so its B.2 grids (ReLU 1.7e-3 ... 1.7e-2) mean here what they meant there. The
trainer's main loss is the FVU, mse_scale * mean_b ||x - x_hat||^2 with mse_scale = 1 / E||x - mean(x)||^2
fixed at init (§A.6), so the penalty carries the same constant factor:

    loss = mse_scale * mean_b (||x_b - x_hat_b||^2 + lambda_t * input_rms * sum_i |z_bi| * w_i)
    penalty = lambda_t * input_rms * mse_scale * mean_b sum_i |z_bi| * w_i

which is the paper's loss times the constant mse_scale (Adam is invariant to a constant loss scale, so
the optimum and the training path are the paper's).
  lambda_t  = l1_coeff * min(1, progress / l1_warmup_frac): linear warm-up (Conerly et al. 2024)
  w_i       = ||W_dec,i|| with l1_decoder_norm (Conerly et al. 2024; the decoder is then left
              unconstrained, as in Gao et al.'s GPT-4 baselines), else 1 (unit-norm decoder rows)
  input_rms = sqrt(E||x||^2) of the normalised inputs (StepContext): 1 for unit_norm, the paper's inputs,
              so lambda is exactly theirs; sqrt(d_in) for standardize and the measured value for none,
              which keeps lambda in the paper's units whatever the input scale (latents scale with x).
A.6's normalisation constant leaves one reading open: if the paper divided only the MSE term by its
constant, its lambda is ours times mse_scale (~1 / (1 - ||E x||^2) on unit-norm inputs).
"""
from __future__ import annotations

import torch
from pydantic import Field

from sae_core.architectures.base import Architecture, SAEConfig, StepContext
from sae_core.architectures.entry_code import EntryCode


class L1Config(SAEConfig):
    # the paper's lambda (eq. 1, docstring); default: mid-range of Gao et al.'s ReLU grid (§B.2, 1.7e-3..1.7e-2)
    l1_coeff: float = Field(5e-3, ge=0, allow_inf_nan=False)
    l1_warmup_frac: float = Field(0.05, ge=0, le=1)  # Conerly et al. 2024 warm up over 5% of training
    l1_decoder_norm: bool = False  # weight |z_i| by ||W_dec,i|| with an unconstrained decoder (Conerly et al.)


def l1_penalty(z: torch.Tensor | EntryCode, W_dec: torch.Tensor, cfg: L1Config, ctx: StepContext) -> torch.Tensor:
    warm = min(1.0, ctx.progress / cfg.l1_warmup_frac) if cfg.l1_warmup_frac > 0 else 1.0
    if isinstance(z, EntryCode):
        per_latent, batch = z.latent_sums(z.vals.abs(), W_dec.shape[0]), z.batch
    else:
        per_latent, batch = z.abs().sum(dim=0), z.shape[0]
    if cfg.l1_decoder_norm:
        per_latent = per_latent * W_dec.norm(dim=1)
    return cfg.l1_coeff * warm * ctx.input_rms * ctx.mse_scale * per_latent.sum() / batch


class L1Family(Architecture):
    """What every L1-penalised family shares: dead latents are resampled 4 times in training (Gao et al.
    appendix B.2), and the unit-norm decoder constraint is dropped when the penalty carries the norms."""

    default_resamples = 4
    sparsity_keys = ("l1_coeff",)

    @property
    def constrain_decoder(self) -> bool:
        return not self.cfg.l1_decoder_norm
