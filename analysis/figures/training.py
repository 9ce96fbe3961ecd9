"""How the runs trained and what they do per layer: training curves, dead latents at the end of training, and
the per-layer metrics of multi-layer SAEs (Lawson et al. 2024)."""
from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib import pyplot as plt
from matplotlib import ticker
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from analysis.figures.data import SkipFigure, at_best_lr, downstream_label, lr_note, ok_runs, one_site
from analysis.figures.scaling_laws import series_vs_n
from analysis.figures.style import (
    NMSE,
    add_legend,
    family_order,
    fmt_value,
    key_label,
    key_symbol,
    log2_axis,
    loglog,
    n_label,
    paper_figure,
    sequential_colors,
    subplots,
    title_with_notes,
)
from analysis.selection import SPARSITY_KEYS, numeric, sparsity_key

MAX_PANELS = 4
LINE_STYLES = ["-", "--", ":", "-."]


def _width_colorbar(fig: Figure, axes, norm: LogNorm, widths: np.ndarray) -> None:
    bar = fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=plt.get_cmap("viridis")), ax=list(axes),
                       label="n_latents", pad=0.01)
    bar.ax.yaxis.set_major_locator(ticker.FixedLocator(widths) if len(widths) <= 10
                                   else ticker.LogLocator(base=2, numticks=8))
    bar.ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: n_label(v)))
    bar.ax.yaxis.set_minor_locator(ticker.NullLocator())


@paper_figure
def fig_curves(curves: pd.DataFrame, runs: pd.DataFrame) -> Figure:
    """Training curves, nmse vs tokens (log-log), colored by n_latents; one panel per architecture (the 4 with
    the most runs); line style per sparsity value when a panel has at most 4 of them."""
    if curves is None or curves.empty:
        raise SkipFigure("no training curves")
    for c in ("run_id", "tokens", "nmse"):
        if c not in curves:
            raise SkipFigure(f"the curves table has no {c} column")
    d, note, _ = one_site(ok_runs(runs, ()))
    c = curves[curves["run_id"].isin(d["run_id"])].copy()
    c["tokens"], c["nmse"] = numeric(c, "tokens"), numeric(c, "nmse")
    c = c[np.isfinite(c["tokens"]) & (c["tokens"] > 0) & np.isfinite(c["nmse"]) & (c["nmse"] > 0)]
    counts = c.groupby("run_id").size()
    d = d[d["run_id"].isin(counts[counts >= 2].index)]
    if d.empty:
        raise SkipFigure("no ok run has a curve with 2 points (tokens > 0, nmse > 0)")
    per_fam = d["family"].value_counts()
    fams = sorted(per_fam.index, key=lambda f: (-per_fam[f], family_order(f)))[:MAX_PANELS]
    fams = sorted(fams, key=family_order)
    lo, hi = d["n_latents"].min(), d["n_latents"].max()
    norm = LogNorm(vmin=lo / 1.5 if lo == hi else lo, vmax=hi * 1.5 if lo == hi else hi)
    cmap = plt.get_cmap("viridis")
    fig, axes = subplots(len(fams), sharey=True)
    for ax, fam in zip(axes, fams):
        rows = d[d["family"] == fam]
        key = sparsity_key(rows)
        values = sorted(rows[key].dropna().unique()) if key else []
        style = dict(zip(values, LINE_STYLES)) if 1 < len(values) <= len(LINE_STYLES) else {}
        for _, run in rows.sort_values(["n_latents", "run_id"]).iterrows():
            pts = c[c["run_id"] == run["run_id"]].sort_values("tokens")
            ax.plot(pts["tokens"], pts["nmse"], color=cmap(norm(run["n_latents"])), lw=1.0,
                    ls=style.get(run[key], "-") if key else "-", gid="curve")
        for v, ls in style.items():
            ax.plot([], [], color="gray", ls=ls, label=key_label(key, v))
        loglog(ax)
        ax.set_xlabel("training tokens")
        ax.set_title(fam)
        add_legend(ax)
    axes[0].set_ylabel(NMSE)
    _width_colorbar(fig, axes, norm, np.unique(d["n_latents"].to_numpy(float)))
    omitted = len(per_fam) - len(fams)
    title_with_notes(fig, "training curves", note, f"{omitted} more architectures not shown" if omitted else "")
    return fig


@paper_figure
def fig_dead(runs: pd.DataFrame) -> Figure:
    """Gao et al. appendix (dead_ratio): fraction of dead latents at the end of training vs n_latents per
    architecture (one series per k where k sets L0; others the mean over their sparsity grid), log x."""
    d, note, _ = one_site(ok_runs(runs, ("dead_frac",), positive=()))
    d, dropped = at_best_lr(d, "nmse") if np.isfinite(numeric(d, "nmse")).all() else (d, 0)
    if d["n_latents"].nunique() < 2:
        raise SkipFigure("needs at least 2 widths n_latents")
    fig, (ax,) = subplots()
    series_vs_n(ax, d, "dead_frac", "mean")
    log2_axis(ax.xaxis, values=d["n_latents"])
    ax.set_ylim(bottom=0)
    ax.set_xlabel("n_latents")
    ax.set_ylabel("dead latents (fraction)")
    title_with_notes(ax, "dead latents vs width", note, lr_note(dropped))
    add_legend(ax)
    return fig


def _run_label(run: pd.Series, vary: list[str]) -> str:
    """What tells this run from the others: n=4096, k=32, seed 1, ..."""
    prefix = {"family": "", "n_latents": "n=", "seed": "seed "}
    return ", ".join(prefix.get(c, key_symbol(c) + "=") + (n_label(run[c]) if c == "n_latents" else fmt_value(run[c]))
                     for c in vary)


@paper_figure
def fig_layers(layers: pd.DataFrame, runs: pd.DataFrame) -> Figure:
    """Lawson et al. Figs. 8-10 (multi-layer SAEs): nmse and the downstream loss of splicing into each layer
    vs layer, one series per run, labelled by what differs between the runs (n_latents, k, ...)."""
    if layers is None or layers.empty:
        raise SkipFigure("no per-layer table (no multi-layer SAE in the sweep)")
    for c in ("run_id", "layer", "nmse"):
        if c not in layers:
            raise SkipFigure(f"the layers table has no {c} column")
    lay = layers.copy()
    for c in ("layer", "nmse", "downstream_loss"):
        lay[c] = numeric(lay, c)
    lay = lay[np.isfinite(lay["layer"]) & np.isfinite(lay["nmse"]) & (lay["nmse"] > 0)]
    try:
        d = ok_runs(runs, ())
        d = d[d["run_id"].isin(lay["run_id"])]
    except SkipFigure:
        d = pd.DataFrame({"run_id": []})
    if d.empty:
        raise SkipFigure("no ok run has per-layer nmse")
    vary = [c for c in ("family", "n_latents", *SPARSITY_KEYS, "seed")
            if c in d and d[c].nunique(dropna=True) > 1] or ["n_latents"]
    panels = [("nmse", NMSE)]
    if lay["downstream_loss"].notna().any():
        panels.append(("downstream_loss", downstream_label(d)))
    d = d.sort_values([c for c in ("n_latents", *SPARSITY_KEYS, "run_id") if c in d])
    fig, axes = subplots(len(panels))
    for (_, run), color in zip(d.iterrows(), sequential_colors(len(d))):
        label = _run_label(run, vary)
        pts = lay[lay["run_id"] == run["run_id"]].sort_values("layer")
        for ax, (y, _) in zip(axes, panels):
            ok = pts[np.isfinite(pts[y])]
            ax.plot(ok["layer"], ok[y], marker="o", color=color, gid="series", label=label)
    for ax, (y, ylabel) in zip(axes, panels):
        if (lay[y].dropna() > 0).all():
            ax.set_yscale("log")
        ax.set_xlabel("layer")
        ax.set_ylabel(ylabel)
        ax.xaxis.get_major_locator().set_params(integer=True)
        add_legend(ax)
    fig.suptitle("multi-layer SAEs: per-layer metrics")
    return fig
