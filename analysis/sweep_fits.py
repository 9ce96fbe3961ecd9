"""The laws a sweep's data support, fitted and written to `results/<sweep>/fits/` (fits.json, fits.parquet).

- L(N) per (arch, k) for the TopK family and per (arch, l1_coeff) for the L1 family: converged runs only
  (convergence judged from the curves, `analysis.fits.convergence`; unconverged runs are flagged).
- L(C) per (arch, k): the lower envelope of the training curves of every width, each curve from 10% of its
  run's tokens on (the first steps are a transient of the initialisation, not compute-efficient training).
- The joint law L(n, k) over the `topk` runs (at least 2 k and 3 n).
- lr*(n) where the sweep has at least 2 learning rates at each of at least 3 widths.
A law the data do not support is skipped with its reason.
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from analysis.fits import Fit, convergence, fit_joint, fit_lofn, fit_loc, fit_lr, fits_table
from analysis.results import load_curves, load_runs
from orchestrator.store import write_parquet_atomic
from sae_core.errors import DataError
from sae_core.io import write_json_atomic

LAWS = ("lofn", "loc", "joint", "lr")
CURVE_START = 0.1  # fraction of a run's tokens before its curve enters the L(C) frontier


def _label(keys: tuple, values) -> str:
    values = values if isinstance(values, tuple) else (values,)
    return ", ".join(f"{k}={v}" for k, v in zip(keys, values) if not pd.isna(v))


def _groups(runs: pd.DataFrame) -> list[tuple[tuple, pd.DataFrame]]:
    """(arch, k) for the TopK family, (arch, l1_coeff) for the L1 family, (arch,) otherwise."""
    out = []
    for arch, part in runs.groupby("arch"):
        key = "k" if part["k"].notna().any() else "l1_coeff" if part["l1_coeff"].notna().any() else None
        if key is None:
            out.append(((("arch",), arch), part))
        else:
            out += [((("arch", key), (arch, v)), g) for v, g in part.groupby(key)]
    return out


def fit_sweep(sweep_dir: str | Path, laws: tuple[str, ...] = LAWS) -> tuple[dict[str, Fit], dict[str, str]]:
    """Fits by name, and the reason each skipped law was skipped."""
    runs, curves = load_runs(sweep_dir), load_curves(sweep_dir)
    if runs.empty:
        raise DataError(f"{sweep_dir}: no finished runs to fit")
    runs = runs[runs.status == "ok"]
    if not curves.empty:
        runs = runs.merge(convergence(curves)[["run_id", "converged"]], on="run_id", how="left")
    fits: dict[str, Fit] = {}
    skipped: dict[str, str] = {}

    def attempt(name: str, fn, frame: pd.DataFrame | None = None):
        """fn(converged_only) -> Fit. When too few runs of `frame` converged, the law is fitted at the token
        budget instead: its name says so and `flagged` lists the unconverged runs it used."""
        try:
            fits[name] = fn(True)
            return
        except DataError as err:
            reason = str(err)
        if frame is not None and "not converged" in reason:
            try:
                fit = fn(False)
                fit.flagged = list(frame.run_id[frame.converged.eq(False).fillna(False)].astype(str))
                fits[f"{name} at the token budget"] = fit
                return
            except DataError as err:
                reason = str(err)
        skipped[name] = reason

    for (keys, values), part in _groups(runs):
        label = _label(keys, values)
        if "lofn" in laws:
            attempt(f"L(N) {label}", lambda conv, part=part: fit_lofn(part, converged_only=conv), part)
        if "loc" in laws and not curves.empty and part.n_latents.nunique() >= 2:
            mine = curves[curves.run_id.isin(part.run_id)]
            mine = mine[mine.tokens >= CURVE_START * mine.groupby("run_id").tokens.transform("max")]
            attempt(f"L(C) {label}", lambda conv, mine=mine: fit_loc(mine))
    if "joint" in laws:
        topk = runs[runs.arch == "topk"]
        attempt("L(n,k) topk", lambda conv: fit_joint(topk, converged_only=conv), topk)
    if "lr" in laws:
        by_n = runs.groupby("n_latents").lr.nunique()
        if (by_n >= 2).sum() >= 3:
            attempt("lr*(n)", lambda conv: fit_lr(runs))
        else:
            skipped["lr*(n)"] = "needs at least 2 learning rates at each of at least 3 widths"
    return fits, skipped


def write_fits(sweep_dir: str | Path, fits: dict[str, Fit], skipped: dict[str, str]) -> Path:
    out = Path(sweep_dir) / "fits"
    write_json_atomic(out / "fits.json", {"fits": {name: f.to_dict() for name, f in fits.items()},
                                          "skipped": skipped})
    if fits:
        table = fits_table(fits)
        write_parquet_atomic(out / "fits.parquet", json.loads(table.to_json(orient="records")))
    return out


def print_fits(fits: dict[str, Fit], skipped: dict[str, str], echo=print) -> None:
    for name, f in fits.items():
        ci = ", ".join(f"{k} [{lo:.3g}, {hi:.3g}]" for k, (lo, hi) in f.ci.items())
        hold = f.holdout.get("max_rel_error") if f.holdout else None
        echo(f"{name}: {f.formula}   (R² {f.r2:.3f}, {f.n_points} points"
             + (f", largest held out: {hold:.1%} error" if hold is not None else "") + ")")
        echo(f"    95% CI: {ci}")
        if f.flagged:
            echo(f"    not converged: {', '.join(f.flagged)}")
    for name, reason in skipped.items():
        echo(f"{name}: skipped ({reason})")
