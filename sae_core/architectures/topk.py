"""TopK SAE (Gao et al. 2024, eq. 2 with the reference code's latent bias and ReLU):
z = ReLU(TopK_k(W_enc (x - b_pre) + b_enc)), x_hat = W_dec^T z + b_pre, loss = FVU + aux_coeff * AuxK.

Defaults: k = 32, the k of the paper's released GPT-2 SAEs and of most of its sweeps; k_aux = the power
of two nearest d_in / 2 and aux_coeff = 1/32 (appendix B.1: "not extremely sensitive"); use_b_enc = true
as in the reference code (appendix C.3: b_enc does not change the converged loss, removing it makes
TopK a per-example-threshold JumpReLU and converges slightly slower).

AuxK reconstructs the detached residual e = x - x_hat from the top-k_aux pre-activations among dead
latents, ê = W_dec z_aux, and adds aux_coeff * ||e - ê||^2 / ||e - mean(e)||^2. Its normaliser is
recomputed every batch because the residual's scale shrinks during training (seed 000, A.6); a batch
with zero residual variance (one row, or a perfect fit) contributes 0 rather than inf or NaN.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field, ValidationInfo, field_validator
from torch import nn

from sae_core.architectures.base import (
    Architecture, LossOutput, SAEConfig, SparseCode, StepContext, fvu_loss, register,
)
from sae_core.kernels import sparse_decode, topk_encode


def _k_at_most_n(value: int | None, info: ValidationInfo) -> int | None:
    n = info.data.get("n_latents")
    if value is not None and n is not None and value > n:
        raise ValueError(f"must be <= n_latents ({n}); allowed: 1..{n}")
    return value


class TopKConfig(SAEConfig):
    arch: Literal["topk"] = "topk"
    k: int = Field(32, ge=1)
    k_aux: int | None = Field(None, ge=1)  # None: the power of two nearest d_in / 2 (paper B.1)
    aux_coeff: float = Field(1 / 32, ge=0, allow_inf_nan=False)
    use_b_enc: bool = True

    _check_k = field_validator("k", "k_aux")(_k_at_most_n)

    @property
    def resolved_k_aux(self) -> int:
        k_aux = self.k_aux or 2 ** max(0, round(math.log2(max(self.d_in / 2, 1))))
        return min(k_aux, self.n_latents)

    @property
    def encode_k(self) -> int:
        """How many latents the training forward selects."""
        return self.k


@register
class TopK(Architecture):
    name = "topk"
    Config = TopKConfig

    def __init__(self, cfg: TopKConfig):
        super().__init__(cfg)
        self.b_enc = nn.Parameter(torch.zeros(cfg.n_latents)) if cfg.use_b_enc else None

    def preactivation(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x - self.b_pre, self.W_enc, self.b_enc)

    def encode_sparse(self, x: torch.Tensor, k: int | None = None) -> SparseCode:
        vals, idx, _, _ = topk_encode(x - self.b_pre, self.W_enc, self.b_enc, k or self.cfg.k)
        return SparseCode(idx, vals)

    def encode(self, x: torch.Tensor) -> SparseCode:
        return self.encode_sparse(x)

    batch_select = False  # BatchTopK selects over the whole batch

    @classmethod
    def flops_per_vector(cls, cfg: TopKConfig) -> float:
        # the training decodes: TopK(k), and the wide code too where more are selected (Multi-TopK)
        decoded = cfg.k + (cfg.encode_k if cfg.encode_k > cfg.k else 0)
        return float(2 * cfg.d_in * cfg.n_latents + 4 * cfg.d_in * cfg.encode_k + 6 * cfg.d_in * decoded)

    def reconstruction_loss(self, x, code: SparseCode, ctx: StepContext, terms: dict):
        """Main loss from the training code; also the inference code, its reconstruction and the number of
        latents per row in each decode (for FLOPs)."""
        x_hat = self.decode(code)
        loss = fvu_loss(x, x_hat, ctx.mse_scale)
        terms["mse_loss"] = loss.detach()
        return loss, code, x_hat, [self.cfg.k]

    def loss(self, x: torch.Tensor, ctx: StepContext) -> LossOutput:
        cfg: TopKConfig = self.cfg
        dead = ctx.dead_latents if cfg.aux_coeff > 0 and ctx.dead_latents is not None else None
        k_aux = min(cfg.resolved_k_aux, len(dead)) if dead is not None else 0
        vals, idx, aux_vals, aux_idx = topk_encode(
            x - self.b_pre, self.W_enc, self.b_enc, cfg.encode_k, dead if k_aux else None, k_aux, self.batch_select,
            ctx.selection)
        terms: dict[str, torch.Tensor] = {}
        loss, code, x_hat, decoded = self.reconstruction_loss(x, SparseCode(idx, vals), ctx, terms)
        if k_aux:
            e = (x - x_hat).detach()
            e_hat = sparse_decode(aux_idx, aux_vals, self.W_dec)
            variance = (e - e.mean(dim=0)).pow(2).sum()
            aux = torch.where(variance > 0, (e - e_hat).pow(2).sum() / variance.clamp_min(1e-30), 0.0)
            terms["aux_loss"] = aux.detach()
            loss = loss + cfg.aux_coeff * aux
            decoded.append(k_aux)
        d, n, B = cfg.d_in, cfg.n_latents, x.shape[0]
        # dense encoder forward; per selected entry 4d in the encoder backward (weight + input
        # gradients) and 6d per decoded entry (forward, value gradient, weight gradient). BatchTopK
        # selects k per row on average, so the same count holds.
        flops = B * (2 * d * n + 4 * d * (cfg.encode_k + k_aux) + 6 * d * sum(decoded))
        return LossOutput(loss=loss, code=code, flops=float(flops), terms=terms)
