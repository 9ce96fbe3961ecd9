"""ReLU SAE with an L1 penalty (Bricken et al. 2023; Gao et al. 2024 eq. 1 as the baseline):
z = ReLU(W_enc (x - b_pre) + b_enc), loss = FVU(x, x_hat) + L1 penalty (sparsity.py).

Defaults follow Gao et al.'s baselines: resample dead latents 4 times in training (appendix B.2),
l1_coeff in the middle of their grid; l1_decoder_norm switches to their GPT-4 setting (decoder norms in
the penalty, no unit-norm constraint, Conerly et al. 2024).
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


class ReLUConfig(L1Config):
    arch: Literal["relu"] = "relu"


@register
class ReLU(L1Family):
    name = "relu"
    Config = ReLUConfig

    def __init__(self, cfg: ReLUConfig, mesh: Mesh = TRIVIAL):
        super().__init__(cfg, mesh)
        self.b_enc = nn.Parameter(torch.zeros(self.n_local))

    def preactivation(self, x: torch.Tensor) -> torch.Tensor:
        return centred_linear(x, self.b_pre, self.W_enc, self.b_enc)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.preactivation(x).relu()

    def loss(self, x: torch.Tensor, ctx: StepContext) -> LossOutput:
        h = self.preactivation(x)
        on = Support.above(h, 0.0)
        z = on.code(on.values(h).relu())
        mse = fvu_loss(x, self.decode(z), ctx.mse_scale)
        l1 = l1_penalty(z, self.W_dec, self.cfg, ctx)
        return LossOutput(loss=mse + l1, code=z, flops=x.shape[0] * self.flops_per_vector(self.cfg),
                          terms={"mse_loss": mse.detach(), "l1_loss": l1.detach()})
