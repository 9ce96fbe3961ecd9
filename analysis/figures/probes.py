"""Probe loss (Gao et al. 2024, §4.2, Fig. 7a and the ReLU-vs-TopK probe figure of its appendix): how well the
single best latent of an SAE predicts binary tasks, against width and against L0, with the residual stream's
own best coordinate as the baseline (the runs' probe_loss and probe_loss_baseline:
sae_core.evaluation.probe, docs/metrics.md)."""
from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from analysis.figures.data import SkipFigure, at_best_lr, lr_note, ok_runs, one_site
from analysis.figures.scaling_laws import series_vs_n
from analysis.figures.style import (
    add_legend,
    arch_color,
    arch_marker,
    family_order,
    fmt_value,
    log2_axis,
    paper_figure,
    subplots,
    title_with_notes,
)
from analysis.selection import numeric


@paper_figure
def fig_probe(runs: pd.DataFrame) -> Figure:
    """(a) probe loss vs n_latents: one series per k for the families whose L0 is set by k, the others their
    best per width over their sparsity grid; (b) probe loss vs L0, every run of each family (its
    sparsity setting and width varying along it). Both: the baseline (the best single coordinate of the SAE's
    normalised input, the same for every run of a site) as a dashed grey line; lower is better."""
    if runs is None or runs.empty or "probe_loss" not in runs or numeric(runs, "probe_loss").isna().all():
        raise SkipFigure("no run has probe_loss (eval.probe off, or no model to probe)")
    d, note, _ = one_site(ok_runs(runs, ("probe_loss", "l0")))
    d, dropped = at_best_lr(d, "nmse")
    base = numeric(d, "probe_loss_baseline").dropna()
    fig, (ax, ax2) = subplots(2)
    if d["n_latents"].nunique() >= 2:
        series_vs_n(ax, d, "probe_loss", "min")
        log2_axis(ax.xaxis, values=d["n_latents"])
    else:
        ax.text(0.5, 0.5, "one width only", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("n_latents")
    for fam in sorted(d["family"].unique(), key=family_order):
        rows = d[d["family"] == fam].sort_values("l0")
        ax2.plot(rows["l0"].to_numpy(float), rows["probe_loss"].to_numpy(float), ls="none", color=arch_color(fam),
                 marker=arch_marker(fam), gid="points", label=fam)
    log2_axis(ax2.xaxis, fmt_value)  # powers of 2: measured L0s crowd each other
    ax2.set_xlabel("L0 (active latents per token)")
    for a in (ax, ax2):
        if len(base):
            a.axhline(float(np.mean(base)), color="grey", ls="--", lw=1, gid="baseline",
                      label="baseline: best input coordinate")
        a.set_ylabel("probe loss (nats, mean over tasks)")
        add_legend(a)
    title_with_notes(fig, "probe loss (lower: a single latent predicts the tasks better)", note, lr_note(dropped))
    return fig
