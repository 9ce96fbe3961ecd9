"""EleutherAI sparsify folders (cfg.json + sae.safetensors: encoder.weight [M, D], encoder.bias [M], W_dec [M, D],
b_dec [D]), which sparsify's `Sae.load_from_disk` and EleutherAI's tooling load. sparsify computes

    z = TopK(ReLU(encoder.weight (x - b_dec) + encoder.bias)),   x_hat = W_dec^T z + b_dec

on raw activations, which is our TopK exactly when the SAE was trained with normalization: none (the same
latents win: ReLU is monotone and only zeros could tie). So only TopK-family SAEs (multi_topk flagged as
such; inference is TopK(k) in both) with unit-norm decoder rows and no input normalisation export; others
are refused with the reason. Reading is the inverse; sparsify's other activations (groupmax), transcoders
and skip connections are refused.
"""
from __future__ import annotations

from pathlib import Path

import torch

from sae_core.architectures import SAEConfig, parse_sae_config
from sae_core.errors import DataError
from sae_core.io import save_safetensors_atomic, write_json_atomic
from sae_core.sae_files import SAEContents, config_int, read_json, read_tensors

CONFIG, WEIGHTS = "cfg.json", "sae.safetensors"
REEXPORT = "re-export the SAE (sae-scaling export, or sparsify's save_to_disk)"


def matches(path: Path) -> bool:
    return (path / CONFIG).is_file() and (path / WEIGHTS).is_file()


def write(cfg: SAEConfig, tensors: dict[str, torch.Tensor], meta: dict, out: Path,
          latent_stats: Path | None = None) -> Path:
    """meta and latent_stats: sparsify's folders have no place for them."""
    if cfg.arch not in ("topk", "multi_topk"):
        raise DataError(f"export --format sparsify: sparsify holds TopK SAEs only; this one is {cfg.arch!r} "
                        "(use --format saelens)")
    if cfg.normalization != "none":
        raise DataError(f"export --format sparsify: sparsify encodes raw activations, but this SAE was trained on "
                        f"normalization {cfg.normalization!r} inputs; use --format saelens (layer_norm), or train "
                        "with sae: {normalization: none}")
    sd = {k: v.detach().float().cpu() for k, v in tensors.items()}
    norms = sd["W_dec"].norm(dim=1)
    if not torch.allclose(norms, torch.ones_like(norms), atol=1e-4):
        raise DataError("export --format sparsify: the decoder rows are not unit-norm; TopK ranks latents by value, "
                        "so their norms cannot be folded into the encoder; train with decoder_unit_norm: true")
    theirs = {"encoder.weight": sd["W_enc"], "encoder.bias": sd.get("b_enc", torch.zeros(cfg.n_latents)),
              "W_dec": sd["W_dec"], "b_dec": sd["b_pre"]}
    config = {"activation": "topk", "expansion_factor": cfg.n_latents / cfg.d_in, "normalize_decoder": True,
              "num_latents": cfg.n_latents, "k": cfg.k, "multi_topk": cfg.arch == "multi_topk",
              "skip_connection": False, "transcode": False, "d_in": cfg.d_in}
    save_safetensors_atomic(theirs, out / WEIGHTS)
    write_json_atomic(out / CONFIG, config)  # last: a folder with cfg.json is complete
    return out


def read(path: Path) -> SAEContents:
    where = path / CONFIG
    cfg = read_json(where, REEXPORT)
    w = read_tensors(path / WEIGHTS, REEXPORT, ("encoder.weight", "encoder.bias", "W_dec", "b_dec"))
    problems = [f"{key}: {cfg.get(key)!r}; readable: {want!r}" for key, want in
                (("activation", "topk"), ("transcode", False), ("skip_connection", False))
                if cfg.get(key, want) != want]
    if "W_skip" in w:
        problems.append("a W_skip tensor (skip connection); readable: none")
    if problems:
        raise DataError(f"{where}: " + "; ".join(problems))
    k = config_int(cfg, "k", where, REEXPORT)
    if w["encoder.weight"].dim() != 2:
        raise DataError(f"{path / WEIGHTS}: encoder.weight has shape {tuple(w['encoder.weight'].shape)}; allowed: "
                        f"[num_latents, d_in]; {REEXPORT}")
    n, d = w["encoder.weight"].shape
    multi = bool(cfg.get("multi_topk")) and 4 * k <= n
    config = parse_sae_config({"arch": "multi_topk" if multi else "topk", "d_in": d, "n_latents": n, "k": k,
                               "normalization": "none"}, source=str(where))
    tensors = {"b_pre": w["b_dec"], "W_enc": w["encoder.weight"], "b_enc": w["encoder.bias"], "W_dec": w["W_dec"]}
    return SAEContents(config, tensors, {"imported_from": {"format": "sparsify", "path": str(path)}},
                       path / WEIGHTS, REEXPORT)
