"""Scaling-law fits for SAE sweeps (Gao et al. 2024 §1): L(N), L(C), the joint L(n, k) of eq. 3, and lr*(n).

    fit = fit_joint(runs)                  # one row per SAE: n_latents, k, nmse
    fit.params, fit.ci, fit.predict(n_latents=2**24, k=32), fit.predict_interval(n_latents=2**24, k=32)
    fit_lofn(runs, by=["arch", "k"])       # {group: Fit}, L = c + a·n^b per group
    fit_loc(curves)                        # lower envelope of all training curves, then L = c + a·C^b
    fit_lr(runs)                           # lr*(n) = a·n^b from an lr sweep
    fits_table({"L(N)": f1, "L(C)": f2})   # one row per fit, for reports

Every law is fitted by least squares on log L: the data span decades, and a relative error should count the
same at every size. Confidence intervals are 95% bootstrap percentile intervals (the data points resampled
with replacement, seeded, so a fit is reproducible); `holdout` refits without the largest sizes and reports
how well the law extrapolates to them, the use a scaling law is fitted for.
"""
from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from scipy.optimize import least_squares
from scipy.special import expit

from analysis.frontier import lower_envelope
from analysis.selection import best_lr, run_ids, usable
from sae_core.errors import DataError

N_BOOT = 200
SEED = 0
JOINT_PARAMS = ("alpha", "beta_k", "beta_n", "gamma", "zeta", "eta")
# Gao et al. eq. 3 (GPT-4, TopK): one of the starting points of fit_joint
PUBLISHED_JOINT = {"alpha": -0.50, "beta_k": 0.26, "beta_n": -0.017, "gamma": -0.042, "zeta": -1.32, "eta": -0.085}


def _num(v: Any) -> float | None:
    """A float for JSON; NaN and inf (not JSON) become None."""
    return float(v) if v is not None and np.isfinite(v) else None


@dataclass
class Fit:
    """One fitted law. `params` in the data's own units; `ci` 95% bootstrap percentile intervals; `r2` and
    `rmse_log` measured on log L; `x_range` the data range of each predictor (beyond it is extrapolation)."""
    law: str                                    # lofn | lofn_power | loc | joint | lr
    formula: str                                # with the fitted numbers, for legends
    params: dict[str, float]
    ci: dict[str, tuple[float, float]]
    r2: float
    rmse_log: float
    n_points: int
    x_range: dict[str, tuple[float, float]]
    holdout: dict | None = None                 # {"max_rel_error", "mean_rel_error", "n_held_out", "held_out"}
    flagged: list = field(default_factory=list)  # run_ids left out as not converged
    runs: list = field(default_factory=list)     # run_ids of the points (L(C): the runs its frontier came from)
    group: dict = field(default_factory=dict)    # which series of a sweep (analysis.selection.Series.group)
    at_budget: bool = False                      # fitted at the token budget: too few runs had converged
    extra: dict = field(default_factory=dict)    # law-specific: power_law, frontier, best, excluded
    variables: tuple[str, ...] = ()              # predict's arguments, in order
    model: Callable | None = field(default=None, repr=False)    # model(theta, *xs) -> prediction
    draws: np.ndarray | None = field(default=None, repr=False)  # bootstrap parameter draws, (B, len(params))

    def _inputs(self, args: tuple, kw: dict) -> tuple[list[np.ndarray], bool]:
        kw = {**dict(zip(self.variables, args)), **kw}
        if set(kw) != set(self.variables):
            raise TypeError(f"{self.law} fit: predict takes {', '.join(self.variables)}; got {', '.join(kw) or 'nothing'}")
        xs = [np.asarray(kw[v], dtype=float) for v in self.variables]
        return xs, all(x.ndim == 0 for x in xs)

    def predict(self, *args, **kw) -> float | np.ndarray:
        xs, scalar = self._inputs(args, kw)
        out = self.model(np.array(list(self.params.values())), *xs)
        return float(out) if scalar else out

    def predict_interval(self, *args, level: float = 0.95, **kw) -> tuple:
        """Percentile interval of the predictions of the bootstrap parameter draws."""
        xs, scalar = self._inputs(args, kw)
        if self.draws is None or not len(self.draws):
            nan = np.full(np.broadcast(*xs).shape, np.nan)
            return (float("nan"),) * 2 if scalar else (nan, nan)
        preds = np.array([self.model(t, *xs) for t in self.draws])
        q = 50 * (1 - level)
        low, high = np.percentile(preds, [q, 100 - q], axis=0)
        return (float(low), float(high)) if scalar else (low, high)

    def to_dict(self) -> dict:
        holdout = None if self.holdout is None else {
            k: (_num(v) if isinstance(v, (float, np.floating)) else
                [_num(x) for x in v] if isinstance(v, list) else int(v)) for k, v in self.holdout.items()}
        return {"law": self.law, "formula": self.formula,
                "params": {k: _num(v) for k, v in self.params.items()},
                "ci": {k: [_num(lo), _num(hi)] for k, (lo, hi) in self.ci.items()},
                "r2": _num(self.r2), "rmse_log": _num(self.rmse_log), "n_points": int(self.n_points),
                "x_range": {k: [_num(lo), _num(hi)] for k, (lo, hi) in self.x_range.items()},
                "holdout": holdout, "flagged": [str(r) for r in self.flagged], "runs": [str(r) for r in self.runs],
                "group": self.group, "at_budget": self.at_budget, "variables": list(self.variables),
                "draws": [[_num(v) for v in row] for row in (self.draws if self.draws is not None else [])],
                **({"best": json.loads(self.extra["best"].to_json(orient="records"))} if "best" in self.extra else {})}

    @classmethod
    def from_dict(cls, d: dict) -> Fit:
        """A fit as `to_dict` wrote it (fits.json), with predict and predict_interval working again."""
        none = float("nan")
        # in the model's order: a JSON writer may have sorted the keys
        params = {k: none if d["params"][k] is None else float(d["params"][k]) for k in PARAMS[d["law"]]}
        draws = np.array([[none if v is None else v for v in row] for row in d.get("draws", [])], dtype=float)
        extra = {"best": pd.DataFrame(d["best"])} if "best" in d else {}
        return cls(law=d["law"], formula=d["formula"], params=params, extra=extra,
                   ci={k: (none if lo is None else lo, none if hi is None else hi) for k, (lo, hi) in d["ci"].items()},
                   r2=none if d["r2"] is None else d["r2"], rmse_log=none if d["rmse_log"] is None else d["rmse_log"],
                   n_points=d["n_points"], x_range={k: tuple(v) for k, v in d["x_range"].items()},
                   holdout=d.get("holdout"), flagged=list(d.get("flagged", [])), runs=list(d.get("runs", [])),
                   group=dict(d.get("group", {})), at_budget=bool(d.get("at_budget", False)),
                   variables=tuple(d.get("variables", d["x_range"])), model=MODELS[d["law"]],
                   draws=draws.reshape(-1, len(params)))


# ---------------------------------------------------------------- the one generic fitter: solve, bootstrap, holdout

def _unit_resampler(units: np.ndarray, X: list[np.ndarray], y: np.ndarray) -> Callable:
    """Draws of whole units (all points of each drawn unit, as often as it is drawn): the points of one unit
    (the seeds of one cell) share its configuration and are not independent evidence about the law."""
    members = [np.flatnonzero(units == u) for u in np.unique(units)]

    def draw(rng):
        idx = np.concatenate([members[i] for i in rng.integers(0, len(members), len(members))])
        return [x[idx] for x in X], y[idx]
    return draw


def _build(law: str, names: Sequence[str], variables: Sequence[str], X: list[np.ndarray], y: np.ndarray,
           solve: Callable, model: Callable, formula: Callable, *, min_ok: Callable, hold: np.ndarray,
           n_boot: int, seed: int, units: np.ndarray | None = None, bounds: tuple | None = None) -> Fit:
    """Fit `solve(X, y, init) -> theta` to every point, bootstrap it, and refit without the `hold` points to
    see how it predicts them. `min_ok(X)` says whether a subset of the design still identifies the law.
    The bootstrap resamples `units` (one label per point; default: every point its own unit): a draw takes
    every point of each drawn unit. `bounds` (lower, upper) per parameter: the law's own constraints, which
    the small-sample scaling of the draws must not push them past."""
    theta = solve(X, y, None)
    res = np.log(model(theta, *X)) - np.log(y)
    ly = np.log(y)
    ss_tot = float(np.sum((ly - ly.mean()) ** 2))
    rng = np.random.default_rng(seed)
    units = np.arange(len(y)) if units is None else np.asarray(units)
    draw = _unit_resampler(units, X, y)
    draws = []
    for _ in range(n_boot):
        Xb, yb = draw(rng)
        if min_ok(Xb):  # a resample that misses too many design points cannot identify the law: skipped
            draws.append(solve(Xb, yb, theta))  # started from the full fit: same basin, much faster
    draws = np.array(draws, dtype=float).reshape(-1, len(names))
    # Resampling m units understates the spread of a p-parameter fit by about (m - p) / m in variance (the fit
    # chases each resample's noise); the usual small-sample correction scales the draws' deviations from the
    # fit back up. On eq. 3 data (45 cells, 6 parameters) it lifts the 95% intervals' measured coverage from
    # 0.89-0.94 to 0.92-0.96.
    m = len(np.unique(units))
    draws = theta + (draws - theta) * np.sqrt(m / max(m - len(names), 1))
    if bounds is not None:
        draws = np.clip(draws, *bounds)
    if len(draws):
        ci = {p: (float(lo), float(hi)) for p, lo, hi in zip(names, *np.percentile(draws, [2.5, 97.5], axis=0))}
    else:
        ci = {p: (float("nan"), float("nan")) for p in names}
    holdout = None
    keep = [x[~hold] for x in X]
    if hold.any() and min_ok(keep):
        held = model(solve(keep, y[~hold], None), *[x[hold] for x in X])
        rel = np.abs(held / y[hold] - 1)
        holdout = {"max_rel_error": float(rel.max()), "mean_rel_error": float(rel.mean()),
                   "n_held_out": int(hold.sum()), "held_out": sorted({float(v) for v in X[0][hold]})}
    return Fit(law=law, formula=formula(theta), params=dict(zip(names, map(float, theta))), ci=ci,
               r2=1 - float(np.sum(res ** 2)) / ss_tot if ss_tot > 0 else float("nan"),
               rmse_log=float(np.sqrt(np.mean(res ** 2))), n_points=len(y),
               x_range={v: (float(x.min()), float(x.max())) for v, x in zip(variables, X)},
               holdout=holdout, variables=tuple(variables), model=model, draws=draws)


def _power_law_model(t, x):
    return t[0] * x ** t[1]


def _offset_power_model(t, x):
    return t[2] + t[0] * x ** t[1]


def _offset_power_solver(x0: float) -> Callable:
    """Least squares on log L for L = c + a·x^b with a > 0, b ≤ 0, c ≥ 0. Internally x is divided by x0 (the
    data's geometric mean) so the amplitude is O(L) whatever the units (FLOPs ~ 1e15, fractions ~ 1e-7)."""
    def solve(X, y, init):
        lx, ly = np.log(X[0] / x0), np.log(y)

        def resid(t):
            return np.log(t[2] + t[0] * np.exp(t[1] * lx)) - ly

        def jac(t):
            e = np.exp(t[1] * lx)
            L = t[2] + t[0] * e
            return np.column_stack([e / L, t[0] * e * lx / L, 1 / L])

        lower, upper = [1e-12 * float(np.min(y)), -10.0, 0.0], [np.inf, 0.0, np.inf]
        if init is not None:  # original units -> scaled amplitude
            starts = [np.array([max(init[0] * x0 ** init[1], lower[0] * 10), min(init[1], -1e-6), max(init[2], 0)])]
        else:  # several floors c; for each, a straight line through log(y - c) gives a and b
            starts = []
            for frac in (0.0, 0.5, 0.9, 0.99):
                c0 = frac * float(np.min(y))
                b0, la0 = np.polyfit(lx, np.log(y - c0), 1) if len(np.unique(lx)) > 1 else (-0.1, np.log(np.mean(y)))
                starts.append(np.array([max(np.exp(la0), lower[0] * 10), float(np.clip(b0, -9.9, -1e-4)), c0]))
        best = min((least_squares(resid, s, jac=jac, bounds=(lower, upper), x_scale="jac") for s in starts),
                   key=lambda r: r.cost)
        A, b, c = best.x
        return np.array([A * x0 ** (-b), b, c])  # back to the original units of x
    return solve


def _solve_power_law(X, y, init):
    """L = a·x^b: a straight line on log-log axes, solved exactly."""
    b, la = np.polyfit(np.log(X[0]), np.log(y), 1)
    return np.array([np.exp(la), b])


def _fit_offset_power(x: np.ndarray, y: np.ndarray, *, law: str, var: str, symbol: str, lhs: str = "L",
                      offset: bool = True, hold_top: int = 1, n_boot: int = N_BOOT, seed: int = SEED,
                      units: np.ndarray | None = None) -> Fit:
    """L = c + a·x^b (offset) or L = a·x^b, with bootstrap CIs; holds out the `hold_top` largest distinct x."""
    names = ("a", "b", "c") if offset else ("a", "b")
    distinct = np.unique(x)
    hold = np.isin(x, distinct[-hold_top:])
    if offset:
        solve, model = _offset_power_solver(float(np.exp(np.mean(np.log(x))))), _offset_power_model
        formula = lambda t: f"{lhs} = {t[2]:.3g} + {t[0]:.3g}·{symbol}^{t[1]:.3g}"
    else:
        solve, model = _solve_power_law, _power_law_model
        formula = lambda t: f"{lhs} = {t[0]:.3g}·{symbol}^{t[1]:.3g}"
    # a > 0 always; an offset law also has b <= 0 (L falls with x) and c >= 0 (a loss floor)
    bounds = ([0, -np.inf, 0], [np.inf, 0, np.inf]) if offset else ([0, -np.inf], [np.inf, np.inf])
    return _build(law, names, [var], [x], y, solve, model, formula, hold=hold, n_boot=n_boot, seed=seed,
                  min_ok=lambda X: len(np.unique(X[0])) >= len(names), units=units, bounds=bounds)


# ---------------------------------------------------------------- selecting the rows a law is fitted to

def _require(df: pd.DataFrame, cols: Sequence[str], who: str) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise DataError(f"{who}: needs columns {', '.join(cols)}; missing {', '.join(missing)}")


def _need_distinct(values: np.ndarray, n: int, who: str, what: str, flagged: Sequence = ()) -> None:
    got = len(np.unique(values))
    if got < n:
        why = (f" among converged runs ({len(flagged)} left out as not converged; converged_only=False fits "
               "them at their token budget)") if len(flagged) else ""
        raise DataError(f"{who}: needs at least {n} distinct {what}, got {got}{why}")


def _select(runs: pd.DataFrame, who: str, cols: Sequence[str], converged_only: bool, y: str = "nmse",
            at_best_lr: bool = False):
    """Rows with status ok, a positive finite y and finite `cols` (analysis.selection.usable); with
    `at_best_lr`, each cell at its best lr (analysis.selection.best_lr: mean y over seeds, every lr of the cell
    competing, converged or not); then runs marked converged == False are dropped when converged_only and
    returned as `flagged` (NA means unknown and is kept). Every row left out is in `excluded`
    {run_id: reason}, so nothing disappears silently."""
    _require(runs, cols, who)
    d, excluded = usable(runs, y)
    for c in (c for c in cols if c != y):  # y: usable's check
        v = pd.to_numeric(d[c], errors="coerce").astype(float).to_numpy()
        bad = ~(np.isfinite(v) & (v > 0)) if c in ("n_latents", "lr") else ~np.isfinite(v)
        excluded.update({r: f"{c} missing or not positive" for r in run_ids(d)[bad]})
        d = d[~bad]
    if at_best_lr:
        d, dropped = best_lr(d, y)
        excluded.update(dropped)
    flagged: list[str] = []
    if converged_only and "converged" in d:
        bad = d["converged"].astype("boolean").eq(False).fillna(False).to_numpy(bool)
        flagged = list(run_ids(d)[bad])
        excluded.update({r: "not converged" for r in flagged})
        d = d[~bad]
    return d, flagged, excluded


def _column(d: pd.DataFrame, c: str) -> np.ndarray:
    return pd.to_numeric(d[c]).astype(float).to_numpy()


def _plain(v: Any) -> Any:
    return v.item() if isinstance(v, np.generic) else v


# ---------------------------------------------------------------- L(N)

def fit_lofn(runs: pd.DataFrame, by: str | Sequence[str] | None = None, converged_only: bool = True,
             n_boot: int = N_BOOT, seed: int = SEED) -> Fit | dict:
    """L(n) = c + a·n^b (a > 0, b ≤ 0, c ≥ 0: the irreducible loss) over the runs' final nmse. Where the runs
    hold several learning rates per width, each width at its best lr (analysis.selection.best_lr, as Gao et
    al. 2024 fit L(N)); every seed of it is a point, and the bootstrap resamples widths (all seeds of a drawn
    width together). `fit.runs` lists the runs used; `fit.extra["excluded"]` every other run with its reason;
    `fit.extra["power_law"]` the pure power law (c = 0) on the same points (its r2 is the case for the
    irreducible term). With `by`, one fit per group, returned as {group: Fit} (a value for one key, a tuple for
    several); groups with fewer than 3 distinct n_latents are skipped with a warning."""
    if by is not None:
        keys = [by] if isinstance(by, str) else list(by)
        _require(runs, ["n_latents", "nmse", *keys], "fit_lofn")
        out = {}
        for key, group in runs.groupby(keys, dropna=False, sort=True):
            key = _plain(key[0]) if len(keys) == 1 else tuple(map(_plain, key))
            try:
                out[key] = fit_lofn(group, None, converged_only, n_boot, seed)
            except DataError as err:
                named = dict(zip(keys, key if len(keys) > 1 else (key,)))
                warnings.warn(f"fit_lofn: skipped group {named}: {err}", stacklevel=2)
        if not out:
            raise DataError(f"fit_lofn: no group of {', '.join(keys)} has 3 distinct n_latents with status ok")
        return out
    d, flagged, excluded = _select(runs, "fit_lofn", ["n_latents", "nmse"], converged_only, at_best_lr=True)
    n, y = _column(d, "n_latents"), _column(d, "nmse")
    _need_distinct(n, 3, "fit_lofn", "n_latents", flagged)
    fit = _fit_offset_power(n, y, law="lofn", var="n_latents", symbol="n", n_boot=n_boot, seed=seed, units=n)
    fit.extra["power_law"] = _fit_offset_power(n, y, law="lofn_power", var="n_latents", symbol="n", offset=False,
                                               n_boot=n_boot, seed=seed, units=n)
    fit.flagged, fit.runs, fit.extra["excluded"] = flagged, list(run_ids(d)), excluded
    return fit


def convergence(curves: pd.DataFrame, window: float = 0.2, tol: float = 0.01, x: str = "tokens",
                y: str = "nmse") -> pd.DataFrame:
    """Whether each run had stopped improving. Rule: on log-tokens axes, take the last `window` fraction of
    the run's token range (from its first to its last logged point with tokens > 0); the run is converged if
    nmse at the end is less than `tol` (relative) below nmse at the start of that window (the start value
    interpolated in log tokens): last_rel_change = (nmse_start − nmse_end) / nmse_start < tol. A run that got
    worse counts as converged (it is not improving; divergence is the status column's business). A run with
    fewer than two logged points cannot be judged: converged False, last_rel_change NaN."""
    _require(curves, ["run_id", x, y], "convergence")
    rows = []
    for run_id, c in curves.groupby("run_id", sort=True):
        t, v = _column(c, x), _column(c, y)
        ok = np.isfinite(t) & (t > 0) & np.isfinite(v)
        t, v = t[ok], v[ok]
        order = np.argsort(t, kind="stable")
        lt, v = np.log(t[order]), v[order]
        if len(lt) < 2 or lt[-1] == lt[0]:
            rows.append((run_id, False, float("nan")))
            continue
        start = np.interp(lt[-1] - window * (lt[-1] - lt[0]), lt, v)
        change = float((start - v[-1]) / start)
        rows.append((run_id, change < tol, change))
    return pd.DataFrame(rows, columns=["run_id", "converged", "last_rel_change"])


# ---------------------------------------------------------------- L(C)

def loc_frontier(curves: pd.DataFrame, x: str = "flops", y: str = "nmse") -> pd.DataFrame:
    """The lower envelope of every run's curve points: sorted by x, a point is kept if its y is strictly
    below every y at smaller or equal x (a running minimum). Of exact duplicates (same x and y) the first in
    (x, y, run_id) order is kept. Rows with a non-finite x or y are ignored. Columns x, y, run_id."""
    _require(curves, ["run_id", x, y], "loc_frontier")
    d = curves[["run_id", x, y]].copy()
    d[x], d[y] = _column(d, x), _column(d, y)
    d = d[np.isfinite(d[x]) & np.isfinite(d[y])].sort_values("run_id", kind="mergesort")
    return d.iloc[lower_envelope(d[x].to_numpy(), d[y].to_numpy())][[x, y, "run_id"]].reset_index(drop=True)


def fit_loc(curves: pd.DataFrame, x: str = "flops", y: str = "nmse", x_min: float | None = None,
            x_max: float | None = None, holdout_frac: float = 0.2, n_boot: int = N_BOOT, seed: int = SEED) -> Fit:
    """L(C) = c + a·C^b over the compute frontier: the lower envelope of every run's training curve
    (`loc_frontier` over points with x > 0, so step 0 is left out; kept in `fit.extra["frontier"]`), fitted
    like L(N) over the frontier points with x_min ≤ x ≤ x_max (default: all of them). Set the range when the
    frontier's ends are not compute-limited: below the C at which the smallest run first gets near its best,
    the frontier is that run's warm-up; beyond the largest run's, a converged run's plateau. Both bend the
    fitted exponent. The holdout leaves out the largest `holdout_frac` of the fitted points (at least one).
    Neighbouring frontier points come from one run's autocorrelated curve, so the bootstrap resamples runs:
    each draw takes every frontier point of each drawn run. `fit.runs` are the runs on the fitted frontier.""" 
    _require(curves, ["run_id", x, y], "fit_loc")
    front = loc_frontier(curves[(pd.to_numeric(curves[x]) > 0) & (pd.to_numeric(curves[y]) > 0)], x, y)
    cx, cy = _column(front, x), _column(front, y)
    inside = (cx >= (-np.inf if x_min is None else x_min)) & (cx <= (np.inf if x_max is None else x_max))
    cx, cy, owner = cx[inside], cy[inside], front["run_id"].astype(str).to_numpy()[inside]
    _need_distinct(cx, 3, "fit_loc", f"{x} on the frontier" + ("" if x_min is None and x_max is None else " in range"))
    fit = _fit_offset_power(cx, cy, law="loc", var=x, symbol="C", hold_top=max(1, int(round(holdout_frac * len(cx)))),
                            n_boot=n_boot, seed=seed, units=owner)
    fit.extra["frontier"] = front
    fit.runs = sorted(set(owner))
    return fit


# ---------------------------------------------------------------- L(n, k), Gao et al. eq. 3

def _joint_solver(mk: float, mn: float) -> Callable:
    """Least squares on log L for eq. 3. Internally ln k and ln n are centred (by mk, mn): the same model,
    but α, β_k, β_n lose their strong correlation with γ, which keeps the optimiser well conditioned. The
    centred parameters are a linear map of the published ones, so the least-squares optimum is the same."""
    def to_centred(p):
        a, bk, bn, g, z, e = p
        return np.array([a + bk * mk + bn * mn + g * mk * mn, bk + g * mn, bn + g * mk, g, z + e * mk, e])

    def from_centred(q):
        a, bk, bn, g, z, e = q
        bk, bn = bk - g * mn, bn - g * mk
        return np.array([a - bk * mk - bn * mn - g * mk * mn, bk, bn, g, z - e * mk, e])

    def solve(X, y, init):
        u, v, ly = np.log(X[1]) - mk, np.log(X[0]) - mn, np.log(y)

        def terms(q):
            return q[0] + q[1] * u + q[2] * v + q[3] * u * v, q[4] + q[5] * u

        def resid(q):
            return np.logaddexp(*terms(q)) - ly

        def jac(q):  # d log(e^t1 + e^t2) = w dt1 + (1 - w) dt2, w = sigmoid(t1 - t2)
            t1, t2 = terms(q)
            w = expit(t1 - t2)
            return np.column_stack([w, w * u, w * v, w * u * v, 1 - w, (1 - w) * u])

        if init is not None:
            starts = [init]
        else:  # the published law, then generic splits of the mean loss between the two terms
            m = float(np.log(np.mean(y)))
            starts = [np.array(list(PUBLISHED_JOINT.values()))] + [
                from_centred(np.array([m + np.log(s), 0.0, bn, 0.0, m + np.log(1 - s), 0.0]))
                for s in (0.5, 0.8) for bn in (-0.1, -0.3)]
        fits = [least_squares(resid, to_centred(s), jac=jac, method="lm") for s in starts]
        return from_centred(min(fits, key=lambda r: r.cost).x)
    return solve


def _joint_model(t, n, k):
    a, bk, bn, g, z, e = t
    lk, ln = np.log(k), np.log(n)
    return np.exp(a + bk * lk + bn * ln + g * lk * ln) + np.exp(z + e * lk)


MODELS = {"lofn": _offset_power_model, "loc": _offset_power_model, "lofn_power": _power_law_model,
          "lr": _power_law_model, "joint": _joint_model}
PARAMS = {"lofn": ("a", "b", "c"), "loc": ("a", "b", "c"), "lofn_power": ("a", "b"), "lr": ("a", "b"),
          "joint": JOINT_PARAMS}  # each model's parameter order


def _joint_formula(t) -> str:
    def term(coef, label):
        return f" {'-' if coef < 0 else '+'} {abs(coef):.3g}·{label}"
    a, bk, bn, g, z, e = t
    return (f"L = exp({a:.3g}{term(bk, 'ln k')}{term(bn, 'ln n')}{term(g, 'ln k·ln n')})"
            f" + exp({z:.3g}{term(e, 'ln k')})")


def fit_joint(runs: pd.DataFrame, converged_only: bool = True, n_boot: int = N_BOOT, seed: int = SEED) -> Fit:
    """Gao et al. eq. 3: L(n, k) = exp(α + β_k ln k + β_n ln n + γ ln k ln n) + exp(ζ + η ln k), natural
    logs, fitted on log L from several starting points (the published coefficients among them), best kept.
    Rows without k (the L1 family) are left out and listed in extra["excluded"]. The holdout refits without
    the largest n (every k) and predicts it. predict(n_latents=..., k=...). As fit_lofn: each (n, k) cell at
    its best lr, seeds as points, the bootstrap resampling cells; `fit.runs` the runs used."""
    cols = ["n_latents", "k", "nmse"]
    d, flagged, excluded = _select(runs, "fit_joint", cols, converged_only, at_best_lr=True)
    n, k, y = _column(d, "n_latents"), _column(d, "k"), _column(d, "nmse")
    _need_distinct(n, 3, "fit_joint", "n_latents", flagged)
    _need_distinct(k, 2, "fit_joint", "k", flagged)
    if len(set(zip(n, k))) < 7:
        raise DataError(f"fit_joint: needs at least 7 distinct (n_latents, k) points for 6 parameters, "
                        f"got {len(set(zip(n, k)))}")

    def min_ok(X):
        return len(np.unique(X[0])) >= 3 and len(np.unique(X[1])) >= 2 and len(set(zip(*X))) >= 7

    fit = _build("joint", JOINT_PARAMS, ["n_latents", "k"], [n, k], y,
                 _joint_solver(float(np.mean(np.log(k))), float(np.mean(np.log(n)))), _joint_model, _joint_formula,
                 min_ok=min_ok, hold=n == n.max(), n_boot=n_boot, seed=seed, units=np.array(
                     [f"{a:g}/{b:g}" for a, b in zip(n, k)]))
    fit.flagged, fit.runs, fit.extra["excluded"] = flagged, list(run_ids(d)), excluded
    return fit


# ---------------------------------------------------------------- lr*(n)

def _best_lr(lr: np.ndarray, loss: np.ndarray) -> tuple[float, str, bool]:
    """The loss-minimising lr: the vertex of a parabola in log lr through the best lr and its two neighbours
    (clipped to their span) when there are 3 lrs or more and the parabola opens upwards, else the argmin.
    Also whether the best measured lr is at the edge of the grid (the optimum may lie outside it)."""
    order = np.argsort(lr)
    l, loss = np.log(lr[order]), loss[order]
    i = int(np.argmin(loss))
    edge = i in (0, len(l) - 1)
    if len(l) >= 3:
        w = slice(min(max(i - 1, 0), len(l) - 3), min(max(i - 1, 0), len(l) - 3) + 3)
        p = np.polyfit(l[w], loss[w], 2)
        if p[0] > 0:
            return float(np.exp(np.clip(-p[1] / (2 * p[0]), l[w][0], l[w][-1]))), "parabola", edge
    return float(np.exp(l[i])), "argmin", edge


def fit_lr(runs: pd.DataFrame, converged_only: bool = False, n_boot: int = N_BOOT, seed: int = SEED) -> Fit:
    """lr*(n) = a·n^b from an lr sweep (Gao et al. Fig. 3; the common reading is b = −1/2). Per n_latents,
    the best lr (`_best_lr`, nmse averaged over seeds at each lr; `extra["best"]`: n_latents, best_lr, method,
    at_edge), then a straight line on log-log axes. Not-converged runs are kept by default: at a fixed
    budget a too-small lr is exactly the run that has not converged, and dropping it would move the minimum."""
    d, flagged, excluded = _select(runs, "fit_lr", ["n_latents", "lr", "nmse"], converged_only)
    d = d.assign(n_latents=_column(d, "n_latents"), lr=_column(d, "lr"), nmse=_column(d, "nmse"))
    rows = []
    for n, g in d.groupby("n_latents", sort=True):
        m = g.groupby("lr", sort=True)["nmse"].mean()
        rows.append((n, *_best_lr(m.index.to_numpy(float), m.to_numpy(float)), len(m)))
    best = pd.DataFrame(rows, columns=["n_latents", "best_lr", "method", "at_edge", "n_lrs"])
    _need_distinct(best.n_latents.to_numpy(), 2, "fit_lr", "n_latents")
    fit = _fit_offset_power(best.n_latents.to_numpy(float), best.best_lr.to_numpy(float), law="lr", var="n_latents",
                            symbol="n", lhs="lr*", offset=False, n_boot=n_boot, seed=seed)
    fit.flagged, fit.runs, fit.extra["excluded"], fit.extra["best"] = flagged, list(run_ids(d)), excluded, best
    return fit


# ---------------------------------------------------------------- reports

def fits_table(fits: dict[str, Fit]) -> pd.DataFrame:
    """One row per fit: name, law, formula, each parameter with its CI (p, p_low, p_high), r2, rmse_log,
    n_points, holdout_max_rel_error. Parameters a law does not have are NaN."""
    rows = []
    for name, f in fits.items():
        row: dict[str, Any] = {"name": name, "law": f.law, "formula": f.formula}
        for p, v in f.params.items():
            row[p], (row[f"{p}_low"], row[f"{p}_high"]) = v, f.ci.get(p, (np.nan, np.nan))
        row.update(r2=f.r2, rmse_log=f.rmse_log, n_points=f.n_points,
                   holdout_max_rel_error=f.holdout["max_rel_error"] if f.holdout else np.nan)
        rows.append(row)
    table = pd.DataFrame(rows)
    tail = ["r2", "rmse_log", "n_points", "holdout_max_rel_error"]
    return table[[c for c in table.columns if c not in tail] + [c for c in tail if c in table.columns]]
