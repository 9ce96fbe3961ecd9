"""Writing a trained SAE in a peer toolkit's on-disk format, so it loads there and computes the same thing.

SAELens (v6 folder: cfg.json + sae_weights.safetensors [+ sparsity.safetensors]):
  z = act(W_enc^T (LN(x) - b_dec) + b_enc),  x_hat = (W_dec^T z + b_dec) * std(x) + mean(x)
with normalize_activations: layer_norm (or none). Our unit_norm input is LN(x) / sqrt(d_in) and standardize
is LN(x), so with s = 1/sqrt(d_in) (unit_norm) or 1 (standardize, none) the export is exact:
  W_enc_SL = (s W_enc)^T,  W_dec_SL = W_dec / s,  b_dec_SL = b_pre / s.
Families: topk and multi_topk -> topk (k), relu -> standard, jumprelu -> jumprelu, batchtopk -> jumprelu with
its inference threshold on every latent, gated -> gated. ProLU has no SAELens counterpart.

sparsify (cfg.json + sae.safetensors: encoder.weight [n, d], encoder.bias, W_dec [n, d], b_dec): TopK on
raw activations, so only TopK-family SAEs trained with normalization: none export exactly.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from sae_core.errors import DataError
from sae_core.evaluation.reconstruction import load_latent_stats
from sae_core.io import save_safetensors_atomic, write_json_atomic
from sae_core.sae import LATENT_STATS_FILE, SAE

FORMATS = ("saelens", "sparsify")
_SAELENS_ARCH = {"topk": "topk", "multi_topk": "topk", "relu": "standard", "jumprelu": "jumprelu",
                 "batchtopk": "jumprelu", "gated": "gated"}
# our site names -> TransformerLens hook names (SAELens's metadata.hook_name)
_TL_HOOKS = {"resid_pre": "blocks.{L}.hook_resid_pre", "resid_post": "blocks.{L}.hook_resid_post",
             "resid_post_ln": "blocks.{L}.hook_resid_post", "mlp_out": "blocks.{L}.hook_mlp_out"}


def _input_scale(sae: SAE) -> tuple[str, float]:
    norm = sae.cfg.normalization
    if norm == "none":
        return "none", 1.0
    return "layer_norm", (1 / math.sqrt(sae.cfg.d_in) if norm == "unit_norm" else 1.0)


def export_saelens(sae: SAE, out: str | Path, source: Path | None = None) -> Path:
    cfg, sd = sae.cfg, {k: v.detach().float().cpu() for k, v in sae.arch.state_dict().items()}
    if cfg.arch not in _SAELENS_ARCH:
        raise DataError(f"export --format saelens: arch {cfg.arch!r} has no SAELens counterpart; "
                        f"exportable: {', '.join(_SAELENS_ARCH)}")
    norm, s = _input_scale(sae)
    tensors = {"W_enc": (s * sd["W_enc"]).T.contiguous(), "W_dec": sd["W_dec"] / s, "b_dec": sd["b_pre"] / s}
    if cfg.arch == "gated":
        tensors.update(b_gate=sd["b_gate"], b_mag=sd["b_mag"], r_mag=sd["r_mag"])
    else:
        tensors["b_enc"] = sd["b_enc"] if "b_enc" in sd else torch.zeros(cfg.n_latents)
    if cfg.arch == "jumprelu":
        tensors["threshold"] = sd["threshold"]
    elif cfg.arch == "batchtopk":
        if float(sd["threshold"]) < 0:
            raise DataError("export --format saelens: this BatchTopK SAE has no inference threshold yet "
                            "(it is estimated during training)")
        tensors["threshold"] = sd["threshold"].expand(cfg.n_latents).clone()
    hook = sae.meta.get("hook") or {}
    layer = (hook.get("layers") or [None])[0]
    site = hook.get("site")
    config = {
        "architecture": _SAELENS_ARCH[cfg.arch], "d_in": cfg.d_in, "d_sae": cfg.n_latents, "dtype": "float32",
        "device": "cpu", "apply_b_dec_to_input": True, "normalize_activations": norm, "reshape_activations": "none",
        "metadata": {"sae_lens_version": "6.0.0", "sae_lens_training_version": None,
                     "model_name": hook.get("model"),
                     "hook_name": _TL_HOOKS[site].format(L=layer) if site in _TL_HOOKS and layer is not None else None,
                     "hook_head_index": None, "prepend_bos": False},
        "sae_scaling": {"sae": cfg.model_dump(), **{k: v for k, v in sae.meta.items() if k in ("hook", "run_id")}},
    }
    if _SAELENS_ARCH[cfg.arch] == "topk":
        config.update(k=cfg.k, rescale_acts_by_decoder_norm=False)
    out = Path(out)
    save_safetensors_atomic(tensors, out / "sae_weights.safetensors")
    if source is not None and (source / LATENT_STATS_FILE).is_file():  # SAELens's feature density: log10 freq
        freq = load_latent_stats(source / LATENT_STATS_FILE)["frequency"]
        save_safetensors_atomic({"sparsity": freq.clamp_min(1e-10).log10()}, out / "sparsity.safetensors")
    write_json_atomic(out / "cfg.json", config)
    return out


def export_sparsify(sae: SAE, out: str | Path) -> Path:
    cfg, sd = sae.cfg, {k: v.detach().float().cpu() for k, v in sae.arch.state_dict().items()}
    if cfg.arch not in ("topk", "multi_topk"):
        raise DataError(f"export --format sparsify: sparsify holds TopK SAEs only; this one is {cfg.arch!r} "
                        "(use --format saelens)")
    if cfg.normalization != "none":
        raise DataError(f"export --format sparsify: sparsify encodes raw activations, but this SAE was trained on "
                        f"normalization {cfg.normalization!r} inputs; use --format saelens (layer_norm), or train "
                        "with sae: {normalization: none}")
    tensors = {"encoder.weight": sd["W_enc"], "encoder.bias": sd.get("b_enc", torch.zeros(cfg.n_latents)),
               "W_dec": sd["W_dec"], "b_dec": sd["b_pre"]}
    config = {"activation": "topk", "expansion_factor": cfg.n_latents / cfg.d_in, "normalize_decoder": True,
              "num_latents": cfg.n_latents, "k": cfg.k, "multi_topk": cfg.arch == "multi_topk",
              "skip_connection": False, "transcode": False, "d_in": cfg.d_in}
    out = Path(out)
    save_safetensors_atomic(tensors, out / "sae.safetensors")
    write_json_atomic(out / "cfg.json", config)
    return out


def export(run_dir: str | Path, fmt: str, out: str | Path) -> Path:
    if fmt not in FORMATS:
        raise DataError(f"export --format: {fmt!r} is not a format; allowed: {', '.join(FORMATS)}")
    run_dir = Path(run_dir)
    sae = SAE.load(run_dir)
    return export_saelens(sae, out, run_dir) if fmt == "saelens" else export_sparsify(sae, out)
