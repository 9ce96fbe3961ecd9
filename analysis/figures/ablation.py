"""Sparsity of ablation effects (Gao et al. 2024, §4.5, Fig. 7 style): how concentrated the change of the model's
outputs is when one latent is ablated at one position, per architecture family against L0, beside the same for
ablating a residual-stream channel (the runs' ablation_sparsity columns: sae_core.evaluation.ablation,
docs/metrics.md)."""
from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from analysis.figures.data import SkipFigure, at_best_lr, lr_note, ok_runs, one_site, pick_n
from analysis.figures.style import (
    add_legend,
    arch_color,
    arch_marker,
    family_order,
    fmt_value,
    log2_axis,
    n_label,
    paper_figure,
    subplots,
    title_with_notes,
)
from analysis.selection import numeric


@paper_figure
def fig_ablation_sparsity(runs: pd.DataFrame) -> Figure:
    """Ablation sparsity ((‖v‖₁/‖v‖₂)² / size of v; lower: sparser) vs L0 per architecture at one width, as
    fig_frontier picks it, with error bars of ± one standard error of the subsample (seeds at one L0 averaged,
    their errors combined); the residual-channel baseline as a line at its mean over the runs shown and a band
    over their range."""
    if runs is None or runs.empty or "ablation_sparsity" not in runs \
            or numeric(runs, "ablation_sparsity").isna().all():
        raise SkipFigure("no run has ablation_sparsity (eval.ablation off, or runs recorded before it)")
    d, note, _ = one_site(ok_runs(runs, ("l0", "ablation_sparsity")))
    d, dropped = at_best_lr(d)
    d, n = pick_n(d, "l0", "ablation_sparsity")
    d = d.assign(se_sq=numeric(d, "ablation_sparsity_se") ** 2 if "ablation_sparsity_se" in d else np.nan,
                 baseline=numeric(d, "ablation_sparsity_baseline") if "ablation_sparsity_baseline" in d else np.nan)
    fig, (ax,) = subplots()
    for fam in sorted(d["family"].unique(), key=family_order):
        g = d[d["family"] == fam].groupby("l0")
        rows = g[["ablation_sparsity"]].mean().assign(se=np.sqrt(g["se_sq"].sum(min_count=1)) / g.size())
        ax.errorbar(rows.index.to_numpy(float), rows["ablation_sparsity"], yerr=rows["se"].to_numpy(float),
                    color=arch_color(fam), marker=arch_marker(fam), capsize=3, gid="points", label=fam)
    base = d["baseline"].to_numpy(float)
    base = base[np.isfinite(base)]
    if len(base):
        ax.axhline(base.mean(), color="grey", ls="--", gid="baseline", label="residual channels (baseline)")
        ax.axhspan(base.min(), base.max(), color="grey", alpha=0.15, lw=0, gid="baseline_band")
    ax.set_yscale("log")
    ax.set_ylabel("ablation sparsity (lower: sparser)")
    log2_axis(ax.xaxis, fmt_value)
    ax.set_xlabel("L0 (active latents per token)")
    add_legend(ax)
    title_with_notes(fig, "sparsity of ablation effects" + ("" if n is None else f", n = {n_label(n)}"), note,
                     lr_note(dropped))
    return fig
