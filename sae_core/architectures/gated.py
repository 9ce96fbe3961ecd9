"""Gated SAE (Rajamanoharan et al. 2024, "Improving Dictionary Learning with Gated Sparse Autoencoders",
arXiv 2404.16014): the gated encoder f~(x) with its weight sharing (section 3.2.1) and the loss L_gated
(section 3.2.2).

    pi_gate = W_gate (x - b_pre) + b_gate                    f_gate = 1[pi_gate > 0]
    pi_mag  = (exp(r_mag) * W_gate) (x - b_pre) + b_mag      f_mag  = ReLU(pi_mag)
    z = f_gate * f_mag,  x_hat = W_dec z + b_pre
    L_gated = FVU(x, x_hat) + L1(ReLU(pi_gate)) + FVU(x, x_hat_frozen(ReLU(pi_gate)))

W_gate is the base class's W_enc; the per-latent tensors are b_gate, r_mag and b_mag (SAELens's names).
The Heaviside gate passes no gradient, so the gate path learns only from the L1 term (which alone would
shut every gate) and the auxiliary term, which asks ReLU(pi_gate) to reconstruct x through a frozen copy
of the decoder weights and bias, so that the auxiliary task cannot pull the dictionary towards the gate
path's shrunk activations. The magnitude path carries no penalty: that is what removes shrinkage.

Hyperparameters (L1Config, sparsity.py):
  l1_coeff 5e-3: mid-range of Gao et al.'s ReLU grid, on the same dimensionless scale as every L1 family
      here, so sweeps are comparable (the gate's L1 is the same quantity as a ReLU SAE's).
  l1_warmup_frac 0.05: Conerly et al. 2024's linear warm-up.
  l1_decoder_norm False: the paper's setting, unit-norm decoder rows kept by the trainer. With True
      (Conerly et al.'s penalty, decoder unconstrained) the decoder norms in the penalty are detached: the
      authors report that the decoder must be frozen in both the penalty and the auxiliary term or in
      neither, and that freezing it in one place only does worse (Rajamanoharan, LessWrong comment on the
      paper's post, 2024); we keep the frozen auxiliary decoder of the paper and freeze it in the penalty.
r_mag, b_gate and b_mag start at 0 (and go back to 0 on resampling): the magnitude path starts as a copy of
the gate path, exp(0) = 1.

Training settings: dead latents are resampled 4 times, as Gao et al. (appendix B.2) do for their gated
baselines. Adam beta1 is left at the trainer's default, not set to 0: dictionary_learning's GatedSAETrainer
uses betas (0, 0.999), but that could not be confirmed from the Gated paper's own text, and a shared
optimizer keeps gated comparable with the other L1 families. Set train.adam_beta1 = 0 to follow it.
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from sae_core.architectures.base import LossOutput, StepContext, code_product, dense_flops, fvu_loss, register
from sae_core.architectures.entry_code import EVERYWHERE, Support
from sae_core.architectures.l1_penalty import L1Config, L1Family, l1_penalty
from sae_core.kernels.centred_linear import centred_linear
from sae_core.parallel.mesh import TRIVIAL, Mesh


class GatedConfig(L1Config):
    arch: Literal["gated"] = "gated"


@register
class Gated(L1Family):
    name = "gated"

    @classmethod
    def flops_per_vector(cls, cfg) -> float:
        # shared encoder and decoder: full matmuls (6dn each); the frozen decoder of the auxiliary loss has
        # no weight gradient, only the input gradient into the gate path: 2dn forward + 2dn backward
        return dense_flops(cfg.d_in, cfg.n_latents, 1) + 4.0 * cfg.d_in * cfg.n_latents
    Config = GatedConfig

    def __init__(self, cfg: GatedConfig, mesh: Mesh = TRIVIAL):
        super().__init__(cfg, mesh)
        self.b_gate = nn.Parameter(torch.zeros(self.n_local))
        self.r_mag = nn.Parameter(torch.zeros(self.n_local))
        self.b_mag = nn.Parameter(torch.zeros(self.n_local))

    def _paths(self, shared: torch.Tensor, on: Support = EVERYWHERE) -> tuple[torch.Tensor, torch.Tensor]:
        # Row i of the magnitude encoder is exp(r_mag_i) W_gate,i, so both paths share one matmul and the
        # magnitude path is a per-latent rescale of it: half the encoder FLOPs of two separate products.
        s = on.values(shared)
        return s + on.latent(self.b_gate), s * on.latent(self.r_mag).exp() + on.latent(self.b_mag)

    def _shared(self, x: torch.Tensor) -> torch.Tensor:
        return centred_linear(x, self.b_pre, self.W_enc, None)

    def preactivation(self, x: torch.Tensor) -> torch.Tensor:
        # the magnitude path carries the latent values; a test-time TopK/JumpReLU replaces the gate
        return self._paths(self._shared(x))[1]

    @staticmethod
    def _code(pi_gate: torch.Tensor, pi_mag: torch.Tensor) -> torch.Tensor:
        return (pi_gate > 0).to(pi_mag.dtype) * pi_mag.relu()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self._code(*self._paths(self._shared(x)))

    def loss(self, x: torch.Tensor, ctx: StepContext) -> LossOutput:
        shared = self._shared(x)
        on = Support.above(shared, -self.b_gate)  # the gate: pi_gate > 0; the code and the aux path are 0 elsewhere
        pi_gate, pi_mag = self._paths(shared, on)
        z, gate_acts = on.code(self._code(pi_gate, pi_mag)), on.code(pi_gate.relu())
        mse = fvu_loss(x, self.decode(z), ctx.mse_scale)
        # frozen here too when the norms enter the penalty, matching the frozen auxiliary decoder
        l1 = l1_penalty(gate_acts, self.W_dec.detach(), self.cfg, ctx)
        x_hat_frozen = code_product(gate_acts, self.W_dec.detach()) + self.b_pre.detach()
        aux = fvu_loss(x, x_hat_frozen, ctx.mse_scale)
        return LossOutput(loss=mse + l1 + aux, code=z, flops=x.shape[0] * self.flops_per_vector(self.cfg),
                          terms={"mse_loss": mse.detach(), "l1_loss": l1.detach(), "aux_loss": aux.detach()})
