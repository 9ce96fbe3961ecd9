"""The scaling laws of a sweep (Gao et al. 2024 §3): L(C) over the compute frontier, L(N) and the joint L(n, k),
NMSE against width per architecture, and the learning rate's optimum lr*(n)."""
from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from analysis.figures.data import (
    Fits,
    SkipFigure,
    at_best_lr,
    by_n,
    formula,
    grid,
    law_of,
    lr_note,
    ok_runs,
    one_site,
    styled_series,
    sweep_laws,
)
from analysis.figures.style import (
    NMSE,
    add_legend,
    arch_color,
    arch_marker,
    family_order,
    fmt_value,
    key_label,
    key_symbol,
    log2_axis,
    loglog,
    n_label,
    paper_figure,
    sequential_colors,
    si,
    subplots,
    title_with_notes,
)
from analysis.fits import Fit, loc_frontier
from analysis.selection import SPARSITY_KEYS, l0_set_by_k, numeric, series, sparsity_key
from analysis.sweep_fits import CURVE_START

# ---------------------------------------------------------------- L(C)

def _frontier_and_law(ax, g: dict, mine: pd.DataFrame, laws: Fits, site: dict) -> None:
    """A series' compute frontier and its L(C); where there is no law, the frontier's label says why."""
    if mine["tokens"].notna().all():
        mine = mine[mine["tokens"] >= CURVE_START * mine.groupby("run_id")["tokens"].transform("max")]
    front = loc_frontier(mine)
    dots = ax.plot(front["flops"], front["nmse"], ls="none", marker=g["marker"], ms=3, color=g["color"],
                   gid="frontier")[0]
    fit, why = law_of(laws, "loc", {**g["group"], **site})
    if fit is None:
        dots.set_label(f"{g['label']} frontier (no fit: {why})")
        return
    x = grid(front["flops"].min(), front["flops"].max())
    ax.plot(x, fit.predict(flops=x), color=g["color"], lw=1.6, gid="fit", label=f"{g['label']}: {formula(fit)}")


@paper_figure
def fig_loc(curves: pd.DataFrame, runs: pd.DataFrame, fits: Fits | None = None) -> Figure:
    """Gao et al. Fig. 1 left: every run's training curve (nmse vs SAE training FLOPs, thin; a search's
    stopped runs too), per series
    (architecture × k) with at least 2 widths the compute frontier (lower envelope of the curves, from 10% of
    each run's tokens on) and the fitted L(C) = c + a·C^b, log-log."""
    if curves is None or curves.empty:
        raise SkipFigure("no training curves")
    for c in ("run_id", "flops", "nmse"):
        if c not in curves:
            raise SkipFigure(f"the curves table has no {c} column")
    # a search's stopped runs spent compute on the way to the frontier: their curves count, as in the L(C) fit
    shown = (runs.assign(status=runs["status"].astype(str).replace("stopped", "ok"))
             if runs is not None and "status" in runs else runs)
    d, note, site = one_site(ok_runs(shown, ("nmse",)))
    c = curves[curves["run_id"].isin(d["run_id"])].copy()
    c["flops"], c["nmse"], c["tokens"] = numeric(c, "flops"), numeric(c, "nmse"), numeric(c, "tokens")
    c = c[np.isfinite(c["flops"]) & (c["flops"] > 0) & np.isfinite(c["nmse"]) & (c["nmse"] > 0)]
    if c.empty:
        raise SkipFigure("no curve point with flops > 0 and nmse > 0 for an ok run")
    laws = sweep_laws(fits, runs, curves)
    fig, (ax,) = subplots()
    for g in styled_series(d):
        mine = c[c["run_id"].isin(g["rows"]["run_id"])]
        if mine.empty:
            continue
        frontier = g["rows"]["n_latents"].nunique() >= 2  # one width is a single curve: no frontier across sizes
        for i, (_, run) in enumerate(mine.groupby("run_id", sort=True)):
            run = run.sort_values("flops")
            # without a frontier (which carries the series' name) the curves name their series themselves
            label = f"{g['label']} (runs)" if i == 0 and not frontier else None
            ax.plot(run["flops"], run["nmse"], color=g["color"], lw=0.6, alpha=0.35, gid="curve", label=label)
        if frontier:
            _frontier_and_law(ax, g, mine, laws, site)
    loglog(ax)
    ax.set_xlabel("SAE training FLOPs")
    ax.set_ylabel(NMSE)
    title_with_notes(ax, "L(C): compute frontier (markers) and fits; thin: every run", note)
    add_legend(ax, outside=True)
    return fig


# ---------------------------------------------------------------- L(N), L(n, k)

def _points(ax, g: dict) -> bool:
    """A series' runs, those the fits leave out as not converged hollow; whether there were any of those."""
    rows = g["rows"].sort_values("n_latents")
    # converged == False (analysis.fits.convergence, merged in by render_all): the fits leave it out
    late = (rows["converged"].astype("boolean").eq(False).fillna(False).to_numpy(bool) if "converged" in rows
            else np.zeros(len(rows), bool))
    ax.plot(rows["n_latents"][~late], rows["nmse"][~late], ls="none", marker=g["marker"], color=g["color"],
            gid="points", label=g["label"])
    if late.any():
        ax.plot(rows["n_latents"][late], rows["nmse"][late], ls="none", marker=g["marker"], mfc="none",
                color=g["color"], gid="unconverged")
    return bool(late.any())


@paper_figure
def fig_lofn(runs: pd.DataFrame, fits: Fits | None = None) -> Figure:
    """Gao et al. Fig. 1 right: converged nmse vs n_latents, one series per k (the families whose L0 is set by
    k), with the joint L(n, k) fit drawn per k where it can be fitted (>= 2 k, >= 3 n, 7 cells), else an
    L(N) = c + a·n^b fit per k. A sweep without such a family: one series per architecture (and sparsity
    value), each with its L(N)."""
    d, note, site = one_site(ok_runs(runs, ("nmse",)))
    d, dropped = at_best_lr(d)
    by_k = d[d["family"].map(l0_set_by_k).astype(bool)]
    groups = styled_series(by_k if not by_k.empty else d)
    if not any(g["rows"]["n_latents"].nunique() >= 2 for g in groups):
        raise SkipFigure("needs some series (architecture, k) with at least 2 widths n_latents")
    laws = sweep_laws(fits, runs)
    fig, (ax,) = subplots()
    joint = {fam: fit for fam in {g["family"] for g in groups if l0_set_by_k(g["family"])}
             if (fit := law_of(laws, "joint", {"arch": fam, **site})[0]) is not None}
    labelled = set()
    any_unconverged, n_fits, why = False, 0, []
    for g in groups:
        any_unconverged |= _points(ax, g)
        x = grid(g["rows"]["n_latents"].min(), g["rows"]["n_latents"].max())
        fit = joint.get(g["family"])
        if fit is not None and g["key"] == "k" and g["value"] is not None:
            label = "_nolegend_" if g["family"] in labelled else f"{g['family']} L(n,k): {formula(fit)}"
            labelled.add(g["family"])
            ax.plot(x, fit.predict(n_latents=x, k=np.full_like(x, g["value"])), color=g["color"], gid="fit",
                    label=label)
            n_fits += 1
            continue
        fit, reason = law_of(laws, "lofn", {**g["group"], **site})
        if fit is None:  # e.g. < 3 converged widths: the measured points, joined
            why.append(reason.removeprefix("fit_lofn: "))
            n, y = by_n(g["rows"], "nmse")
            ax.plot(n, y, color=g["color"], lw=0.8, alpha=0.6, gid="guide")
            continue
        ax.plot(x, fit.predict(n_latents=x), color=g["color"], gid="fit", label=f"{g['label']}: {formula(fit)}")
        n_fits += 1
    log2_axis(ax.xaxis, values=pd.concat([g["rows"]["n_latents"] for g in groups]))
    ax.set_yscale("log")
    ax.set_xlabel("n_latents")
    ax.set_ylabel(f"{NMSE} (end of training)")
    if any_unconverged:
        # left out of a fit unless the fit says "at the token budget" (too few converged: all are used)
        ax.plot([], [], ls="none", marker="o", mfc="none", color="gray", label="not converged")
    title_with_notes(ax, "L(n, k)" if joint else "L(N)", note, lr_note(dropped), "" if n_fits else f"no fit: {why[0]}")
    add_legend(ax, outside=True)
    return fig


# ---------------------------------------------------------------- a metric vs width per architecture

def series_vs_n(ax, d: pd.DataFrame, y: str, how_other: str) -> None:
    """The families whose L0 is set by k: one series per k (mean over seeds); other families: one per
    architecture, per n the `how_other` ("min": best, "mean") over its sparsity grid of the per-cell means."""
    other = d[~d["family"].map(l0_set_by_k).astype(bool)]
    fams = sorted(other["family"].unique(), key=family_order)
    n_fams = d["family"].nunique()
    for g in styled_series(d, k_only=True, sequential=n_fams == 1):
        n, v = by_n(g["rows"], y)
        label = " ".join(p for p in (g["family"], "" if g["key"] is None else key_label(g["key"], g["value"])) if p)
        ax.plot(n, v, marker=g["marker"], color=g["color"], gid="series", label=label)
    for fam in fams:
        rows = other[other["family"] == fam]
        key = sparsity_key(rows)
        cells = rows.groupby(["n_latents"] + ([rows[key].fillna(-1.0)] if key else []))[y].mean()
        per_n = cells.groupby(level=0)
        per_n = per_n.min() if how_other == "min" else per_n.mean()
        label = fam + (f" ({'best' if how_other == 'min' else 'mean'} over {key_symbol(key)})"
                       if key and rows[key].nunique() > 1 else "")
        ax.plot(per_n.index.to_numpy(float), per_n.to_numpy(float), marker=arch_marker(fam), color=arch_color(fam),
                gid="series", label=label)


@paper_figure
def fig_nmse_vs_n(runs: pd.DataFrame) -> Figure:
    """Gao et al. Fig. 2b: nmse vs n_latents per architecture: one series per k where k sets L0, the others
    their best nmse at each n over their sparsity grid (l1_coeff ...), log-log."""
    d, note, _ = one_site(ok_runs(runs, ("nmse",)))
    d, dropped = at_best_lr(d)
    if d["n_latents"].nunique() < 2:
        raise SkipFigure(f"needs at least 2 widths n_latents; the sweep has {fmt_value(d['n_latents'].iloc[0])} only")
    fig, (ax,) = subplots()
    series_vs_n(ax, d, "nmse", "min")
    log2_axis(ax.xaxis, values=d["n_latents"])
    ax.set_yscale("log")
    ax.set_xlabel("n_latents")
    ax.set_ylabel(NMSE)
    title_with_notes(ax, "NMSE vs width", note, lr_note(dropped))
    add_legend(ax)
    return fig


# ---------------------------------------------------------------- learning rate

def _best_lr_stars(ax, fit: Fit, per_n: list) -> None:
    """The best lr of each width (analysis.fits.fit_lr), starred on its series, with the lr*(n) law."""
    best = fit.extra["best"]
    best = best.rename(columns={"n": "n_latents"}) if "n_latents" not in best else best
    xs, ys = [], []
    for values, rows in per_n:
        hit = best[best["n_latents"] == values[0]]
        if hit.empty:
            continue
        per_lr = rows.groupby("lr")["nmse"].mean()
        b = float(hit["best_lr"].iloc[0])
        xs.append(b)
        ys.append(float(np.interp(np.log(b), np.log(per_lr.index.to_numpy(float)), per_lr.to_numpy(float))))
    ax.plot(xs, ys, ls="none", marker="*", ms=10, color="black", gid="best_lr", label=f"best lr: {formula(fit)}")


@paper_figure
def fig_lr(runs: pd.DataFrame, fits: Fits | None = None) -> Figure:
    """Gao et al. Fig. 3: nmse vs learning rate (log2 axis), one series per n_latents (and architecture / k
    when those vary), nmse averaged over seeds, each point annotated with its training tokens; the best lr of
    each n (analysis.fits.fit_lr) starred, with the lr*(n) law in the legend."""
    d, note, site = one_site(ok_runs(runs, ("nmse", "lr")))
    key = [c for c in ("family", *SPARSITY_KEYS) if c in d and d[c].nunique(dropna=True) > 1]
    per_n = []
    for values, rows in d.groupby(["n_latents", *key], sort=True, dropna=False):
        if rows["lr"].nunique() >= 2:
            per_n.append((values if isinstance(values, tuple) else (values,), rows))
    if not per_n:
        raise SkipFigure("needs at least 2 learning rates at the same n_latents")
    fig, (ax,) = subplots()
    colors = sequential_colors(len(per_n))
    for (values, rows), color in zip(per_n, colors):
        label = f"n={n_label(values[0])}" + "".join(
            f", {v if k == 'family' else key_label(k, v)}" for k, v in zip(key, values[1:]))
        per_lr = rows.groupby("lr")
        lr, y = per_lr["nmse"].mean().index.to_numpy(float), per_lr["nmse"].mean().to_numpy(float)
        ax.plot(lr, y, marker="o", color=color, gid="series", label=label)
        if "tokens" in rows:
            for xi, yi, t in zip(lr, y, per_lr["tokens"].mean()):
                ax.annotate(si(t), (xi, yi), textcoords="offset points", xytext=(0, 4), ha="center", fontsize=6,
                            color=color, gid="tokens")
    groups = styled_series(d)
    if len(groups) == 1 and d["n_latents"].nunique() >= 2:  # lr*(n) is a law of one architecture and k
        fit, _ = law_of(sweep_laws(fits, runs), "lr", {**groups[0]["group"], **site})
        if fit is not None:
            _best_lr_stars(ax, fit, per_n)
    lrs = np.concatenate([rows["lr"].to_numpy(float) for _, rows in per_n])
    log2_axis(ax.xaxis, lambda v: f"{v:.2g}", values=lrs)
    ax.set_yscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel(NMSE)
    title_with_notes(ax, "NMSE vs learning rate (labels: training tokens)", note)
    add_legend(ax, outside=True)
    return fig


# ---------------------------------------------------------------- subject model size

@paper_figure
def fig_subject_models(runs: pd.DataFrame, fits: Fits | None = None) -> Figure:
    """Gao et al. 2024, §3.5 (subject model size): L(N) of one family and sparsity value for each subject model
    in one plot, each model's fitted exponent in the legend. Needs several models: a sweep whose `model` is a
    list, or `sae-scaling figures` over sweeps of different models. Per model, the site (hook, layer) with the
    most runs; the family and sparsity value shown is the one the most models have at >= 2 widths."""
    d = ok_runs(runs, ("nmse",))
    if "model" not in d or d["model"].nunique(dropna=True) < 2:
        raise SkipFigure("one subject model; the figure compares several (a `model` list in the sweep, or "
                         "`sae-scaling figures` over sweeps of different models)")
    d, dropped = at_best_lr(d)
    by_what: dict[tuple, dict] = {}
    for s in series(d):
        if s.rows["n_latents"].nunique() < 2:
            continue
        model = s.group.get("model")
        mine = by_what.setdefault((s.family, s.key, s.value), {})
        if model not in mine or len(s.rows) > len(mine[model].rows):
            mine[model] = s
    if not by_what:
        raise SkipFigure("no model has a series (architecture, sparsity value) with at least 2 widths")
    (family, key, value), per_model = max(
        by_what.items(), key=lambda kv: (len(kv[1]), sum(len(s.rows) for s in kv[1].values())))
    if len(per_model) < 2:
        raise SkipFigure("no architecture and sparsity value has at least 2 widths for 2 or more models")
    laws = sweep_laws(fits, runs)
    fig, (ax,) = subplots()
    for (model, s), color in zip(sorted(per_model.items(), key=lambda kv: str(kv[0])),
                                 sequential_colors(len(per_model))):
        n, y = by_n(s.rows, "nmse")
        ax.plot(n, y, ls="none", marker=arch_marker(family), color=color, gid="points")
        fit, why = law_of(laws, "lofn", s.group)
        if fit is None:
            ax.plot(n, y, color=color, lw=0.8, alpha=0.6, gid="guide", label=f"{model} (no fit: {why})")
            continue
        lo, hi = fit.ci.get("b", (np.nan, np.nan))
        x = grid(n.min(), n.max())
        ax.plot(x, fit.predict(n_latents=x), color=color, gid="fit",
                label=f"{model}: exponent {fit.params['b']:.3f} [{lo:.3f}, {hi:.3f}]")
    log2_axis(ax.xaxis, values=d["n_latents"])
    ax.set_yscale("log")
    ax.set_xlabel("n_latents")
    ax.set_ylabel(f"{NMSE} (end of training)")
    what = " ".join(p for p in (family, "" if key is None else key_label(key, value)) if p)
    title_with_notes(ax, f"L(N) per subject model ({what})", lr_note(dropped))
    add_legend(ax, outside=True)
    return fig
