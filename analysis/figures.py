"""The figures of a sweep, in the style of the papers it reproduces (Gao et al. 2024 §6, Lawson et al. 2024,
Leask et al. 2025). One function per figure; each takes the tables it needs (analysis.results) and returns a
matplotlib Figure, or raises SkipFigure with a one-line reason when the data do not support it.

    paths = render_all("results/my-sweep")     # every figure the data support -> results/my-sweep/figures/
    fig = fig_frontier(load_runs("results/my-sweep"))

Conventions shared by every figure:
- runs with status "ok" only (curves: every run that has a runs row);
- the runs shown and the laws drawn are those of `sae-scaling fit` (analysis.selection, analysis.sweep_fits):
  where a sweep also varies the learning rate, each configuration at its best lr (lowest mean nmse over
  seeds), seeds kept as separate points; every legend's formula is the fit in fits.json;
- where a sweep reads several sites (hook, layer), a figure that compares widths or architectures shows the
  site with the most runs and says so in its title;
- series: the TopK family (topk, batchtopk, multi_topk) one per k, the L1 family (relu, gated, prolu) one per
  l1_coeff, jumprelu one per target_l0 / l0_coeff where swept; ProLU's two gradients are two families
  (prolu-ste, prolu-relu) when the sweep has the `gradient` column;
- artists carry a gid ("points", "fit", "frontier", "curve", "series", ...) so tests and callers can find them.
"""
from __future__ import annotations

import functools
import inspect
import math
import textwrap
import warnings
from pathlib import Path
from typing import Callable

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib import ticker  # noqa: E402
from matplotlib.colors import LogNorm, to_rgb  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from analysis.frontier import lower_envelope  # noqa: E402
from analysis.fits import Fit, loc_frontier  # noqa: E402
from analysis.results import load_curves, load_layers, load_recovery, load_runs  # noqa: E402
from analysis.selection import (SPARSITY_KEYS, best_lr, families, group_label, numeric, plain_value,  # noqa: E402
                                series, sparsity_key, varying_sites, width_ladders)
from analysis.sweep_fits import (CURVE_START, TITLES, find_fit, fit_runs, sweep_fits,  # noqa: E402
                                 with_convergence)
from sae_core.errors import DataError  # noqa: E402
from sae_core.io import write_atomic  # noqa: E402

__all__ = ["SkipFigure", "STYLE", "ARCH_COLORS", "FIGURES", "render_all", "fig_loc", "fig_lofn", "fig_frontier",
           "fig_nmse_vs_n", "fig_lr", "fig_downstream", "fig_dead", "fig_recovery", "fig_curves", "fig_layers",
           "fig_width_ladder"]


class SkipFigure(Exception):
    """The data do not support this figure; the message says why, in one line."""


# ---------------------------------------------------------------- style

DPI = 300
STYLE = {
    "font.family": "sans-serif",
    "font.sans-serif": ["DejaVu Sans", "Arial", "Helvetica"],
    "font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "legend.fontsize": 7, "legend.title_fontsize": 7,
    "xtick.labelsize": 8, "ytick.labelsize": 8,
    "axes.grid": True, "axes.grid.which": "major", "grid.alpha": 0.3, "grid.linewidth": 0.5,
    "axes.spines.top": False, "axes.spines.right": False, "axes.linewidth": 0.8,
    "lines.linewidth": 1.4, "lines.markersize": 4.5,
    "legend.frameon": False, "legend.handlelength": 1.8,
    "figure.dpi": 100, "savefig.dpi": DPI, "figure.constrained_layout.use": True,
    "pdf.fonttype": 42, "ps.fonttype": 42,  # editable text in the PDF
    "image.cmap": "viridis",
}
PANEL = (4.6, 3.6)  # inches per panel

# One fixed color (and marker) per architecture, the same in every figure.
ARCH_COLORS = {
    "topk": "#1f77b4", "batchtopk": "#17becf", "multi_topk": "#9467bd",
    "relu": "#d62728", "gated": "#2ca02c", "prolu": "#ff7f0e", "prolu-ste": "#ff7f0e", "prolu-relu": "#bcbd22",
    "jumprelu": "#8c564b",
}
ARCH_MARKERS = {"topk": "o", "batchtopk": "s", "multi_topk": "D", "relu": "^", "gated": "v", "prolu": "P",
                "prolu-ste": "P", "prolu-relu": "X", "jumprelu": "*"}
ARCH_ORDER = list(ARCH_COLORS)
OTHER_COLOR = "#7f7f7f"
TOPK_FAMILY = ("topk", "batchtopk", "multi_topk")
KEY_SYMBOL = {"k": "k", "l1_coeff": "λ", "target_l0": "target L0", "l0_coeff": "λ₀"}
THRESHOLD = 0.7  # Leask et al.: a latent of the larger SAE with max cosine below it is novel
MAX_RECOVERY_RUNS = 6
MAX_PANELS = 4
NMSE = "normalized MSE"
DOWNSTREAM_LABEL = {"ce": "ΔCE (nats/token)", "embedding_cosine": "1 − cos(pooled embedding)"}


def _figure(fn: Callable) -> Callable:
    """Draw under the paper style; a figure function that fails closes whatever it had opened."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        before = set(plt.get_fignums())
        try:
            with plt.rc_context(STYLE):
                fig = fn(*args, **kwargs)
                plain_value_log_ticks(fig)
                return fig
        except BaseException:
            for num in set(plt.get_fignums()) - before:
                plt.close(num)
            raise
    return wrapper


class _PlainLogFormatter(ticker.LogFormatter):
    """Log-axis tick labels as plain numbers (0.3, 0.6) instead of 3×10⁻¹, with LogFormatter's choice of
    which minor ticks to label."""
    def _num_to_string(self, x, vmin, vmax):
        return f"{x:.3g}"


def plain_value_log_ticks(fig: Figure) -> None:
    """Base-10 log axes whose range lies within 1e-3..1e4 get plain-number tick labels."""
    for ax in fig.axes:
        if ax.get_label() == "<colorbar>":
            continue
        for axis in (ax.xaxis, ax.yaxis):
            if axis.get_scale() != "log" or getattr(axis.get_transform(), "base", 10) != 10:
                continue
            lo, hi = axis.get_view_interval()
            if 1e-3 <= min(lo, hi) and max(lo, hi) <= 1e4:
                axis.set_major_formatter(_PlainLogFormatter())
                axis.set_minor_formatter(_PlainLogFormatter(labelOnlyBase=False, minor_thresholds=(1, 0.4)))


def _subplots(ncols: int = 1, nrows: int = 1, **kw) -> tuple[Figure, np.ndarray]:
    fig, axes = plt.subplots(nrows, ncols, figsize=(PANEL[0] * ncols, PANEL[1] * nrows), squeeze=False, **kw)
    return fig, axes.ravel()


def arch_color(family: str) -> str:
    return ARCH_COLORS.get(family, ARCH_COLORS.get(str(family).split("-")[0], OTHER_COLOR))


def _marker(family: str) -> str:
    return ARCH_MARKERS.get(family, ARCH_MARKERS.get(str(family).split("-")[0], "o"))


def _shades(color: str, m: int) -> list[tuple]:
    """m variants of one color, light to dark (series of one architecture, e.g. one per k)."""
    if m == 1:
        return [to_rgb(color)]
    rgb = np.array(to_rgb(color))
    out = []
    for f in np.linspace(-0.55, 0.35, m):
        target = np.ones(3) if f < 0 else np.zeros(3)
        out.append(tuple(rgb + abs(f) * (target - rgb)))
    return out


def _sequential(m: int) -> list[tuple]:
    return [tuple(plt.get_cmap("viridis")(x)[:3]) for x in np.linspace(0.05, 0.85, m)] if m > 1 else [to_rgb("#1f77b4")]


def _loglog(ax, x: bool = True, y: bool = True) -> None:
    if x:
        ax.set_xscale("log")
    if y:
        ax.set_yscale("log")


def _legend(ax, outside: bool = False, **kw) -> None:
    """The axes' legend; `outside`: below the figure (long fit formulas), as a figure legend."""
    handles, labels = ax.get_legend_handles_labels()
    if not handles:
        return
    if outside:
        ax.figure.legend(handles, [_wrap(t) for t in labels], loc="outside lower center", **kw)
    else:
        ax.legend(**kw)


def _wrap(text: str, width: int = 90) -> str:
    return "\n".join(textwrap.wrap(text, width, subsequent_indent="    ", break_long_words=False)) or text


def _title(target, main: str, *notes: str) -> None:
    """A title, and below it in one line the notes (what was left out) that apply."""
    notes = "; ".join(n for n in notes if n)
    text = main + (f"\n{notes}" if notes else "")
    (target.suptitle if isinstance(target, Figure) else target.set_title)(text)


def _log2_axis(axis, fmt: Callable[[float], str] | None = None, numticks: int = 8, values=None) -> None:
    """A log axis (base 2) for widths, L0 and learning rates: ticks at the measured `values` when there are at
    most 10 of them (e.g. n = 768, 1536, ...), else at powers of 2; labelled by `fmt` (default: widths)."""
    set_scale = axis.axes.set_xscale if axis is axis.axes.xaxis else axis.axes.set_yscale
    set_scale("log", base=2)
    axis.set_major_locator(ticker.LogLocator(base=2, numticks=numticks))
    axis.set_major_formatter(ticker.FuncFormatter(lambda v, _: (fmt or _n_label)(v)))
    axis.set_minor_locator(ticker.NullLocator())
    if values is not None:
        values = np.unique(np.asarray(values, float)[np.isfinite(np.asarray(values, float))])
        if 1 < len(values) <= 10:
            axis.set_major_locator(ticker.FixedLocator(values))


# ---------------------------------------------------------------- formatting

def _fmt(v) -> str:
    """A grid value for a label: 32, 0.0017, 1.5e+04."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)) or pd.isna(v):
        return "–"
    if isinstance(v, str):
        return v
    v = float(v)
    return str(int(v)) if v.is_integer() and abs(v) < 1e6 else f"{v:.3g}"


def _si(v: float) -> str:
    """16000000 -> 16M (token counts on points)."""
    if not np.isfinite(v):
        return ""
    for scale, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= scale:
            return f"{v / scale:.3g}{unit}"
    return f"{v:.3g}"


def _n_label(n: float) -> str:
    """A width: 4096, or 2¹⁷ for powers of two from 2¹⁴ on (the papers' notation)."""
    n = int(n)
    if n >= 2 ** 14 and n & (n - 1) == 0:
        return "2" + str(n.bit_length() - 1).translate(str.maketrans("0123456789", "⁰¹²³⁴⁵⁶⁷⁸⁹"))
    return str(n)


# ---------------------------------------------------------------- selecting rows

def _runs(runs: pd.DataFrame, need: tuple[str, ...] = ("nmse",),
          positive: tuple[str, ...] | None = None) -> pd.DataFrame:
    """Runs with status ok and finite `need` columns (positive where in `positive`, default: all of them);
    numeric columns as floats, a `family` column. SkipFigure if nothing is left."""
    if runs is None or runs.empty:
        raise SkipFigure("no finished runs")
    missing = [c for c in ("n_latents", *need) if c not in runs]
    if missing:
        raise SkipFigure(f"the runs table has no {', '.join(missing)} column")
    d = runs
    if "status" in d:
        d = d[d["status"].astype(str) == "ok"]
    if d.empty:
        raise SkipFigure("no run finished with status ok")
    d = d.copy()
    for c in ("n_latents", "lr", "nmse", "mse", "l0", "l1", "dead_frac", "dead_frac_eval", "tokens", "flops",
              "downstream_loss", "downstream_kl", *SPARSITY_KEYS, *need):
        if c in d:
            d[c] = numeric(d, c)
    d["family"] = families(d)
    positive = need if positive is None else positive
    ok = np.ones(len(d), bool)
    for c in need:
        v = d[c].to_numpy(float)
        ok &= np.isfinite(v) & ((v > 0) if c in positive else True)
    d = d[ok & np.isfinite(d["n_latents"].to_numpy(float))]
    if d.empty:
        raise SkipFigure(f"no ok run has {' and '.join(need)}" + (" > 0" if positive else "") if need
                         else "no ok run has n_latents")
    return d


def _site_key(d: pd.DataFrame) -> tuple[list[str], pd.Series]:
    keys = [c for c in ("model", "hook", "layer") if c in d]
    if not keys:
        return keys, pd.Series([()] * len(d), index=d.index)
    vals = d[keys].astype(object).where(d[keys].notna(), None)
    return keys, pd.Series(list(map(tuple, vals.to_numpy())), index=d.index)


def _one_site(d: pd.DataFrame) -> tuple[pd.DataFrame, str, dict]:
    """The rows of the site (model, hook, layer) with the most runs, a note for the title when others were
    left out (comparing widths across layers would compare different activations), and the site as the fits
    name it in their groups (the site keys that vary in `d`)."""
    keys, site = _site_key(d)
    counts = site.value_counts()
    if len(counts) <= 1:
        return d, "", {}
    best = sorted(counts.index, key=lambda s: (-counts[s], str(s)))[0]
    named = {k: v for k, v in zip(keys, best)}
    where = f"layer {_fmt(named['layer'])}" if named.get("layer") is not None else "multi-layer SAEs"
    if "hook" in named and len({s[keys.index('hook')] for s in counts.index}) > 1:
        where = f"{named['hook']}, {where}"
    group = {k: plain_value(named[k]) for k in varying_sites(d)}
    return (d[site == best], f"{where} ({len(counts) - 1} other site{'s' * (len(counts) > 2)} not shown)", group)


def _at_best_lr(d: pd.DataFrame, y: str = "nmse") -> tuple[pd.DataFrame, int]:
    """analysis.selection.best_lr, and how many runs it dropped."""
    kept, dropped = best_lr(d, y)
    return kept, len(dropped)


def _family_order(f: str) -> tuple:
    base = f.split("-")[0]
    return (ARCH_ORDER.index(f) if f in ARCH_ORDER else ARCH_ORDER.index(base) if base in ARCH_ORDER
            else len(ARCH_ORDER), f)


def _groups(d: pd.DataFrame, topk_only: bool = False, sequential: bool | None = None) -> list[dict]:
    """Series: per family, one per value of its sparsity key (k, l1_coeff, ...), else one for the family.
    Each: family, key, value, rows, group (as the fits name it, analysis.selection.series), label, color,
    marker. Colors: a sequential map when every series is of
    one family (or `sequential`), else the family's color in shades; labels name the family only when there
    are several."""
    out = [{"family": s.family, "key": s.key, "value": s.value, "rows": s.rows, "group": s.group}
           for s in series(d) if not topk_only or s.family in TOPK_FAMILY]
    out.sort(key=lambda g: _family_order(g["family"]))  # stable: each family's series keep their value order
    fams = {g["family"] for g in out}
    seq = _sequential(len(out)) if (len(fams) == 1 if sequential is None else sequential) else None
    for fam in fams:
        mine = [g for g in out if g["family"] == fam]
        for g, c in zip(mine, _shades(arch_color(fam), len(mine))):
            g["color"] = c
    for i, g in enumerate(out):
        if seq is not None:
            g["color"] = seq[i]
        g["marker"] = _marker(g["family"])
        value = "" if g["key"] is None else f"{KEY_SYMBOL[g['key']]}={_fmt(g['value'])}"
        g["label"] = (value or g["family"]) if len(fams) == 1 else " ".join(p for p in (g["family"], value) if p)
    return out


def _by_n(rows: pd.DataFrame, y: str, how: str = "mean") -> tuple[np.ndarray, np.ndarray]:
    """Per n_latents, y's mean (over seeds) or min."""
    s = rows.groupby("n_latents")[y]
    s = s.mean() if how == "mean" else s.min()
    return s.index.to_numpy(float), s.to_numpy(float)


def _pareto(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    keep = lower_envelope(x, y)
    return x[keep], y[keep]


def _pick_n(d: pd.DataFrame, x: str, y: str) -> tuple[pd.DataFrame, float | None]:
    """Gao et al. compare families at one width: the n at which the most families have >= 2 distinct x
    values (the largest such n on ties); None (all rows) when no family has 2 at any n."""
    d = d[np.isfinite(d[x]) & (d[x] > 0) & np.isfinite(d[y])]
    counts = d.groupby(["n_latents", "family"])[x].nunique()
    counts = counts[counts >= 2]
    if counts.empty:
        return d, None
    per_n = counts.groupby(level=0).size()
    n = max(per_n.index, key=lambda v: (per_n[v], v))
    return d[d["n_latents"] == n], float(n)


Fits = tuple[dict[str, Fit], dict[str, str]]  # as analysis.sweep_fits.fit_runs returns them


def _laws(fits: Fits | None, runs: pd.DataFrame, curves: pd.DataFrame | None = None) -> Fits:
    """The sweep's fits as `sae-scaling fit` wrote them (render_all passes them in); a figure drawn on its
    own fits its tables by the same rules, without bootstrap (a figure needs the curve, not its interval)."""
    if fits is not None:
        return fits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fit_runs(runs, curves, n_boot=0)


def _law(fits: Fits, law: str, group: dict) -> tuple[Fit | None, str]:
    """The fit of `law` for a series, or None and why it was not fitted."""
    hit = find_fit(fits[0], law, group)
    if hit is not None:
        return hit[1], ""
    return None, fits[1].get(f"{TITLES[law]} {group_label(group)}", "not fitted")


def _formula(fit: Fit) -> str:
    return fit.formula + (" (at the token budget, not converged)" if fit.at_budget else "")


def _grid(lo: float, hi: float, m: int = 60) -> np.ndarray:
    return np.geomspace(lo, hi, m) if hi > lo else np.array([lo])


def _lr_note(dropped: int) -> str:
    return f"best lr per config ({dropped} other runs not shown)" if dropped else ""


# ---------------------------------------------------------------- 1. L(C)

@_figure
def fig_loc(curves: pd.DataFrame, runs: pd.DataFrame, fits: Fits | None = None) -> Figure:
    """Gao et al. Fig. 1 left: every run's training curve (nmse vs SAE training FLOPs, thin), per series
    (architecture × k) with at least 2 widths the compute frontier (lower envelope of the curves, from 10% of each run's tokens on)
    and the fitted L(C) = c + a·C^b, log-log."""
    if curves is None or curves.empty:
        raise SkipFigure("no training curves")
    for c in ("run_id", "flops", "nmse"):
        if c not in curves:
            raise SkipFigure(f"the curves table has no {c} column")
    d, note, site = _one_site(_runs(runs, ("nmse",)))
    c = curves[curves["run_id"].isin(d["run_id"])].copy()
    c["flops"], c["nmse"], c["tokens"] = numeric(c, "flops"), numeric(c, "nmse"), numeric(c, "tokens")
    c = c[np.isfinite(c["flops"]) & (c["flops"] > 0) & np.isfinite(c["nmse"]) & (c["nmse"] > 0)]
    if c.empty:
        raise SkipFigure("no curve point with flops > 0 and nmse > 0 for an ok run")
    laws = _laws(fits, runs, curves)
    fig, (ax,) = _subplots()
    n_fits = 0
    for g in _groups(d):
        mine = c[c["run_id"].isin(g["rows"]["run_id"])]
        if mine.empty:
            continue
        for _, run in mine.groupby("run_id", sort=True):
            run = run.sort_values("flops")
            ax.plot(run["flops"], run["nmse"], color=g["color"], lw=0.6, alpha=0.35, gid="curve")
        if g["rows"]["n_latents"].nunique() < 2:  # one width: a single curve, no frontier across sizes
            continue
        if mine["tokens"].notna().all():
            mine = mine[mine["tokens"] >= CURVE_START * mine.groupby("run_id")["tokens"].transform("max")]
        front = loc_frontier(mine)
        dots = ax.plot(front["flops"], front["nmse"], ls="none", marker=g["marker"], ms=3, color=g["color"],
                       gid="frontier")[0]
        fit, why = _law(laws, "loc", {**g["group"], **site})
        if fit is None:
            dots.set_label(f"{g['label']} frontier (no fit: {why})")
            continue
        x = _grid(front["flops"].min(), front["flops"].max())
        ax.plot(x, fit.predict(flops=x), color=g["color"], lw=1.6, gid="fit", label=f"{g['label']}: {_formula(fit)}")
        n_fits += 1
    _loglog(ax)
    ax.set_xlabel("SAE training FLOPs")
    ax.set_ylabel(NMSE)
    _title(ax, "L(C): compute frontier (markers) and fits; thin: every run", note)
    _legend(ax, outside=True)
    return fig


# ---------------------------------------------------------------- 2. L(N), L(n, k)

@_figure
def fig_lofn(runs: pd.DataFrame, fits: Fits | None = None) -> Figure:
    """Gao et al. Fig. 1 right: converged nmse vs n_latents, one series per k (TopK family), with the joint
    L(n, k) fit drawn per k where it can be fitted (>= 2 k, >= 3 n, 7 cells), else an L(N) = c + a·n^b fit
    per k. A sweep without the TopK family: one series per architecture (and l1_coeff), each with its L(N)."""
    d, note, site = _one_site(_runs(runs, ("nmse",)))
    d, dropped = _at_best_lr(d)
    topk = d[d["family"].isin(TOPK_FAMILY)]
    groups = _groups(topk if not topk.empty else d)
    if not any(g["rows"]["n_latents"].nunique() >= 2 for g in groups):
        raise SkipFigure("needs some series (architecture, k) with at least 2 widths n_latents")
    laws = _laws(fits, runs)
    fig, (ax,) = _subplots()
    joint = {fam: fit for fam in {g["family"] for g in groups} & set(TOPK_FAMILY)
             if (fit := _law(laws, "joint", {"arch": fam, **site})[0]) is not None}
    labelled = set()
    any_unconverged, n_fits, why = False, 0, []
    for g in groups:
        rows = g["rows"].sort_values("n_latents")
        # converged == False (analysis.fits.convergence, merged in by render_all): the fits leave it out
        late = (rows["converged"].astype("boolean").eq(False).fillna(False).to_numpy(bool) if "converged" in rows
                else np.zeros(len(rows), bool))
        ax.plot(rows["n_latents"][~late], rows["nmse"][~late], ls="none", marker=g["marker"], color=g["color"],
                gid="points", label=g["label"])
        if late.any():
            any_unconverged = True
            ax.plot(rows["n_latents"][late], rows["nmse"][late], ls="none", marker=g["marker"], mfc="none",
                    color=g["color"], gid="unconverged")
        lo, hi = rows["n_latents"].min(), rows["n_latents"].max()
        x = _grid(lo, hi)
        fit = joint.get(g["family"])
        if fit is not None and g["key"] == "k" and g["value"] is not None:
            label = "_nolegend_"
            if g["family"] not in labelled:
                labelled.add(g["family"])
                label = f"{g['family']} L(n,k): {_formula(fit)}"
            ax.plot(x, fit.predict(n_latents=x, k=np.full_like(x, g["value"])), color=g["color"], gid="fit",
                    label=label)
            n_fits += 1
            continue
        fit, reason = _law(laws, "lofn", {**g["group"], **site})
        if fit is None:  # e.g. < 3 converged widths: the measured points, joined
            why.append(reason.removeprefix("fit_lofn: "))
            n, y = _by_n(rows, "nmse")
            ax.plot(n, y, color=g["color"], lw=0.8, alpha=0.6, gid="guide")
            continue
        ax.plot(x, fit.predict(n_latents=x), color=g["color"], gid="fit", label=f"{g['label']}: {_formula(fit)}")
        n_fits += 1
    _log2_axis(ax.xaxis, values=pd.concat([g["rows"]["n_latents"] for g in groups]))
    ax.set_yscale("log")
    ax.set_xlabel("n_latents")
    ax.set_ylabel(f"{NMSE} (end of training)")
    if any_unconverged:
        # left out of a fit unless the fit says "at the token budget" (too few converged: all are used)
        ax.plot([], [], ls="none", marker="o", mfc="none", color="gray", label="not converged")
    _title(ax, "L(n, k)" if joint else "L(N)", note, _lr_note(dropped), "" if n_fits else f"no fit: {why[0]}")
    _legend(ax, outside=True)
    return fig


# ---------------------------------------------------------------- 3. sparsity frontier

@_figure
def fig_frontier(runs: pd.DataFrame) -> Figure:
    """Gao et al. Fig. 2a: nmse vs L0 per architecture at one width (the n with the most architectures
    measured at >= 2 L0), each architecture's points and its Pareto frontier (lower envelope), log-log."""
    d, note, site = _one_site(_runs(runs, ("nmse", "l0")))
    d, dropped = _at_best_lr(d)
    d, n = _pick_n(d, "l0", "nmse")
    if n is None:
        raise SkipFigure("needs an architecture with at least 2 runs of different L0 at the same n_latents")
    fig, (ax,) = _subplots()
    for fam in sorted(d["family"].unique(), key=_family_order):
        rows = d[d["family"] == fam]
        color = arch_color(fam)
        ax.plot(rows["l0"], rows["nmse"], ls="none", marker=_marker(fam), color=color, alpha=0.5, gid="points")
        x, y = _pareto(rows["l0"].to_numpy(float), rows["nmse"].to_numpy(float))
        if rows["l0"].nunique() >= 2:
            ax.plot(x, y, color=color, marker=_marker(fam), gid="frontier", label=fam)
        else:
            ax.lines[-1].set_label(f"{fam} (one L0)")
    _log2_axis(ax.xaxis, _fmt)
    ax.set_yscale("log")
    ax.set_xlabel("L0 (active latents per token)")
    ax.set_ylabel(NMSE)
    _title(ax, f"sparsity frontier, n = {_n_label(n)}", note, _lr_note(dropped))
    _legend(ax)
    return fig


# ---------------------------------------------------------------- 4. nmse vs n per architecture

def _series_vs_n(ax, d: pd.DataFrame, y: str, how_other: str) -> int:
    """TopK family: one series per k (mean over seeds); other families: one per architecture, per n the
    `how_other` ("min": best, "mean") over its sparsity grid of the per-cell means. Returns series drawn."""
    drawn = 0
    other = d[~d["family"].isin(TOPK_FAMILY)]
    fams = sorted(other["family"].unique(), key=_family_order)
    n_fams = d["family"].nunique()
    for g in _groups(d, topk_only=True, sequential=n_fams == 1):
        n, v = _by_n(g["rows"], y)
        label = " ".join(p for p in (g["family"], "" if g["key"] is None else
                                     f"{KEY_SYMBOL[g['key']]}={_fmt(g['value'])}") if p)
        ax.plot(n, v, marker=g["marker"], color=g["color"], gid="series", label=label)
        drawn += 1
    for fam in fams:
        rows = other[other["family"] == fam]
        key = sparsity_key(rows)
        cells = rows.groupby(["n_latents"] + ([rows[key].fillna(-1.0)] if key else []))[y].mean()
        per_n = cells.groupby(level=0)
        per_n = per_n.min() if how_other == "min" else per_n.mean()
        label = fam + (f" ({'best' if how_other == 'min' else 'mean'} over {KEY_SYMBOL[key]})"
                       if key and rows[key].nunique() > 1 else "")
        ax.plot(per_n.index.to_numpy(float), per_n.to_numpy(float), marker=_marker(fam), color=arch_color(fam),
                gid="series", label=label)
        drawn += 1
    return drawn


@_figure
def fig_nmse_vs_n(runs: pd.DataFrame) -> Figure:
    """Gao et al. Fig. 2b: nmse vs n_latents per architecture: the TopK family one series per k, the others
    their best nmse at each n over their sparsity grid (l1_coeff ...), log-log."""
    d, note, site = _one_site(_runs(runs, ("nmse",)))
    d, dropped = _at_best_lr(d)
    if d["n_latents"].nunique() < 2:
        raise SkipFigure(f"needs at least 2 widths n_latents; the sweep has {_fmt(d['n_latents'].iloc[0])} only")
    fig, (ax,) = _subplots()
    _series_vs_n(ax, d, "nmse", "min")
    _log2_axis(ax.xaxis, values=d["n_latents"])
    ax.set_yscale("log")
    ax.set_xlabel("n_latents")
    ax.set_ylabel(NMSE)
    _title(ax, "NMSE vs width", note, _lr_note(dropped))
    _legend(ax)
    return fig


# ---------------------------------------------------------------- 5. learning rate

@_figure
def fig_lr(runs: pd.DataFrame, fits: Fits | None = None) -> Figure:
    """Gao et al. Fig. 3: nmse vs learning rate (log2 axis), one series per n_latents (and architecture / k
    when those vary), nmse averaged over seeds, each point annotated with its training tokens; the best lr of
    each n (analysis.fits.fit_lr) starred, with the lr*(n) law in the legend."""
    d, note, site = _one_site(_runs(runs, ("nmse", "lr")))
    key = [c for c in ("family", *SPARSITY_KEYS) if c in d and d[c].nunique(dropna=True) > 1]
    per_n = []
    for values, rows in d.groupby(["n_latents", *key], sort=True, dropna=False):
        if rows["lr"].nunique() >= 2:
            per_n.append((values if isinstance(values, tuple) else (values,), rows))
    if not per_n:
        raise SkipFigure("needs at least 2 learning rates at the same n_latents")
    fig, (ax,) = _subplots()
    colors = _sequential(len(per_n))
    for (values, rows), color in zip(per_n, colors):
        label = f"n={_n_label(values[0])}" + "".join(
            f", {v if k == 'family' else f'{KEY_SYMBOL[k]}={_fmt(v)}'}" for k, v in zip(key, values[1:]))
        per_lr = rows.groupby("lr")
        lr, y = per_lr["nmse"].mean().index.to_numpy(float), per_lr["nmse"].mean().to_numpy(float)
        ax.plot(lr, y, marker="o", color=color, gid="series", label=label)
        if "tokens" in rows:
            for xi, yi, t in zip(lr, y, per_lr["tokens"].mean()):
                ax.annotate(_si(t), (xi, yi), textcoords="offset points", xytext=(0, 4), ha="center", fontsize=6,
                            color=color, gid="tokens")
    groups = _groups(d)
    if len(groups) == 1 and d["n_latents"].nunique() >= 2:  # lr*(n) is a law of one architecture and k
        fit, _ = _law(_laws(fits, runs), "lr", {**groups[0]["group"], **site})
        if fit is not None:
            best = fit.extra["best"]
            best = best.rename(columns={"n": "n_latents"}) if "n_latents" not in best else best
            xs, ys = [], []
            for (values, rows), color in zip(per_n, colors):
                hit = best[best["n_latents"] == values[0]]
                if hit.empty:
                    continue
                per_lr = rows.groupby("lr")["nmse"].mean()
                b = float(hit["best_lr"].iloc[0])
                xs.append(b)
                ys.append(float(np.interp(np.log(b), np.log(per_lr.index.to_numpy(float)), per_lr.to_numpy(float))))
            ax.plot(xs, ys, ls="none", marker="*", ms=10, color="black", gid="best_lr",
                    label=f"best lr: {_formula(fit)}")
    lrs = np.concatenate([rows["lr"].to_numpy(float) for _, rows in per_n])
    _log2_axis(ax.xaxis, lambda v: f"{v:.2g}", values=lrs)
    ax.set_yscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel(NMSE)
    _title(ax, "NMSE vs learning rate (labels: training tokens)", note)
    _legend(ax, outside=True)
    return fig


# ---------------------------------------------------------------- 6. downstream loss

def _downstream_label(d: pd.DataFrame) -> str:
    metrics = d["downstream_metric"].dropna().unique() if "downstream_metric" in d else []
    if len(metrics) == 1:
        return DOWNSTREAM_LABEL.get(str(metrics[0]), f"downstream loss ({metrics[0]})")
    return "downstream loss"


@_figure
def fig_downstream(runs: pd.DataFrame) -> Figure:
    """Gao et al. ΔCE figure: the downstream loss of splicing the reconstruction into the model (ΔCE for an
    LM, 1 − cos of the pooled embedding for an encoder) (a) vs L0 per architecture at one width, with each
    architecture's lower envelope; (b) vs n_latents, TopK series per k, others their best per n."""
    if (runs is not None and not runs.empty and "downstream_loss" in runs
            and numeric(runs, "downstream_loss").isna().all()):
        reasons = runs["downstream_null_reason"].dropna().unique() if "downstream_null_reason" in runs else []
        raise SkipFigure("downstream_loss is null for every run" + (f": {reasons[0]}" if len(reasons) else ""))
    d, note, site = _one_site(_runs(runs, ("downstream_loss",), positive=()))
    d, dropped = _at_best_lr(d, "downstream_loss")
    ylabel = _downstream_label(d)
    fig, axes = _subplots(2)
    ax = axes[0]
    left, n = _pick_n(d[np.isfinite(d["l0"]) & (d["l0"] > 0)] if "l0" in d else d.iloc[:0], "l0", "downstream_loss")
    for fam in sorted(left["family"].unique(), key=_family_order):
        rows = left[left["family"] == fam]
        color = arch_color(fam)
        ax.plot(rows["l0"], rows["downstream_loss"], ls="none", marker=_marker(fam), color=color, alpha=0.5,
                gid="points")
        x, y = _pareto(rows["l0"].to_numpy(float), rows["downstream_loss"].to_numpy(float))
        ax.plot(x, y, color=color, marker=_marker(fam), gid="frontier", label=fam)
    _log2_axis(ax.xaxis, _fmt)
    ax.set_xlabel("L0")
    ax.set_ylabel(ylabel)
    ax.set_title("vs L0" + ("" if n is None else f", n = {_n_label(n)}"))
    ax = axes[1]
    _series_vs_n(ax, d, "downstream_loss", "min")
    _log2_axis(ax.xaxis, values=d["n_latents"])
    ax.set_xlabel("n_latents")
    ax.set_ylabel(ylabel)
    ax.set_title("vs width")
    if (d["downstream_loss"] > 0).all():
        for ax in axes:
            ax.set_yscale("log")
    for ax in axes:
        _legend(ax)
    _title(fig, "downstream loss", note, _lr_note(dropped))
    return fig


# ---------------------------------------------------------------- 7. dead latents

@_figure
def fig_dead(runs: pd.DataFrame) -> Figure:
    """Gao et al. appendix (dead_ratio): fraction of dead latents at the end of training vs n_latents per
    architecture (TopK family one series per k; others the mean over their sparsity grid), log x."""
    d, note, site = _one_site(_runs(runs, ("dead_frac",), positive=()))
    d, dropped = _at_best_lr(d, "nmse") if np.isfinite(numeric(d, "nmse")).all() else (d, 0)
    if d["n_latents"].nunique() < 2:
        raise SkipFigure("needs at least 2 widths n_latents")
    fig, (ax,) = _subplots()
    _series_vs_n(ax, d, "dead_frac", "mean")
    _log2_axis(ax.xaxis, values=d["n_latents"])
    ax.set_ylim(bottom=0)
    ax.set_xlabel("n_latents")
    ax.set_ylabel("dead latents (fraction)")
    _title(ax, "dead latents vs width", note, _lr_note(dropped))
    _legend(ax)
    return fig


# ---------------------------------------------------------------- 8. progressive recovery

@_figure
def fig_recovery(recovery: pd.DataFrame, runs: pd.DataFrame) -> Figure:
    """Gao et al. Fig. 10 (progressive recovery): nmse vs test-time L0 when the activation is swapped for
    TopK(k') (solid) or JumpReLU(θ) (dashed), one color per run, the run's trained (L0, nmse) marked. At most
    6 runs: the widest of each (architecture, k or l1_coeff). A second panel for the downstream loss when
    the recovery table has it."""
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
    try:
        d = _runs(runs, ("nmse",))
    except SkipFigure:
        d = pd.DataFrame({"run_id": sorted(ids)})
    d = d[d["run_id"].isin(ids)]
    if d.empty:
        raise SkipFigure("the runs with recovery points have no ok row in the runs table")
    if "family" in d:  # the widest run of each (family, sparsity value)
        chosen = []
        for g in _groups(d):
            rows = g["rows"].sort_values(["n_latents", "run_id"])
            chosen.append((g, rows.iloc[-1]))
        if len(chosen) > MAX_RECOVERY_RUNS:
            chosen = [chosen[int(i)] for i in np.unique(np.linspace(0, len(chosen) - 1, MAX_RECOVERY_RUNS).round())]
    else:
        chosen = [(None, row) for _, row in d.head(MAX_RECOVERY_RUNS).iterrows()]
    panels = [("nmse", NMSE)]
    chosen_ids = [row["run_id"] for _, row in chosen]
    if rec[rec["run_id"].isin(chosen_ids)]["downstream_loss"].notna().any():
        panels.append(("downstream_loss", _downstream_label(runs if runs is not None else rec)))
    fig, axes = _subplots(len(panels))
    tab = [plt.get_cmap("tab10")(i) for i in range(10)]
    for i, (g, row) in enumerate(chosen):
        color = tab[i % 10] if g is None else g["color"]  # the run's series color, as in the other figures
        mine = rec[rec["run_id"] == row["run_id"]]
        label = row["run_id"] if g is None else (
            f"{g['family']} n={_n_label(row['n_latents'])}"
            + ("" if g["key"] is None else f" {KEY_SYMBOL[g['key']]}={_fmt(g['value'])}"))
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
        _log2_axis(ax.xaxis, _fmt)
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


# ---------------------------------------------------------------- 9. training curves

@_figure
def fig_curves(curves: pd.DataFrame, runs: pd.DataFrame) -> Figure:
    """Training curves, nmse vs tokens (log-log), colored by n_latents; one panel per architecture (the 4 with
    the most runs); line style per k / l1_coeff when a panel has at most 4 of them."""
    if curves is None or curves.empty:
        raise SkipFigure("no training curves")
    for c in ("run_id", "tokens", "nmse"):
        if c not in curves:
            raise SkipFigure(f"the curves table has no {c} column")
    d, note, site = _one_site(_runs(runs, ()))
    c = curves[curves["run_id"].isin(d["run_id"])].copy()
    c["tokens"], c["nmse"] = numeric(c, "tokens"), numeric(c, "nmse")
    c = c[np.isfinite(c["tokens"]) & (c["tokens"] > 0) & np.isfinite(c["nmse"]) & (c["nmse"] > 0)]
    counts = c.groupby("run_id").size()
    d = d[d["run_id"].isin(counts[counts >= 2].index)]
    if d.empty:
        raise SkipFigure("no ok run has a curve with 2 points (tokens > 0, nmse > 0)")
    per_fam = d["family"].value_counts()
    fams = sorted(per_fam.index, key=lambda f: (-per_fam[f], _family_order(f)))[:MAX_PANELS]
    fams = sorted(fams, key=_family_order)
    lo, hi = d["n_latents"].min(), d["n_latents"].max()
    norm = LogNorm(vmin=lo / 1.5 if lo == hi else lo, vmax=hi * 1.5 if lo == hi else hi)
    cmap = plt.get_cmap("viridis")
    fig, axes = _subplots(len(fams), sharey=True)
    styles = ["-", "--", ":", "-."]
    for ax, fam in zip(axes, fams):
        rows = d[d["family"] == fam]
        key = sparsity_key(rows)
        values = sorted(rows[key].dropna().unique()) if key else []
        style = {v: styles[i] for i, v in enumerate(values)} if 1 < len(values) <= len(styles) else {}
        for _, run in rows.sort_values(["n_latents", "run_id"]).iterrows():
            pts = c[c["run_id"] == run["run_id"]].sort_values("tokens")
            ax.plot(pts["tokens"], pts["nmse"], color=cmap(norm(run["n_latents"])), lw=1.0,
                    ls=style.get(run[key], "-") if key else "-", gid="curve")
        for v, ls in style.items():
            ax.plot([], [], color="gray", ls=ls, label=f"{KEY_SYMBOL[key]}={_fmt(v)}")
        _loglog(ax)
        ax.set_xlabel("training tokens")
        ax.set_title(fam)
        _legend(ax)
    axes[0].set_ylabel(NMSE)
    sm = plt.cm.ScalarMappable(norm=norm, cmap=cmap)
    bar = fig.colorbar(sm, ax=list(axes), label="n_latents", pad=0.01)
    widths = np.unique(d["n_latents"].to_numpy(float))
    bar.ax.yaxis.set_major_locator(ticker.FixedLocator(widths) if len(widths) <= 10
                                   else ticker.LogLocator(base=2, numticks=8))
    bar.ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: _n_label(v)))
    bar.ax.yaxis.set_minor_locator(ticker.NullLocator())
    omitted = len(per_fam) - len(fams)
    _title(fig, "training curves", note, f"{omitted} more architectures not shown" if omitted else "")
    return fig


# ---------------------------------------------------------------- 10. multi-layer SAEs

@_figure
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
        d = _runs(runs, ())
        d = d[d["run_id"].isin(lay["run_id"])]
    except SkipFigure:
        d = pd.DataFrame({"run_id": []})
    if d.empty:
        raise SkipFigure("no ok run has per-layer nmse")
    vary = [c for c in ("family", "n_latents", *SPARSITY_KEYS, "seed") if c in d and d[c].nunique(dropna=True) > 1]
    if not vary:
        vary = ["n_latents"]
    symbol = {"family": "", "n_latents": "n=", "seed": "seed ", **{k: f"{v}=" for k, v in KEY_SYMBOL.items()}}
    panels = [("nmse", NMSE)]
    if lay["downstream_loss"].notna().any():
        panels.append(("downstream_loss", _downstream_label(d)))
    d = d.sort_values([c for c in ("n_latents", *SPARSITY_KEYS, "run_id") if c in d])
    colors = _sequential(len(d))
    fig, axes = _subplots(len(panels))
    for (_, run), color in zip(d.iterrows(), colors):
        label = ", ".join(f"{symbol[c]}{_n_label(run[c]) if c == 'n_latents' else _fmt(run[c])}" for c in vary)
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
        _legend(ax)
    fig.suptitle("multi-layer SAEs: per-layer metrics")
    return fig


# ---------------------------------------------------------------- 11. SAE families

@_figure
def fig_width_ladder(sweep_dir: str | Path, runs: pd.DataFrame) -> Figure:
    """Leask et al. Fig. 7: for each width ladder (analysis.selection.width_ladders: SAEs of the same arch,
    sparsity, layer and seed, each at its best lr, differing in width) and each pair of consecutive widths,
    the histogram over the larger SAE's latents of their max decoder cosine to the smaller SAE's latents;
    latents left of the 0.7 line are novel. No activations needed: the decoders come from
    results/<sweep>/saes/<run_id>."""
    import torch

    from sae_core.evaluation.width_ladder import decoder_max_cosine
    from sae_core.sae import SAE

    families = width_ladders(runs) if runs is not None and not runs.empty else []
    if not families:
        raise SkipFigure("no two ok SAEs differ only in n_latents (same architecture, sparsity, layer and seed)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    saes_dir = Path(sweep_dir) / "saes"
    panels, missing = [], 0
    for named, rows in families:
        decs = []
        for _, run in rows.iterrows():
            try:
                sae = SAE.load(saes_dir / str(run["run_id"]), device=device)
                decs.append((int(run["n_latents"]), sae.net.W_dec.detach()))
            except DataError:
                missing += 1
        pairs = []
        for (ns, small), (nl, large) in zip(decs, decs[1:]):
            if small.shape[1] != large.shape[1]:
                continue
            pairs.append((ns, nl, decoder_max_cosine(large, small).cpu().numpy()))
        if pairs:
            title = ", ".join(f"{KEY_SYMBOL.get(k, k)}={_fmt(v)}" if k != "arch" else str(v)
                              for k, v in named.items() if v is not None and not pd.isna(v))
            panels.append((title, pairs))
    if not panels:
        raise SkipFigure("no family has two loadable SAEs with the same d_in"
                         + (f" ({missing} SAE folders missing under {saes_dir})" if missing else ""))
    shown = panels[:6]
    ncols = min(3, len(shown))
    nrows = math.ceil(len(shown) / ncols)
    fig, axes = _subplots(ncols, nrows, sharex=True)
    for ax, (title, pairs) in zip(axes, shown):
        colors = _sequential(len(pairs))
        lo = min(0.0, min(float(mc.min()) for _, _, mc in pairs))
        bins = np.linspace(lo, 1.0, 41)
        for (ns, nl, mc), color in zip(pairs, colors):
            novel = float((mc < THRESHOLD).mean())
            _, _, patches = ax.hist(mc, bins=bins, weights=np.full(len(mc), 1 / len(mc)), histtype="step",
                                    color=color, lw=1.4, label=f"{_n_label(ns)} → {_n_label(nl)}: {novel:.0%} novel")
            for p in patches:
                p.set_gid("hist")
        ax.axvline(THRESHOLD, color="black", ls="--", lw=1, gid="threshold", label=f"threshold {THRESHOLD}")
        ax.set_title(title)
        ax.set_xlabel("max cosine to the smaller SAE's latents")
        ax.set_ylabel("fraction of the larger SAE's latents")
        _legend(ax, loc="best", frameon=True, framealpha=0.85, edgecolor="none")
    for ax in axes[len(shown):]:
        ax.set_visible(False)
    more = len(panels) - len(shown)
    fig.suptitle("SAE families: decoder overlap of consecutive widths"
                 + (f" ({more} more families not shown)" if more else ""))
    return fig


# ---------------------------------------------------------------- all of them

FIGURES: dict[str, Callable[..., Figure]] = {
    "loc": fig_loc,
    "lofn": fig_lofn,
    "frontier": fig_frontier,
    "nmse_vs_n": fig_nmse_vs_n,
    "lr": fig_lr,
    "downstream": fig_downstream,
    "dead": fig_dead,
    "recovery": fig_recovery,
    "curves": fig_curves,
    "layers": fig_layers,
    "width_ladder": fig_width_ladder,
}


def save_figure(fig: Figure, out_dir: str | Path, name: str) -> list[Path]:
    """<out_dir>/<name>.png (300 dpi) and .pdf, each written under a temporary name and renamed."""
    paths = []
    for fmt in ("png", "pdf"):
        path = Path(out_dir) / f"{name}.{fmt}"
        write_atomic(path, lambda tmp, fmt=fmt: fig.savefig(tmp, format=fmt, dpi=DPI, bbox_inches="tight",
                                                             metadata={"CreationDate": None} if fmt == "pdf" else None))
        paths.append(path)
    return paths


def render_all(sweep_dir: str | Path, out_dir: str | Path | None = None, names: list[str] | None = None,
               fits: Fits | None = None, all_runs: bool = False) -> list[tuple[str, list[Path] | None, str | None]]:
    """Every figure of FIGURES (or `names`) the sweep's data support, saved as <out_dir>/<name>.png and .pdf
    (default out_dir: <sweep_dir>/figures). The tables are loaded once; the laws drawn are `fits`, else the
    sweep's fits.json (fitted and written first when missing or stale: analysis.sweep_fits.sweep_fits).
    Returns (name, paths, None) for each figure written and (name, None, reason) for each skipped. Every
    figure is closed. all_runs: also the rows of grid points since removed from the sweep."""
    sweep_dir = Path(sweep_dir)
    out = Path(out_dir) if out_dir is not None else sweep_dir / "figures"
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
