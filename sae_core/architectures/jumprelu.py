"""JumpReLU SAE (Rajamanoharan et al. 2024b, "Jumping Ahead: Improving Reconstruction Fidelity with
JumpReLU Sparse Autoencoders", arXiv 2407.14435).

    h = (x - b_pre) W_enc^T + b_enc                                   (pre-activation)
    z = JumpReLU_θ(h) = h ⊙ H(h - θ),  θ = threshold, learned per latent    (paper eq. 4; H(0) = 0)
    x_hat = z W_dec + b_pre
    loss = FVU(x, x_hat) + l0_coeff * S(L0),  L0 = mean_b Σ_i H(h_bi - θ_i)
      sparsity "l0":        S = L0                         (paper eq. 10, in FVU units)
      sparsity "target_l0": S = (L0 / target_l0 - 1)^2     (dictionary_learning's JumpReluTrainer)

The paper's encoder reads x, not x - b_pre; subtracting the decoder bias is this toolkit's convention and
only re-parameterises b_enc. θ is learned directly, not as log θ as in the paper (SAELens made the same
change, its PR 718): Adam moves a parameter by about lr per step whatever its gradient's scale, so log θ
changes θ by a factor (1 + lr) per step and reaching a useful threshold takes ln(θ/θ_init)/lr steps —
thousands at lr 2e-3, tens of millions of tokens at the paper's lr; measured here, target_l0 had no effect
at all within 500k tokens (L0 42-93 for targets 4 and 16). Learned directly, θ moves additively, about
lr per step. A latent is active only where h > θ and h > 0, so a θ that drifts below 0 acts as a ReLU.

Straight-through estimators (paper eqs. 11-12), with the rectangle kernel K(u) = 1[-1/2 < u < 1/2] and
bandwidth ε:
    ∂JumpReLU_θ(h)/∂θ := -(θ/ε) K((h - θ)/ε),   ∂JumpReLU_θ(h)/∂h = H(h - θ)
    ∂H(h - θ)/∂θ      := -(1/ε) K((h - θ)/ε),   ∂H(h - θ)/∂h := 0
so the L0 term trains only the thresholds; W_enc and b_enc learn from the reconstruction alone.

Defaults. The paper and Gemma Scope use ε = θ_init = 1e-3 on activations scaled by a fixed scalar to unit
mean squared norm, E||x||^2 = 1 (Lieberum et al. 2024, Gemma Scope, §3.1; dictionary_learning's
get_norm_factor and SAELens's maintainers read the JumpReLU paper's ε the same way; the
sqrt(d_in) scaling of Anthropic's April 2024 update, this toolkit's "standardize", is a different one).
`bandwidth` is in those units: the ε the estimators use is bandwidth * input_rms, input_rms =
sqrt(E||x||^2) of the SAE's normalised inputs (StepContext): 1 under the default unit_norm (||x|| = 1:
the paper's units, ε = bandwidth), sqrt(d_in) under standardize, the measured value under none (the
synthetic test data: ~5). At init a pre-activation has std ~ input_rms / sqrt(d_in) (0.016-0.036 for
unit-norm inputs at d_in = 768-4096), so the window's width relative to the pre-activations is the same
under every normalisation. threshold_init stays in the units of the normalised input (it is θ's value).
- threshold_init = 1e-3: the paper's (and Gemma Scope's) value. Learned additively, θ reaches the
  scale of the pre-activations (~0.05 on unit-norm inputs) within a few hundred steps at lr 2e-4, and
  the SAE starts as a ReLU SAE with no latent dead.
- l0_coeff = None, resolved per mode (`resolved_l0_coeff`); the loss is an FVU, so both are dimensionless.
  "l0": 2e-3. The penalty balances where -dFVU/dL0 = l0_coeff; with FVU ∝ L0^-α, α ~ 1 near FVU ~ 0.1,
  that is L0 ≈ FVU / l0_coeff ≈ 50, mid-range for SAEs (observed: ~25 on the synthetic test data, 12
  active features per vector; 35 at 1e-3, 8 at 3e-2).
  "target_l0": 10. The quadratic penalty balances at L0 / target_l0 - 1 ≈ α FVU / (2 l0_coeff): ~1% at
  FVU ~ 0.2. dictionary_learning's 1.0 multiplies an unnormalised squared error, far larger than an FVU;
  here 1.0 stopped ~10% above the target (8.8 for 8 on the synthetic data), 10 within 3% (8.0-8.2).
- sparsity = "l0": the paper's objective; "target_l0" asks for an L0 directly instead of searching for
  the coefficient that gives it.
- Adam β1 = 0 (`train_defaults`): the paper and Gemma Scope train with (β1, β2) = (0, 0.999), as does
  dictionary_learning's JumpReluTrainer ("parameters from the paper"). The threshold's pseudo-gradient is
  non-zero only on the steps that put a pre-activation inside its window; momentum keeps pushing θ after
  they pass (observed with β1 = 0.9: L0 19 against 8 for target 8, and 55% dead latents against 34%).
- no dead-latent resampling (default_resamples = 0): the paper uses none.
- unit-norm decoder rows (the trainer's default): the L0 penalty does not involve decoder norms, so the
  constraint only removes a rescaling symmetry (dictionary_learning's JumpReluTrainer keeps it too).
- no sparsity-coefficient warm-up: the L0 term acts on θ alone, which moves only ~lr per step, so it
  cannot switch latents off abruptly at the start. Under "standardize" (pre-activations ~1) or raw
  activations, θ has further to go: raise threshold_init or lr.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, ValidationInfo, field_validator
from torch import nn

from sae_core.architectures.base import Architecture, LossOutput, SAEConfig, StepContext, fvu_loss, register
from sae_core.architectures.entry_code import Support
from sae_core.kernels.centred_linear import centred_linear
from sae_core.parallel.mesh import TRIVIAL, Mesh

_DEFAULT_L0_COEFF = {"l0": 2e-3, "target_l0": 10.0}


class JumpReLUConfig(SAEConfig):
    arch: Literal["jumprelu"] = "jumprelu"
    # l0: the paper's L0 penalty (eq. 10); target_l0: a quadratic pull towards target_l0 instead
    sparsity: Literal["l0", "target_l0"] = "l0"
    l0_coeff: float | None = Field(None, ge=0, allow_inf_nan=False)  # None: the mode's default (docstring)
    target_l0: float | None = Field(None, gt=0, allow_inf_nan=False, validate_default=True)  # sparsity: target_l0
    # ε for inputs of unit mean squared norm (the paper's units); training uses bandwidth * input_rms
    bandwidth: float = Field(1e-3, gt=0, allow_inf_nan=False)
    threshold_init: float = Field(1e-3, ge=0, allow_inf_nan=False)  # every latent's threshold θ at init

    @field_validator("target_l0")
    @classmethod
    def _target_iff_target_mode(cls, value: float | None, info: ValidationInfo) -> float | None:
        mode = info.data.get("sparsity")
        if mode == "target_l0" and value is None:
            raise ValueError("required when sparsity is 'target_l0'; allowed: a number > 0")
        if mode == "l0" and value is not None:
            raise ValueError("applies only when sparsity is 'target_l0'; remove it or set sparsity: target_l0")
        return value

    @property
    def resolved_l0_coeff(self) -> float:
        return _DEFAULT_L0_COEFF[self.sparsity] if self.l0_coeff is None else self.l0_coeff


def _threshold_grad(grad_out: torch.Tensor, h: torch.Tensor, theta: torch.Tensor, bandwidth: float,
                    slope: torch.Tensor | float) -> torch.Tensor:
    """-(slope/ε) K((h - θ)/ε) times the incoming gradient, summed over the dimensions θ was broadcast on."""
    window = (((h - theta) / bandwidth).abs() < 0.5).to(h.dtype)
    return (-(slope / bandwidth) * window * grad_out).sum_to_size(theta.shape)


def _active(h: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    return (h > theta) & (h > 0)


class _ThresholdSTE(torch.autograd.Function):
    """forward(h, θ, ε) of a function with a jump at h = θ; subclasses give its value and backward."""

    @staticmethod
    def setup_context(ctx, inputs, output):
        h, theta, bandwidth = inputs
        ctx.save_for_backward(h, theta)
        ctx.bandwidth = bandwidth


class JumpReLUFunction(_ThresholdSTE):
    """h ⊙ H(h - θ); ∂/∂h = H(h - θ), ∂/∂θ := -(θ/ε) K((h - θ)/ε) (paper eq. 11)."""

    @staticmethod
    def forward(h, theta, bandwidth):
        return h * _active(h, theta)

    @staticmethod
    def backward(ctx, grad_out):
        h, theta = ctx.saved_tensors
        return grad_out * _active(h, theta), _threshold_grad(grad_out, h, theta, ctx.bandwidth, theta), None


class StepFunction(_ThresholdSTE):
    """H(h - θ); ∂/∂h := 0, ∂/∂θ := -(1/ε) K((h - θ)/ε) (paper eq. 12)."""

    @staticmethod
    def forward(h, theta, bandwidth):
        return _active(h, theta).to(h.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        h, theta = ctx.saved_tensors
        # None is autograd's zero: the L0 term must not reach the encoder
        return None, _threshold_grad(grad_out, h, theta, ctx.bandwidth, 1.0), None


@register
class JumpReLU(Architecture):
    name = "jumprelu"
    Config = JumpReLUConfig
    train_defaults = {"adam_beta1": 0.0}
    default_resamples = 0
    # target_l0 first: set only in its own mode, where it is what the sweep chose (l0_coeff then only scales it)
    sparsity_keys = ("target_l0", "l0_coeff")

    def __init__(self, cfg: JumpReLUConfig, mesh: Mesh = TRIVIAL):
        super().__init__(cfg, mesh)
        self.b_enc = nn.Parameter(torch.zeros(self.n_local))
        self.threshold = nn.Parameter(torch.full((self.n_local,), float(cfg.threshold_init)))

    def reset_latent_params(self, idx: torch.Tensor) -> None:
        with torch.no_grad():  # the trainer already holds no_grad; direct callers need not
            super().reset_latent_params(idx)  # b_enc to 0; threshold is set right after
            self.threshold[idx] = self.cfg.threshold_init

    def preactivation(self, x: torch.Tensor) -> torch.Tensor:
        return centred_linear(x, self.b_pre, self.W_enc, self.b_enc)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return JumpReLUFunction.apply(self.preactivation(x), self.threshold, self.cfg.bandwidth)

    def loss(self, x: torch.Tensor, ctx: StepContext) -> LossOutput:
        cfg: JumpReLUConfig = self.cfg
        h, theta = self.preactivation(x), self.threshold
        bandwidth = cfg.bandwidth * ctx.input_rms  # in the units of the normalised input (docstring)
        # every entry that is active (h > max(θ, 0)) or in θ's window (|h - θ| < ε/2): the rest have value 0
        # and no gradient, neither into h nor into θ
        on = Support.above(h, torch.minimum(theta - bandwidth / 2, theta.clamp(min=0)))
        h, theta = on.values(h), on.latent(theta)
        z = on.code(JumpReLUFunction.apply(h, theta, bandwidth))
        mse = fvu_loss(x, self.decode(z), ctx.mse_scale)
        l0 = StepFunction.apply(h, theta, bandwidth).sum() / x.shape[0]
        sparsity = l0 if cfg.sparsity == "l0" else (l0 / cfg.target_l0 - 1).pow(2)
        l0_loss = cfg.resolved_l0_coeff * sparsity
        # not "l0": the trainer merges terms into curve rows, where "l0" is the held-out L0
        terms = {"mse_loss": mse.detach(), "l0_loss": l0_loss.detach(), "batch_l0": l0.detach()}
        return LossOutput(loss=mse + l0_loss, code=z, flops=x.shape[0] * self.flops_per_vector(self.cfg),
                          terms=terms)
