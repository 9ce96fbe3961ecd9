"""How a multi-layer SAE's latents spread over the layers it reads, and how alike adjacent residual streams are
(after Lawson et al. 2024, "Residual stream analysis with multi-layer SAEs").

Per latent i and hooked layer l, over the held-out vectors (`layer_ids`: each vector's layer):
  mass m[i, l]    = sum of |z_i| over the vectors of layer l (codes are non-negative in every family here, so
                    this is the sum of its activations);
  profile p[i, l] = m[i, l] / sum_l m[i, l]  (a distribution over layers; latents with no mass have none);
  live            = the latent fires on at least one held-out vector (mass > 0), as dead_frac_eval counts;
  active at l     = p[i, l] >= min(min_frac, 1 / (2 L)), min_frac = 0.05 by default (LAYER_MIN_FRAC).
Why a share of the mass and not "fires on >= 1 vector of layer l": a single stray firing would then count a
layer, so the count grows with the size of the held-out set, while p estimates a fixed quantity. The 5% floor
ignores such strays; the 1 / (2L) cap keeps a latent spread evenly over many layers (p = 1/L each, below 5% from
L = 21 on) active at every one of them. The peak layer always passes (p_max >= 1/L), so a live latent is active
at 1..L layers.

Runs-table metrics: layers_active_mean = the mean over live latents of the number of layers each is active at;
single_layer_frac = the fraction of live latents active at exactly one layer.
Per-run tables (multi-layer SAEs only):
  layer_spread:    (n_layers, n_latents, frac): the live latents active at exactly n_layers layers, for every
                   n_layers in 1..L (zeros kept, so lines of different runs share their x values);
  layer_profile:   (peak_layer, layer, mass, n_latents): the mean profile of the live latents whose mass peaks
                   at peak_layer (ties: the earliest layer), an [L, L] matrix; the per-latent profiles
                   ([n_latents, L], 2^17 x L for large SAEs) are too big to keep for every run;
  adjacent_cosine: (layer, next_layer, cosine, n_positions): for each pair of consecutive hooked layers, the
                   mean over held-out token positions of cos(x_layer, x_next_layer), the same token's residual
                   stream at the two layers, in float64. The held-out vectors of a multi-layer source are
                   layer-major and aligned: the j-th vector of every layer is the same token position (the
                   cache stores every layer's vectors of the same kept positions in the same order, and the
                   on-the-fly source extracts all layers of the same rows at once); `adjacent_cosine` refuses
                   layers with unequal counts, where that cannot hold.
"""
from __future__ import annotations

import math

import torch

from sae_core.architectures import SparseCode
from sae_core.sae import SAE

LAYER_MIN_FRAC = 0.05  # the share of a latent's mass at a layer for it to count as active there (docstring)


@torch.no_grad()
def layer_mass(sae: SAE, x: torch.Tensor, layer_ids: torch.Tensor, layers: list[int],
               batch_size: int = 4096) -> torch.Tensor:
    """m: [n_latents, len(layers)] float64, sum of |z_i| over the held-out vectors of each layer (CPU)."""
    device, mesh = sae.net.W_dec.device, sae.net.mesh
    n = sae.net.n_local
    col = torch.full((int(max(layers)) + 1,), -1, dtype=torch.long)
    col[torch.tensor(layers)] = torch.arange(len(layers))
    group = col[layer_ids.cpu().long()]
    if (group < 0).any():
        raise ValueError(f"layer_ids: a layer outside the hooked layers {layers}")
    mass = torch.zeros(n * len(layers), dtype=torch.float64, device=device)  # flat [n, L]
    for start in range(0, x.shape[0], batch_size):
        xb = x[start:start + batch_size].to(device)
        gb = group[start:start + batch_size].to(device)
        code, _ = sae.encode_code(xb)
        if isinstance(code, SparseCode):  # never densify a sparse code
            flat = code.idx * len(layers) + gb[:, None]
            mass.index_add_(0, flat.reshape(-1), code.vals.abs().double().reshape(-1))
        else:
            z = code.abs().double()  # [B, n]
            for j in range(len(layers)):
                mass.view(n, len(layers))[:, j] += z[gb == j].sum(dim=0)
    return mesh.gather(mass.view(n, len(layers)), dim=0).cpu()


def active_threshold(n_layers: int, min_frac: float = LAYER_MIN_FRAC) -> float:
    return min(min_frac, 1.0 / (2 * n_layers))


def spread(mass: torch.Tensor, layers: list[int], min_frac: float = LAYER_MIN_FRAC) -> tuple[dict, dict]:
    """From m [n_latents, L]: the runs-table metrics and the tables layer_spread and layer_profile."""
    mass = mass.double()
    L = mass.shape[1]
    total = mass.sum(dim=1)
    live = total > 0
    p = mass[live] / total[live, None]
    n_active = (p >= active_threshold(L, min_frac)).sum(dim=1)
    n_live = int(live.sum())
    metrics = {"layers_active_mean": float(n_active.double().mean()) if n_live else math.nan,
               "single_layer_frac": float((n_active == 1).double().mean()) if n_live else math.nan}
    counts = torch.bincount(n_active, minlength=L + 1)
    hist = [{"n_layers": j, "n_latents": int(counts[j]), "frac": int(counts[j]) / n_live if n_live else math.nan}
            for j in range(1, L + 1)]
    peak = p.argmax(dim=1) if n_live else torch.zeros(0, dtype=torch.long)  # argmax: the first of ties
    profile = []
    for a in range(L):
        rows = p[peak == a]
        mean = rows.mean(dim=0) if rows.shape[0] else torch.full((L,), math.nan, dtype=torch.float64)
        profile += [{"peak_layer": layers[a], "layer": layers[b], "mass": float(mean[b]),
                     "n_latents": int(rows.shape[0])} for b in range(L)]
    return metrics, {"layer_spread": hist, "layer_profile": profile}


@torch.no_grad()
def adjacent_cosine(x: torch.Tensor, layer_ids: torch.Tensor, layers: list[int],
                    batch_size: int = 65536) -> list[dict]:
    """Rows (layer, next_layer, cosine, n_positions): the mean over positions of cos(x_l, x_next), float64.
    x holds every layer's vectors of the same positions in the same order (module docstring)."""
    ids = layer_ids.cpu()
    per = [x[ids == layer] for layer in layers]
    if len({t.shape[0] for t in per}) != 1:
        raise ValueError("adjacent_cosine: the layers hold unequal numbers of held-out vectors, so they are not "
                         "the same token positions")
    rows = []
    for layer, nxt, a, b in zip(layers, layers[1:], per, per[1:]):
        total, n = 0.0, a.shape[0]
        for start in range(0, n, batch_size):
            xa, xb = a[start:start + batch_size].double(), b[start:start + batch_size].double()
            total += float(torch.nn.functional.cosine_similarity(xa, xb, dim=1, eps=1e-30).sum())
        rows.append({"layer": layer, "next_layer": nxt, "cosine": total / n if n else math.nan,
                     "n_positions": n})
    return rows


def evaluate_cross_layer(sae: SAE, x: torch.Tensor, layer_ids: torch.Tensor, layers: list[int],
                         batch_size: int = 4096, min_frac: float = LAYER_MIN_FRAC) -> tuple[dict, dict]:
    """The runs-table metrics and the tables layer_spread, layer_profile and adjacent_cosine of a multi-layer
    SAE; layers: its hooked layers in the order of the held-out set."""
    metrics, tables = spread(layer_mass(sae, x, layer_ids, layers, batch_size), layers, min_frac)
    tables["adjacent_cosine"] = adjacent_cosine(x, layer_ids, layers)
    return metrics, tables
