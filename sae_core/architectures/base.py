"""The architecture interface every SAE family implements, and the registry of families.

An architecture owns its parameters and says how to encode, how to compute its training loss from a
(normalised) batch, and what that step cost in FLOPs. Everything else — initialisation from data,
the decoder constraint, the optimizer, dead-latent tracking, checkpoints, metrics — is the trainer's,
shared by all families. Every family has a pre-encoder bias b_pre (also the decoder bias) and a
decoder W_dec of shape [n_latents, d_in] whose rows are the latent directions.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from sae_core.kernels import sparse_decode

Normalization = Literal["none", "unit_norm", "standardize"]


class SAEConfig(BaseModel):
    """What is needed to rebuild an SAE: family, sizes, input normalisation and family hyperparameters."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    arch: str
    d_in: int = Field(ge=1)
    n_latents: int = Field(ge=1)
    # unit_norm: Gao et al. (subtract the mean over d_in, scale to unit norm); standardize: Lawson et
    # al. (subtract the mean, divide by the std over d_in). Both are undone on the SAE's output.
    normalization: Normalization = "unit_norm"


@dataclass
class SparseCode:
    """Latents as (idx, vals) of shape [B, k]; entries with vals == 0 are inactive."""

    idx: torch.Tensor
    vals: torch.Tensor

    def dense(self, n_latents: int) -> torch.Tensor:
        z = self.vals.new_zeros(self.vals.shape[0], n_latents)
        return z.scatter_(1, self.idx, self.vals)


Code = SparseCode | torch.Tensor  # sparse families return SparseCode, dense families a [B, n] tensor


@dataclass
class StepContext:
    """What the trainer tells the architecture about the current step."""

    mse_scale: float  # 1 / E||x - mean(x)||^2 on the init sample: makes the main loss an FVU
    dead_latents: torch.Tensor | None = None  # indices of latents dead by the trainer's window
    progress: float = 0.0  # fraction of training done, for coefficient warm-ups


@dataclass
class LossOutput:
    loss: torch.Tensor
    code: Code  # the code used at inference (for L0 and dead-latent tracking)
    flops: float  # training FLOPs of this step (forward + backward), as the README defines them
    terms: dict[str, torch.Tensor] = field(default_factory=dict)  # detached scalars, logged on curves


_REGISTRY: dict[str, type["Architecture"]] = {}


def register(cls: type["Architecture"]) -> type["Architecture"]:
    _REGISTRY[cls.name] = cls
    return cls


def registry() -> dict[str, type["Architecture"]]:
    return dict(_REGISTRY)


class Architecture(nn.Module):
    name: ClassVar[str]
    Config: ClassVar[type[SAEConfig]]

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        self.cfg = cfg
        self.b_pre = nn.Parameter(torch.zeros(cfg.d_in))
        self.W_dec = nn.Parameter(torch.empty(cfg.n_latents, cfg.d_in))

    # --- what a family defines -------------------------------------------------------------
    def init_encoder(self, tied: bool, generator: torch.Generator) -> None:
        """Initialise encoder parameters; W_dec already holds unit-norm random rows."""
        raise NotImplementedError

    def encode(self, x: torch.Tensor) -> Code:
        """Inference code of a normalised batch."""
        raise NotImplementedError

    def loss(self, x: torch.Tensor, ctx: StepContext) -> LossOutput:
        raise NotImplementedError

    # --- shared ----------------------------------------------------------------------------
    def reset_parameters(self, tied: bool, generator: torch.Generator) -> None:
        with torch.no_grad():
            self.W_dec.copy_(torch.randn(self.W_dec.shape, generator=generator))
            self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True))
            self.b_pre.zero_()
        self.init_encoder(tied, generator)

    def decode(self, code: Code) -> torch.Tensor:
        if isinstance(code, SparseCode):
            return sparse_decode(code.idx, code.vals, self.W_dec) + self.b_pre
        return code @ self.W_dec + self.b_pre

    def dense_latents(self, code: Code) -> torch.Tensor:
        return code.dense(self.cfg.n_latents) if isinstance(code, SparseCode) else code

    def active_latents(self, code: Code) -> torch.Tensor:
        """Indices of latents active on at least one row of the batch."""
        if isinstance(code, SparseCode):
            return code.idx[code.vals > 0].unique()
        return (code > 0).any(dim=0).nonzero().squeeze(1)


def fvu_loss(x: torch.Tensor, x_hat: torch.Tensor, mse_scale: float) -> torch.Tensor:
    """sum ||x - x_hat||^2 / (B * E||x - mean||^2): the normalised MSE with a fixed denominator."""
    return (x - x_hat).pow(2).sum(dim=-1).mean() * mse_scale
