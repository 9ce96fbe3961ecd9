"""The rows a figure draws and the laws it draws over them. The rows are chosen by the rules the fits use
(analysis.selection: usable runs, each cell at its best lr, series per family and sparsity value), so a legend's
law and the points under it come from the same runs; the laws are the sweep's fits (analysis.sweep_fits)."""
from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

from analysis.figures.style import (
    arch_color,
    arch_marker,
    family_order,
    fmt_value,
    key_label,
    sequential_colors,
    shades,
)
from analysis.fits import Fit
from analysis.frontier import lower_envelope
from analysis.selection import (
    SITE_KEYS,
    SPARSITY_KEYS,
    best_lr,
    families,
    group_label,
    l0_set_by_k,
    numeric,
    plain_value,
    series,
    varying_sites,
)
from analysis.sweep_fits import TITLES, find_fit, fit_runs

Fits = tuple[dict[str, Fit], dict[str, str]]  # as analysis.sweep_fits.fit_runs returns them
DOWNSTREAM_LABEL = {"ce": "ΔCE (nats/token)", "embedding_cosine": "1 − cos(pooled embedding)"}


class SkipFigure(Exception):
    """The data do not support this figure; the message says why, in one line."""


def ok_runs(runs: pd.DataFrame, need: tuple[str, ...] = ("nmse",),
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


def one_site(d: pd.DataFrame) -> tuple[pd.DataFrame, str, dict]:
    """The rows of the site (model, hook, layer) with the most runs, a note for the title when others were
    left out (comparing widths across layers would compare different activations), and the site as the fits
    name it in their groups (the site keys that vary in `d`)."""
    keys = [c for c in SITE_KEYS if c in d]
    vals = d[keys].astype(object).where(d[keys].notna(), None)
    site = pd.Series(list(map(tuple, vals.to_numpy())), index=d.index)
    counts = site.value_counts()
    if len(counts) <= 1:
        return d, "", {}
    best = sorted(counts.index, key=lambda s: (-counts[s], str(s)))[0]
    named = {k: v for k, v in zip(keys, best)}
    where = f"layer {fmt_value(named['layer'])}" if named.get("layer") is not None else "multi-layer SAEs"
    if "hook" in named and len({s[keys.index('hook')] for s in counts.index}) > 1:
        where = f"{named['hook']}, {where}"
    group = {k: plain_value(named[k]) for k in varying_sites(d)}
    return (d[site == best], f"{where} ({len(counts) - 1} other site{'s' * (len(counts) > 2)} not shown)", group)


def at_best_lr(d: pd.DataFrame, y: str = "nmse") -> tuple[pd.DataFrame, int]:
    """analysis.selection.best_lr, and how many runs it dropped."""
    kept, dropped = best_lr(d, y)
    return kept, len(dropped)


def lr_note(dropped: int) -> str:
    return f"best lr per config ({dropped} other runs not shown)" if dropped else ""


def styled_series(d: pd.DataFrame, k_only: bool = False, sequential: bool | None = None) -> list[dict]:
    """analysis.selection.series (only the families whose L0 is set by k with `k_only`), each as a dict: family,
    key, value, rows, group (as the fits name it), label, color, marker. Colors: a sequential map when every
    series is of one family (or `sequential`), else the family's color in shades; labels name the family only
    when there are several."""
    out = [{"family": s.family, "key": s.key, "value": s.value, "rows": s.rows, "group": s.group}
           for s in series(d) if not k_only or l0_set_by_k(s.family)]
    out.sort(key=lambda g: family_order(g["family"]))  # stable: each family's series keep their value order
    fams = {g["family"] for g in out}
    seq = sequential_colors(len(out)) if (len(fams) == 1 if sequential is None else sequential) else None
    for fam in fams:
        mine = [g for g in out if g["family"] == fam]
        for g, c in zip(mine, shades(arch_color(fam), len(mine))):
            g["color"] = c
    for i, g in enumerate(out):
        if seq is not None:
            g["color"] = seq[i]
        g["marker"] = arch_marker(g["family"])
        value = "" if g["key"] is None else key_label(g["key"], g["value"])
        g["label"] = (value or g["family"]) if len(fams) == 1 else " ".join(p for p in (g["family"], value) if p)
    return out


def by_n(rows: pd.DataFrame, y: str, how: str = "mean") -> tuple[np.ndarray, np.ndarray]:
    """Per n_latents, y's mean (over seeds) or min."""
    s = rows.groupby("n_latents")[y]
    s = s.mean() if how == "mean" else s.min()
    return s.index.to_numpy(float), s.to_numpy(float)


def pareto(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    keep = lower_envelope(x, y)
    return x[keep], y[keep]


def pick_n(d: pd.DataFrame, x: str, y: str) -> tuple[pd.DataFrame, float | None]:
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


def downstream_label(d: pd.DataFrame) -> str:
    metrics = d["downstream_metric"].dropna().unique() if "downstream_metric" in d else []
    if len(metrics) == 1:
        return DOWNSTREAM_LABEL.get(str(metrics[0]), f"downstream loss ({metrics[0]})")
    return "downstream loss"


# ---------------------------------------------------------------- the laws drawn

def sweep_laws(fits: Fits | None, runs: pd.DataFrame, curves: pd.DataFrame | None = None) -> Fits:
    """The sweep's fits as `sae-scaling fit` wrote them (render_all passes them in); a figure drawn on its
    own fits its tables by the same rules, without bootstrap (a figure needs the curve, not its interval)."""
    if fits is not None:
        return fits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fit_runs(runs, curves, n_boot=0)


def law_of(fits: Fits, law: str, group: dict) -> tuple[Fit | None, str]:
    """The fit of `law` for a series, or None and why it was not fitted."""
    hit = find_fit(fits[0], law, group)
    if hit is not None:
        return hit[1], ""
    return None, fits[1].get(f"{TITLES[law]} {group_label(group)}", "not fitted")


def formula(fit: Fit) -> str:
    return fit.formula + (" (at the token budget, not converged)" if fit.at_budget else "")


def grid(lo: float, hi: float, m: int = 60) -> np.ndarray:
    return np.geomspace(lo, hi, m) if hi > lo else np.array([lo])
