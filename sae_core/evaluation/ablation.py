"""Sparsity of ablation effects (Gao et al. 2024, §4.5), on a subsample of (latent, position) pairs.

One sample ablates one latent i at one token position t of a held-out row: the hooked activation there becomes
x - (decode(z) - decode(z with z_i = 0)), i.e. x minus latent i's contribution in the input's space (exact for any
normalisation, bias and architecture), the SAE's reconstruction error staying in place; every other position is
unchanged. The change in the model's output at positions t, ..., t+T-1 (clipped to the row; T = `window`) has
each position's median over its V entries subtracted and is flattened to v in R^{V·T'}; the sample's value is

    (‖v‖₁ / ‖v‖₂)² / (V·T')    in [1/(V·T'), 1]: 1/(V·T') when one entry moves, 1 when all move alike

The run's `ablation_sparsity` is the mean over samples, `ablation_sparsity_se` its standard error (std/√m).
The output is the logits [V] for causal LMs; encoders have none, so their last hidden state [d] stands in.

Sampling (seeded, so two calls on one SAE agree): the candidate positions are the first `_CANDIDATES` held-out
positions; `latents` latents drawn uniformly among those active there, and for each, `positions` positions among
those where it is active. The baseline (`ablation_sparsity_baseline`) ablates a residual-stream channel instead:
x_j e_j subtracted at the same positions, j uniform over the site's d coordinates, one per latent sample.
An ablation that changes the input by exactly 0 (a zero decoder row; a channel whose x_j is 0) has no effect to
measure (its value would be 0/0): it is dropped, and `ablation_samples` counts only the samples kept.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from sae_core.evaluation.downstream import DownstreamEval
from sae_core.lm import ActivationExtractor
from sae_core.sae import SAE

ABLATION_COLUMNS = ("ablation_sparsity", "ablation_sparsity_se", "ablation_sparsity_baseline",
                    "ablation_samples")
_CANDIDATES = 4096  # held-out positions encoded to find the active latents (the first ones, as the probe's)
_SEED = 0


def effect_sparsity(diff: torch.Tensor) -> float:
    """(‖v‖₁/‖v‖₂)² / v.numel() of the output change diff [T', V] after removing each position's median over V
    (numpy's median: the mean of the two middle values when V is even); NaN when v is 0. Float64."""
    diff = diff.double()
    ordered = diff.sort(dim=-1).values
    n = diff.shape[-1]
    v = diff - (ordered[..., (n - 1) // 2] + ordered[..., n // 2])[..., None] / 2
    l1, l2 = float(v.abs().sum()), float(v.norm())
    return (l1 / l2) ** 2 / v.numel() if l2 > 0 else math.nan


def _output(downstream: DownstreamEval, out) -> torch.Tensor:
    return (out.logits if downstream.lm.causal else out.last_hidden_state).float()


@torch.inference_mode()
def ablation_effects(downstream: DownstreamEval, layer: int, rows: torch.Tensor, ts: torch.Tensor,
                     deltas: torch.Tensor, window: int) -> np.ndarray:
    """effect_sparsity of each sample: held-out row rows[s], its site's value at position ts[s] minus
    deltas[s] [d] (site space). One spliced batch row per sample, beside one clean forward of each row of
    its batch (the samples are batched by row, so a row's samples share it)."""
    out = np.full(len(rows), math.nan)
    order = rows.argsort(stable=True)
    tokens, step = downstream.tokens, downstream.batch_rows
    for lo in range(0, len(rows), step):
        idx = order[lo:lo + step]
        r, t, delta = rows[idx], ts[idx], deltas[idx].to(downstream.device)
        # a causal LM's outputs up to the window's end do not read the tokens after it
        length = min(int(t.max()) + window, tokens.shape[1]) if downstream.lm.causal else tokens.shape[1]
        distinct, where = r.unique(return_inverse=True)
        clean = _output(downstream, downstream.lm.model(input_ids=tokens[distinct, :length].to(downstream.device)))
        ids = tokens[r, :length].to(downstream.device)
        at = torch.zeros(ids.shape, dtype=torch.bool, device=ids.device)
        at[torch.arange(len(r), device=ids.device), t.to(ids.device)] = True  # one per batch row: sample order
        spliced = downstream.extractor.run_spliced(ids, layer, at, lambda v, d=delta: v - d.to(v.dtype))
        new = _output(downstream, spliced)
        for s in range(len(r)):
            span = slice(int(t[s]), int(t[s]) + window)
            out[int(idx[s])] = effect_sparsity(new[s, span] - clean[int(where[s]), span])
    return out


def _candidates(downstream: DownstreamEval, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row, position, site vector [d]) of the first _CANDIDATES held-out positions."""
    keep = downstream.positions
    end = min(int(torch.searchsorted(keep.sum(dim=1).cumsum(0), _CANDIDATES)) + 1, len(keep))
    keep = keep[:end]
    extract = ActivationExtractor(downstream.lm.model, downstream.site, [layer])
    acts = torch.cat([extract(downstream.tokens[lo:min(lo + downstream.batch_rows, end)].to(downstream.device))[0]
                      .cpu() for lo in range(0, end, downstream.batch_rows)])
    rows, ts = keep.nonzero(as_tuple=True)
    return rows[:_CANDIDATES], ts[:_CANDIDATES], acts[keep][:_CANDIDATES]


@dataclass
class Samples:
    rows: torch.Tensor  # [m] held-out row of each sample
    ts: torch.Tensor  # [m] position ablated in it
    latents: torch.Tensor  # [m] latent ablated
    delta: torch.Tensor  # [m, d] latent i's contribution there, in the site's space
    baseline: torch.Tensor  # [m, d] x_j e_j of a random channel j at the same position


@torch.no_grad()
def sample_ablations(sae: SAE, downstream: DownstreamEval, layer: int, latents: int = 32,
                     positions: int = 4) -> Samples | None:
    """The seeded subsample of the module doc; None when no latent is active on the candidate positions."""
    rows, ts, x = _candidates(downstream, layer)
    device = sae.net.W_dec.device
    # (position, latent) of every activation, held sparse: positions x latents can be billions
    active = torch.cat([(sae.encode(x[lo:lo + 1024].to(device)) > 0).nonzero().cpu() + torch.tensor([lo, 0])
                        for lo in range(0, len(x), 1024)]).numpy()
    on = np.unique(active[:, 1])
    if not len(on):
        return None
    rng = np.random.default_rng(_SEED)
    at, ids = [], []
    for i in rng.choice(on, size=min(latents, len(on)), replace=False):
        where = active[active[:, 1] == i, 0]
        at += rng.choice(where, size=min(positions, len(where)), replace=False).tolist()
        ids += [int(i)] * min(positions, len(where))
    at, ids = torch.tensor(at), torch.tensor(ids)
    code, stats = sae.encode_code(x[at].to(device))
    z = sae.net.dense_latents(code)
    z_off = z.clone()
    z_off[torch.arange(len(ids), device=device), ids.to(device)] = 0
    delta = (sae.decode(z, stats) - sae.decode(z_off, stats)).float().cpu()
    channels = torch.from_numpy(rng.integers(0, x.shape[1], size=len(ids)))
    baseline = torch.zeros_like(delta)
    baseline[torch.arange(len(ids)), channels] = x[at, channels]
    return Samples(rows[at], ts[at], ids, delta, baseline)


def _mean_se(values: np.ndarray) -> tuple[float | None, float | None, int]:
    """Mean, standard error and count of the finite values (NaN: a sample with no effect)."""
    values = values[np.isfinite(values)]
    if not len(values):
        return None, None, 0
    se = float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else None
    return float(values.mean()), se, len(values)


def evaluate_ablation(sae: SAE, downstream: DownstreamEval, layer: int, latents: int = 32, positions: int = 4,
                      window: int = 16) -> dict:
    """The ABLATION_COLUMNS of `sae` at `layer` (see the module doc); null for a sharded SAE, whose decoder is
    split over processes, and when no latent is active on the candidate positions."""
    s = sample_ablations(sae, downstream, layer, latents, positions) if sae.net.mesh.shards == 1 else None
    if s is None:
        return dict.fromkeys(ABLATION_COLUMNS)
    # the latent and channel samples at one position run in one pass: one clean forward of the row for both
    m, deltas = len(s.rows), torch.cat([s.delta, s.baseline])
    moved = deltas.ne(0).any(dim=1)  # a zero change has no effect to measure
    values = np.full(2 * m, math.nan)
    values[moved.numpy()] = ablation_effects(downstream, layer, s.rows.repeat(2)[moved], s.ts.repeat(2)[moved],
                                             deltas[moved], window)
    mean, se, count = _mean_se(values[:m])
    return {"ablation_sparsity": mean, "ablation_sparsity_se": se,
            "ablation_sparsity_baseline": _mean_se(values[m:])[0], "ablation_samples": count}
