"""Multi-layer SAEs across layers (after Lawson et al. 2024, "Residual stream analysis with multi-layer SAEs"):
how many layers each latent is active at, which layers the latents peaking at a layer also use, and how alike
the residual streams of adjacent layers are. Read from the per-run tables layer_spread, layer_profile and
adjacent_cosine (sae_core.evaluation.cross_layer; definitions in docs/metrics.md)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from analysis.figures.data import SkipFigure, at_best_lr, downstream_label, ok_runs
from analysis.figures.style import NMSE, add_legend, fmt_value, n_label, paper_figure, sequential_colors, subplots
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


def _counterparts(d: pd.DataFrame, multi: pd.Series, n_layers: int) -> pd.DataFrame:
    """The per-layer runs trained beside a multi-layer run by hook.multi_layer `both`: same family, sparsity,
    seed and model, 1/L of its latents, one per layer."""
    same = d["layer"].notna() & d["family"].eq(multi["family"]) & d["n_latents"].eq(round(multi["n_latents"] / n_layers))
    for c in ("model", "seed", *SPARSITY_KEYS):
        if c in d and pd.notna(multi.get(c)):
            same &= d[c].eq(multi[c])
    return d[same].sort_values("layer").drop_duplicates("layer")


@paper_figure
def fig_multi_vs_per_layer(layers: pd.DataFrame, runs: pd.DataFrame) -> Figure:
    """Lawson et al. 2024's comparison at equal total latents: per layer, the nmse (and the downstream loss of
    splicing at that layer, where measured) of one multi-layer SAE with n latents (solid) and of the L per-layer
    SAEs of n / L latents trained beside it on the same vectors (dashed; hook.multi_layer `both`), one colour per
    pair; the legend gives each side's mean over layers."""
    if layers is None or layers.empty or "run_id" not in layers:
        raise SkipFigure(f"no per-layer table ({NO_MULTI_LAYER})")
    d = ok_runs(runs, ("nmse",))
    d, _ = at_best_lr(d)
    d["layer"] = numeric(d, "layer")
    lay = layers.copy()
    for c in ("layer", "nmse", "downstream_loss"):
        lay[c] = numeric(lay, c)
    pairs = []
    for _, multi in d[d["layer"].isna() & d["run_id"].isin(lay["run_id"])].sort_values("n_latents").iterrows():
        mine = lay[lay["run_id"] == multi["run_id"]].sort_values("layer")
        per = _counterparts(d, multi, len(mine))
        if len(per) == len(mine) and set(per["layer"]) == set(mine["layer"]):
            pairs.append((multi, mine, per))
    if not pairs:
        raise SkipFigure("no multi-layer SAE has per-layer SAEs of 1/L its latents beside it (hook.multi_layer: both)")
    panels = [("nmse", NMSE)]
    if all(p[1]["downstream_loss"].notna().all() and p[2]["downstream_loss"].notna().all() for p in pairs):
        panels.append(("downstream_loss", downstream_label(d)))
    fig, axes = subplots(len(panels))
    for (multi, mine, per), color in zip(pairs, sequential_colors(len(pairs))):
        n, n_layers = multi["n_latents"], len(mine)
        # every panel's mean over layers (nmse, downstream) in the one legend
        multi_mean, per_mean = (", ".join(f"{y.split('_')[0]} {side[y].mean():.3g}" for y, _ in panels)
                                for side in (mine, per))
        for ax, (y, _) in zip(axes, panels):
            ax.plot(mine["layer"], mine[y], marker="o", color=color, gid="multi_layer",
                    label=f"one SAE over {n_layers} layers, n={n_label(n)} (mean {multi_mean})")
            ax.plot(per["layer"], per[y], marker="s", ls="--", color=color, gid="per_layer",
                    label=f"{n_layers} SAEs, n={n_label(n / n_layers)} each (mean {per_mean})")
    for ax, (_, ylabel) in zip(axes, panels):
        ax.set_xlabel("layer")
        ax.set_ylabel(ylabel)
        ax.xaxis.get_major_locator().set_params(integer=True)
    add_legend(axes[0], outside=True)  # the panels draw the same series: one legend, with every panel's means
    fig.suptitle("multi-layer vs per-layer SAEs at equal total latents")
    return fig
