"""SAELens v6 folders (cfg.json + sae_weights.safetensors [+ sparsity.safetensors]), which SAELens, SAEBench
and Neuronpedia load. SAELens computes

    z = act(W_enc^T (LN(x) - b_dec) + b_enc),   x_hat = (W_dec^T z + b_dec) * std(x) + mean(x)

with normalize_activations layer_norm, LN(x) = (x - mean) / (std + 1e-5), std the unbiased one (or none:
no LN). Ours read u = (x - mean) / ||x - mean|| (unit_norm) or (x - mean) / std_population (standardize),
which are LN(x) * s up to SAELens's 1e-5 on std, s = 1/sqrt(d-1) or sqrt(d/(d-1)). Every activation here
is positively homogeneous, so the exported latents are ours / s in LN units, and with
    W_enc_SL = W_enc^T,  b_enc_SL = b_enc / s (and threshold, b_gate, b_mag / s),  W_dec_SL = W_dec,
    b_dec_SL = b_pre / s
the exported SAE computes ours on raw activations (relative error ~1e-5 / std(x) from that eps) and keeps
unit-norm decoder rows.

Families: topk and multi_topk -> topk (k; multi_topk's inference is TopK(k)), relu -> standard, jumprelu ->
jumprelu, batchtopk -> jumprelu with its inference threshold on every latent, gated -> gated (b_gate, b_mag,
r_mag, no b_enc). ProLU has no SAELens counterpart. Decoder rows leave unit-norm (what SAELens users and
Neuronpedia assume): an elementwise activation takes each row's norm into its encoder row, bias and
threshold exactly; TopK, which ranks latents by value, exports only with unit-norm rows (the trainer's
default constraint).

Reading is the inverse: topk, standard, jumprelu and gated folders become our topk, relu, jumprelu and gated
SAEs, so peers' SAEs go through this toolkit's evaluations and figures. A peer's layer_norm SAE reads as
standardize with s folded into W_enc and W_dec, so its latents are the peer's own; a folder we exported
(its cfg.json keeps our config) gets its normalisation and latent units back.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from sae_core.architectures import SAEConfig, parse_sae_config
from sae_core.errors import DataError
from sae_core.io import save_safetensors_atomic, write_json_atomic
from sae_core.sae_files import SAEContents, config_int, load_latent_stats, read_json, read_tensors

CONFIG, WEIGHTS, SPARSITY = "cfg.json", "sae_weights.safetensors", "sparsity.safetensors"
VERSION = "6.0.0"
_TO_SAELENS = {"topk": "topk", "multi_topk": "topk", "relu": "standard", "jumprelu": "jumprelu",
               "batchtopk": "jumprelu", "gated": "gated"}
_FROM_SAELENS = {"topk": "topk", "standard": "relu", "jumprelu": "jumprelu", "gated": "gated"}
# our site names -> TransformerLens hook names (SAELens's metadata.hook_name); reading maps back
_TL_HOOKS = {"resid_pre": "blocks.{L}.hook_resid_pre", "resid_post": "blocks.{L}.hook_resid_post",
             "resid_post_ln": "blocks.{L}.hook_resid_post", "mlp_out": "blocks.{L}.hook_mlp_out"}
_ELEMENTWISE = ("relu", "jumprelu", "batchtopk", "gated")
# the tensors each SAELens architecture's reader uses
_TENSORS = {"standard": ("W_enc", "W_dec", "b_dec", "b_enc"), "topk": ("W_enc", "W_dec", "b_dec", "b_enc"),
            "jumprelu": ("W_enc", "W_dec", "b_dec", "b_enc", "threshold"),
            "gated": ("W_enc", "W_dec", "b_dec", "b_gate", "b_mag", "r_mag")}
REEXPORT = "re-export the SAE (sae-scaling export, or SAELens's save_model)"


def layer_norm_scale(normalization: str, d: int) -> float:
    """s with our normalised input = SAELens's LN(x) * s (1 without normalisation)."""
    return {"none": 1.0, "unit_norm": 1 / math.sqrt(d - 1), "standardize": math.sqrt(d / (d - 1))}[normalization]


def _unit_decoder(arch: str, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same SAE with unit-norm decoder rows: z_i * c_i with d_i / c_i, c_i = ||d_i||, taken exactly into
    what produces z_i for an elementwise activation (ReLU(c a) = c ReLU(a), c > 0)."""
    c = sd["W_dec"].norm(dim=1)
    if arch not in _ELEMENTWISE:
        if not torch.allclose(c, torch.ones_like(c), atol=1e-4):
            raise DataError(f"export: this {arch} SAE's decoder rows are not unit-norm (norms {float(c.min()):.3g} to "
                            f"{float(c.max()):.3g}); TopK ranks latents by value, so their norms cannot be folded into "
                            "the encoder without changing which latents win; train with decoder_unit_norm: true")
        return sd
    sd = {**sd, "W_dec": sd["W_dec"] / c[:, None]}
    if arch == "gated":  # the gate's sign is scale-free; the magnitude path carries the scale
        sd.update(r_mag=sd["r_mag"] + c.log(), b_mag=sd["b_mag"] * c)
        return sd
    sd.update(W_enc=sd["W_enc"] * c[:, None], b_enc=sd["b_enc"] * c)
    if arch == "jumprelu":
        sd["threshold"] = sd["threshold"] * c
    elif arch == "batchtopk":
        sd["threshold"] = sd["threshold"] * c  # one threshold becomes one per latent
    return sd


def _sparsity(latent_stats: Path | None) -> torch.Tensor | None:
    """SAELens's log10 feature density, from the latent stats the trainer saved beside the weights (if any)."""
    if latent_stats is None or not latent_stats.is_file():
        return None
    return load_latent_stats(latent_stats)["frequency"].clamp_min(1e-10).log10()


def matches(path: Path) -> bool:
    return (path / CONFIG).is_file() and (path / WEIGHTS).is_file()


def write(cfg: SAEConfig, tensors: dict[str, torch.Tensor], meta: dict, out: Path,
          latent_stats: Path | None = None) -> Path:
    """latent_stats: the trainer's per-latent statistics file, written as SAELens's sparsity if it exists."""
    if cfg.arch not in _TO_SAELENS:
        raise DataError(f"export --format saelens: arch {cfg.arch!r} has no SAELens counterpart; "
                        f"exportable: {', '.join(_TO_SAELENS)}")
    sd = {k: v.detach().double().cpu() for k, v in tensors.items()}
    if cfg.arch == "batchtopk":
        if float(sd["threshold"]) < 0:
            raise DataError("export --format saelens: this BatchTopK SAE has no inference threshold yet "
                            "(it is estimated during training)")
        sd["threshold"] = sd["threshold"].expand(cfg.n_latents).clone()
    sd = _unit_decoder(cfg.arch, sd)
    s = layer_norm_scale(cfg.normalization, cfg.d_in)
    theirs = {"W_enc": sd["W_enc"].T, "W_dec": sd["W_dec"], "b_dec": sd["b_pre"] / s}
    if cfg.arch == "gated":
        theirs.update(b_gate=sd["b_gate"] / s, b_mag=sd["b_mag"] / s, r_mag=sd["r_mag"])
    else:
        theirs["b_enc"] = (sd["b_enc"] if "b_enc" in sd else torch.zeros(cfg.n_latents, dtype=torch.float64)) / s
    if "threshold" in sd:
        theirs["threshold"] = sd["threshold"] / s
    hook = meta.get("hook") or {}
    layer = (hook.get("layers") or [None])[0]
    site = hook.get("site")
    config = {
        "architecture": _TO_SAELENS[cfg.arch], "d_in": cfg.d_in, "d_sae": cfg.n_latents, "dtype": "float32",
        "device": "cpu", "apply_b_dec_to_input": True,
        "normalize_activations": "none" if cfg.normalization == "none" else "layer_norm",
        "reshape_activations": "none",
        "metadata": {"sae_lens_version": VERSION, "sae_lens_training_version": None,
                     "model_name": hook.get("model"),
                     "hook_name": _TL_HOOKS[site].format(L=layer) if site in _TL_HOOKS and layer is not None else None,
                     "hook_head_index": None, "context_size": hook.get("context_length"), "prepend_bos": False},
        "sae_scaling": {"sae": cfg.model_dump(), **{k: v for k, v in meta.items() if k in ("hook", "run_id")}},
    }
    if _TO_SAELENS[cfg.arch] == "topk":
        config.update(k=cfg.k, rescale_acts_by_decoder_norm=False)
    sparsity = _sparsity(latent_stats)  # read before writing
    save_safetensors_atomic({k: v.float() for k, v in theirs.items()}, out / WEIGHTS)
    if sparsity is not None:
        save_safetensors_atomic({"sparsity": sparsity}, out / SPARSITY)
    write_json_atomic(out / CONFIG, config)  # last: a folder with cfg.json is complete
    return out


def _site(hook_name) -> tuple[str | None, list[int] | None]:
    for site, pattern in _TL_HOOKS.items():
        prefix, suffix = pattern.split("{L}")
        if isinstance(hook_name, str) and hook_name.startswith(prefix) and hook_name.endswith(suffix):
            layer = hook_name[len(prefix):len(hook_name) - len(suffix)]
            if layer.isdigit():
                return site, [int(layer)]
    return None, None


def _metadata(cfg: dict, where: Path) -> dict:
    meta = cfg.get("metadata") or {}
    if not isinstance(meta, dict):
        raise DataError(f"{where}: metadata: got {meta!r}; allowed: an object (model_name, hook_name, ...); "
                        f"{REEXPORT}")
    return meta


def _check_readable(cfg: dict, meta: dict, where: Path) -> None:
    """Refuse what this reader cannot map onto ours, every reason at once."""
    version = str(cfg.get("sae_lens_version") or meta.get("sae_lens_version") or "0")
    if not version.split(".")[0].isdigit() or int(version.split(".")[0]) < 6:
        raise DataError(f"{where}: a SAELens config older than v6 (sae_lens_version {version!r}); load it with "
                        "sae_lens >= 6 and save it again (SAE.load_from_disk, then save_model)")
    arch, norm = cfg.get("architecture"), cfg.get("normalize_activations", "none")
    problems = []
    if arch not in _FROM_SAELENS:
        problems.append(f"architecture {arch!r}; readable: {', '.join(_FROM_SAELENS)}")
    if norm not in ("none", "layer_norm"):
        problems.append(f"normalize_activations {norm!r} (it needs the training data's norm); "
                        "readable: none, layer_norm")
    if cfg.get("reshape_activations", "none") != "none":
        problems.append(f"reshape_activations {cfg['reshape_activations']!r}; readable: none")
    if cfg.get("rescale_acts_by_decoder_norm"):
        problems.append("rescale_acts_by_decoder_norm: true; readable: false")
    if problems:
        raise DataError(f"{where}: " + "; ".join(problems))


def _our_normalization(cfg: dict) -> str | None:
    """The normalisation of an SAE exported from here (its cfg.json keeps our config); None for a peer's."""
    ours = cfg.get("sae_scaling")
    sae = ours.get("sae") if isinstance(ours, dict) else None
    return sae.get("normalization") if isinstance(sae, dict) else None


def read(path: Path) -> SAEContents:
    where = path / CONFIG
    cfg = read_json(where, REEXPORT)
    meta = _metadata(cfg, where)
    _check_readable(cfg, meta, where)
    arch, norm = cfg["architecture"], cfg.get("normalize_activations", "none")
    ours = _FROM_SAELENS[arch]
    d, n = config_int(cfg, "d_in", where, REEXPORT), config_int(cfg, "d_sae", where, REEXPORT)
    topk = {"k": config_int(cfg, "k", where, REEXPORT)} if ours == "topk" else {}
    w = {k: v.double() for k, v in read_tensors(path / WEIGHTS, REEXPORT, _TENSORS[arch]).items()}
    normalization = "standardize" if norm == "layer_norm" else "none"
    exported = _our_normalization(cfg) in ("unit_norm", "standardize")
    if exported and norm == "layer_norm":  # one of ours: back in its own normalisation
        normalization = _our_normalization(cfg)
    s = layer_norm_scale(normalization, d)
    W = w["W_enc"]  # [d_in, d_sae]
    if not cfg.get("apply_b_dec_to_input", True):  # W^T x + b = W^T (x - b_dec) + (b + W^T b_dec)
        shift = w["b_dec"] @ W
        if arch == "gated":
            w["b_gate"], w["b_mag"] = w["b_gate"] + shift, w["b_mag"] + shift * w["r_mag"].exp()
        else:
            w["b_enc"] = w["b_enc"] + shift
    state = {"b_pre": w["b_dec"] * s, **{k: w[k] for k in ("b_enc", "threshold", "b_gate", "b_mag", "r_mag") if k in w}}
    if exported:  # undo the export's unit change: latents back in ours
        state.update(W_enc=W.T, W_dec=w["W_dec"], **{k: w[k] * s for k in ("b_enc", "threshold", "b_gate", "b_mag")
                                                     if k in w})
    else:  # a peer's SAE keeps its latents: the factor s goes into the weights
        state.update(W_enc=W.T / s, W_dec=w["W_dec"] * s)
    site, layers = _site(meta.get("hook_name"))
    config = parse_sae_config({"arch": ours, "d_in": d, "n_latents": n, "normalization": normalization, **topk},
                              source=str(where))
    our_meta = {"hook": {"model": meta.get("model_name"), "site": site, "layers": layers,
                         "context_length": meta.get("context_size")} if site else None,
                "imported_from": {"format": "saelens", "path": str(path), "hook_name": meta.get("hook_name")}}
    return SAEContents(config, {k: v.float() for k, v in state.items()}, our_meta, path / WEIGHTS, REEXPORT)
