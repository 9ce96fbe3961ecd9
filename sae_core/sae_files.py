"""The files of an SAE folder (SAE.save writes one; the trainer adds its latent statistics) and their I/O.
Every reader fails with a DataError naming the file and what to do (`fix`), so a damaged folder is named
wherever it is read: SAE.load, an export, a peer format's reader (sae_core/formats).

A folder of any format reads as an `SAEContents`: the SAE's config, its tensors in this toolkit's names (the
architecture's state_dict) and the metadata kept beside them; writers take those three.
"""
from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from sae_core.architectures import SAEConfig, parse_sae_config
from sae_core.errors import DataError
from sae_core.io import save_safetensors_atomic, write_json_atomic
from sae_core.sources.base import is_int

WEIGHTS_FILE = "sae.safetensors"
CONFIG_FILE = "config.json"
LATENT_STATS_FILE = "latent_stats.safetensors"  # written by the trainer beside the weights
RETRAIN = "re-train the run (re-run its sweep) or save the SAE again"  # what to do about a damaged SAE folder


@dataclass
class SAEContents:
    """An SAE as a folder holds it. `weights` and `fix` name the file the tensors came from and what to do
    about it, for when they turn out not to fit the config."""

    config: SAEConfig
    tensors: dict[str, torch.Tensor]
    meta: dict  # what was trained on and how (hook, train settings, metrics), or where it was imported from
    weights: Path
    fix: str


def read_folder(path: Path) -> SAEContents:
    """The SAE in a folder SAE.save wrote (CONFIG_FILE present)."""
    cfg_path, weights = path / CONFIG_FILE, path / WEIGHTS_FILE
    if not weights.is_file():
        raise DataError(f"{weights}: not found; an SAE folder holds {CONFIG_FILE} and {WEIGHTS_FILE}")
    saved = read_json(cfg_path, RETRAIN)
    if not isinstance(saved.get("sae"), dict):
        raise DataError(f"{cfg_path}: key 'sae' {'missing' if 'sae' not in saved else 'is not an object'}; "
                        f"allowed: the SAE's config (arch, d_in, n_latents, ...) as SAE.save writes it; {RETRAIN}")
    config = parse_sae_config(saved.pop("sae"), source=str(cfg_path), prefix="sae")
    return SAEContents(config, read_tensors(weights, RETRAIN), saved, weights, RETRAIN)


def write_folder(path: Path, config: SAEConfig, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    save_safetensors_atomic(tensors, path / WEIGHTS_FILE)
    write_json_atomic(path / CONFIG_FILE, {"sae": config.model_dump(), **meta})


def read_json(path: Path, fix: str) -> dict:
    """A JSON object file."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise DataError(f"{path}: unreadable JSON ({type(err).__name__}: {err}); {fix}") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: holds a JSON {type(data).__name__}, expected an object; {fix}")
    return data


def read_tensors(path: Path, fix: str, required: Iterable[str] = ()) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors (on the CPU), those `required` present and every value finite: nan
    weights would otherwise surface far away (an export's 'not unit-norm (nan to nan)', nan metrics)."""
    try:
        tensors = load_file(path)
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


def load_state(net: nn.Module, contents: SAEContents) -> None:
    """The tensors into the architecture their config describes; a mismatch names the file they came from."""
    try:
        net.load_state_dict(contents.tensors)
    except RuntimeError as err:  # missing, unexpected or misshapen tensors
        raise DataError(f"{contents.weights}: its tensors do not fit the SAE its config describes "
                        f"({' '.join(str(err).split())}); {contents.fix}") from None


def config_int(cfg: dict, key: str, path: Path, fix: str) -> int:
    """cfg[key], an integer >= 1."""
    value = cfg.get(key)
    if not is_int(value) or value < 1:
        got = "missing" if key not in cfg else f"got {value!r}"
        raise DataError(f"{path}: {key}: {got}; allowed: an integer >= 1; {fix}")
    return int(value)


class LatentStats(Protocol):  # sae_core.evaluation.reconstruction.Evaluation is one
    frequency: torch.Tensor  # [n_latents]: fraction of held-out vectors on which each latent is active
    mean_activation: torch.Tensor  # [n_latents]: mean value when active
    mean_sq_activation: torch.Tensor  # [n_latents]: E[z_i^2] over all vectors (Gao et al. 2024, App. E.4)


def save_latent_stats(stats: LatentStats, path: str | Path) -> None:
    save_safetensors_atomic({"frequency": stats.frequency, "mean_activation": stats.mean_activation,
                             "mean_sq_activation": stats.mean_sq_activation}, Path(path))


def load_latent_stats(path: str | Path) -> dict[str, torch.Tensor]:
    """Per-latent held-out statistics saved with an SAE: `frequency` (for density histograms; log10 of it is
    SAELens's `sparsity`), `mean_activation` (when active) and `mean_sq_activation` (E[z_i^2], Gao et al.
    2024's importance, App. E.4), which a file written before it was recorded lacks: what the file holds is
    returned."""
    return read_tensors(Path(path), RETRAIN, ("frequency", "mean_activation"))
