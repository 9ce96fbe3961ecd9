"""Per-latent statistics of the held-out set (Gao et al. 2024, App. E.4): how the latents' densities and
importances are spread, read from the latent_stats.safetensors each run saves beside its SAE."""
from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from analysis.figures.data import SkipFigure, at_best_lr, lr_note, ok_runs, one_site
from analysis.figures.style import (
    add_legend,
    key_label,
    n_label,
    paper_figure,
    sequential_colors,
    subplots,
    title_with_notes,
)
from analysis.results import Sweeps, sae_dir, saes_where
from sae_core.errors import DataError
from sae_core.sae_files import LATENT_STATS_FILE, load_latent_stats

BINS = 40
# (stat, x label): density = the fraction of held-out vectors a latent is active on; importance = E[z_i^2],
# Gao et al.'s approximation of a latent's marginal impact on the MSE
PANELS = (("frequency", "log10 latent density"), ("mean_sq_activation", "log10 latent importance E[z²]"))


def _stats(sweep_dir: Sweeps, rows: pd.DataFrame) -> list[tuple[float, dict]]:
    """(n_latents, its latent stats) of each run whose SAE folder holds a readable stats file."""
    out = []
    for _, run in rows.sort_values(["n_latents", "run_id"]).iterrows():
        path = sae_dir(sweep_dir, str(run["run_id"])) / LATENT_STATS_FILE
        if not path.is_file():
            continue
        try:
            out.append((float(run["n_latents"]), load_latent_stats(path)))
        except DataError:  # a damaged file: that run is left out, as a missing one
            continue
    return out


@paper_figure
def fig_latent_density(sweep_dir: Sweeps, runs: pd.DataFrame) -> Figure:
    """Gao et al. Fig. 19: histograms over latents of log10 density (close to Gaussian) and of log10 E[z²]
    (more like a Laplace distribution), one line per TopK run at the sweep's most common k, colored by width.
    Latents that never fire (density 0) have no log and are left out, counted in the legend; each histogram
    is a fraction of its SAE's latents so widths compare. Where the held-out set is several layers' vectors
    (a multi-layer SAE), a density is over all of them."""
    d, site_note, _ = one_site(ok_runs(runs))
    d, dropped = at_best_lr(d)
    d = d[(d["family"] == "topk") & np.isfinite(d["k"].to_numpy(float))] if "k" in d else d.iloc[:0]
    if d.empty:
        raise SkipFigure("no ok TopK run")
    counts = d["k"].value_counts()
    k = sorted(counts.index, key=lambda v: (-counts[v], v))[0]
    stats = _stats(sweep_dir, d[d["k"] == k])
    if not stats:
        raise SkipFigure(f"no TopK run at {key_label('k', k)} has {LATENT_STATS_FILE} under {saes_where(sweep_dir)}")
    widths = sorted({n for n, _ in stats})
    colors = dict(zip(widths, sequential_colors(len(widths))))
    fig, axes = subplots(2)
    for ax, (name, xlabel) in zip(axes, PANELS):
        values = [(n, s[name].double().numpy()) for n, s in stats if name in s]  # an older file has no E[z²]
        logs = [np.log10(v[v > 0]) for _, v in values]
        if not any(len(lv) for lv in logs):
            ax.text(0.5, 0.5, f"no run saved {name}", ha="center", va="center", transform=ax.transAxes)
        else:
            both = np.concatenate(logs)
            lo, hi = float(both.min()), float(both.max())
            bins = np.linspace(lo - 0.5, hi + 0.5, BINS + 1) if lo == hi else np.linspace(lo, hi, BINS + 1)
            labelled = set()
            for (n, v), lv in zip(values, logs):
                dead = len(v) - len(lv)
                label = None if n in labelled else f"n={n_label(n)}" + (f" ({dead} never fire)" if dead else "")
                labelled.add(n)
                _, _, patches = ax.hist(lv, bins=bins, weights=np.full(len(lv), 1 / len(v)), histtype="step",
                                        color=colors[n], lw=1.4, label=label)
                for p in patches:
                    p.set_gid("hist")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("fraction of latents")
        add_legend(ax, loc="best", frameon=True, framealpha=0.85, edgecolor="none")
    title_with_notes(fig, f"Latent density and importance, TopK {key_label('k', k)}", site_note, lr_note(dropped))
    return fig
