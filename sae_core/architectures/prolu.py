"""ProLU SAE (Taggart 2024, "ProLU: A Nonlinearity for Sparse Autoencoders", AI Alignment Forum; the
ProLU-STE and ProLU-ReLU baselines of Gao et al. 2024):

    m = W_enc (x - b_pre),  z = ProLU(m, b) = m * 1[m > 0 and m + b > 0],  x_hat = W_dec z + b_pre
    loss = FVU(x, x_hat) + L1(z)

The bias b (b_enc, one per latent) only decides whether a latent fires; unlike ReLU(m + b) it never
shifts the magnitude of an active latent, so activations are scale-consistent (no shrinkage by the bias).
Its true gradient is 0 almost everywhere, so training uses one of Taggart's two synthetic gradients, with
gate = 1[m > 0 and m + b > 0] and g = dL/dz:
    ProLU-ReLU: dL/dm = g * gate,            dL/db = g * gate        (backward of ReLU(m + b) on the gate)
    ProLU-STE:  dL/dm = g * gate * (1 + m),  dL/db = g * gate * m    (straight-through estimate of the
                Heaviside H(m + b) in m * H(m + b), with derivative 1 where the gate is open)

Hyperparameters:
  gradient "ste": the straight-through variant keeps the derivative of the actual forward function,
      m * H(m + b), with only the Heaviside's delta replaced; ProLU-ReLU substitutes a different function's
      backward. Gao et al. train both; pick "relu" for the other baseline.
  l1_coeff 5e-3, l1_warmup_frac 0.05, l1_decoder_norm False: as for every L1 family (sparsity.py), so the
      ProLU, ReLU and Gated sweeps share one dimensionless lambda scale.
b_enc starts at 0 (and returns to 0 on resampling): ProLU(m, 0) = ReLU(m), the plain SAE. Dead latents are
resampled 4 times, as Gao et al. (appendix B.2) do for their L1 baselines.
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from sae_core.architectures.base import LossOutput, StepContext, fvu_loss, register
from sae_core.architectures.entry_code import Support
from sae_core.architectures.l1_penalty import L1Config, L1Family, l1_penalty
from sae_core.kernels.centred_linear import centred_linear
from sae_core.parallel.mesh import TRIVIAL, Mesh

ProLUGradient = Literal["ste", "relu"]


class ProLUConfig(L1Config):
    arch: Literal["prolu"] = "prolu"
    gradient: ProLUGradient = "ste"  # the synthetic gradient: straight-through (ste) or ReLU's (Gao et al.)


class ProLUFunction(torch.autograd.Function):
    """ProLU(m, b) with the synthetic gradient named by `mode` ("ste" or "relu")."""

    @staticmethod
    def forward(ctx, m: torch.Tensor, b: torch.Tensor, mode: str) -> torch.Tensor:
        gate = (m > 0) & (m + b > 0)
        ctx.save_for_backward(m, gate)
        ctx.mode = mode
        ctx.b_shape = b.shape
        return m * gate

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        m, gate = ctx.saved_tensors
        g = g * gate
        if ctx.mode == "ste":
            grad_m, grad_b = g * (1 + m), g * m
        else:
            grad_m, grad_b = g, g
        # b was broadcast over the batch: its gradient is the sum over the broadcast dimensions
        return grad_m, grad_b.sum_to_size(ctx.b_shape), None


def prolu(m: torch.Tensor, b: torch.Tensor, mode: str = "ste") -> torch.Tensor:
    return ProLUFunction.apply(m, b, mode)


@register
class ProLU(L1Family):
    name = "prolu"
    Config = ProLUConfig

    def __init__(self, cfg: ProLUConfig, mesh: Mesh = TRIVIAL):
        super().__init__(cfg, mesh)
        self.b_enc = nn.Parameter(torch.zeros(self.n_local))

    def preactivation(self, x: torch.Tensor) -> torch.Tensor:
        # m, not m + b: active latents take m's value, so a test-time TopK/JumpReLU acts on m
        return centred_linear(x, self.b_pre, self.W_enc, None)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return prolu(self.preactivation(x), self.b_enc, self.cfg.gradient)

    def loss(self, x: torch.Tensor, ctx: StepContext) -> LossOutput:
        m = self.preactivation(x)
        on = Support.above(m, (-self.b_enc).clamp(min=0))  # ProLU's gate: m > 0 and m + b > 0
        z = on.code(prolu(on.values(m), on.latent(self.b_enc), self.cfg.gradient))
        mse = fvu_loss(x, self.decode(z), ctx.mse_scale)
        l1 = l1_penalty(z, self.W_dec, self.cfg, ctx)
        # encoder and decoder matmuls, each with weight and input gradients (6Bdn each)
        flops = x.shape[0] * self.flops_per_vector(self.cfg)
        return LossOutput(loss=mse + l1, code=z, flops=flops,
                          terms={"mse_loss": mse.detach(), "l1_loss": l1.detach()})
