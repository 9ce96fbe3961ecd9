"""The SAE a user loads: one architecture plus its input normalisation, saved as safetensors + JSON.

    sae = SAE.load("results/my-sweep/saes/<run_id>")   # or a SAELens v6 / sparsify folder
    z = sae.encode(x)            # dense latents [B, n_latents]
    x_hat = sae.decode(z)        # in the SAE's (normalised) input space
    x_hat = sae.reconstruct(x)   # in the original activation space
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from sae_core.architectures import Architecture, Code, SAEConfig, SparseCode, build_architecture, parse_sae_config
from sae_core.errors import DataError
from sae_core.io import save_safetensors_atomic, write_json_atomic
from sae_core.normalization import TokenStats, denormalize, normalize
from sae_core.parallel.mesh import TRIVIAL, Mesh
from sae_core.sources.base import is_int

WEIGHTS_FILE = "sae.safetensors"
CONFIG_FILE = "config.json"
LATENT_STATS_FILE = "latent_stats.safetensors"  # written by the trainer beside the weights
RETRAIN = "re-train the run (re-run its sweep) or save the SAE again"  # what to do about a damaged SAE folder


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
        if (k is None) == (threshold is None):
            raise ValueError("give exactly one of k, threshold")
        xn, stats = self.normalize(x.to(self.net.W_dec.dtype))
        h = self.net.preactivation(xn)
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
        save_safetensors_atomic(self.net.state_dict(), path / WEIGHTS_FILE)
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
        saved = read_json(cfg_path, RETRAIN)
        if not isinstance(saved.get("sae"), dict):
            raise DataError(f"{cfg_path}: key 'sae' {'missing' if 'sae' not in saved else 'is not an object'}; "
                            f"allowed: the SAE's config (arch, d_in, n_latents, ...) as SAE.save writes it; {RETRAIN}")
        sae = cls(parse_sae_config(saved.pop("sae"), source=str(cfg_path), prefix="sae"), meta=saved, init_seed=None)
        load_state(sae, read_tensors(weights, RETRAIN, device=device), weights, RETRAIN)
        return sae.to(device)


# --- reading SAE files: every failure a DataError naming the file and what to do (`fix`) -------------------
def read_json(path: Path, fix: str) -> dict:
    """A JSON object file."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise DataError(f"{path}: unreadable JSON ({type(err).__name__}: {err}); {fix}") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: holds a JSON {type(data).__name__}, expected an object; {fix}")
    return data


def read_tensors(path: Path, fix: str, required: Iterable[str] = (),
                 device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """A safetensors file's tensors, those `required` present and every value finite: nan weights would
    otherwise surface far away (an export's 'not unit-norm (nan to nan)', nan metrics)."""
    try:
        tensors = load_file(path, device=str(device))
    except (OSError, SafetensorError) as err:  # safetensors checks the header against the file's size
        raise DataError(f"{path}: unreadable safetensors file ({err}); {fix}") from None
    missing = [name for name in required if name not in tensors]
    if missing:
        raise DataError(f"{path}: tensors {', '.join(missing)} missing (it holds {', '.join(sorted(tensors))}); "
                        f"{fix}")
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise DataError(f"{path}: tensor {name!r} holds nan or inf; {fix}")
    return tensors


def load_state(sae: SAE, state: dict[str, torch.Tensor], path: Path, fix: str) -> None:
    """The weights into the SAE its config describes; a mismatch names the file it came from."""
    try:
        sae.net.load_state_dict(state)
    except RuntimeError as err:  # missing, unexpected or misshapen tensors
        raise DataError(f"{path}: its tensors do not fit the SAE its config describes ({' '.join(str(err).split())})"
                        f"; {fix}") from None


def config_int(cfg: dict, key: str, path: Path, fix: str) -> int:
    """cfg[key], an integer >= 1."""
    value = cfg.get(key)
    if not is_int(value) or value < 1:
        got = "missing" if key not in cfg else f"got {value!r}"
        raise DataError(f"{path}: {key}: {got}; allowed: an integer >= 1; {fix}")
    return int(value)
