"""TopK SAE (Gao et al. 2024, eq. 2 with the reference code's latent bias and ReLU):
z = ReLU(TopK_k(W_enc (x - b_pre) + b_enc)), x_hat = W_dec^T z + b_pre, loss = FVU + aux_coeff * AuxK.

Defaults: k = 32, the k of the paper's released GPT-2 SAEs and of most of its sweeps; k_aux = the power
of two nearest d_in / 2 and aux_coeff = 1/32 (appendix B.1: "not extremely sensitive"); use_b_enc = true
as in the reference code (appendix C.3: b_enc does not change the converged loss, removing it makes
TopK a per-example-threshold JumpReLU and converges slightly slower).

AuxK reconstructs the detached residual e = x - x_hat from the top-k_aux pre-activations among dead
latents, ê = W_dec z_aux, and adds aux_coeff * AuxK, normalised one of two ways (`aux_normalization`):
  batch (default): sum_b ||e_b - ê_b||^2 / sum_b ||e_b - mean_b(e)||^2 over the (global) batch: the
      reference code's normalized_mse(ê, e) = mse(ê, e) / mse(batch_mean(e), e).
  token: mean_b ||e_b - ê_b||^2 / ||e_b||^2, each token's error divided by that token's own squared
      residual norm: Gao et al. 2024, §A.6, "For the AuxK MSE loss, we compute the normalization per
      token, because the scale of the error changes throughout training". Read as the per-token
      normalisation of the reference code's loss.py (normalized_mean_squared_error divides each token's
      squared error by its squared norm), since a token has no mean of its own to subtract. The
      denominator is the residual's own norm, not that of e + b_pre (the reference code's AuxK target
      carries b_pre, which both decodes add): a constant ||b_pre||^2 would defeat the stated purpose.
Either normaliser is recomputed every step, following the residual's shrinking scale. A batch (or a token)
with a zero normaliser (one row, or a perfect fit) contributes 0 rather than inf or NaN, as the reference
code's nan_to_num(0) does.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Literal

import torch
from pydantic import Field, ValidationInfo, field_validator
from torch import nn

from sae_core.architectures.base import (
    Architecture,
    LossOutput,
    SAEConfig,
    SparseCode,
    StepContext,
    fvu_loss,
    register,
)
from sae_core.kernels import EXACT, Selection, sparse_decode, topk_encode
from sae_core.parallel.mesh import TRIVIAL, Mesh
from sae_core.parallel.sharded_topk import keep_global_topk, shard_candidates


def _k_at_most_n(value: int | None, info: ValidationInfo) -> int | None:
    n = info.data.get("n_latents")
    if value is not None and n is not None and value > n:
        raise ValueError(f"must be <= n_latents ({n}); allowed: 1..{n}")
    return value


class TopKConfig(SAEConfig):
    arch: Literal["topk"] = "topk"
    k: int = Field(32, ge=1)  # active latents per vector
    k_aux: int | None = Field(None, ge=1)  # None: the power of two nearest d_in / 2 (paper B.1)
    aux_coeff: float = Field(1 / 32, ge=0, allow_inf_nan=False)  # weight of the AuxK dead-latent loss (paper B.1)
    # batch: the reference code's per-batch normaliser; token: the paper's (§A.6) per-token one (docstring)
    aux_normalization: Literal["batch", "token"] = "batch"
    use_b_enc: bool = True  # an encoder bias before the top-k

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
    shardable = True
    sparsity_keys = ("k",)
    l0_set_by_k = True  # BatchTopK and Multi-TopK too: k latents per row (on average over BatchTopK's batch)
    # the paper's lr rule scaled up for runs shorter than its convergence horizon (config.horizon_lr_factor),
    # measured on this family; `recipe: gao2024` and an explicit lr keep the rule
    train_defaults = {"lr": "horizon"}

    def __init__(self, cfg: TopKConfig, mesh: Mesh = TRIVIAL):
        super().__init__(cfg, mesh)
        self.b_enc = nn.Parameter(torch.zeros(self.n_local)) if cfg.use_b_enc else None

    def preactivation(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x - self.b_pre, self.W_enc, self.b_enc)

    def _select(self, x: torch.Tensor, k: int, dead: torch.Tensor | None = None, k_aux: int = 0,
                selection: Selection = EXACT, replica_rows: bool = False):
        """(vals, idx) [B, m] of this shard's latents in the global top-k (other entries 0), and the AuxK code
        (aux_vals, aux_idx) among the dead latents, k_aux of them over all shards. In one process m = k.
        replica_rows: x is this replica's rows of a global batch (training), whose BatchTopK cut spans all
        replicas; otherwise every replica holds the same x."""
        mesh = self.mesh
        x = mesh.to_shards(x - self.b_pre)
        here = dead if k_aux and dead is not None and len(dead) else None
        m_aux = min(shard_candidates(k_aux, mesh, self.n_local), len(here)) if here is not None else 0
        # BatchTopK's cut is made global inside (the batch's k B winners); a per-row top-k here
        width = k if self.batch_select else shard_candidates(k, mesh, self.n_local)
        cut_mesh = mesh if replica_rows else dataclasses.replace(mesh, replicas=1, replica=0, replica_group=None)
        vals, idx, aux_vals, aux_idx = topk_encode(
            x, self.W_enc, self.b_enc, width, here, m_aux, self.batch_select, selection, cut_mesh)
        if mesh.shards > 1:
            if not self.batch_select:
                vals = vals * keep_global_topk(vals, k, mesh)
            if k_aux:  # every shard offers the same width; a shard short of dead latents pads with inactive 0s
                pad = shard_candidates(k_aux, mesh, self.n_local) - aux_vals.shape[1]
                aux_vals = torch.cat([aux_vals, aux_vals.new_zeros(aux_vals.shape[0], pad)], dim=1)
                aux_idx = torch.cat([aux_idx, aux_idx.new_zeros(aux_idx.shape[0], pad)], dim=1)
                aux_vals = aux_vals * keep_global_topk(aux_vals, k_aux, mesh)
        return vals, idx, aux_vals, aux_idx

    def encode_sparse(self, x: torch.Tensor, k: int | None = None) -> SparseCode:
        vals, idx, _, _ = self._select(x, k or self.cfg.k)
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

    def aux_loss(self, e: torch.Tensor, e_hat: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """AuxK of the residual e and its reconstruction ê from dead latents, normalised per batch (over all
        replicas' rows: batch_variance) or per token (a mean over this replica's rows, which the trainer's
        replica average makes the global batch's mean)."""
        err = (e - e_hat).pow(2).sum(dim=-1)
        if self.cfg.aux_normalization == "token":
            norm = e.pow(2).sum(dim=-1)
            return torch.where(norm > 0, err / norm.clamp_min(1e-30), 0.0).mean()
        variance = ctx.batch_variance(e)
        return torch.where(variance > 0, err.sum() / variance.clamp_min(1e-30), 0.0)

    def loss(self, x: torch.Tensor, ctx: StepContext) -> LossOutput:
        cfg: TopKConfig = self.cfg
        k_aux = min(cfg.resolved_k_aux, ctx.dead_count()) if cfg.aux_coeff > 0 else 0
        vals, idx, aux_vals, aux_idx = self._select(x, cfg.encode_k, ctx.dead_latents, k_aux, ctx.selection,
                                                    replica_rows=True)
        terms: dict[str, torch.Tensor] = {}
        loss, code, x_hat, decoded = self.reconstruction_loss(x, SparseCode(idx, vals), ctx, terms)
        if k_aux:
            e = (x - x_hat).detach()
            e_hat = self.mesh.sum_shards(sparse_decode(aux_idx, aux_vals, self.W_dec))
            aux = self.aux_loss(e, e_hat, ctx)
            terms["aux_loss"] = aux.detach()
            loss = loss + cfg.aux_coeff * aux
            decoded.append(k_aux)
        d, n, B = cfg.d_in, cfg.n_latents, x.shape[0]
        # dense encoder forward; per selected entry 4d in the encoder backward (weight + input
        # gradients) and 6d per decoded entry (forward, value gradient, weight gradient). BatchTopK
        # selects k per row on average, so the same count holds.
        flops = B * (2 * d * n + 4 * d * (cfg.encode_k + k_aux) + 6 * d * sum(decoded))
        return LossOutput(loss=loss, code=code, flops=float(flops), terms=terms)
