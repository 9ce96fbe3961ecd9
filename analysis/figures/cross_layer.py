"""Multi-layer SAEs across layers (after Lawson et al. 2024, "Residual stream analysis with multi-layer SAEs"):
how many layers each latent is active at, which layers the latents peaking at a layer also use, and how alike
the residual streams of adjacent layers are. Read from the per-run tables layer_spread, layer_profile and
adjacent_cosine (sae_core.evaluation.cross_layer; definitions in docs/metrics.md)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from analysis.figures.data import SkipFigure, ok_runs
from analysis.figures.style import add_legend, fmt_value, n_label, paper_figure, sequential_colors, subplots
from analysis.results import load_table
from analysis.selection import SPARSITY_KEYS, numeric

NO_MULTI_LAYER = "no multi-layer SAE in the sweep"


def _multi_layer_runs(sweep_dir: str | Path, runs: pd.DataFrame, table: str,
                      need: tuple[str, ...]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The ok runs that have rows in `table` (sorted by width, then sparsity), and those rows."""
    rows = load_table(sweep_dir, table)
    if rows is None or rows.empty:
        raise SkipFigure(f"no {table} table ({NO_MULTI_LAYER})")
    missing = [c for c in ("run_id", *need) if c not in rows]
    if missing:
        raise SkipFigure(f"the {table} table has no {', '.join(missing)} column")
    rows = rows.copy()
    for c in need:
        rows[c] = numeric(rows, c)
    d = ok_runs(runs, ())
    d = d[d["run_id"].isin(rows["run_id"])]
    if d.empty:
        raise SkipFigure(f"no ok run has a {table} table ({NO_MULTI_LAYER})")
    d = d.sort_values([c for c in ("n_latents", *SPARSITY_KEYS, "run_id") if c in d])
    return d, rows[rows["run_id"].isin(d["run_id"])]


def _label(run: pd.Series, d: pd.DataFrame) -> str:
    vary = [c for c in ("n_latents", *SPARSITY_KEYS, "seed") if c in d and d[c].nunique(dropna=True) > 1]
    vary = vary or ["n_latents"]
    return ", ".join(("n=" + n_label(run[c])) if c == "n_latents" else f"{c}={fmt_value(run[c])}" for c in vary)


@paper_figure
def fig_layer_spread(sweep_dir: str | Path, runs: pd.DataFrame) -> Figure:
    """Left: the fraction of live latents active at 1, 2, ..., L layers, one line per multi-layer run (colour =
    width). Right: the largest run's peak-layer profile matrix: row = the layer where a latent's activation
    mass peaks, column = layer, colour = the mean share of those latents' mass at that layer."""
    d, spread = _multi_layer_runs(sweep_dir, runs, "layer_spread", ("n_layers", "frac"))
    fig, (ax, heat) = subplots(2)
    for (_, run), color in zip(d.iterrows(), sequential_colors(len(d))):
        pts = spread[spread["run_id"] == run["run_id"]].sort_values("n_layers")
        pts = pts[np.isfinite(pts["frac"])]
        ax.plot(pts["n_layers"], pts["frac"], marker="o", color=color, gid="series", label=_label(run, d))
    ax.set_xlabel("layers a latent is active at")
    ax.set_ylabel("fraction of live latents")
    ax.xaxis.get_major_locator().set_params(integer=True)
    add_legend(ax)
    largest = d.iloc[-1]
    try:
        _, profile = _multi_layer_runs(sweep_dir, d[d["run_id"] == largest["run_id"]], "layer_profile",
                                       ("peak_layer", "layer", "mass"))
    except SkipFigure:
        profile = pd.DataFrame()
    if profile.empty:
        heat.set_axis_off()
        heat.set_title("no layer_profile table")
    else:
        matrix = profile.pivot_table(index="peak_layer", columns="layer", values="mass", dropna=False)
        image = heat.imshow(matrix.to_numpy(float), origin="lower", cmap="viridis", vmin=0, vmax=1,
                            aspect="auto", gid="profile")
        heat.set_xticks(range(matrix.shape[1]), [str(int(v)) for v in matrix.columns])
        heat.set_yticks(range(matrix.shape[0]), [str(int(v)) for v in matrix.index])
        heat.grid(False)  # the style's grid would cut through the cells
        heat.set_xlabel("layer")
        heat.set_ylabel("peak layer of the latent")
        heat.set_title(f"mean layer profile, n={n_label(largest['n_latents'])}")
        fig.colorbar(image, ax=heat, label="share of activation mass")
    fig.suptitle("multi-layer SAEs: how many layers a latent is active at")
    return fig


@paper_figure
def fig_adjacent_cosine(sweep_dir: str | Path, runs: pd.DataFrame) -> Figure:
    """The mean over held-out tokens of cos(x_l, x_next) of the residual streams of adjacent hooked layers,
    vs l. A property of the activations, not of the SAE: runs on the same held-out set give the same line,
    so one line per distinct held-out set is drawn (runs that agree to 1e-9 are merged)."""
    d, cos = _multi_layer_runs(sweep_dir, runs, "adjacent_cosine", ("layer", "cosine"))
    fig, axes = subplots(1)
    ax = axes[0]
    drawn: list[np.ndarray] = []
    for (_, run), color in zip(d.iterrows(), sequential_colors(len(d))):
        pts = cos[cos["run_id"] == run["run_id"]].sort_values("layer")
        pts = pts[np.isfinite(pts["cosine"])]
        values = pts[["layer", "cosine"]].to_numpy(float)
        if pts.empty or any(v.shape == values.shape and np.allclose(v, values, rtol=0, atol=1e-9) for v in drawn):
            continue
        drawn.append(values)
        ax.plot(pts["layer"], pts["cosine"], marker="o", color=color, gid="series",
                label=_label(run, d) if len(d) > 1 else None)
    if not drawn:
        raise SkipFigure("no finite adjacent-layer cosine")
    ax.set_xlabel("layer l (vs the next hooked layer)")
    ax.set_ylabel("mean cos(x_l, x_next)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    if len(drawn) > 1:
        add_legend(ax)
    ax.set_title("residual stream: adjacent-layer cosine similarity")
    return fig
