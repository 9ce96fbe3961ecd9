"""Activation shrinkage and refinement (Gao et al. 2024, §5.1, Fig. 9): how much each architecture family's
reconstruction improves when its active latents' values are re-fitted with the decoder frozen, and how shrunk
its activations are (the runs' refined_nmse, shrinkage: sae_core.evaluation.refinement, docs/metrics.md)."""
from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from analysis.figures.data import SkipFigure, at_best_lr, lr_note, ok_runs, one_site, pick_n
from analysis.figures.style import (
    NMSE,
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
def fig_shrinkage(runs: pd.DataFrame) -> Figure:
    """(a) nmse (solid) and refined nmse (dashed) vs L0 per architecture at one width, as fig_frontier picks it
    (the n with the most architectures at >= 2 L0): the gap refinement closes, larger for L1 families;
    (b) the shrinkage factor vs L0 per architecture (1: unshrunk; the L1 penalty's shrinkage pulls it below 1).
    Seeds at one L0 are averaged."""
    if runs is None or runs.empty or "refined_nmse" not in runs or numeric(runs, "refined_nmse").isna().all():
        raise SkipFigure("no run has refined_nmse (eval.refinement off, or runs recorded before it)")
    d, note, _ = one_site(ok_runs(runs, ("nmse", "l0", "refined_nmse")))
    d, dropped = at_best_lr(d)
    d, n = pick_n(d, "l0", "nmse")
    d = d.assign(shrinkage=numeric(d, "shrinkage") if "shrinkage" in d else np.nan)
    fig, (ax, ax2) = subplots(2)
    for fam in sorted(d["family"].unique(), key=family_order):
        rows = d[d["family"] == fam].groupby("l0")[["nmse", "refined_nmse", "shrinkage"]].mean().sort_index()
        style = {"color": arch_color(fam), "marker": arch_marker(fam)}
        l0 = rows.index.to_numpy(float)
        ax.plot(l0, rows["nmse"], ls="-", gid="nmse", label=fam, **style)
        ax.plot(l0, rows["refined_nmse"], ls="--", mfc="white", gid="refined", **style)
        shrink = rows["shrinkage"].to_numpy(float)
        ok = np.isfinite(shrink)
        if ok.any():
            ax2.plot(l0[ok], shrink[ok], ls="-", gid="shrinkage", label=fam, **style)
    ax.set_yscale("log")
    ax.set_ylabel(NMSE)
    ax.set_title("nmse: original (solid), refined (dashed)")
    ax2.axhline(1.0, color="grey", lw=0.8, ls=":", gid="reference")
    ax2.set_ylabel("shrinkage (slope of original on refined)")
    ax2.set_title("shrinkage (1: none)")
    for a in (ax, ax2):
        log2_axis(a.xaxis, fmt_value)
        a.set_xlabel("L0 (active latents per token)")
        add_legend(a)
    handles, labels = ax.get_legend_handles_labels()
    ax.legend(handles + [Line2D([], [], color="black", ls="-"), Line2D([], [], color="black", ls="--")],
              labels + ["original", "refined"])
    title_with_notes(fig, "activation refinement" + ("" if n is None else f", n = {n_label(n)}"), note,
                     lr_note(dropped))
    return fig
