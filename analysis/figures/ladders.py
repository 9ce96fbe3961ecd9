"""Width ladders (the "SAE families" of Leask et al. 2025): how much of a wider SAE's dictionary is new, read
from the decoders of SAEs that differ only in width."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from analysis.figures.data import SkipFigure
from analysis.figures.style import add_legend, key_label, n_label, paper_figure, sequential_colors, subplots
from analysis.results import Sweeps, sae_dir, saes_where
from analysis.selection import width_ladders
from sae_core.errors import DataError
from sae_core.evaluation.width_ladder import decoder_max_cosine
from sae_core.sae import SAE

THRESHOLD = 0.7  # Leask et al.: a latent of the larger SAE with max cosine below it is novel
MAX_LADDERS = 6


def _ladder_panels(sweep_dir: Sweeps, ladders: list[tuple[dict, pd.DataFrame]]) -> tuple[list, int]:
    """Per ladder with two loadable SAEs of the same d_in: its title and, per pair of consecutive widths, (small
    n, large n, each large latent's max cosine to the small SAE's); and how many SAE folders failed to load."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    panels, missing = [], 0
    for named, rows in ladders:
        decs = []
        for _, run in rows.iterrows():
            try:
                sae = SAE.load(sae_dir(sweep_dir, str(run["run_id"])), device=device)
                decs.append((int(run["n_latents"]), sae.net.W_dec.detach()))
            except DataError:
                missing += 1
        pairs = [(ns, nl, decoder_max_cosine(large, small).cpu().numpy())
                 for (ns, small), (nl, large) in zip(decs, decs[1:]) if small.shape[1] == large.shape[1]]
        if pairs:
            title = ", ".join(key_label(k, v) if k != "arch" else str(v)
                              for k, v in named.items() if v is not None and not pd.isna(v))
            panels.append((title, pairs))
    return panels, missing


@paper_figure
def fig_width_ladder(sweep_dir: Sweeps, runs: pd.DataFrame) -> Figure:
    """Leask et al. Fig. 7: for each width ladder (analysis.selection.width_ladders: SAEs of the same arch,
    sparsity, layer and seed, each at its best lr, differing in width) and each pair of consecutive widths,
    the histogram over the larger SAE's latents of their max decoder cosine to the smaller SAE's latents;
    latents left of the 0.7 line are novel. No activations needed: the decoders come from
    results/<sweep>/saes/<run_id>."""
    ladders = width_ladders(runs) if runs is not None and not runs.empty else []
    if not ladders:
        raise SkipFigure("no two ok SAEs differ only in n_latents (same architecture, sparsity, layer and seed)")
    panels, missing = _ladder_panels(sweep_dir, ladders)
    if not panels:
        raise SkipFigure("no family has two loadable SAEs with the same d_in"
                         + (f" ({missing} SAE folders missing under {saes_where(sweep_dir)})" if missing else ""))
    shown = panels[:MAX_LADDERS]
    ncols = min(3, len(shown))
    fig, axes = subplots(ncols, math.ceil(len(shown) / ncols), sharex=True)
    for ax, (title, pairs) in zip(axes, shown):
        lo = min(0.0, min(float(mc.min()) for _, _, mc in pairs))
        bins = np.linspace(lo, 1.0, 41)
        for (ns, nl, mc), color in zip(pairs, sequential_colors(len(pairs))):
            novel = float((mc < THRESHOLD).mean())
            _, _, patches = ax.hist(mc, bins=bins, weights=np.full(len(mc), 1 / len(mc)), histtype="step",
                                    color=color, lw=1.4, label=f"{n_label(ns)} → {n_label(nl)}: {novel:.0%} novel")
            for p in patches:
                p.set_gid("hist")
        ax.axvline(THRESHOLD, color="black", ls="--", lw=1, gid="threshold", label=f"threshold {THRESHOLD}")
        ax.set_title(title)
        ax.set_xlabel("max cosine to the smaller SAE's latents")
        ax.set_ylabel("fraction of the larger SAE's latents")
        add_legend(ax, loc="best", frameon=True, framealpha=0.85, edgecolor="none")
    for ax in axes[len(shown):]:
        ax.set_visible(False)
    more = len(panels) - len(shown)
    fig.suptitle("SAE families: decoder overlap of consecutive widths"
                 + (f" ({more} more families not shown)" if more else ""))
    return fig
