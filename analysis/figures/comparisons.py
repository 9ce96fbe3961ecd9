"""Architecture families compared (Gao et al. 2024 §4-5): the sparsity frontier at one width, the downstream
loss of splicing the reconstruction into the model, and progressive recovery under a test-time activation."""
from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib import pyplot as plt
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from analysis.figures.data import (
    SkipFigure,
    at_best_lr,
    downstream_label,
    lr_note,
    ok_runs,
    one_site,
    pareto,
    pick_n,
    styled_series,
)
from analysis.figures.scaling_laws import series_vs_n
from analysis.figures.style import (
    NMSE,
    add_legend,
    arch_color,
    arch_marker,
    family_order,
    fmt_value,
    key_label,
    log2_axis,
    n_label,
    paper_figure,
    subplots,
    title_with_notes,
)
from analysis.selection import numeric

MAX_RECOVERY_RUNS = 6


def _frontiers(ax, d: pd.DataFrame, y: str) -> None:
    """Per architecture, its runs' (L0, y) and their Pareto frontier (the lower envelope)."""
    for fam in sorted(d["family"].unique(), key=family_order):
        rows = d[d["family"] == fam]
        color = arch_color(fam)
        ax.plot(rows["l0"], rows[y], ls="none", marker=arch_marker(fam), color=color, alpha=0.5, gid="points")
        if rows["l0"].nunique() >= 2:
            x, v = pareto(rows["l0"].to_numpy(float), rows[y].to_numpy(float))
            ax.plot(x, v, color=color, marker=arch_marker(fam), gid="frontier", label=fam)
        else:
            ax.lines[-1].set_label(f"{fam} (one L0)")
    log2_axis(ax.xaxis, fmt_value)


@paper_figure
def fig_frontier(runs: pd.DataFrame) -> Figure:
    """Gao et al. Fig. 2a: nmse vs L0 per architecture at one width (the n with the most architectures
    measured at >= 2 L0), each architecture's points and its Pareto frontier (lower envelope), log-log."""
    d, note, _ = one_site(ok_runs(runs, ("nmse", "l0")))
    d, dropped = at_best_lr(d)
    d, n = pick_n(d, "l0", "nmse")
    if n is None:
        raise SkipFigure("needs an architecture with at least 2 runs of different L0 at the same n_latents")
    fig, (ax,) = subplots()
    _frontiers(ax, d, "nmse")
    ax.set_yscale("log")
    ax.set_xlabel("L0 (active latents per token)")
    ax.set_ylabel(NMSE)
    title_with_notes(ax, f"sparsity frontier, n = {n_label(n)}", note, lr_note(dropped))
    add_legend(ax)
    return fig


@paper_figure
def fig_downstream(runs: pd.DataFrame) -> Figure:
    """Gao et al. ΔCE figure: the downstream loss of splicing the reconstruction into the model (ΔCE for an
    LM, 1 − cos of the pooled embedding for an encoder) (a) vs L0 per architecture at one width, with each
    architecture's lower envelope; (b) vs n_latents, one series per k where k sets L0, others their best per n."""
    if (runs is not None and not runs.empty and "downstream_loss" in runs
            and numeric(runs, "downstream_loss").isna().all()):
        # the finished runs' reason first: a stopped or failed run's says only that it did not finish
        ranked = runs.sort_values("status", key=lambda s: s.astype(str) != "ok") if "status" in runs else runs
        reasons = ranked["downstream_null_reason"].dropna().unique() if "downstream_null_reason" in runs else []
        raise SkipFigure("downstream_loss is null for every run" + (f": {reasons[0]}" if len(reasons) else ""))
    d, note, _ = one_site(ok_runs(runs, ("downstream_loss",), positive=()))
    d, dropped = at_best_lr(d, "downstream_loss")
    ylabel = downstream_label(d)
    fig, axes = subplots(2)
    ax = axes[0]
    left, n = pick_n(d[np.isfinite(d["l0"]) & (d["l0"] > 0)] if "l0" in d else d.iloc[:0], "l0", "downstream_loss")
    _frontiers(ax, left, "downstream_loss")
    ax.set_xlabel("L0")
    ax.set_ylabel(ylabel)
    ax.set_title("vs L0" + ("" if n is None else f", n = {n_label(n)}"))
    ax = axes[1]
    series_vs_n(ax, d, "downstream_loss", "min")
    log2_axis(ax.xaxis, values=d["n_latents"])
    ax.set_xlabel("n_latents")
    ax.set_ylabel(ylabel)
    ax.set_title("vs width")
    if (d["downstream_loss"] > 0).all():
        for ax in axes:
            ax.set_yscale("log")
    for ax in axes:
        add_legend(ax)
    title_with_notes(fig, "downstream loss", note, lr_note(dropped))
    return fig


# ---------------------------------------------------------------- progressive recovery

def _recovery_points(recovery: pd.DataFrame) -> tuple[pd.DataFrame, set]:
    """The recovery table's points with L0 > 0 and nmse > 0, and the runs that have at least 2 of them."""
    if recovery is None or recovery.empty:
        raise SkipFigure("no progressive-recovery table (eval.recovery off, or no run finished)")
    for c in ("run_id", "activation", "l0", "nmse"):
        if c not in recovery:
            raise SkipFigure(f"the recovery table has no {c} column")
    rec = recovery.copy()
    for c in ("l0", "nmse", "downstream_loss"):
        rec[c] = numeric(rec, c)
    rec = rec[np.isfinite(rec["l0"]) & (rec["l0"] > 0) & np.isfinite(rec["nmse"]) & (rec["nmse"] > 0)]
    counts = rec.groupby("run_id").size()
    ids = set(counts[counts >= 2].index)
    if not ids:
        raise SkipFigure("no run has 2 recovery points with L0 > 0 and nmse > 0")
    return rec, ids


def _recovery_runs(runs: pd.DataFrame, ids: set) -> list[tuple[dict | None, pd.Series]]:
    """At most MAX_RECOVERY_RUNS (series, run) pairs: the widest run of each series, evenly thinned; without an
    ok runs table, the first runs of the recovery table (series None)."""
    try:
        d = ok_runs(runs, ("nmse",))
    except SkipFigure:
        d = pd.DataFrame({"run_id": sorted(ids)})
    d = d[d["run_id"].isin(ids)]
    if d.empty:
        raise SkipFigure("the runs with recovery points have no ok row in the runs table")
    if "family" not in d:
        return [(None, row) for _, row in d.head(MAX_RECOVERY_RUNS).iterrows()]
    chosen = [(g, g["rows"].sort_values(["n_latents", "run_id"]).iloc[-1]) for g in styled_series(d)]
    if len(chosen) > MAX_RECOVERY_RUNS:
        chosen = [chosen[int(i)] for i in np.unique(np.linspace(0, len(chosen) - 1, MAX_RECOVERY_RUNS).round())]
    return chosen


@paper_figure
def fig_recovery(recovery: pd.DataFrame, runs: pd.DataFrame) -> Figure:
    """Gao et al. Fig. 10 (progressive recovery): nmse vs test-time L0 when the activation is swapped for
    TopK(k') (solid) or JumpReLU(θ) (dashed), one color per run, the run's trained (L0, nmse) marked. At most
    6 runs: the widest of each (architecture, sparsity value). A second panel for the downstream loss when
    the recovery table has it."""
    rec, ids = _recovery_points(recovery)
    chosen = _recovery_runs(runs, ids)
    panels = [("nmse", NMSE)]
    chosen_ids = [row["run_id"] for _, row in chosen]
    if rec[rec["run_id"].isin(chosen_ids)]["downstream_loss"].notna().any():
        panels.append(("downstream_loss", downstream_label(runs if runs is not None else rec)))
    fig, axes = subplots(len(panels))
    tab = [plt.get_cmap("tab10")(i) for i in range(10)]
    for i, (g, row) in enumerate(chosen):
        color = tab[i % 10] if g is None else g["color"]  # the run's series color, as in the other figures
        mine = rec[rec["run_id"] == row["run_id"]]
        label = row["run_id"] if g is None else (
            f"{g['family']} n={n_label(row['n_latents'])}" + ("" if g["key"] is None else
                                                              f" {key_label(g['key'], g['value'])}"))
        for ax, (y, _) in zip(axes, panels):
            for act, ls, lab in (("topk", "-", label), ("jumprelu", "--", "_nolegend_")):
                pts = mine[(mine["activation"] == act) & np.isfinite(mine[y])].sort_values("l0")
                if not pts.empty:
                    ax.plot(pts["l0"], pts[y], ls=ls, color=color, gid=act, label=lab if y == "nmse" else "_nolegend_")
            trained = float(row.get(y, np.nan)) if y in row else np.nan
            if np.isfinite(trained) and np.isfinite(float(row.get("l0", np.nan))):
                ax.plot([row["l0"]], [trained], ls="none", marker="o", ms=6, mfc="white", mec=color,
                        mew=1.5, gid="trained")
    for ax, (y, ylabel) in zip(axes, panels):
        log2_axis(ax.xaxis, fmt_value)
        if y == "nmse" or bool((rec[y].dropna() > 0).all()):
            ax.set_yscale("log")
        ax.set_xlabel("test-time L0")
        ax.set_ylabel(ylabel)
    handles, labels = axes[0].get_legend_handles_labels()
    handles += [Line2D([], [], color="black", ls="-"), Line2D([], [], color="black", ls="--"),
                Line2D([], [], color="black", ls="none", marker="o", mfc="white")]
    labels += ["TopK(k′)", "JumpReLU(θ)", "as trained"]
    axes[0].legend(handles, labels)
    axes[0].set_title("progressive recovery")
    return fig
