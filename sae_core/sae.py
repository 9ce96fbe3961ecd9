"""The SAE a user loads: one architecture plus its input normalisation, saved as safetensors + JSON.

    sae = SAE.load("results/my-sweep/saes/<run_id>")   # or a SAELens v6 / sparsify folder
    z = sae.encode(x)            # dense latents [B, n_latents]
    x_hat = sae.decode(z)        # in the SAE's (normalised) input space
    x_hat = sae.reconstruct(x)   # in the original activation space
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from sae_core import formats
from sae_core.architectures import Architecture, Code, SAEConfig, SparseCode, build_architecture, parse_sae_config
from sae_core.architectures.entry_code import EntryCode
from sae_core.kernels.dense_code import entries_above
from sae_core.kernels.topk_select import row_topk
from sae_core.normalization import TokenStats, denormalize, normalize
from sae_core.parallel.mesh import TRIVIAL, Mesh
from sae_core.sae_files import load_state, write_folder


class SAE(nn.Module):
    def __init__(self, cfg: SAEConfig | dict, meta: dict | None = None, init_seed: int | None = 0,
                 mesh: Mesh = TRIVIAL):
        """meta: what was trained on and how (hook, train settings, metrics), kept in config.json beside `sae`.
        init_seed: the tied random initialisation the trainer starts from; None leaves the weights unset
        (they are about to be loaded). mesh: the latent shard this process holds, in sharded training."""
        super().__init__()
        self.cfg = parse_sae_config(cfg)
        self.net: Architecture = build_architecture(self.cfg, mesh)
        self.meta = dict(meta or {})
        if init_seed is not None:
            self.net.reset_parameters(True, init_seed)

    # --- inference -------------------------------------------------------------------------
    def normalize(self, x: torch.Tensor) -> tuple[torch.Tensor, TokenStats | None]:
        return normalize(x, self.cfg.normalization)

    def encode_code(self, x: torch.Tensor) -> tuple[Code, TokenStats | None]:
        """The architecture's own code (sparse for the TopK family) and the per-token stats of x."""
        xn, stats = self.normalize(x.to(self.net.W_dec.dtype))
        return self.net.encode(xn), stats

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.dense_latents(self.encode_code(x)[0])

    def decode(self, z: Code, stats: TokenStats | None = None) -> torch.Tensor:
        """Reconstruction from latents; pass the stats from `encode_code` to map back to the original space."""
        return denormalize(self.net.decode(z), stats)

    def encode_with(self, x: torch.Tensor, *, k: int | None = None,
                    threshold: float | None = None) -> tuple[Code, TokenStats | None]:
        """Swap the activation at test time (Gao et al. 5.3): TopK(k) or JumpReLU(threshold) applied to the
        family's pre-activations, whatever it was trained with. Exactly one of k, threshold."""
        h, stats = self.preactivations(x)
        return apply_test_time_activation(h, k=k, threshold=threshold), stats

    def preactivations(self, x: torch.Tensor) -> tuple[torch.Tensor, TokenStats | None]:
        """The dense [B, n] values the family's activation acts on, and the per-token stats of x."""
        xn, stats = self.normalize(x.to(self.net.W_dec.dtype))
        return self.net.preactivation(xn), stats

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        code, stats = self.encode_code(x)
        return self.decode(code, stats)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reconstruct(x)

    # --- storage ---------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        write_folder(Path(path), self.cfg, self.net.state_dict(), self.meta)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> SAE:
        """A folder SAE.save wrote, or a SAELens v6 or sparsify folder (sae_core/formats)."""
        contents = formats.read(Path(path))
        sae = cls(contents.config, meta=contents.meta, init_seed=None)
        load_state(sae.net, contents)
        return sae.to(device)


def apply_test_time_activation(h: torch.Tensor, *, k: int | None = None, threshold: float | None = None,
                               entries: bool = False) -> Code:
    """TopK(k) or JumpReLU(threshold) of pre-activations h (`SAE.encode_with`). Exactly one of k, threshold.
    entries: JumpReLU's code as its active entries (EntryCode) where few enough pass to pay (an evaluation's
    use: decoded and counted over them), else [B, n] as always."""
    if (k is None) == (threshold is None):
        raise ValueError("give exactly one of k, threshold")
    if k is not None:
        vals, idx = row_topk(h, k)
        return SparseCode(idx, vals.relu())
    if entries and (found := entries_above(h, torch.tensor(threshold, dtype=h.dtype))) is not None:
        rows, latents = found
        return EntryCode(rows, latents, h[rows, latents], h.shape[0])
    return h * (h > threshold)
