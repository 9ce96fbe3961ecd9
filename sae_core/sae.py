"""The SAE a user loads: one architecture plus its input normalisation, saved as safetensors + JSON.

    sae = SAE.load("results/my-sweep/saes/<run_id>")   # or a SAELens v6 / sparsify folder
    z = sae.encode(x)            # dense latents [B, n_latents]
    x_hat = sae.decode(z)        # in the SAE's (normalised) input space
    x_hat = sae.reconstruct(x)   # in the original activation space
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from sae_core.architectures import Architecture, Code, SAEConfig, SparseCode, build_architecture, parse_sae_config
from sae_core.errors import DataError
from sae_core.io import save_safetensors_atomic, write_json_atomic
from sae_core.normalization import TokenStats, denormalize, normalize
from sae_core.parallel.mesh import TRIVIAL, Mesh

WEIGHTS_FILE = "sae.safetensors"
CONFIG_FILE = "config.json"
LATENT_STATS_FILE = "latent_stats.safetensors"  # written by the trainer beside the weights


class SAE(nn.Module):
    def __init__(self, cfg: SAEConfig | dict, meta: dict | None = None, init_seed: int | None = 0,
                 mesh: Mesh = TRIVIAL):
        """meta: what was trained on and how (hook, train settings, metrics), kept in config.json beside `sae`.
        init_seed: the tied random initialisation the trainer starts from; None leaves the weights unset
        (they are about to be loaded). mesh: the latent shard this process holds, in sharded training."""
        super().__init__()
        self.cfg = parse_sae_config(cfg)
        self.arch: Architecture = build_architecture(self.cfg, mesh)
        self.meta = dict(meta or {})
        if init_seed is not None:
            self.arch.reset_parameters(True, init_seed)

    # --- inference -------------------------------------------------------------------------
    def normalize(self, x: torch.Tensor) -> tuple[torch.Tensor, TokenStats | None]:
        return normalize(x, self.cfg.normalization)

    def encode_code(self, x: torch.Tensor) -> tuple[Code, TokenStats | None]:
        """The architecture's own code (sparse for the TopK family) and the per-token stats of x."""
        xn, stats = self.normalize(x.to(self.arch.W_dec.dtype))
        return self.arch.encode(xn), stats

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.arch.dense_latents(self.encode_code(x)[0])

    def decode(self, z: Code, stats: TokenStats | None = None) -> torch.Tensor:
        """Reconstruction from latents; pass the stats from `encode_code` to map back to the original space."""
        return denormalize(self.arch.decode(z), stats)

    def encode_with(self, x: torch.Tensor, *, k: int | None = None,
                    threshold: float | None = None) -> tuple[Code, TokenStats | None]:
        """Swap the activation at test time (Gao et al. 5.3): TopK(k) or JumpReLU(threshold) applied to the
        family's pre-activations, whatever it was trained with. Exactly one of k, threshold."""
        if (k is None) == (threshold is None):
            raise ValueError("give exactly one of k, threshold")
        xn, stats = self.normalize(x.to(self.arch.W_dec.dtype))
        h = self.arch.preactivation(xn)
        if k is not None:
            vals, idx = h.topk(k, dim=-1)
            return SparseCode(idx, vals.relu()), stats
        return h * (h > threshold), stats

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        code, stats = self.encode_code(x)
        return self.decode(code, stats)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reconstruct(x)

    # --- storage ---------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        path = Path(path)
        save_safetensors_atomic(self.arch.state_dict(), path / WEIGHTS_FILE)
        write_json_atomic(path / CONFIG_FILE, {"sae": self.cfg.model_dump(), **self.meta})

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> "SAE":
        path = Path(path)
        cfg_path, weights = path / CONFIG_FILE, path / WEIGHTS_FILE
        if not cfg_path.is_file():  # a peer's folder? (sae_core/formats)
            from sae_core.formats import load_foreign

            foreign = load_foreign(path, device) if path.is_dir() else None
            if foreign is not None:
                return foreign
            raise DataError(f"{path}: no SAE here; expected this toolkit's folder ({CONFIG_FILE} + {WEIGHTS_FILE}), "
                            "a SAELens v6 folder (cfg.json + sae_weights.safetensors) or a sparsify folder "
                            "(cfg.json + sae.safetensors)")
        if not weights.is_file():
            raise DataError(f"{weights}: not found; an SAE folder holds {CONFIG_FILE} and {WEIGHTS_FILE}")
        saved = json.loads(cfg_path.read_text())
        sae = cls(parse_sae_config(saved.pop("sae"), source=str(cfg_path), prefix="sae"), meta=saved, init_seed=None)
        sae.arch.load_state_dict(load_file(weights, device=str(device)))
        return sae.to(device)
