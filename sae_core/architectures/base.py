"""The architecture interface every SAE family implements, and the registry of families.

An architecture owns its parameters and says how to encode, how to compute its training loss from a
(normalised) batch, and what that step cost in FLOPs. Everything else — initialisation from data,
the decoder constraint, the optimizer, dead-latent tracking, resampling, checkpoints, metrics — is the
trainer's, shared by all families. Every family has a pre-encoder bias b_pre (also the decoder bias),
an encoder W_enc and a decoder W_dec, both [n_latents, d_in], the decoder's rows being the latent
directions. Every other parameter is indexed by latent along its first dimension.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from sae_core.architectures.entry_code import EntryCode
from sae_core.kernels import EXACT, Selection, sparse_decode
from sae_core.kernels.dense_code import decode_code, decode_entries
from sae_core.parallel.mesh import TRIVIAL, Mesh

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


# sparse families return SparseCode, dense families a [B, n] tensor (in training, EntryCode once it is sparse)
Code = SparseCode | EntryCode | torch.Tensor


def code_product(code: Code, W: torch.Tensor) -> torch.Tensor:
    """The code times W [n, d]: a decoder without its bias."""
    if isinstance(code, SparseCode):
        return sparse_decode(code.idx, code.vals, W)
    if isinstance(code, EntryCode):
        return decode_entries(code.rows, code.latents, code.vals, W, code.batch)
    return decode_code(code, W)


@dataclass
class StepContext:
    """What the trainer tells the architecture about the current step."""

    mse_scale: float  # 1 / E||x - mean(x)||^2 on the init sample: makes the main loss an FVU
    # sqrt(E||x||^2) of the normalised inputs (input_rms): hyperparameters given in the units of inputs of
    # unit mean squared norm (the L1 coefficient, JumpReLU's bandwidth) are multiplied by it
    input_rms: float = 1.0
    dead_latents: torch.Tensor | None = None  # this shard's latents dead by the trainer's window (local indices)
    dead_total: int | None = None  # dead latents over all shards; None: those of dead_latents
    progress: float = 0.0  # fraction of training done, for coefficient warm-ups
    selection: Selection = EXACT  # how the TopK family ranks its pre-activations (train.topk_select)
    mesh: Mesh = TRIVIAL  # the run's processes: batch statistics are taken over all replicas' rows

    def dead_count(self) -> int:
        if self.dead_total is not None:
            return self.dead_total
        return 0 if self.dead_latents is None else len(self.dead_latents)

    def batch_variance(self, e: torch.Tensor) -> torch.Tensor:
        """sum ||e - mean(e)||^2 over the global batch, as this replica's share (times B_local / B_global):
        a loss term sum_local / share has gradients whose mean over replicas is those of the global term."""
        mesh = self.mesh
        if mesh.replicas == 1:
            return (e - e.mean(dim=0)).pow(2).sum()
        rows = mesh.reduce_(torch.tensor([float(e.shape[0])], dtype=e.dtype, device=e.device), "replicas")
        mean = mesh.reduce_(e.sum(dim=0), "replicas") / rows
        total = mesh.reduce_((e - mean).pow(2).sum().reshape(1), "replicas")
        return (total * e.shape[0] / rows)[0]


@dataclass
class LossOutput:
    loss: torch.Tensor
    code: Code  # the code used at inference (for L0 and dead-latent tracking)
    flops: float  # training FLOPs of this step (forward + backward), as docs/scaling-laws.md defines them
    terms: dict[str, torch.Tensor] = field(default_factory=dict)  # detached scalars, logged on curves


def dense_flops(d_in: int, n_latents: int, batch: int, matmuls: int = 2) -> float:
    """Each dense [B, d] x [d, n] matmul costs 2Bdn forward and 4Bdn backward (weight and input gradients)."""
    return float(6 * d_in * n_latents * batch * matmuls)


INIT_BLOCK = 4096  # latents per initialisation block (one generator each)

_REGISTRY: dict[str, type[Architecture]] = {}


def register(cls: type[Architecture]) -> type[Architecture]:
    _REGISTRY[cls.name] = cls
    return cls


def registry() -> dict[str, type[Architecture]]:
    return dict(_REGISTRY)


class Architecture(nn.Module):
    name: ClassVar[str]
    Config: ClassVar[type[SAEConfig]]
    # Training settings the family's own paper uses, applied where the user set nothing (TrainConfig keys).
    train_defaults: ClassVar[dict] = {}
    # How many times dead latents are resampled in training unless train.resample_dead says otherwise.
    default_resamples: ClassVar[int] = 0
    # Whether the latents can be split over shards (a sharded selection exists for the family's activation).
    shardable: ClassVar[bool] = False
    # The Config keys that set the family's sparsity, in priority order: a run's sparsity setting is the first
    # of them its config sets. Analysis splits a sweep into series (one L(N) each) by it (analysis.selection).
    sparsity_keys: ClassVar[tuple[str, ...]] = ()
    # Whether the config's k sets L0 (the TopK family): Gao et al. 2024's joint law L(n, k) (eq. 3) is fitted
    # only to these families' runs, over their k column.
    l0_set_by_k: ClassVar[bool] = False

    def __init__(self, cfg: SAEConfig, mesh: Mesh = TRIVIAL):
        """mesh: which latents this process holds (all of them in a single process); per-latent parameters
        have n_local rows, b_pre is whole on every shard."""
        super().__init__()
        self.cfg, self.mesh = cfg, mesh
        self.latent_start, stop = mesh.latent_range(cfg.n_latents)
        self.n_local = stop - self.latent_start
        self.b_pre = nn.Parameter(torch.zeros(cfg.d_in))
        self.W_enc = nn.Parameter(torch.empty(self.n_local, cfg.d_in))
        self.W_dec = nn.Parameter(torch.empty(self.n_local, cfg.d_in))

    # --- what a family defines -------------------------------------------------------------
    def preactivation(self, x: torch.Tensor) -> torch.Tensor:
        """The dense [B, n] values the family's activation function acts on (for test-time swaps)."""
        raise NotImplementedError

    def encode(self, x: torch.Tensor) -> Code:
        """Inference code of a normalised batch."""
        raise NotImplementedError

    def loss(self, x: torch.Tensor, ctx: StepContext) -> LossOutput:
        raise NotImplementedError

    def finalize(self, batches: Iterator[torch.Tensor]) -> bool:
        """Called by the trainer once after the last training step, with the weights the run keeps (again if
        it then keeps the EMA weights instead): estimate what inference needs from training data (BatchTopK's
        threshold). batches: this replica's normalised rows of the run's training batches, the last first,
        read lazily (take as many as needed). Every rank of a sharded run calls it alike. Returns whether it
        changed anything. Default: nothing to estimate."""
        return False

    @classmethod
    def flops_per_vector(cls, cfg: SAEConfig) -> float:
        """Training FLOPs per vector with no dead latents (docs/scaling-laws.md, "Compute accounting"): what a
        sweep's plan estimates. Default: a dense encoder and a dense decoder."""
        return dense_flops(cfg.d_in, cfg.n_latents, 1)

    @property
    def constrain_decoder(self) -> bool:
        """Whether the trainer keeps decoder rows unit-norm (families whose penalty uses the norms opt out)."""
        return True

    def reset_latent_params(self, idx: torch.Tensor) -> None:
        """Per-latent parameters other than W_enc/W_dec back to their initial values (default 0)."""
        for name, p in self.named_parameters():
            if name not in ("b_pre", "W_enc", "W_dec"):
                p[idx] = 0.0

    # --- shared ----------------------------------------------------------------------------
    def latent_parameters(self) -> list[str]:
        """Names of the parameters indexed by latent along dim 0 (all but b_pre)."""
        return [name for name, _ in self.named_parameters() if name != "b_pre"]

    def reset_parameters(self, tied: bool, seed: int) -> None:
        """Unit-norm random decoder rows; encoder tied to them (W_enc = W_dec^T in the paper's layout) or
        torch's nn.Linear default U(-1/sqrt(d), 1/sqrt(d)); every other parameter at its initial value.

        The random rows are drawn in blocks of INIT_BLOCK latents, each from its own generator, so a shard
        draws exactly its rows of the whole SAE's initialisation without building the rest."""
        d, start, stop = self.cfg.d_in, self.latent_start, self.latent_start + self.n_local
        bound = 1 / math.sqrt(d)
        with torch.no_grad():
            self.b_pre.zero_()
            for block in range(start // INIT_BLOCK, -(-stop // INIT_BLOCK)):
                lo, hi = block * INIT_BLOCK, min((block + 1) * INIT_BLOCK, self.cfg.n_latents)
                gen = torch.Generator().manual_seed(seed * 1_000_003 + block)
                here = slice(max(lo, start) - lo, min(hi, stop) - lo)
                rows = slice(max(lo, start) - start, min(hi, stop) - start)
                self.W_dec[rows] = torch.randn(hi - lo, d, generator=gen)[here]
                if not tied:
                    self.W_enc[rows] = (torch.rand(hi - lo, d, generator=gen) * 2 * bound - bound)[here]
            self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True))
            if tied:
                self.W_enc.copy_(self.W_dec)
            self.reset_latent_params(torch.arange(self.n_local))

    @torch.no_grad()
    def reinit_latents(self, idx: torch.Tensor, directions: torch.Tensor, encoder_norm: float) -> None:
        """Resampling (Bricken et al. 2023): decoder rows to the given unit directions, encoder rows to the
        same directions at `encoder_norm`, other per-latent parameters to their initial values."""
        self.W_dec[idx] = directions.to(self.W_dec.dtype)
        self.W_enc[idx] = (directions * encoder_norm).to(self.W_enc.dtype)
        self.reset_latent_params(idx)

    def decode(self, code: Code) -> torch.Tensor:
        """Each shard decodes its latents; the partial reconstructions are summed over shards."""
        return self.mesh.sum_shards(code_product(code, self.W_dec)) + self.b_pre

    def dense_latents(self, code: Code) -> torch.Tensor:
        return code if isinstance(code, torch.Tensor) else code.dense(self.n_local)

    def active_latents(self, code: Code) -> torch.Tensor:
        """Indices (this shard's) of latents active on at least one row of the batch."""
        if isinstance(code, SparseCode):
            return code.idx[code.vals > 0].unique()
        if isinstance(code, EntryCode):
            return code.latents[code.vals > 0].unique()
        return (code > 0).any(dim=0).nonzero().squeeze(1)


def input_rms(x: torch.Tensor, normalization: str) -> float:
    """sqrt(E||x||^2) of normalised inputs x: 1 for unit_norm and sqrt(d_in) for standardize (exact by
    construction, whatever the sample), measured on x for none."""
    if normalization == "unit_norm":
        return 1.0
    if normalization == "standardize":
        return math.sqrt(x.shape[-1])
    rms = math.sqrt(float(x.double().pow(2).sum(dim=-1).mean()))
    return rms if math.isfinite(rms) and rms > 0 else 1.0


def fvu_loss(x: torch.Tensor, x_hat: torch.Tensor, mse_scale: float) -> torch.Tensor:
    """sum ||x - x_hat||^2 / (B * E||x - mean||^2): the normalised MSE with a fixed denominator."""
    return (x - x_hat).pow(2).sum(dim=-1).mean() * mse_scale
