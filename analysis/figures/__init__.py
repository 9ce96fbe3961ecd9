"""The figures of a sweep, in the style of the papers it reproduces (Gao et al. 2024 §6, Lawson et al. 2024,
Leask et al. 2025). One function per figure; each takes the tables it needs (analysis.results) and returns a
matplotlib Figure, or raises SkipFigure with a one-line reason when the data do not support it.

    paths = render_all("results/my-sweep")     # every figure the data support -> results/my-sweep/figures/
    fig = fig_frontier(load_runs("results/my-sweep"))

The modules: style (look, colors, axes, labels, saving), data (which rows and laws a figure draws), and the
figures by what they show: scaling_laws, comparisons (of architecture families), training (curves, dead
latents, layers), ladders (width ladders), latents (per-latent density and importance), cross_layer
(multi-layer SAEs across layers), shrinkage (activation refinement, Gao et al. 2024, §5.1, Fig. 9), probes
(probe loss, §4.2), ablation (sparsity of ablation effects, Gao et al. 2024, §4.5).

Conventions shared by every figure:
- runs with status "ok" only (curves: every run that has a runs row);
- the runs shown and the laws drawn are those of `sae-scaling fit` (analysis.selection, analysis.sweep_fits):
  where a sweep also varies the learning rate, each configuration at its best lr (lowest mean nmse over
  seeds), seeds kept as separate points; every legend's formula is the fit in fits.json;
- where a sweep reads several sites (hook, layer), a figure that compares widths or architectures shows the
  site with the most runs and says so in its title;
- series: one per value of the family's sparsity key (`Architecture.sparsity_keys`: k for the TopK family,
  l1_coeff for the L1 family, target_l0 / l0_coeff for jumprelu) where swept; the families whose L0 is set by
  k (`Architecture.l0_set_by_k`) get the joint L(n, k) and a series per k where others get their best per
  width; ProLU's two gradients are two families (prolu-ste, prolu-relu) when the sweep has the `gradient`
  column;
- artists carry a gid ("points", "fit", "frontier", "curve", "series", ...) so tests and callers can find them.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot is first imported (here or by the submodules): figures are only written

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from analysis.figures.ablation import fig_ablation_sparsity  # noqa: E402
from analysis.figures.comparisons import fig_downstream, fig_frontier, fig_recovery  # noqa: E402
from analysis.figures.cross_layer import fig_adjacent_cosine, fig_layer_spread, fig_multi_vs_per_layer  # noqa: E402
from analysis.figures.data import Fits, SkipFigure  # noqa: E402
from analysis.figures.ladders import fig_width_ladder  # noqa: E402
from analysis.figures.latents import fig_latent_density  # noqa: E402
from analysis.figures.probes import fig_probe  # noqa: E402
from analysis.figures.scaling_laws import (  # noqa: E402
    fig_loc,
    fig_lofn,
    fig_lr,
    fig_nmse_vs_n,
    fig_subject_models,
)
from analysis.figures.shrinkage import fig_shrinkage  # noqa: E402
from analysis.figures.style import ARCH_COLORS, STYLE, save_figure  # noqa: E402
from analysis.figures.training import fig_curves, fig_dead, fig_layers  # noqa: E402
from analysis.results import Sweeps, load_curves, load_layers, load_recovery, load_runs, sweep_dirs  # noqa: E402
from analysis.sweep_fits import sweep_fits, with_convergence  # noqa: E402
from sae_core.errors import DataError  # noqa: E402

__all__ = ["SkipFigure", "STYLE", "ARCH_COLORS", "FIGURES", "render_all", "save_figure", "fig_loc", "fig_lofn",
           "fig_frontier", "fig_nmse_vs_n", "fig_lr", "fig_downstream", "fig_dead", "fig_recovery", "fig_curves",
           "fig_layers", "fig_width_ladder", "fig_latent_density",
           "fig_layer_spread", "fig_adjacent_cosine", "fig_shrinkage", "fig_ablation_sparsity", "fig_subject_models",
           "fig_multi_vs_per_layer", "fig_probe"]

FIGURES: dict[str, Callable[..., Figure]] = {
    "loc": fig_loc,
    "lofn": fig_lofn,
    "frontier": fig_frontier,
    "nmse_vs_n": fig_nmse_vs_n,
    "lr": fig_lr,
    "subject_models": fig_subject_models,
    "downstream": fig_downstream,
    "dead": fig_dead,
    "recovery": fig_recovery,
    "shrinkage": fig_shrinkage,
    "probe": fig_probe,
    "ablation_sparsity": fig_ablation_sparsity,
    "curves": fig_curves,
    "layers": fig_layers,
    "width_ladder": fig_width_ladder,
    "latent_density": fig_latent_density,
    "layer_spread": fig_layer_spread,
    "adjacent_cosine": fig_adjacent_cosine,
    "multi_vs_per_layer": fig_multi_vs_per_layer,
}


def render_all(sweep_dir: Sweeps, out_dir: str | Path | None = None, names: list[str] | None = None,
               fits: Fits | None = None, all_runs: bool = False) -> list[tuple[str, list[Path] | None, str | None]]:
    """Every figure of FIGURES (or `names`) the sweep's data support, saved as <out_dir>/<name>.png and .pdf
    (default out_dir: <sweep_dir>/figures). The tables are loaded once; the laws drawn are `fits`, else the
    sweep's fits.json (fitted and written first when missing or stale: analysis.sweep_fits.sweep_fits).
    Returns (name, paths, None) for each figure written and (name, None, reason) for each skipped. Every
    figure is closed. all_runs: also the rows of grid points since removed from the sweep. Several sweep
    folders are drawn together (analysis.results.load_table) into `out_dir`, which must then be given."""
    dirs = sweep_dirs(sweep_dir)
    sweep_dir = dirs[0] if len(dirs) == 1 else dirs
    if out_dir is None and len(dirs) > 1:
        raise DataError("figures of several sweeps: give the folder to write them to (--out)")
    out = Path(out_dir) if out_dir is not None else dirs[0] / "figures"
    runs, curves = load_runs(sweep_dir, all_runs), load_curves(sweep_dir, all_runs)
    if fits is None and not runs.empty:
        fits = sweep_fits(sweep_dir, all_runs)
    # the fits' convergence, so a figure can show the runs they left out as not converged
    tables = {"runs": with_convergence(runs, curves), "curves": curves,
              "recovery": load_recovery(sweep_dir, all_runs), "layers": load_layers(sweep_dir, all_runs),
              "sweep_dir": sweep_dir, "fits": fits}
    results = []
    for name in names or list(FIGURES):
        fn = FIGURES[name]
        args = [tables[p] for p in inspect.signature(fn).parameters]
        try:
            fig = fn(*args)
        except (SkipFigure, DataError) as err:
            results.append((name, None, str(err)))
            continue
        try:
            with plt.rc_context(STYLE):
                paths = save_figure(fig, out, name)
        finally:
            plt.close(fig)
        results.append((name, paths, None))
    return results
