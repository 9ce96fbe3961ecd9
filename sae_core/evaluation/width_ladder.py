"""Comparing SAEs of different width trained on the same hook (Leask et al. 2025, "Sparse autoencoders do
not find canonical units of analysis").

For a smaller SAE (n_small latents) and a larger one (n_large), both with the same d_in:
- max_cos_large[i] = max_j cos(W_dec_large[i], W_dec_small[j]), and max_cos_small the reverse; decoder
  rows are normalised first (they need not be unit norm). mean_max_cos is the mean of max_cos_large.
- A latent of the larger SAE is novel when its max_cos_large < threshold (default 0.7); novel_frac is
  the fraction of the larger SAE's latents that are novel.
- Per input vector, mse = ||x - x_hat||^2 / d_in in the original activation space. For each novel latent,
  the mean mse of the smaller SAE and of the larger SAE over the inputs where that latent is active
  (nonzero) and where it is inactive; difference = active - inactive. The averages over novel latents
  (the paper's table) use only the n_novel_used novel latents active on at least one input and inactive
  on at least one; they are NaN when there is none.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from sae_core.architectures import Code, SparseCode
from sae_core.errors import DataError
from sae_core.sae import SAE

PER_LATENT_COLUMNS = ["latent", "max_cos", "n_active", "small_mse_active", "small_mse_inactive",
                      "large_mse_active", "large_mse_inactive"]


@dataclass
class PairComparison:
    n_small: int
    n_large: int
    threshold: float
    max_cos_large: torch.Tensor  # [n_large] float32: per larger-SAE latent, max cosine to the smaller's rows
    max_cos_small: torch.Tensor  # [n_small] float32: per smaller-SAE latent, max cosine to the larger's rows
    novel: torch.Tensor  # [n_large] bool: max_cos_large < threshold
    novel_frac: float
    per_latent: pd.DataFrame  # one row per novel latent, columns PER_LATENT_COLUMNS
    summary: dict[str, float]


def _unit_rows(w: torch.Tensor) -> torch.Tensor:
    w = w.float() if w.dtype in (torch.float16, torch.bfloat16) else w
    return w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)


@torch.no_grad()
def decoder_max_cosine(a_dec: torch.Tensor, b_dec: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Per row of a, max cosine over rows of b ([n_a] float32, on a's device). Rows of a are taken `chunk`
    at a time so the full [n_a, n_b] similarity matrix never exists."""
    a, b = _unit_rows(a_dec), _unit_rows(b_dec.to(a_dec.device))
    return torch.cat([(a[i:i + chunk] @ b.T).amax(dim=1) for i in range(0, a.shape[0], chunk)]).float()


def _active_pairs(code: Code, slot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(input row, novel slot) of every active novel latent; slot maps a latent to its novel index or -1.
    O(active entries): no [B, n_novel] matrix, which at n = 2^17 with half the latents novel would not fit."""
    if isinstance(code, SparseCode):
        p = slot[code.idx]
        hit = (p >= 0) & (code.vals != 0)
        rows = torch.arange(code.idx.shape[0], device=p.device).unsqueeze(1).expand_as(p)
        return rows[hit], p[hit]
    rows, latents = (code != 0).nonzero(as_tuple=True)
    p = slot[latents]
    return rows[p >= 0], p[p >= 0]


def _vector_mse(xb: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    return (xb.double() - x_hat.double()).pow(2).mean(dim=1)


def _check_d_in(saes: Sequence[SAE]) -> None:
    if len({s.cfg.d_in for s in saes}) > 1:
        shapes = ", ".join(f"n_latents={s.cfg.n_latents}: d_in={s.cfg.d_in}" for s in saes)
        raise DataError(f"SAEs to compare must share d_in (same hook); got {shapes}")


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    return torch.where(den > 0, num / den.clamp_min(1), torch.nan)


@torch.no_grad()
def compare_pair(small: SAE, large: SAE, x: torch.Tensor, threshold: float = 0.7,
                 batch_size: int = 4096) -> PairComparison:
    """Decoder overlap and novel-latent reconstruction errors of two SAEs (order-agnostic) on x [N, d_in]."""
    if small.cfg.n_latents > large.cfg.n_latents:
        small, large = large, small
    _check_d_in([small, large])
    d_in = large.cfg.d_in
    if x.ndim != 2 or x.shape[1] != d_in:
        raise DataError(f"inputs must be [N, d_in={d_in}]; got shape {tuple(x.shape)}")
    device, small_device = large.net.W_dec.device, small.net.W_dec.device
    max_cos_large = decoder_max_cosine(large.net.W_dec, small.net.W_dec)
    max_cos_small = decoder_max_cosine(small.net.W_dec, large.net.W_dec)
    novel = max_cos_large < threshold
    novel_idx = novel.nonzero().squeeze(1)
    slot = torch.full((large.cfg.n_latents,), -1, dtype=torch.long, device=device)
    slot[novel_idx] = torch.arange(len(novel_idx), device=device)

    # Sums over active inputs and over all inputs; inactive = total - active keeps memory at O(n_novel).
    n_active = torch.zeros(len(novel_idx), dtype=torch.float64, device=device)
    active_err = {k: torch.zeros(len(novel_idx), dtype=torch.float64, device=device) for k in ("small", "large")}
    total_err = {k: torch.zeros((), dtype=torch.float64, device=device) for k in ("small", "large")}
    for start in range(0, x.shape[0], batch_size):
        xb, xs = x[start:start + batch_size].to(device), x[start:start + batch_size].to(small_device)
        code, stats = large.encode_code(xb)  # one encode gives both the novel latents and the reconstruction
        err = {"large": _vector_mse(xb, large.decode(code, stats)),
               "small": _vector_mse(xs, small.reconstruct(xs)).to(device)}
        rows, slots = _active_pairs(code, slot)
        n_active.index_add_(0, slots, torch.ones_like(slots, dtype=torch.float64))
        for k in err:
            active_err[k].index_add_(0, slots, err[k][rows])
            total_err[k] += err[k].sum()

    n_inactive = x.shape[0] - n_active
    cols = {"latent": novel_idx.cpu().numpy(), "max_cos": max_cos_large[novel_idx].cpu().numpy(),
            "n_active": n_active.long().cpu().numpy()}
    for k in ("small", "large"):
        cols[f"{k}_mse_active"] = _ratio(active_err[k], n_active).cpu().numpy()
        cols[f"{k}_mse_inactive"] = _ratio(total_err[k] - active_err[k], n_inactive).cpu().numpy()
    per_latent = pd.DataFrame(cols, columns=PER_LATENT_COLUMNS)

    used = per_latent[(per_latent.n_active > 0) & (per_latent.n_active < x.shape[0])]
    novel_frac = float(novel.double().mean())
    summary = {"n_small": small.cfg.n_latents, "n_large": large.cfg.n_latents, "threshold": threshold,
               "novel_frac": novel_frac, "n_novel": len(novel_idx), "n_novel_used": len(used)}
    for k in ("small", "large"):
        act, inact = used[f"{k}_mse_active"].mean(), used[f"{k}_mse_inactive"].mean()
        summary |= {f"{k}_mse_active": float(act), f"{k}_mse_inactive": float(inact),
                    f"{k}_mse_diff": float(act - inact)}
    summary["mean_max_cos"] = float(max_cos_large.double().mean())
    return PairComparison(small.cfg.n_latents, large.cfg.n_latents, threshold, max_cos_large.cpu(),
                            max_cos_small.cpu(), novel.cpu(), novel_frac, per_latent, summary)


def compare_ladder(saes: Sequence[SAE], x: torch.Tensor, threshold: float = 0.7,
                   batch_size: int = 4096) -> pd.DataFrame:
    """One row (compare_pair's summary) per consecutive pair of the SAEs sorted by n_latents."""
    if len(saes) < 2:
        raise DataError(f"a family comparison needs at least 2 SAEs; got {len(saes)}")
    _check_d_in(saes)
    ordered = sorted(saes, key=lambda s: s.cfg.n_latents)
    return pd.DataFrame([compare_pair(a, b, x, threshold, batch_size).summary for a, b in zip(ordered, ordered[1:])])


def compare_saved(paths: Sequence[str | Path], x: torch.Tensor, threshold: float = 0.7,
                  batch_size: int = 4096) -> pd.DataFrame:
    """compare_ladder on SAEs loaded from their saved folders."""
    return compare_ladder([SAE.load(p) for p in paths], x, threshold, batch_size)
